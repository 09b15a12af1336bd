"""One layer's path to one repository: the seed's ``v2PushDescriptor.Upload``.

In the seed's order:
 1. a foreign layer (descriptor with ``urls``) is skipped;
 2. a layer the push state knows is in the target repository: done, no request;
 3. the size tier sets the mount attempts and existence checks;
 4. metadata for the DiffID: one existence check (HEAD), candidates in likeness order;
 5. cross-repository mounts from the same registry, never the target repository
    (this batch's own uploads first): 201 mounted; 202 keeps the offered session
    for the upload and cancels the one it replaces; stale candidates are removed;
 6. more existence checks, up to the tier's remaining count;
 7. upload (the blob compressed while hashed, in prepare), then the DiffID ->
    digest metadata is recorded with our HMAC and the target repository.

Steps 3-7 hold the blob's single-flight (per registry and blob, state.py), never
longer: a layer of an image still being checked (its gate not open) comes back
``Staged`` before any write, leaving the flight and its upload thread, and its
image's own thread waits for the gate; another image that needs the same blob
goes on meanwhile. A large layer may have sent its data by then, uncommitted:
another push of that blob to the registry comes back ``Staged`` too, instead of
uploading it again, and goes on (mounts it) once that data is committed.
Only a definite answer to a mount (the registry opened an upload instead, or
denied it) may remove a store entry; a temporary one is retried under the policy.
A descriptor's size is what we hashed, or what a valid registry answer said.
"""

from __future__ import annotations

import concurrent.futures as cf
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from . import mediatypes as mt
from . import waits
from .digest import Digest
from .errors import BatchPushError, Cancelled, SourceError
from .metadata import MetadataStore, OverlayStore
from .outcome import LayerOutcome, LayerResult
from .policy import Tier, V2Metadata, entry_hmac, hmac_matches, mount_candidates, remove_after_failed_mount, sort_by_likeness_and_age, tier_for
from .prepare import PreparedLayer
from .progress import NoProgress, Progress
from .reference import Reference
from .registry.client import BlobUpload, RegistryClient
from .registry.errors import AuthError, RegistryError, UploadGoneError
from .registry.reads import BlobStream
from .sources.base import FileRange
from .state import PushState, RemoteBlob

log = logging.getLogger(__name__)

#: with an image still being checked, layers at least this large send their data
#: before the commit is allowed; smaller ones just wait (a PATCH costs a request)
STREAM_MIN_BYTES = 1 << 20


class ImageGate:
    """Opens when every layer of an image is checked; fails if one is not."""

    def __init__(self, layers: tuple[cf.Future[Any], ...], cancel: threading.Event) -> None:
        self._left = len(layers)
        self._lock = threading.Lock()
        self._opened = threading.Event()
        self._error: BaseException | None = None
        self._cancel = cancel
        if not layers:
            self._opened.set()
        for future in layers:
            future.add_done_callback(self._done)

    def _done(self, future: cf.Future[Any]) -> None:
        # may run at once in the thread that registers it: it takes only this lock,
        # and asks the (done) future before taking it
        error = Cancelled() if future.cancelled() else future.exception()
        with self._lock:
            self._left -= 1
            if self._error is None and error is not None:
                self._error = error
            opened = self._left == 0 or self._error is not None
        if opened:
            self._opened.set()

    @property
    def open(self) -> bool:
        return self._opened.is_set() and self._error is None

    def wait(self) -> None:
        """Block until every layer is checked; raises the first layer's error."""
        waits.event(self._opened, self._cancel)
        if self._error is not None:
            raise ImageAbandoned(f"another layer of the image failed: {self._error}")


class ImageAbandoned(BatchPushError):
    """This layer's image will not be pushed: stop, cancel the session."""

    kind = "abandoned"


class _Staged(Exception):
    """The layer's data is sent; its commit waits for the image's gate (outside the flight)."""


