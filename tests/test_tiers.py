"""The seed's size tiers as LayerPusher.push lives them, against the real registry:
how many mount candidates it tries, in which order, how many existence checks
(HEAD blob) it sends, which store entries a failed mount removes, and the outcome.

Every expected number is the seed's (moby ``distribution/push_v2.go``, in
shared/seed/push_v2.reflowed.txt), written out here rather than read from
policy.py, so that policy.py is checked against the seed and not against itself:

- getMaxMountAndExistenceCheckAttempts: a layer up to 100 KiB tries 1 mount and
  1 check; up to 10 MiB (or of unknown size) 3 mounts and 1 check; larger, 4 mounts
  and 3 checks, those also with digests known from other repositories;
- Upload: one existence check first (``layerAlreadyExists(..., true, 1, ...)``: any
  repository's digest, the likeliest), then the mounts, then the tier's remaining
  checks (``maxExistenceChecks - len(pd.checkedDigests)``), then the upload, in the
  session the last failed mount opened (``layerUpload = lu``, the one before it
  cancelled);
- getRepositoryMountCandidates / sortV2MetadataByLikenessAndAge: same registry,
  never the target; our credentials' HMAC first, then more leading path components
  equal to the target's, then youngest first;
- the removal after a failed mount: the entry goes when the failure is not
  "unauthorised without auth info" (``hasAuthInfo``: a registry token, or a username
  and a password) and its HMAC is ours or empty; layerAlreadyExists removes a
  target-repository entry whose blob is unknown.

The client is a real RegistryClient that records each protocol step it is asked
for; faults come from the proxy in front of the real registry.
"""

from __future__ import annotations

import gzip
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from fault_proxy import FaultProxy, Rule
from images import LayoutWriter, layer_tar, random_layer

from batchpush.digest import Digest
from batchpush.layer_push import LayerPusher
from batchpush.metadata import MetadataStore
from batchpush.outcome import LayerOutcome, LayerResult
from batchpush.policy import V2Metadata, entry_hmac, hmac_key
from batchpush.prepare import PreparedLayer, Preparer
from batchpush.reference import Reference
from batchpush.registry.auth import Credentials
from batchpush.registry.client import BlobUpload, MountResult, RegistryClient, RegistryOptions, UploadSession
from batchpush.registry.errors import AuthError
from batchpush.sources import open_source
from batchpush.sources.base import FileRange
from batchpush.state import PushState

ALICE = Credentials("alice", "alice-secret-pw")
BOB = Credentials("bob", "bob-secret-pw")
#: a docker login through an identity token (e.g. an OAuth registry): no password
IDENTITY_TOKEN_ONLY = Credentials(identity_token="an-identity-token")
TARGET = "team/app/new"

#: the seed's numbers (getMaxMountAndExistenceCheckAttempts): tier -> (mounts, existence checks)
SEED_MOUNTS = {"small": 1, "middle": 3, "large": 4}
SEED_CHECKS = {"small": 1, "middle": 1, "large": 3}
TIERS = ["small", "middle", "large"]


# -- the recording client ----------------------------------------------------------
@dataclass
class Step:
    """One protocol step LayerPusher asked for, with its arguments and its answer."""

    name: str
    repository: str
    digest: Digest | None = None
    from_repository: str | None = None
    #: the upload location the step used (upload, cancel) or was given (a 202 mount, a start)
    location: str | None = None
    mounted: bool | None = None
    error: BaseException | None = None


