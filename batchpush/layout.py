"""An OCI image layout on disk as a push target: ``oci:DIR`` (air-gapped migrations).

Every image of a run goes into one layout: one blob store (``blobs/sha256``, each
blob once however many repositories share it) and one ``index.json`` listing each
tagged image with ``org.opencontainers.image.ref.name`` = ``REPOSITORY:TAG``, so
``skopeo copy oci:DIR:REPOSITORY:TAG ...`` reads any of them out.

``LayoutWriter`` answers the few client calls the layer and image paths make of a
registry (``head_blob``, ``mount_blob``, ``start_upload``, ``upload_blob``,
``put_manifest``, ``head_manifest``...), so an export is the same push (the same
single-flight, gates, attachments and referrers, reports) with a directory as the
registry: a "mount" is granted when the layout holds the blob already (it has one
blob store), an "upload" writes the blob. Why a client and not a second export
path in the engine: the push's decisions (what to send, when a manifest may be
written, what an attachment is) stay in one place.

Written safely:

- a blob is written under a temporary name in ``DIR/.partial/run-*/`` (one
  directory per run, locked while it lives: the next run removes those of runs
  that were killed), hashed as it is written, checked (sha256 and size), synced
  and renamed into ``blobs/sha256/``: a file named by a digest is always that
  blob whole. A blob file already there with the right size is never written
  again (its inode and mtime stay);
- ``index.json`` is replaced atomically (a temporary file renamed over it) at the
  end of the run (``Engine.flush_layouts``: an index that cannot be written fails
  the images that went there) and when the writer is closed — after a cancel
  too — with every image whose manifest was
  written, merged with what the file listed (re-read under a ``flock``, so two
  runs writing one layout lose nothing), after the blob directory is synced. A
  run killed outright leaves the index it found: still a valid layout, its new
  blobs unreferenced until a re-run.

Incremental: a writer made with ``bases`` (``--incremental-from``) treats the
layers those layouts hold as present (never written here) and their tags naming
the same digest as up to date; its index carries ``INCREMENTAL_FROM`` naming the
base layouts by their index digests, and an import of it expects those blobs at
the target (``sources/oci_layout.py``). Configs and manifests are always written:
the layout must stay readable by itself.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import shutil
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

from . import mediatypes as mt
from . import waits
from .digest import Digest, InvalidDigestError
from .errors import BatchPushError, Cancelled, DigestMismatchError, SourceError
from .registry.client import BlobUpload, MountResult, RegistryOptions, UploadSession
from .registry.errors import RegistryError
from .registry.reads import BlobStream, FetchedManifest
from .sources.base import FileRange, read_views
from .sources.oci_layout import INCREMENTAL_FROM, MAX_MANIFEST_BYTES, REF_NAME

log = logging.getLogger(__name__)
T = TypeVar("T")

#: a target's transport: ``oci:DIR`` (every repository below it) or ``oci:DIR:REPOSITORY[:TAG]``
TRANSPORT = "oci:"
LAYOUT_VERSION = {"imageLayoutVersion": "1.0.0"}
#: where blobs are written before they are checked and renamed into ``blobs/``
PARTIAL_DIR = ".partial"
#: blobs written to one layout at once (each a file written as it is read)
MAX_CONCURRENT_WRITES = 4
#: the session location a writer's upload carries (nothing is sent anywhere)
_SESSION = "layout:"
#: the mode of the files written, less the umask
FILE_MODE = 0o666
#: the longest a run waits for the layout's lock while another process holds it
#: (BATCHPUSH_LAYOUT_LOCK_WAIT_S sets it): a run stuck or stopped (SIGSTOP) with
#: the lock fails this run's images with one line, rather than hanging it
LOCK_WAIT_S = 60.0
#: once the run is cancelled, how much longer it waits for the lock (the index
#: written on the way out lists what finished)
LOCK_AFTER_CANCEL_S = 5.0
#: a wait for the lock this long is said (a warning naming the layout)
LOCK_NOTE_S = 1.0
#: how often a run waiting for the lock tries it again
_LOCK_POLL_S = 0.1


def _current_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


#: read once, at import (``os.umask`` sets it to read it: not while threads write files)
_UMASK = _current_umask()


class LayoutError(BatchPushError):
    """The target layout cannot be written (a full disk, a permission, a bad index)."""

    kind = "layout"

    def __init__(self, path: str, problem: str) -> None:
        super().__init__(f"{path}: {problem}")
        self.path = path
        self.problem = problem


def _sync_directory(path: str) -> None:
    """``fsync`` a directory: the renames into it are on the disk."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@dataclass(frozen=True, slots=True)