@dataclass(slots=True)
class _Carry:
    """What one layer's attempts hand to the next: the upload to resume."""

    upload: BlobUpload | None = None
    #: the image's gate, when its layers are still being checked
    gate: ImageGate | None = None
    #: digests whose existence was checked already (seed: checkedDigests), so a
    #: layer that comes back after its gate opened does not check them again
    checked: set[Digest] = field(default_factory=set)
    #: this push is the one sending the blob's data ahead of its gate (state.py)
    staging: bool = False
    #: another push's claim on sending the blob's data: this layer's image waits for
    #: it to end before finishing the layer (once: then it uploads, if it must)
    other: threading.Event | None = None
    #: bytes of the blob sent ahead of the commit
    sent: int = 0


@dataclass(slots=True)
class Staged:
    """A layer that waits for its image's gate, or for another push's data of its
    blob (``waits_for``): nothing of it is written yet (a large layer's data may be
    sent, uncommitted). ``LayerPusher.finish`` completes it once the gate is open
    and ``waits_for`` is set; ``LayerPusher.abandon`` cancels it. Until then it
    holds no thread: the image's own thread waits."""

    layer: PreparedLayer
    carry: _Carry
    is_config: bool

    @property
    def waits_for(self) -> threading.Event | None:
        """Set once the other push's data of this blob is committed or dropped."""
        return self.carry.other


def _compatible(layer: PreparedLayer, entry: V2Metadata) -> bool:
    """May ``entry``'s blob stand for ``layer`` in the manifest? A layer we compress
    may use any gzip blob of the same DiffID (the seed's behaviour); a layer pushed
    as it is needs its own digest."""
    if layer.compressed_by_us:
        return entry.recipe == "" or entry.recipe.startswith("gzip")
    return entry.digest == layer.digest


