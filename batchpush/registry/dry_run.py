"""A registry client that answers writes without sending them: ``--dry-run``.

The dry run is the real push (the same layer path, the same single-flight and
batch state) over this client, so the two cannot drift. Reads (``GET /v2/``,
``HEAD`` of blobs and manifests) go to the registry; each write is answered
from what the registry holds and what this dry run has already "written":

- a mount succeeds when the source repository holds the blob (one HEAD there, a
  read), else the registry would have opened an upload session instead;
- an upload or a manifest is counted and remembered, never sent.

``planned`` lists every protocol step the push would send, in order, as
(method, path): the step's request without its query or session id.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from ..digest import Digest
from ..sources.base import FileRange
from .client import BlobUpload, MountResult, RegistryClient, UploadSession
from .errors import RegistryError
from .reads import BlobStream

#: the location of a session the dry run pretends the registry opened
_SESSION = "dry-run:"


class DryRunClient(RegistryClient):
    """A RegistryClient whose writes are answered, not sent."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self._planned_lock = threading.Lock()
        #: (method, path) of every step the push would send
        self.planned: list[tuple[str, str]] = []
        #: (repository, digest) -> size of the blobs this dry run has "written"
        self._written: dict[tuple[str, Digest], int] = {}

    def _plan(self, method: str, path: str, written: tuple[str, Digest, int] | None = None) -> None:
        with self._planned_lock:
            self.planned.append((method, path))
            if written is not None:
                self._written[written[:2]] = written[2]

    def _written_size(self, repository: str, digest: Digest) -> int | None:
        with self._planned_lock:
            return self._written.get((repository, digest))

    def head_blob(self, repository: str, digest: Digest) -> int | None:
        self._plan("HEAD", f"/v2/{repository}/blobs/{digest}")
        size = self._written_size(repository, digest)
        return size if size is not None else super().head_blob(repository, digest)

    def head_manifest(self, repository: str, reference: str, accept: str) -> tuple[Digest, int] | None:
        self._plan("HEAD", f"/v2/{repository}/manifests/{reference}")
        return super().head_manifest(repository, reference, accept)

    def delete_manifest(self, repository: str, digest: Digest) -> None:
        self._plan("DELETE", f"/v2/{repository}/manifests/{digest}")

    def mount_blob(self, repository: str, digest: Digest, from_repository: str) -> MountResult:
        size = self._written_size(from_repository, digest)
        if size is None:
            try:
                size = super().head_blob(from_repository, digest)
            except RegistryError:
                size = None  # not readable there: the mount would not be granted either
        self._plan("POST", f"/v2/{repository}/blobs/uploads/?mount", None if size is None else (repository, digest, size))
        if size is None:
            return MountResult(False, UploadSession(f"{_SESSION}{repository}"))
        return MountResult(True, None)

    def start_upload(self, repository: str) -> UploadSession:
        self._plan("POST", f"/v2/{repository}/blobs/uploads/")
        return UploadSession(f"{_SESSION}{repository}")

    def cancel_upload(self, repository: str, session: UploadSession) -> None:
        self._plan("DELETE", f"/v2/{repository}/blobs/uploads/")

    def upload_blob(self, repository: str, upload: BlobUpload, blob: FileRange | BlobStream, digest: Digest, *, on_progress: Callable[[int], None] | None = None, before_commit: Callable[[], None] | None = None) -> int:
        """What the upload would send (the blob's size); nothing is read or sent."""
        chunk = self.chunk_bytes(blob.size, upload.session, staged=before_commit is not None)
        if chunk is not None:
            for _ in range(upload.offset, blob.size, chunk):  # the PATCHes a chunked upload sends
                self._plan("PATCH", f"/v2/{repository}/blobs/uploads/")
        if before_commit is not None:
            before_commit()
        self._plan("PUT", f"/v2/{repository}/blobs/uploads/", (repository, digest, blob.size))
        upload.offset = blob.size
        return blob.size

    def put_manifest(self, repository: str, reference: str, media_type: str, data: bytes) -> Digest:
        self._plan("PUT", f"/v2/{repository}/manifests/{reference}")
        return Digest.sha256_of(data)
