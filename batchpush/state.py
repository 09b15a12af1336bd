"""The push state shared by every tag, repository and worker of a batch.

The seed's ``pushState.remoteLayers`` widened from one repository to the batch:
which blobs exist in which (registry, repository), including those this batch just
uploaded, and single-flight per (registry, blob) so a blob is uploaded once and the
other repositories mount it.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

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
        self._flights: dict[tuple[str, Digest], threading.Lock] = {}

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

    @contextmanager
    def single_flight(self, registry: str, digest: Digest) -> Iterator[None]:
        """One holder at a time per (registry, blob): a second job waits for the
        first, then finds the blob in the state (or, if it failed, tries itself)."""
        with self._lock:
            flight = self._flights.setdefault((registry, digest), threading.Lock())
        with flight:
            yield
