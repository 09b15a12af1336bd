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
longer: a layer of an image still being checked (its gate not open) leaves the
flight before it waits, so another image that needs the same blob goes on.
Only a definite answer to a mount (the registry opened an upload instead, or
denied it) may remove a store entry; a temporary one is retried under the policy.
A descriptor's size is what we hashed, or what a valid registry answer said.
"""

from __future__ import annotations

import concurrent.futures as cf
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from . import mediatypes as mt
from . import waits
from .digest import Digest
from .errors import BatchPushError, Cancelled
from .metadata import MetadataStore, OverlayStore
from .outcome import LayerOutcome, LayerResult
from .policy import Tier, V2Metadata, entry_hmac, hmac_matches, mount_candidates, remove_after_failed_mount, sort_by_likeness_and_age, tier_for
from .prepare import PreparedLayer
from .progress import NoProgress, Progress
from .reference import Reference
from .registry.client import BlobUpload, RegistryClient, UploadSession
from .registry.errors import AuthError, RegistryError, UploadGoneError
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
        materialize: Callable[[PreparedLayer], FileRange],
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

    def push(self, layer: PreparedLayer, *, is_config: bool = False, gate: ImageGate | None = None) -> LayerResult:
        """Make ``layer`` (or the image config) present in the target repository.

        The whole path runs under the host's retry policy; an upload that broke is
        resumed, not restarted, on the next attempt. Raises RegistryError when the
        attempts are spent or the failure is not temporary (its session cancelled).

        With a ``gate`` (the image's layers are still being checked), nothing is
        written before the gate opens — no mount, no commit — but a large layer to
        upload sends its data meanwhile and commits when the gate opens; if it
        never does, its session is cancelled. The layer waits for its gate outside
        the blob's flight."""
        carry = _Carry(gate=gate)
        try:
            result = self.client.with_retries(lambda: self._push_once(layer, carry), f"layer {layer.digest}")
        except BaseException:
            if carry.upload is not None:
                self.client.cancel_upload(self.repository, carry.upload.session)
            raise
        if not is_config:
            self.progress.layer_done(str(self.target), result)
        return result

    def _push_once(self, layer: PreparedLayer, carry: _Carry) -> LayerResult:
        while True:
            with self.state.single_flight(self.target.registry, layer.digest, self.client.cancel):
                result = self._settled(layer)
                if result is not None:
                    if carry.upload is not None:  # staged, and another image's push got there first
                        self.client.cancel_upload(self.repository, carry.upload.session)
                        carry.upload = None
                elif carry.upload is not None:  # a retry, or staged data: go on with that upload
                    result = self._upload(layer, carry)
                else:
                    result = self._push(layer, carry)
            if result is not None:
                return result
            assert carry.gate is not None
            carry.gate.wait()  # outside the flight: other images' pushes of this blob go on

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

    def _remember(self, layer: PreparedLayer, blob: RemoteBlob, recipe: str) -> None:
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
        tier, entries, holders = self._candidates(layer)
        # A repository of this registry that this batch saw receive the blob is the
        # first mount candidate (it is there for sure), then the store's candidates.
        batch = [V2Metadata(layer.digest, holder, entry_hmac(self.hmac_key, layer.digest, holder), layer.recipe) for holder in holders[:1]]
        checked: set[Digest] = set()
        if entries and not batch:
            # the seed's first existence check; skipped when a sure mount is at hand,
            # which takes one request too and leaves no doubt
            found = self._already_exists(layer, entries, checked, check_other_repositories=True, max_checks=1)
            if found is not None:
                return found
        candidates = batch + [c for c in mount_candidates(self.target.name, self.hmac_key, tier.max_mount_attempts, entries) if c not in batch]
        candidates = candidates[: max(tier.max_mount_attempts, len(batch))]
        if candidates and carry.gate is not None and not carry.gate.open:
            return None  # a mount writes: only once the whole image is checked
        session: UploadSession | None = None
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
                    if session is not None:
                        self.client.cancel_upload(self.repository, session)
                    raise
                error, result = exc, None
            if result is not None and result.mounted:
                if session is not None:
                    self.client.cancel_upload(self.repository, session)
                    session = None
                blob = self._mounted_blob(layer, candidate.digest)
                if blob is not None:
                    self._remember(layer, blob, candidate.recipe)
                    return self._result(layer, blob, LayerOutcome.MOUNTED, mounted_from=from_repository)
                continue
            log.debug("mount of %s from %s failed: %s", candidate.digest, from_repository, error or "registry opened an upload instead")
            if candidate not in batch and remove_after_failed_mount(candidate, unauthorized=unauthorized, has_auth_info=self._has_auth_info, key=self.hmac_key):
                self.store.remove(candidate)
            if result is not None and result.session is not None:
                if session is not None:
                    self.client.cancel_upload(self.repository, session)
                session = result.session

        remaining = tier.max_existence_checks - len(checked)
        if remaining > 0 and entries:
            found = self._already_exists(layer, entries, checked, check_other_repositories=tier.check_other_repositories, max_checks=remaining)
            if found is not None:
                if session is not None:
                    self.client.cancel_upload(self.repository, session)
                return found
        if session is not None:
            carry.upload = BlobUpload(session)
        return self._upload(layer, carry)

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
                self._remember(layer, blob, entry.recipe)
            else:
                self.state.add_layer(self.target.registry, self.repository, layer.key, blob)
            return self._result(layer, blob, LayerOutcome.EXISTS)
        return None

    def _upload(self, layer: PreparedLayer, carry: _Carry) -> LayerResult | None:
        """Step 7. None: the image's gate is not open; a large layer's data is sent
        first (``carry.upload`` keeps the session), a small one waits unsent."""
        if layer.source.blob is None:
            raise RegistryError("PUT", f"{self.target.name}/blobs/{layer.digest}", None, (), "the source does not hold this layer's bytes", permanent=True)
        gate = carry.gate
        staging = gate is not None and not gate.open
        if staging and (carry.upload is not None or layer.size < STREAM_MIN_BYTES):
            return None  # data already sent, or too small to be worth sending early
        blob = self.materialize(layer)
        if carry.upload is None:
            carry.upload = BlobUpload(self.client.start_upload(self.repository))
        target, digest = str(self.target), str(layer.digest)

        def on_progress(sent_bytes: int) -> None:
            self.progress.layer_bytes(target, digest, sent_bytes, blob.size)

        def stage() -> None:
            if gate is not None and not gate.open:
                raise _Staged()

        try:
            sent = self.client.upload_blob(self.repository, carry.upload, blob, layer.digest, on_progress=on_progress, before_commit=stage if staging else None)
        except _Staged:
            return None
        except UploadGoneError:
            carry.upload = None  # the next attempt starts a new session...
            if self.client.head_blob(self.repository, layer.digest) is None:
                raise
            sent = 0  # ...unless the commit went through before the connection broke
        except RegistryError as exc:
            if not exc.temporary and carry.upload is not None:
                self.client.cancel_upload(self.repository, carry.upload.session)
                carry.upload = None
            raise
        carry.upload = None
        remote = RemoteBlob(layer.digest, layer.size, layer.media_type)
        self._remember(layer, remote, layer.recipe)
        return self._result(layer, remote, LayerOutcome.UPLOADED, sent)