class IndexEntry:
    """One ``index.json`` descriptor: a manifest or index, tagged (``ref_name``) or not."""

    media_type: str
    digest: Digest
    size: int
    ref_name: str | None = None

    def to_json(self) -> dict[str, Any]:
        entry: dict[str, Any] = {"mediaType": self.media_type, "digest": str(self.digest), "size": self.size}
        if self.ref_name:
            entry["annotations"] = {REF_NAME: self.ref_name}
        return entry


def _entries(index: Mapping[str, Any]) -> list[dict[str, Any]]:
    manifests = index.get("manifests")
    return [entry for entry in manifests if isinstance(entry, dict)] if isinstance(manifests, list) else []


def ref_name_of(entry: Mapping[str, Any]) -> str | None:
    annotations = entry.get("annotations")
    name = annotations.get(REF_NAME) if isinstance(annotations, dict) else None
    return name if isinstance(name, str) and name else None


@dataclass(slots=True)
class BaseLayout:
    """A layout an incremental export depends on: its index's digest, the layers
    its manifests name (present in its blob store) and its tags."""

    path: str
    index_digest: Digest
    layers: dict[Digest, int] = field(default_factory=dict)
    refs: dict[str, tuple[Digest, int]] = field(default_factory=dict)

    @classmethod
    def read(cls, path: str) -> BaseLayout:
        """Reads ``path``'s index and manifests; raises LayoutError naming what is wrong."""
        index_path = os.path.join(path, "index.json")
        try:
            with open(index_path, "rb") as file:
                raw = file.read(MAX_MANIFEST_BYTES + 1)
            index = json.loads(raw)
        except (OSError, ValueError) as exc:
            raise LayoutError(index_path, f"not a readable OCI layout index ({exc})") from exc
        if not isinstance(index, dict):
            raise LayoutError(index_path, "index.json is not an object")
        base = cls(path, Digest.sha256_of(raw))
        for entry in _entries(index):
            try:
                digest, size = Digest.parse(entry.get("digest")), entry.get("size")  # type: ignore[arg-type]
            except InvalidDigestError:
                continue
            name = ref_name_of(entry)
            if name and isinstance(size, int):
                base.refs[name] = (digest, size)
            base._walk(digest, depth=0)
        return base

    def _blob(self, digest: Digest) -> str:
        return os.path.join(self.path, "blobs", digest.algorithm, digest.hex)

    def _walk(self, digest: Digest, depth: int) -> None:
        """The layers below manifest (or index) ``digest`` that the blob store holds."""
        if depth > 4:
            return
        try:
            with open(self._blob(digest), "rb") as file:
                document = json.loads(file.read(MAX_MANIFEST_BYTES + 1))
        except (OSError, ValueError):
            return  # a manifest this layout lacks (itself incremental): nothing known below it
        if not isinstance(document, dict):
            return
        for child in _entries(document):
            with contextlib.suppress(InvalidDigestError):
                self._walk(Digest.parse(child.get("digest")), depth + 1)  # type: ignore[arg-type]
        for layer in document.get("layers") or ():
            if not isinstance(layer, dict):
                continue
            try:
                layer_digest = Digest.parse(layer.get("digest"))  # type: ignore[arg-type]
            except InvalidDigestError:
                continue
            with contextlib.suppress(OSError):
                self.layers[layer_digest] = os.stat(self._blob(layer_digest)).st_size


@dataclass(frozen=True, slots=True)
class _NoAuth:
    """A layout asks nobody for credentials (the layer path keys its store with them)."""

    credentials: None = None


