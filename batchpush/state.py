"""The push state shared by every tag, repository and worker of a batch.

The seed's ``pushState.remoteLayers`` widened from one repository to the batch:
which blobs exist in which (registry, repository), including those this batch just
uploaded, and single-flight per (registry, blob) so a blob is uploaded once and the
other repositories mount it.

A flight is held by one blob's work, never by an image: its holder does that blob's
requests and nothing else (it does not wait for its image's other layers while it
holds it). No lock is held while anyone waits or does I/O: the state's lock guards
its dictionaries only, and a flight is an Event that waiters watch together with
the run's cancel flag.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Iterator
from contextlib import AbstractContextManager, ExitStack, contextmanager
from dataclasses import dataclass

from . import waits
from .digest import Digest


@dataclass(frozen=True, slots=True)
class RemoteBlob:
    digest: Digest
    size: int
    media_type: str


class PushState:
    """Thread-safe. Keys: (registry, repository, layer key) where the layer key is a
    DiffID (or the digest of a layer without one)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._layers: dict[tuple[str, str, Digest], RemoteBlob] = {}
        self._repositories: dict[tuple[str, Digest], list[str]] = {}
        self._flights = waits.Flights()
        #: (registry, blob) whose data a push is sending ahead of its image's gate:
        #: its claim, set once that data is committed or dropped
        self._staging: dict[tuple[str, Digest], threading.Event] = {}
        #: (registry, repository, manifest digest) that this batch PUT there
        self._manifests: set[tuple[str, str, Digest]] = set()

    def known_layer(self, registry: str, repository: str, key: Digest) -> RemoteBlob | None:
        with self._lock:
            return self._layers.get((registry, repository, key))

    def add_layer(self, registry: str, repository: str, key: Digest, blob: RemoteBlob) -> None:
        with self._lock:
            self._layers[(registry, repository, key)] = blob
            holders = self._repositories.setdefault((registry, blob.digest), [])
            if repository not in holders:
                holders.append(repository)

    def repositories_with(self, registry: str, digest: Digest) -> list[str]:
        """Repositories of ``registry`` this batch knows hold ``digest``, oldest first."""
        with self._lock:
            return list(self._repositories.get((registry, digest), ()))

    def single_flight(self, registry: str, repository: str, digest: Digest, cancel: threading.Event) -> AbstractContextManager[None]:
        """One holder at a time per (registry, blob): a second job waits for the
        first to end (or for the run to be cancelled: Cancelled), then holds the
        flight itself and finds the blob in the state (or, if the first failed,
        tries itself). Once the batch knows a repository of the registry that holds
        the blob, the flight is per (registry, repository, blob): pushes of it to
        different repositories mount it at once instead of one after the other (a
        chain of round trips behind a far registry)."""

        def key() -> tuple[str, ...]:
            with self._lock:
                known = bool(self._repositories.get((registry, digest)))
            return (registry, repository, str(digest)) if known else (registry, str(digest))

        return self._flights.hold(key, cancel)

    def stage(self, registry: str, digest: Digest) -> threading.Event | None:
        """Claim the sending of a blob's data ahead of its image's gate: None once
        this push has the claim; else the claim of the push that has it (this one
        then sends nothing and waits for it, see ``staged``)."""
        with self._lock:
            claim = self._staging.get((registry, digest))
            if claim is None:
                self._staging[(registry, digest)] = threading.Event()
            return claim

    def staged(self, registry: str, digest: Digest) -> threading.Event | None:
        """The claim of a push whose data of ``digest`` is sent but not committed:
        the flight is left while its image is checked, so another push of the blob
        must wait for the claim to end (outside any flight), then mount what was
        committed, or upload if it was dropped. None if there is none."""
        with self._lock:
            return self._staging.get((registry, digest))

    def unstage(self, registry: str, digest: Digest) -> None:
        """The claimed data is committed (and in the state) or dropped: waiters go on."""
        with self._lock:
            claim = self._staging.pop((registry, digest), None)
        if claim is not None:
            claim.set()

    @contextmanager
    def manifest_writes(self, registry: str, repository: str, digests: Iterable[Digest | str], cancel: threading.Event) -> Iterator[None]:
        """Held around a manifest PUT: ``digests`` are the manifest's own and, for an
        index, its children's. No two PUTs holding a digest in common run at once in
        a repository. The distribution registry writes a manifest's link file in
        place (created empty, then written), so an index PUT that checks a child
        while another image PUTs that child again (a signature's ``.sig`` tag and its
        referrers fallback index name the same manifest) can read it empty, and the
        index is refused: 400 DIGEST_INVALID, MANIFEST_BLOB_UNKNOWN. Taken in one
        order (sorted), so two holders never wait for each other."""
        with ExitStack() as held:
            for digest in sorted({str(d) for d in digests}):
                held.enter_context(self._flights.hold(("manifest", registry, repository, digest), cancel))
            yield

    def known_manifest(self, registry: str, repository: str, digest: Digest) -> bool:
        """Whether this batch PUT manifest ``digest`` in the repository already."""
        with self._lock:
            return (registry, repository, digest) in self._manifests

    def add_manifest(self, registry: str, repository: str, digest: Digest) -> None:
        with self._lock:
            self._manifests.add((registry, repository, digest))