class RecordingClient(RegistryClient):
    """A real client that records every blob step (head, mount, start, upload, cancel)
    and passes it through to the registry unchanged."""

    def __init__(self, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        super().__init__(*args, **kwargs)
        self.steps: list[Step] = []
        self._steps_lock = threading.Lock()

    def _record(self, step: Step) -> Step:
        with self._steps_lock:
            self.steps.append(step)
        return step

    def named(self, name: str) -> list[Step]:
        with self._steps_lock:
            return [s for s in self.steps if s.name == name]

    def head_blob(self, repository: str, digest: Digest) -> int | None:
        step = self._record(Step("head_blob", repository, digest))
        try:
            return super().head_blob(repository, digest)
        except BaseException as exc:
            step.error = exc
            raise

    def mount_blob(self, repository: str, digest: Digest, from_repository: str) -> MountResult:
        step = self._record(Step("mount_blob", repository, digest, from_repository))
        try:
            result = super().mount_blob(repository, digest, from_repository)
        except BaseException as exc:
            step.error = exc
            raise
        step.mounted = result.mounted
        step.location = result.session.location if result.session else None
        return result

    def start_upload(self, repository: str) -> UploadSession:
        step = self._record(Step("start_upload", repository))
        session = super().start_upload(repository)
        step.location = session.location
        return session

    def upload_blob(self, repository: str, upload: BlobUpload, blob: FileRange, digest: Digest, **kwargs) -> int:  # type: ignore[no-untyped-def]
        self._record(Step("upload_blob", repository, digest, location=upload.session.location))
        return super().upload_blob(repository, upload, blob, digest, **kwargs)

    def cancel_upload(self, repository: str, session: UploadSession) -> None:
        self._record(Step("cancel_upload", repository, location=session.location))
        super().cancel_upload(repository, session)


def client_for(host: str, credentials: Credentials | None = ALICE) -> RecordingClient:
    # one attempt's backoff is short (the retry policy's default), a test waits for it
    return RecordingClient(host, RegistryOptions(insecure=True), credentials)


# -- the layers, one per tier ------------------------------------------------------
@dataclass
class Layers:
    by_tier: dict[str, PreparedLayer]
    #: uncompressed beyond 100 KiB (the middle tier), compressed within it
    squeezed: PreparedLayer
    preparer: Preparer


@pytest.fixture(scope="module")
def layers(tmp_path_factory) -> Iterator[Layers]:
    """One uncompressed OCI layout, prepared once: a layer in each tier (incompressible,
    so its gzip is as large) and one that compresses across the small tier's line."""
    root = tmp_path_factory.mktemp("tiers")
    writer = LayoutWriter(str(root / "layout"))
    blobs = [random_layer(1, 40_000), random_layer(2, 1_000_000), random_layer(3, 10_700_000), layer_tar(9, files=3, file_size=60_000)]
    descriptor, _ = writer.image(blobs)
    writer.tag(descriptor, "1.0")
    os.makedirs(root / "spool")
    store = MetadataStore(str(root / "prepare-metadata"))
    preparer = Preparer(str(root / "spool"), store)
    prepared = preparer.prepare(open_source(f"oci:{root}/layout").images()[0].node)
    small, middle, large, squeezed = prepared.layers  # type: ignore[union-attr]
    # the tier is the seed's layer.Size(): the size of what Open() returns, the
    # uncompressed tar (uploadUsingSession compresses that stream as it sends it)
    assert small.source.descriptor.size <= 100 << 10 and small.size <= 100 << 10
    assert 100 << 10 < middle.source.descriptor.size <= 10 << 20
    assert large.source.descriptor.size > 10 << 20
    assert squeezed.source.descriptor.size > 100 << 10 >= squeezed.size
    yield Layers({"small": small, "middle": middle, "large": large}, squeezed, preparer)
    preparer.close()
    store.close()


@pytest.fixture
def store(tmp_path) -> Iterator[MetadataStore]:
    opened = MetadataStore(str(tmp_path / "metadata"))
    yield opened
    opened.close()


@pytest.fixture
def proxy(registry) -> Iterator[FaultProxy]:
    started = FaultProxy(registry.host)
    yield started
    started.stop()


# -- helpers -----------------------------------------------------------------------
def fake_digest(label: str) -> Digest:
    """The digest of another gzip of the layer that no repository holds."""
    return Digest.sha256_of(f"an unknown compression of the layer: {label}".encode())


def entry(host: str, repository: str, digest: Digest, credentials: Credentials | None, recipe: str = "") -> V2Metadata:
    """A store entry as a push with ``credentials`` would have recorded it (seed: TagAndAdd)."""
    name = f"{host}/{repository}"
    return V2Metadata(digest, name, entry_hmac(hmac_key(credentials), digest, name), recipe)


def unsigned(host: str, repository: str, digest: Digest) -> V2Metadata:
    """An entry without an HMAC (recorded by an anonymous push, or an old docker)."""
    return V2Metadata(digest, f"{host}/{repository}", "", "")


def seed_store(store: MetadataStore, layer: PreparedLayer, oldest_first: list[V2Metadata]) -> None:
    for item in oldest_first:
        store.add(layer.key, item)


def put_blob(host: str, repository: str, blob: FileRange, digest: Digest, credentials: Credentials | None = None) -> None:
    """Put a blob into a repository with a plain client (not recorded)."""
    client = RegistryClient(host, RegistryOptions(insecure=True), credentials)
    try:
        client.upload_blob(repository, BlobUpload(client.start_upload(repository)), blob, digest)
    finally:
        client.close()


def other_gzip(layer: PreparedLayer, directory: str) -> tuple[FileRange, Digest]:
    """Another real gzip of the same DiffID (another compressor's output)."""
    assert layer.source.blob is not None
    with layer.source.blob.open() as reader:
        data = gzip.compress(reader.read(), compresslevel=9, mtime=0)
    path = os.path.join(directory, "other.gz")
    with open(path, "wb") as out:
        out.write(data)
    return FileRange(path, 0, len(data)), Digest.sha256_of(data)


def push(client: RegistryClient, layers: Layers, store: MetadataStore, layer: PreparedLayer, credentials: Credentials | None = ALICE) -> LayerResult:
    pusher = LayerPusher(client, Reference(client.host, TARGET), PushState(), store, hmac_key(credentials), materialize=layers.preparer.materialize)
    return pusher.push(layer)


def held(store: MetadataStore, layer: PreparedLayer) -> list[tuple[str, Digest]]:
    """The store's entries for the layer, oldest first, as (repository, digest)."""
    return [(e.source_repository.split("/", 1)[1], e.digest) for e in store.get_metadata(layer.key)]


def mounts(client: RecordingClient) -> list[str]:
    return [s.from_repository or "" for s in client.named("mount_blob")]


def heads(client: RecordingClient) -> list[Digest | None]:
    assert {s.repository for s in client.named("head_blob")} <= {TARGET}, "existence checks go to the target repository only"
    return [s.digest for s in client.named("head_blob")]


# -- the tiers against stale candidates ----------------------------------------------
#: (repository, whose HMAC) oldest first; every digest a different unknown gzip
STALE = [("team/app/old", BOB), ("team/app/q", None), ("team/app/y", ALICE), (TARGET, ALICE), ("team/z", ALICE), ("other/b", BOB)]
#: the seed's likeness order of STALE for target team/app/new and alice's key:
#: alice's entries by matching path components (4, 3, 2), then the others by
#: components, the youngest first among equals (q is younger than old)
STALE_LIKENESS = [TARGET, "team/app/y", "team/z", "team/app/q", "team/app/old", "other/b"]


@pytest.mark.parametrize("tier", TIERS)
def test_stale_candidates_tried_checked_and_removed_per_tier(tier, registry, layers, store):
    """Seed: Upload with no candidate holding the blob. The first check HEADs the
    likeliest digest (the target's own entry: blob unknown, so removed); the tier's
    mounts go in likeness order, each a 202 whose session replaces (and cancels) the
    previous one; a large layer then checks two more digests; the upload uses the
    last mount's session. Tried entries with our HMAC or none are removed, bob's
    is kept, untried ones stay."""
    layer = layers.by_tier[tier]
    digests = {repository: fake_digest(repository) for repository, _ in STALE}
    seed_store(store, layer, [unsigned(registry.host, r, digests[r]) if who is None else entry(registry.host, r, digests[r], who) for r, who in STALE])
    client = client_for(registry.host)

    result = push(client, layers, store, layer)

    tried = ["team/app/y", "team/z", "team/app/q", "team/app/old"][: SEED_MOUNTS[tier]]
    assert mounts(client) == tried == [r for r in STALE_LIKENESS if r != TARGET][: SEED_MOUNTS[tier]]
    assert all(s.digest == digests[s.from_repository or ""] and s.mounted is False for s in client.named("mount_blob"))
    # the first check (any repository's digest, one), then the tier's remaining ones
    assert heads(client) == [digests[r] for r in STALE_LIKENESS][: SEED_CHECKS[tier]]
    assert result.outcome is LayerOutcome.UPLOADED and result.digest == layer.digest
    sessions = [s.location for s in client.named("mount_blob")]
    assert [s.location for s in client.named("cancel_upload")] == sessions[:-1]
    assert client.named("start_upload") == []
    assert [s.location for s in client.named("upload_blob")] == sessions[-1:]

    removed = {TARGET} | {r for r in tried if r != "team/app/old"}
    kept = [(r, digests[r]) for r, _ in STALE if r not in removed]
    assert held(store, layer) == [*kept, (TARGET, layer.digest)]
    assert store.get_metadata(layer.key)[-1].hmac == entry_hmac(hmac_key(ALICE), layer.digest, f"{registry.host}/{TARGET}")


@pytest.mark.parametrize("beyond", [False, True], ids=["holder-last-tried", "holder-just-beyond"])
@pytest.mark.parametrize("tier", TIERS)
def test_the_tier_caps_the_mounts_before_the_holder(tier, beyond, registry, layers, store):
    """Seed: getRepositoryMountCandidates keeps the tier's number of candidates. Of
    several repositories said to hold the layer's own digest, only one really does;
    the others answer the mount with a 202. The holder as the last candidate the
    tier allows is mounted from; one place further it is never tried (the layer is
    uploaded, its entry kept). One existence check: the candidates share a digest."""
    layer = layers.by_tier[tier]
    count = SEED_MOUNTS[tier] + 1
    youngest_first = [f"pool/r{i}" for i in range(count)]  # equal likeness: age decides
    holder = youngest_first[SEED_MOUNTS[tier] if beyond else SEED_MOUNTS[tier] - 1]
    assert layer.blob is not None
    put_blob(registry.host, holder, layer.blob, layer.digest)
    seed_store(store, layer, [entry(registry.host, r, layer.digest, ALICE, layer.recipe) for r in reversed(youngest_first)])
    client = client_for(registry.host)

    result = push(client, layers, store, layer)

    assert mounts(client) == youngest_first[: SEED_MOUNTS[tier]]
    assert heads(client) == [layer.digest]
    failed = [r for r in youngest_first[: SEED_MOUNTS[tier]] if r != holder]
    remaining = [r for r in reversed(youngest_first) if r not in failed]
    if beyond:
        assert result.outcome is LayerOutcome.UPLOADED
        assert held(store, layer) == [*((r, layer.digest) for r in remaining), (TARGET, layer.digest)]
    else:
        assert result.outcome is LayerOutcome.MOUNTED and result.mounted_from == holder
        assert client.named("upload_blob") == [] and client.named("start_upload") == []
        # every 202 session is cancelled: replaced by the next, or made useless by the
        # mount (the seed returns on ErrBlobMounted and leaves that last one open)
        assert len(client.named("cancel_upload")) == len(failed)
        assert held(store, layer) == [*((r, layer.digest) for r in remaining), (TARGET, layer.digest)]


@pytest.mark.parametrize("tier", TIERS)
def test_digests_known_from_other_repositories_are_checked_for_large_layers_only(tier, registry, layers, store, tmp_path):
    """Seed: only the large tier (4, 3, true) goes on checking after the mounts, with
    digests mapped to other repositories too. The target already holds another gzip
    of the layer that the store knows only from elsewhere (third in likeness): a large
    layer finds it with its third check and is not uploaded; the others upload."""
    layer = layers.by_tier[tier]
    blob, other = other_gzip(layer, str(tmp_path))
    put_blob(registry.host, TARGET, blob, other)
    first, second = fake_digest("c"), fake_digest("a")
    seed_store(store, layer, [entry(registry.host, "elsewhere/old", other, ALICE), entry(registry.host, "team/app/a", second, ALICE), entry(registry.host, "team/app/c", first, ALICE)])
    client = client_for(registry.host)

    result = push(client, layers, store, layer)

    assert mounts(client) == ["team/app/c", "team/app/a", "elsewhere/old"][: SEED_MOUNTS[tier]]
    assert heads(client) == [first, second, other][: SEED_CHECKS[tier]]
    if tier == "large":
        assert result.outcome is LayerOutcome.EXISTS and result.digest == other
        assert client.named("upload_blob") == []
        # the seed leaves the last mount's session open here; we cancel every one
        assert len(client.named("cancel_upload")) == len(client.named("mount_blob"))
        # recorded for the target, as layerAlreadyExists does for another repository's mapping
        assert held(store, layer)[-1] == (TARGET, other)
    else:
        assert result.outcome is LayerOutcome.UPLOADED and result.digest == layer.digest
        assert held(store, layer)[-1] == (TARGET, layer.digest)


@pytest.mark.parametrize("tier", TIERS)
def test_a_layer_the_target_holds_is_found_by_the_first_check(tier, registry, layers, store):
    """Seed: the first layerAlreadyExists (any tier): the likeliest entry is the
    target's own; one HEAD finds it, nothing is mounted, and an entry of the target
    with our HMAC is not recorded again."""
    layer = layers.by_tier[tier]
    assert layer.blob is not None
    put_blob(registry.host, TARGET, layer.blob, layer.digest)
    seed_store(
        store,
        layer,
        [entry(registry.host, TARGET, layer.digest, ALICE, layer.recipe), entry(registry.host, "team/app/y", fake_digest("y"), ALICE), entry(registry.host, "other/b", fake_digest("b"), BOB)],
    )
    before = store.get_metadata(layer.key)
    client = client_for(registry.host)

    result = push(client, layers, store, layer)

    assert result.outcome is LayerOutcome.EXISTS and result.digest == layer.digest
    assert heads(client) == [layer.digest]
    assert mounts(client) == [] and client.named("upload_blob") == [] and client.named("start_upload") == []
    assert store.get_metadata(layer.key) == before


def test_the_tier_comes_from_the_uncompressed_size(registry, layers, store):
    """Seed: the tier is layer.Size(), the size of the stream Open() returns, which
    uploadUsingSession compresses: a 180 KiB tar that gzips to 50 KB is a middle
    layer (3 mounts), not a small one (1)."""
    layer = layers.squeezed
    youngest_first = [f"pool/r{i}" for i in range(5)]
    seed_store(store, layer, [entry(registry.host, r, fake_digest(r), ALICE) for r in reversed(youngest_first)])
    client = client_for(registry.host)

    result = push(client, layers, store, layer)

    assert mounts(client) == youngest_first[: SEED_MOUNTS["middle"]]
    assert len(client.named("head_blob")) == SEED_CHECKS["middle"]
    assert result.outcome is LayerOutcome.UPLOADED


# -- the removal rule against each kind of failed mount ------------------------------
def _errors(code: str, message: str) -> bytes:
    return b'{"errors":[{"code":"%s","message":"%s"}]}' % (code.encode(), message.encode())


UNAUTHORIZED = Rule("POST", "mount=", "status", status=401, body=_errors("UNAUTHORIZED", "authentication required"))
DENIED = Rule("POST", "mount=", "status", status=403, body=_errors("DENIED", "requested access to the resource is denied"))
BLOB_UNKNOWN = Rule("POST", "mount=", "status", status=404, body=_errors("BLOB_UNKNOWN", "blob unknown to registry"))


@pytest.mark.parametrize(
    ("rule", "credentials", "removed"),
    [
        pytest.param(UNAUTHORIZED, ALICE, True, id="401-logged-in"),
        pytest.param(UNAUTHORIZED, None, False, id="401-anonymous"),
        # seed: hasAuthInfo is a registry token, or a username and a password
        pytest.param(UNAUTHORIZED, IDENTITY_TOKEN_ONLY, False, id="401-identity-token-only"),
        pytest.param(DENIED, ALICE, True, id="403-logged-in"),
        # seed: only the UNAUTHORIZED code counts as unauthorised; DENIED does not
        pytest.param(DENIED, None, True, id="403-anonymous"),
        pytest.param(BLOB_UNKNOWN, ALICE, True, id="404-blob-unknown"),
    ],
)
def test_a_definite_mount_failure_runs_the_seed_removal_rule(rule, credentials, removed, registry, proxy, layers, store):
    """Seed: after a failed mount the entry is removed unless the failure is
    UNAUTHORIZED while we have no auth info; its HMAC is ours (or none, anonymous).
    The only candidate really holds the blob: only the registry's answer, injected
    by the proxy, decides. A definite answer is not retried: the layer is uploaded."""
    layer = layers.by_tier["small"]
    assert layer.blob is not None
    put_blob(registry.host, "team/base", layer.blob, layer.digest)
    candidate = entry(proxy.host, "team/base", layer.digest, credentials, layer.recipe)
    seed_store(store, layer, [candidate])
    proxy.add(Rule(rule.method, rule.path, rule.action, status=rule.status, body=rule.body))
    client = client_for(proxy.host, credentials)

    result = push(client, layers, store, layer, credentials)

    assert mounts(client) == ["team/base"]
    assert isinstance(client.named("mount_blob")[0].error, Exception)
    assert result.outcome is LayerOutcome.UPLOADED
    assert (candidate in store.get_metadata(layer.key)) is not removed


@pytest.mark.parametrize(
    "rule",
    [
        pytest.param(Rule("POST", "mount=", "status", status=503, body=_errors("UNAVAILABLE", "service unavailable")), id="503"),
        pytest.param(Rule("POST", "mount=", "status", status=429, body=_errors("TOOMANYREQUESTS", "too many requests")), id="429"),
        pytest.param(Rule("POST", "mount=", "reset_buffered"), id="connection-reset"),
    ],
)
def test_a_temporary_mount_failure_keeps_the_entry_and_the_mount_is_retried(rule, registry, proxy, layers, store):
    """A mount that fails for a while (429, 503, a broken
    connection) says nothing about the candidate: its entry stays, and the retry
    policy tries again, which mounts the layer (nothing uploaded)."""
    layer = layers.by_tier["middle"]
    assert layer.blob is not None
    put_blob(registry.host, "team/base", layer.blob, layer.digest)
    candidate = entry(proxy.host, "team/base", layer.digest, ALICE, layer.recipe)
    seed_store(store, layer, [candidate])
    proxy.add(Rule(rule.method, rule.path, rule.action, status=rule.status, body=rule.body))
    client = client_for(proxy.host)

    result = push(client, layers, store, layer)

    assert result.outcome is LayerOutcome.MOUNTED and result.mounted_from == "team/base"
    assert mounts(client) == ["team/base", "team/base"]
    assert client.named("mount_blob")[0].error is not None and client.named("mount_blob")[1].mounted is True
    assert client.named("upload_blob") == [] and client.named("start_upload") == []
    assert candidate in store.get_metadata(layer.key)
    assert held(store, layer)[-1] == (TARGET, layer.digest)


def test_anonymous_mounts_refused_by_a_token_registry_keep_every_entry(token_registry, layers, store):
    """Seed: unauthorised with no auth info keeps the candidates. The real registry
    in token mode lets anonymous pull but not push: each of a middle layer's three
    mounts gets a 401, no entry is removed, and the push fails on its upload."""
    registry, _ = token_registry
    layer = layers.by_tier["middle"]
    assert layer.blob is not None
    youngest_first = ["team/a", "team/b", "team/c", "team/d"]
    for repository in youngest_first:
        put_blob(registry.host, repository, layer.blob, layer.digest, ALICE)
    seed_store(store, layer, [entry(registry.host, r, layer.digest, None, layer.recipe) for r in reversed(youngest_first)])
    before = store.get_metadata(layer.key)
    client = client_for(registry.host, None)

    with pytest.raises(AuthError):
        push(client, layers, store, layer, None)

    assert mounts(client) == youngest_first[: SEED_MOUNTS["middle"]]
    assert all(isinstance(s.error, AuthError) for s in client.named("mount_blob"))
    assert store.get_metadata(layer.key) == before