class LayoutWriter:
    """One OCI layout as a target "registry" (see the module docstring). Thread-safe:
    a lock guards the index entries and the staged files; no I/O is done under it."""

    #: a blob check is a ``stat``: the layer path asks before anything else
    checks_are_free = True

    def __init__(self, path: str, *, bases: tuple[BaseLayout, ...] = (), cancel: threading.Event | None = None, dry_run: bool = False) -> None:
        self.path = os.path.abspath(path)
        self.host = f"{TRANSPORT}{self.path}"
        self.base_url = self.host
        self.bases = bases
        self.dry_run = dry_run
        self.cancel = cancel or threading.Event()
        self.options = RegistryOptions(max_requests_in_flight=MAX_CONCURRENT_WRITES, max_concurrent_uploads=MAX_CONCURRENT_WRITES)
        self.auth = _NoAuth()
        self.rate_limit = None
        self.serves_referrers = False
        #: counters the run's totals read (as of a RegistryClient)
        self.requests_by_method: Counter[str] = Counter()
        self.errors = 0
        #: bytes of blobs and manifests written (a dry run: that would be written)
        self.bytes_sent = 0
        self.bytes_read = 0
        self._lock = threading.Lock()
        #: what this run wrote to the index (ref name or digest -> entry)
        self._written: dict[str, IndexEntry] = {}
        #: the index as found, by ref name (tag lookups before anything is written)
        self._found: dict[str, IndexEntry] = {}
        #: a dry run's "written" blobs
        self._planned: dict[Digest, int] = {}
        #: upload session -> a checked temporary file whose rename waits (``before_commit``)
        self._staged: dict[str, str] = {}
        #: temporary files being written now (a closing writer removes them: after a
        #: cancel, a write still waiting for its source's bytes is not waited for)
        self._writing: set[str] = set()
        self._sessions = 0
        #: entries not yet in index.json (an incremental layout's annotation too)
        self._dirty = bool(bases)
        #: this run's directory of temporary files, and the lock it holds on it
        self._partial = ""
        self._partial_lock: int | None = None
        #: this writer waited the whole bound for the layout's lock once already
        self._lock_refused = False
        if not dry_run:
            self._create()
        self._found = self._read_refs()

    # -- the directory ---------------------------------------------------------
    def _create(self) -> None:
        try:
            os.makedirs(os.path.join(self.path, "blobs", "sha256"), exist_ok=True)
            marker = os.path.join(self.path, "oci-layout")
            if not os.path.exists(marker):
                self._replace(marker, json.dumps(LAYOUT_VERSION).encode())
            if not os.path.exists(os.path.join(self.path, "index.json")):
                self._replace(os.path.join(self.path, "index.json"), self._index_bytes({"schemaVersion": 2, "mediaType": mt.OCI_INDEX, "manifests": []}))
            # under the layout's lock: a run's directory is locked by the time another
            # run looks for those left behind, and no run removes .partial meanwhile
            with self._layout_locked():
                os.makedirs(os.path.join(self.path, PARTIAL_DIR), exist_ok=True)
                self._partial = tempfile.mkdtemp(dir=os.path.join(self.path, PARTIAL_DIR), prefix="run-")
                self._partial_lock = os.open(self._partial, os.O_RDONLY | os.O_DIRECTORY)
                fcntl.flock(self._partial_lock, fcntl.LOCK_EX)
                self._remove_left_behind()
        except OSError as exc:
            raise LayoutError(self.path, f"cannot create the layout: {exc.strerror or exc}") from exc

    @contextlib.contextmanager
    def _layout_locked(self) -> Iterator[None]:
        """An exclusive ``flock`` of the layout's directory (shared by every run and
        writer that writes it): held while the index is merged and replaced, and
        while runs' temporary directories are made or removed."""
        lock = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            self._take_lock(lock)
            yield
        finally:
            os.close(lock)  # the lock goes with its descriptor

    def _take_lock(self, lock: int) -> None:
        """``flock`` of ``lock``, tried every _LOCK_POLL_S (a blocking ``flock`` waits
        for ever, Ctrl-C or not: Python tries it again after the signal handler):
        LayoutError once another process has held it for LOCK_WAIT_S, or for
        LOCK_AFTER_CANCEL_S after the run is cancelled (Cancelled). A writer that
        gave up once only tries it after that (the end of a run flushes, then
        closes, then discards: else three waits of the whole bound)."""
        bound_s = waits.bound_s("BATCHPUSH_LAYOUT_LOCK_WAIT_S", LOCK_WAIT_S)
        started = time.monotonic()
        deadline = started if self._lock_refused else started + bound_s
        cancelled_at: float | None = None
        said = False
        while True:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                pass
            now = time.monotonic()
            if self.cancel.is_set():
                cancelled_at = cancelled_at or now
                if now - cancelled_at >= LOCK_AFTER_CANCEL_S:
                    raise Cancelled(f"{self.path}: stopped while another process held the layout's lock")
            if now >= deadline:
                self._lock_refused = True
                raise LayoutError(self.path, f"another process holds the layout's lock, waited for {bound_s:.0f} s (another batchpush run writing it, stuck or stopped?): nothing more written to it")
            if not said and now - started >= LOCK_NOTE_S:
                log.warning("%s: another process holds the layout's lock; waiting for it up to %.0f s", self.path, deadline - started)
                said = True
            time.sleep(_LOCK_POLL_S)

    def _remove_left_behind(self) -> None:
        """The temporary files of runs that were killed: each run's directory is
        locked while it lives, so one that can be locked belongs to nobody."""
        partial = os.path.join(self.path, PARTIAL_DIR)
        for name in os.listdir(partial):
            path = os.path.join(partial, name)
            if path == self._partial or not name.startswith("run-"):
                continue
            try:
                fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
            except OSError:
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                continue  # a run writing now
            else:
                log.info("%s: removing what a killed run left (%s)", self.path, name)
                shutil.rmtree(path, ignore_errors=True)
            finally:
                os.close(fd)

    def _read_index(self) -> dict[str, Any]:
        index_path = os.path.join(self.path, "index.json")
        try:
            with open(index_path, "rb") as file:
                index = json.loads(file.read(MAX_MANIFEST_BYTES + 1))
        except FileNotFoundError:
            return {"schemaVersion": 2, "mediaType": mt.OCI_INDEX, "manifests": []}
        except (OSError, ValueError) as exc:
            raise LayoutError(index_path, f"the layout's index cannot be read ({exc}): left as it is") from exc
        if not isinstance(index, dict) or not isinstance(index.get("manifests"), list):
            raise LayoutError(index_path, "the layout's index has no manifests list: left as it is")
        return index

    def _read_refs(self) -> dict[str, IndexEntry]:
        found = {}
        for entry in _entries(self._read_index()):
            name = ref_name_of(entry)
            try:
                digest = Digest.parse(entry.get("digest"))  # type: ignore[arg-type]
            except InvalidDigestError:
                continue
            if name and isinstance(entry.get("size"), int) and isinstance(entry.get("mediaType"), str):
                found[name] = IndexEntry(entry["mediaType"], digest, entry["size"], name)
        return found

    def blob_path(self, digest: Digest) -> str:
        # a parsed digest is an algorithm and hex only: it cannot leave the layout
        return os.path.join(self.path, "blobs", digest.algorithm, digest.hex)

    def _size_here(self, digest: Digest) -> int | None:
        with self._lock:
            planned = self._planned.get(digest)
        if planned is not None:
            return planned
        try:
            return os.stat(self.blob_path(digest)).st_size
        except OSError:
            return None

    def _size_in_bases(self, digest: Digest) -> int | None:
        return next((base.layers[digest] for base in self.bases if digest in base.layers), None)

    def _present(self, digest: Digest) -> int | None:
        """The blob's size if this layout, or a base layout, holds it."""
        size = self._size_here(digest)
        return size if size is not None else self._size_in_bases(digest)

    def _temporary(self, directory: str, prefix: str) -> tuple[int, str]:
        """A new file of ``directory``, readable as the umask allows (mkstemp makes it
        0600: a layout carried to another machine is read by another user)."""
        fd, path = tempfile.mkstemp(dir=directory, prefix=prefix)
        try:
            os.fchmod(fd, FILE_MODE & ~_UMASK)
        except OSError:
            os.close(fd)
            os.unlink(path)
            raise
        return fd, path

    def _replace(self, path: str, data: bytes) -> None:
        """``data`` into ``path`` atomically: a temporary file beside it, synced, renamed."""
        fd, temporary = self._temporary(os.path.dirname(path), ".tmp-")
        try:
            with os.fdopen(fd, "wb") as file:
                file.write(data)
                file.flush()
                os.fsync(file.fileno())
            os.replace(temporary, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(temporary)
            raise

    # -- the calls of the push path ------------------------------------------
    def with_retries(self, step: Callable[[], T], what: str) -> T:
        """A local write is not retried: a failure (a full disk) would only come again."""
        try:
            return step()
        except OSError as exc:
            raise LayoutError(getattr(exc, "filename", None) or self.path, f"{what}: {exc.strerror or exc}") from exc

    def head_blob(self, repository: str, digest: Digest) -> int | None:
        return self._present(digest)

    def mount_blob(self, repository: str, digest: Digest, from_repository: str) -> MountResult:
        """Granted when the layout (one blob store) holds the blob already."""
        if self._present(digest) is not None:
            return MountResult(True, None)
        return MountResult(False, self.start_upload(repository))

    def start_upload(self, repository: str) -> UploadSession:
        with self._lock:
            self._sessions += 1
            return UploadSession(f"{_SESSION}{self._sessions}")

    def cancel_upload(self, repository: str, session: UploadSession) -> None:
        """Drops the checked file an upload kept for its commit, if any."""
        with self._lock:
            staged = self._staged.pop(session.location, None)
        if staged is not None:
            with contextlib.suppress(OSError):
                os.unlink(staged)

    def upload_blob(self, repository: str, upload: BlobUpload, blob: FileRange | BlobStream, digest: Digest, *, on_progress: Callable[[int], None] | None = None, before_commit: Callable[[], None] | None = None) -> int:
        """Write the blob: to a temporary file, hashed as it goes, checked (its sha256
        and size), then renamed into the blob store; returns the bytes written. A
        blob the layout already holds at that size is not read nor written again.
        ``before_commit`` (which may raise) runs before the rename: a file it stops
        is kept for this upload's next call (``upload.offset`` says it is whole)."""
        with self._lock:
            staged = self._staged.pop(upload.session.location, None)
        if self._size_here(digest) == blob.size or (staged is None and self._size_in_bases(digest) == blob.size):
            if staged is not None:
                with contextlib.suppress(OSError):
                    os.unlink(staged)
            upload.offset = blob.size
            return 0
        if self.dry_run:
            if before_commit is not None:
                before_commit()
            with self._lock:
                self._planned[digest] = blob.size
                self.bytes_sent += blob.size
            upload.offset = blob.size
            return blob.size
        written = 0
        if staged is None:
            pieces = read_views(blob) if isinstance(blob, FileRange) else blob.views()
            staged = self._write_checked(pieces, blob.size, digest, blob.path if isinstance(blob, FileRange) else blob.name, on_progress)
            written = blob.size
        try:
            if before_commit is not None:
                before_commit()
        except BaseException:
            with self._lock:
                self._staged[upload.session.location] = staged
            upload.offset = blob.size
            raise
        self._commit(staged, digest, blob.size)
        upload.offset = blob.size
        return written

    def _write_checked(self, pieces: Iterable[memoryview], expected_size: int, digest: Digest, name: str, on_progress: Callable[[int], None] | None) -> str:
        """The blob (its ``pieces``, read from ``name``) in a temporary file of
        ``PARTIAL_DIR``, checked against ``digest`` and ``expected_size``; its path."""
        if digest.algorithm != "sha256":
            raise LayoutError(self.path, f"blob {digest}: only sha256 blobs are written to a layout")
        fd, temporary = self._temporary(self._partial, f"{digest.hex[:16]}-")
        with self._lock:
            self._writing.add(temporary)
        try:
            hasher = hashlib.sha256()
            size = 0
            with os.fdopen(fd, "wb") as file:
                for piece in pieces:
                    if self.cancel.is_set():
                        raise Cancelled()
                    hasher.update(piece)
                    file.write(piece)
                    size += len(piece)
                    with self._lock:
                        self.bytes_sent += len(piece)
                    if on_progress is not None:
                        on_progress(size)
                file.flush()
                os.fsync(file.fileno())
            actual = Digest("sha256", hasher.hexdigest())
            if size != expected_size:
                raise DigestMismatchError(name, "blob", f"{expected_size} bytes", f"{size} bytes")
            if actual != digest:
                raise DigestMismatchError(name, "blob", str(digest), str(actual))
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.unlink(temporary)
            raise LayoutError(temporary, f"blob {digest} not written: {exc.strerror or exc}") from exc
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(temporary)
            raise
        finally:
            with self._lock:
                self._writing.discard(temporary)
        return temporary

    def _commit(self, temporary: str, digest: Digest, size: int) -> None:
        """Rename the checked file into the store, unless a blob of that size is there
        already (another run wrote it meanwhile): that file is left as it is."""
        final = self.blob_path(digest)
        try:
            if self._size_here(digest) == size:
                os.unlink(temporary)
                return
            os.makedirs(os.path.dirname(final), exist_ok=True)
            os.replace(temporary, final)
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.unlink(temporary)
            raise LayoutError(final, f"blob {digest} not stored: {exc.strerror or exc}") from exc

    def put_manifest(self, repository: str, reference: str, media_type: str, data: bytes) -> Digest:
        """The manifest as a blob, then an index entry: tagged ``REPOSITORY:TAG``, or
        untagged (by digest: a child or a referrer, kept reachable)."""
        digest = Digest.sha256_of(data)
        if self._size_here(digest) != len(data):
            if self.dry_run:
                with self._lock:
                    self._planned[digest] = len(data)
                    self.bytes_sent += len(data)
            else:
                temporary = self._write_checked((memoryview(data),), len(data), digest, f"manifest {repository}@{digest}", None)
                self._commit(temporary, digest, len(data))
        tagged = ":" not in reference
        entry = IndexEntry(media_type, digest, len(data), f"{repository}:{reference}" if tagged else None)
        with self._lock:
            self._written[entry.ref_name or f"@{digest}"] = entry
            self._dirty = True
        return digest

    def _entry(self, repository: str, reference: str) -> IndexEntry | None:
        name = f"{repository}:{reference}"
        with self._lock:
            entry = self._written.get(name) or self._found.get(name)
        return entry

    def head_manifest(self, repository: str, reference: str, accept: str) -> tuple[Digest, int] | None:
        """What the layout's (or, when incremental, a base layout's) ``REPOSITORY:TAG``
        names; None if nothing, or if its manifest is not in the store."""
        entry = self._entry(repository, reference)
        if entry is not None and self._size_here(entry.digest) == entry.size:
            return entry.digest, entry.size
        for base in self.bases:
            found = base.refs.get(f"{repository}:{reference}")
            if found is not None:
                return found
        return None

    def get_manifest(self, repository: str, reference: str, accept: str = mt.MANIFEST_ACCEPT, *, size: int | None = None) -> FetchedManifest:
        """A manifest of the layout by tag or digest; a 404 RegistryError if none."""
        url = f"{self.host}:{repository}@{reference}" if ":" in reference else f"{self.host}:{repository}:{reference}"
        if ":" in reference:
            digest: Digest | None = Digest.parse(reference)
            media_type = ""
        else:
            entry = self._entry(repository, reference)
            digest, media_type = (entry.digest, entry.media_type) if entry is not None else (None, "")
        if digest is None or self._size_here(digest) is None:
            raise RegistryError("GET", url, 404, ("MANIFEST_UNKNOWN",), "not in the layout")
        try:
            with open(self.blob_path(digest), "rb") as file:
                raw = file.read(MAX_MANIFEST_BYTES + 1)
        except OSError as exc:
            raise LayoutError(self.blob_path(digest), f"cannot read: {exc.strerror or exc}") from exc
        if Digest.sha256_of(raw) != digest:
            raise DigestMismatchError(self.blob_path(digest), "manifest", str(digest), str(Digest.sha256_of(raw)))
        if not media_type:
            document = json.loads(raw)
            media_type = document.get("mediaType", "") if isinstance(document, dict) else ""
        return FetchedManifest(raw, media_type, digest)

    def referrers(self, repository: str, digest: Digest) -> list[dict[str, Any]] | None:
        """A layout serves no referrers API: the fallback tag carries them."""
        return None

    def list_tags(self, repository: str, **_: Any) -> list[str]:
        with self._lock:
            names = set(self._found) | {name for name in self._written if not name.startswith("@")}
        return sorted(name.rsplit(":", 1)[1] for name in names if name.rsplit(":", 1)[0] == repository)

    def delete_manifest(self, repository: str, digest: Digest) -> None:
        raise SourceError(self.host, "tags are not deleted from a layout (prune a registry instead)")

    # -- the index ---------------------------------------------------------------
    @staticmethod
    def _index_bytes(index: Mapping[str, Any]) -> bytes:
        return json.dumps(index, indent=1, ensure_ascii=False).encode() + b"\n"

    def flush(self) -> None:
        """Replace ``index.json`` atomically: what it lists now (re-read under a lock
        on the layout, so a concurrent run's entries stay), this run's entries over
        those of the same name, and the base layouts this one depends on."""
        with self._lock:
            written = list(self._written.values())
            dirty, self._dirty = self._dirty, False
        if self.dry_run or not dirty:
            return
        try:
            self._write_index(written)
        except BaseException:
            with self._lock:
                self._dirty = True
            raise

    def _write_index(self, written: list[IndexEntry]) -> None:
        with self._layout_locked():
            index = self._read_index()
            names = {entry.ref_name for entry in written if entry.ref_name}
            digests = {str(entry.digest) for entry in written if entry.ref_name is None}
            kept = [e for e in _entries(index) if ref_name_of(e) not in names and not (ref_name_of(e) is None and e.get("digest") in digests)]
            index["manifests"] = kept + [entry.to_json() for entry in written]
            index.setdefault("schemaVersion", 2)
            index.setdefault("mediaType", mt.OCI_INDEX)
            if self.bases:
                found = index.get("annotations")
                annotations: dict[str, Any] = found if isinstance(found, dict) else {}
                known = [d for d in str(annotations.get(INCREMENTAL_FROM, "")).split(",") if d]
                annotations[INCREMENTAL_FROM] = ",".join(dict.fromkeys(known + [str(base.index_digest) for base in self.bases]))
                index["annotations"] = annotations
            # the renames of the blobs it names reach the disk first (a medium pulled out
            # right after the run holds an index whose blobs are all there)
            _sync_directory(os.path.join(self.path, "blobs", "sha256"))
            self._replace(os.path.join(self.path, "index.json"), self._index_bytes(index))
            _sync_directory(self.path)

    def close(self) -> None:
        """Writes the index (``flush``) and removes this run's temporary files."""
        try:
            self.flush()
        except (OSError, BatchPushError) as exc:
            log.error("%s: the index was not written: %s", self.path, exc)
        self.discard()

    def discard(self) -> None:
        """Removes this writer's temporary files; the index is left as it is."""
        with self._lock:
            leftovers = [*self._staged.values(), *self._writing]
            self._staged.clear()
        for path in leftovers:
            with contextlib.suppress(OSError):
                os.unlink(path)
        if self._partial:
            shutil.rmtree(self._partial, ignore_errors=True)
        if self._partial_lock is not None:
            os.close(self._partial_lock)
            self._partial_lock = None
        if self._partial:
            self._partial = ""
            try:
                with self._layout_locked(), contextlib.suppress(OSError):  # not empty: another run writes
                    os.rmdir(os.path.join(self.path, PARTIAL_DIR))
            except BatchPushError as exc:  # an empty .partial left: the next run removes it
                log.info("%s", exc)
