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
from contextlib import AbstractContextManager
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
        #: (registry, blob) whose data a push is sending ahead of its image's gate
        self._staging: set[tuple[str, Digest]] = set()

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

    def stage(self, registry: str, digest: Digest) -> bool:
        """Claim the sending of a blob's data ahead of its image's gate: False if
        another push has it (this one then sends nothing and, once its gate opens,
        mounts what the other committed, or uploads if it did not)."""
        with self._lock:
            if (registry, digest) in self._staging:
                return False
            self._staging.add((registry, digest))
            return True

    def unstage(self, registry: str, digest: Digest) -> None:
        with self._lock:
            self._staging.discard((registry, digest))