class LayerPusher:
    """Pushes layers to one target repository. Thread-safe (state and store are)."""

    def __init__(
        self,
        client: RegistryClient,
        target: Reference,
        state: PushState,
        store: MetadataStore | OverlayStore,
        hmac_key: bytes,
        *,
        materialize: Callable[[PreparedLayer], FileRange | BlobStream],
        progress: Progress | None = None,
        allow_nondistributable: bool = False,
    ) -> None:
        self.client = client
        self.target = target
        self.repository = target.repository
        self.state = state
        self.store = store
        self.hmac_key = hmac_key
        self.allow_nondistributable = allow_nondistributable
        #: the layer's bytes, compressing them now if prepare only fingerprinted them
        self.materialize = materialize
        self.progress: Progress = progress or NoProgress()

    def push(self, layer: PreparedLayer, *, is_config: bool = False, gate: ImageGate | None = None) -> LayerResult | Staged:
        """Make ``layer`` (or the image config) present in the target repository.

        The whole path runs under the host's retry policy; an upload that broke is
        resumed, not restarted, on the next attempt. Raises RegistryError when the
        attempts are spent or the failure is not temporary (its session cancelled).

        With a ``gate`` that is not open (the image's layers are still being
        checked), nothing is written — no mount, no commit — and ``Staged`` is
        returned at once: a large layer to upload has sent its data first (one push
        per registry and blob does that; the others send nothing). A layer to
        upload whose data another push has sent, uncommitted, comes back
        ``Staged`` too, gate or not. The caller waits for the gate and the
        staged layer's ``waits_for``, then calls ``finish`` (or ``abandon``)."""
        carry = _Carry(gate=gate)
        presend = next((p for p in layer.presends if p.for_target(self.target) and p.take()), None)
        if presend is not None:
            # its data was sent while it was compressed: the upload goes on from there
            carry.upload, carry.staging, carry.sent = presend.upload, presend.staging, presend.upload.offset
        return self._run(layer, carry, is_config)

    def finish(self, staged: Staged) -> LayerResult:
        """Complete a staged layer, its gate now open and what it waited for done."""
        gate, other = staged.carry.gate, staged.carry.other
        assert (gate is None or gate.open) and (other is None or other.is_set())
        staged.carry.gate = None
        result = self._run(staged.layer, staged.carry, staged.is_config)
        assert isinstance(result, LayerResult)
        return result

    def abandon(self, staged: Staged) -> None:
        """The staged layer's image will not be pushed: its session is cancelled."""
        self._drop_upload(staged.layer, staged.carry)

    def _drop_upload(self, layer: PreparedLayer, carry: _Carry) -> None:
        if carry.upload is not None:
            self.client.cancel_upload(self.repository, carry.upload.session)
            carry.upload = None
        if carry.staging:
            self.state.unstage(self.target.registry, layer.digest)
            carry.staging = False

    def _run(self, layer: PreparedLayer, carry: _Carry, is_config: bool) -> LayerResult | Staged:
        try:
            result = self.client.with_retries(lambda: self._push_once(layer, carry), f"layer {layer.digest}")
        except BaseException:
            self._drop_upload(layer, carry)
            raise
        if result is None:
            return Staged(layer, carry, is_config)
        if not is_config:
            self.progress.layer_done(str(self.target), result)
        return result

    def _push_once(self, layer: PreparedLayer, carry: _Carry) -> LayerResult | None:
        with self.state.single_flight(self.target.registry, self.repository, layer.digest, self.client.cancel):
            result = self._settled(layer)
            if result is not None:
                self._drop_upload(layer, carry)  # staged, and another push got there first
                return result
            if carry.upload is not None:  # a retry, or staged data: go on with that upload
                return self._upload(layer, carry)
            return self._push(layer, carry)

    @property
    def _has_auth_info(self) -> bool:
        """seed: a registry token, or a username with a password (an identity token is not)."""
        c = self.client.auth.credentials
        return c is not None and (bool(c.registry_token) or bool(c.username and c.password))

    def _settled(self, layer: PreparedLayer) -> LayerResult | None:
        """The seed's first two steps: a foreign layer is skipped; a layer the push
        state knows is in the target repository needs no request."""
        if layer.urls and not self.allow_nondistributable:
            return LayerResult(layer.diff_id, layer.digest, layer.size, layer.media_type, LayerOutcome.SKIPPED_FOREIGN)
        known = self.state.known_layer(self.target.registry, self.repository, layer.key)
        return self._result(layer, known, LayerOutcome.KNOWN) if known is not None else None

    def _candidates(self, layer: PreparedLayer) -> tuple[Tier, list[V2Metadata], list[str]]:
        """The layer's size tier, the store's entries that may stand for it, and the
        repositories of this registry (``registry/repo``) that this batch saw receive it."""
        tier = tier_for(layer.source.descriptor.size if layer.source.blob else layer.size)
        entries = [e for e in self.store.get_metadata(layer.key) if _compatible(layer, e)]
        registry = self.target.registry
        holders = [f"{registry}/{repo}" for repo in self.state.repositories_with(registry, layer.digest) if repo != self.repository]
        return tier, entries, holders

    def _result(self, layer: PreparedLayer, blob: RemoteBlob, outcome: LayerOutcome, sent: int = 0, mounted_from: str | None = None) -> LayerResult:
        return LayerResult(layer.diff_id, blob.digest, blob.size, blob.media_type, outcome, sent, mounted_from)

    def remember(self, layer: PreparedLayer, blob: RemoteBlob, recipe: str) -> None:
        """The blob is in the target repository: in the push state, and in the store with our HMAC."""
        self.state.add_layer(self.target.registry, self.repository, layer.key, blob)
        entry = V2Metadata(blob.digest, self.target.name, entry_hmac(self.hmac_key, blob.digest, self.target.name), recipe)
        self.store.add(layer.key, entry)

    def _media_type(self, layer: PreparedLayer, digest: Digest) -> str:
        if digest == layer.digest:
            return layer.media_type
        # another recipe's gzip blob of the same DiffID (seed: schema2.MediaTypeLayer)
        return layer.media_type if layer.media_type in mt.GZIP_LAYERS else mt.DOCKER_LAYER_GZIP

    def _push(self, layer: PreparedLayer, carry: _Carry) -> LayerResult | None:
        """Steps 3-7 for a layer not known in the target repository. None: a write is
        due but the image's gate is not open (the caller waits for it outside the
        flight, then comes back)."""
        if self.client.checks_are_free:
            # an OCI layout target (layout.py): a stat says whether the blob is there
            found = self._exists_here(layer)
            if found is not None:
                return found
        tier, entries, holders = self._candidates(layer)
        # A repository of this registry that this batch saw receive the blob is the
        # first mount candidate (it is there for sure), then the store's candidates.
        batch = [V2Metadata(layer.digest, holder, entry_hmac(self.hmac_key, layer.digest, holder), layer.recipe) for holder in holders[:1]]
        checked = carry.checked
        if entries and not batch and not checked:
            # the seed's first existence check; skipped when a sure mount is at hand,
            # which takes one request too and leaves no doubt
            found = self._already_exists(layer, entries, checked, check_other_repositories=True, max_checks=1)
            if found is not None:
                return found
        candidates = batch + [c for c in mount_candidates(self.target.name, self.hmac_key, tier.max_mount_attempts, entries) if c not in batch]
        candidates = candidates[: max(tier.max_mount_attempts, len(batch))]
        if candidates and carry.gate is not None and not carry.gate.open:
            return None  # a mount writes: only once the whole image is checked
        # seed: once a mount is refused as UNAUTHORIZED, so are the rest of this layer's
        unauthorized = False
        for candidate in candidates:
            from_repository = candidate.source_repository.split("/", 1)[1]
            error: RegistryError | None = None
            try:
                result = self.client.mount_blob(self.repository, candidate.digest, from_repository)
            except AuthError as exc:
                unauthorized = unauthorized or "UNAUTHORIZED" in exc.codes
                error, result = exc, None
            except RegistryError as exc:
                if exc.temporary:  # no answer about the candidate: retried, the store keeps it
                    raise
                error, result = exc, None
            if result is not None and result.mounted:
                self._drop_upload(layer, carry)
                blob = self._mounted_blob(layer, candidate.digest)
                if blob is not None:
                    self.remember(layer, blob, candidate.recipe)
                    return self._result(layer, blob, LayerOutcome.MOUNTED, mounted_from=from_repository)
                continue
            log.debug("mount of %s from %s failed: %s", candidate.digest, from_repository, error or "registry opened an upload instead")
            if candidate not in batch and remove_after_failed_mount(candidate, unauthorized=unauthorized, has_auth_info=self._has_auth_info, key=self.hmac_key):
                self.store.remove(candidate)
            if result is not None and result.session is not None:
                # the session offered instead replaces (and cancels) the one before;
                # kept in the carry at once, so a failure anywhere cancels it
                self._drop_upload(layer, carry)
                carry.upload = BlobUpload(result.session)

        remaining = tier.max_existence_checks - len(checked)
        if remaining > 0 and entries:
            found = self._already_exists(layer, entries, checked, check_other_repositories=tier.check_other_repositories, max_checks=remaining)
            if found is not None:
                self._drop_upload(layer, carry)
                return found
        return self._upload(layer, carry)

    def _exists_here(self, layer: PreparedLayer) -> LayerResult | None:
        """The layer if the target repository holds its digest at its size (one HEAD)."""
        size = self.client.head_blob(self.repository, layer.digest)
        if size is None or size != layer.size:
            return None
        blob = RemoteBlob(layer.digest, layer.size, layer.media_type)
        self.remember(layer, blob, layer.recipe)
        return self._result(layer, blob, LayerOutcome.EXISTS)

    def _mounted_blob(self, layer: PreparedLayer, digest: Digest) -> RemoteBlob | None:
        """What a mount of ``digest`` put in the repository. Our own digest has the
        size we hashed; another recipe's blob has the size a HEAD answers, and one
        the HEAD cannot find is not used (the next candidate, or our upload, is)."""
        if digest == layer.digest:
            return RemoteBlob(digest, layer.size, layer.media_type)
        size = self.client.head_blob(self.repository, digest)
        if size is None:
            log.debug("mounted %s but a HEAD does not find it: not used", digest)
            return None
        return RemoteBlob(digest, size, self._media_type(layer, digest))

    def _already_exists(self, layer: PreparedLayer, entries: list[V2Metadata], checked: set[Digest], *, check_other_repositories: bool, max_checks: int) -> LayerResult | None:
        """seed: layerAlreadyExists — HEAD unique digests in likeness order."""
        candidates = [e for e in entries if check_other_repositories or not e.source_repository or e.source_repository == self.target.name]
        digests: dict[Digest, V2Metadata] = {}
        for entry in sort_by_likeness_and_age(self.target.name, self.hmac_key, candidates):
            if len(digests) >= max_checks:
                break
            if entry.digest in digests or entry.digest in checked:
                continue
            digests[entry.digest] = entry
        for digest, entry in digests.items():
            checked.add(digest)
            try:
                size = self.client.head_blob(self.repository, digest)
            except RegistryError as exc:
                log.debug("existence check of %s failed: %s", digest, exc)
                continue
            if size is None:
                if entry.source_repository == self.target.name:
                    self.store.remove(entry)
                continue
            # our own digest has the size we hashed; another's, the registry's
            blob = RemoteBlob(digest, layer.size if digest == layer.digest else size, self._media_type(layer, digest))
            if entry.source_repository != self.target.name or not hmac_matches(entry, self.hmac_key):
                self.remember(layer, blob, entry.recipe)
            else:
                self.state.add_layer(self.target.registry, self.repository, layer.key, blob)
            return self._result(layer, blob, LayerOutcome.EXISTS)
        return None

    def _upload(self, layer: PreparedLayer, carry: _Carry) -> LayerResult | None:
        """Step 7. None: the image's gate is not open; a large layer's data is sent
        first (``carry.upload`` keeps the session), a small one waits unsent. None
        too when another push's data of the blob is sent and not yet committed
        (``carry.other``)."""
        if layer.source.blob is None and layer.blob is None:
            # an incremental layout leaves the layers of the layouts before it out:
            # the target must hold them already (one HEAD says)
            found = self._exists_here(layer)
            if found is not None:
                return found
            raise SourceError(f"{self.target}", f"the source does not hold the bytes of layer {layer.digest} and the target repository lacks it (an incremental layout: import the layouts it depends on first)")
        gate = carry.gate
        staging = gate is not None and not gate.open
        other: threading.Event | None = None
        if staging:
            if (carry.upload is not None and carry.upload.offset > 0) or layer.size < STREAM_MIN_BYTES:
                return None  # data already sent, or too small to be worth sending early
            if not carry.staging:
                other = self.state.stage(self.target.registry, layer.digest)
                carry.staging = other is None
        elif not carry.staging and carry.other is None:  # waited for no other push yet
            other = self.state.staged(self.target.registry, layer.digest)
        if other is not None:
            # another push sent this blob's data, uncommitted: no second copy
            log.debug("%s: %s is staged by another push; its commit is awaited", self.target, layer.digest)
            carry.other = other
            return None
        blob = self.materialize(layer)
        if carry.upload is None:
            carry.upload = BlobUpload(self.client.start_upload(self.repository))
        target, digest = str(self.target), str(layer.digest)

        def on_progress(sent_bytes: int) -> None:
            self.progress.layer_bytes(target, digest, sent_bytes, blob.size)

        def stage() -> None:
            if gate is not None and not gate.open:
                raise _Staged()

        def counted(sent_bytes: int) -> None:
            carry.sent = sent_bytes
            on_progress(sent_bytes)

        try:
            self.client.upload_blob(self.repository, carry.upload, blob, layer.digest, on_progress=counted, before_commit=stage if staging else None)
        except _Staged:
            return None
        except SourceError:
            carry.upload = None  # a stream that lied: the client cancelled its session already
            raise
        except UploadGoneError:
            carry.upload = None  # the next attempt starts a new session...
            if self.client.head_blob(self.repository, layer.digest) is None:
                raise
            # ...unless the commit went through before the connection broke
        except RegistryError as exc:
            if not exc.temporary:
                self._drop_upload(layer, carry)
            raise
        carry.upload = None
        remote = RemoteBlob(layer.digest, layer.size, layer.media_type)
        self.remember(layer, remote, layer.recipe)
        if carry.staging:  # in the state first: who waited for the claim mounts it
            self.state.unstage(self.target.registry, layer.digest)
            carry.staging = False
        return self._result(layer, remote, LayerOutcome.UPLOADED, carry.sent)
