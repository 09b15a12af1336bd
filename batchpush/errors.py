"""The exception tree of batchpush; every error carries structured fields.

    BatchPushError
    ├── UsageError            bad command line or arguments
    │   └── ClusterError          the Dask cluster cannot run the batch (cluster/)
    ├── ClusterTimeout        no word of a task from the Dask cluster within its bound (cluster/)
    ├── ReferenceError_       an image reference that does not parse
    ├── InvalidDigestError    a digest that does not parse (digest.py)
    ├── SourceError           a source (file or layout) that cannot be read or lies
    │   └── DigestMismatchError   bytes that do not hash to what they claim
    ├── PlanError             a plan file that does not validate
    ├── CredentialsError      a configured credential source that fails (registry/credentials.py)
    ├── InterruptedError_     the run was stopped before this image was complete
    ├── Cancelled             the run is being interrupted: stop, do not retry
    ├── ImageAbandoned        another layer of the image failed: stop this one (layer_push.py)
    ├── WorkerPoolError       the compression workers keep dying (workers.py)
    ├── LayoutError           an OCI layout target that cannot be written (layout.py)
    ├── InternalError         an exception nobody mapped: it fails its image, not the run
    └── RegistryError         a registry answered with an error (registry/errors.py)
        ├── AuthError             401/403, or no usable credentials
        ├── ManifestDigestError   the registry reports another digest than ours
        ├── UploadGoneError       the registry no longer knows an upload session
        ├── UploadRangeError      a 416 again after the registry said where the upload is
        └── MalformedResponseError  an expected status whose headers do not parse

Lower-level errors (OSError, requests exceptions, tarfile errors) are mapped to
these at one boundary each, with ``raise ... from exc``. No message ever contains a
credential, a token or an upload URL's query string.
"""

from __future__ import annotations


class BatchPushError(Exception):
    """Root of every error batchpush raises on purpose."""

    #: short machine-readable kind, written to the report
    kind = "error"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message

    def __reduce__(self) -> tuple[object, ...]:
        # Subclasses take their own arguments, so the default (the class called with
        # ``args``) cannot rebuild them; an error raised in a worker process must
        # cross back, or the whole process pool is declared broken.
        return (_rebuild, (type(self), self.message, dict(self.__dict__)))


def _rebuild(cls: type[BatchPushError], message: str, state: dict[str, object]) -> BatchPushError:
    error = cls.__new__(cls)
    Exception.__init__(error, message)
    error.__dict__.update(state)
    return error


class UsageError(BatchPushError):
    kind = "usage"


class ReferenceError_(BatchPushError):
    """An image reference (registry/repository:tag@digest) that does not parse."""

    kind = "reference"

    def __init__(self, reference: str, problem: str) -> None:
        super().__init__(f"invalid reference {reference!r}: {problem}")
        self.reference = reference
        self.problem = problem


class SourceError(BatchPushError):
    """A source that cannot be read, or whose content is malformed.

    ``path`` names the file (archive, layout directory or blob) and ``image`` the
    image inside it when known.
    """

    kind = "source"

    def __init__(self, path: str, problem: str, *, image: str | None = None) -> None:
        where = f"{path} ({image})" if image else path
        super().__init__(f"{where}: {problem}")
        self.path = path
        self.image = image
        self.problem = problem


class DigestMismatchError(SourceError):
    """Bytes that do not hash to the digest (or DiffID) that describes them."""

    kind = "digest-mismatch"

    def __init__(self, path: str, what: str, expected: str, actual: str, *, image: str | None = None) -> None:
        super().__init__(path, f"{what}: expected {expected}, got {actual}", image=image)
        self.what = what
        self.expected = expected
        self.actual = actual


class PlanError(BatchPushError):
    kind = "plan"


class InterruptedError_(BatchPushError):
    """The run was stopped (SIGINT/SIGTERM) before this image was complete."""

    kind = "interrupted"


class Cancelled(BatchPushError):
    """The run was interrupted (SIGINT/SIGTERM): stop, do not retry."""

    kind = "cancelled"

    def __init__(self, message: str = "the run was interrupted") -> None:
        # a default message: it is raised bare (``raise Cancelled()``) wherever a
        # cancelled run is noticed
        super().__init__(message)


class InternalError(BatchPushError):
    """An exception nobody mapped (a bug, a full disk, a foreign callback's fault):
    the engine fails that image with this one line and goes on with the others."""

    kind = "internal"

    @classmethod
    def of(cls, exc: BaseException, where: str) -> InternalError:
        """``exc`` in one line: its type and message (an OSError: its strerror and file)."""
        if isinstance(exc, OSError) and exc.strerror:
            detail = f"{exc.strerror}: {exc.filename}" if exc.filename else exc.strerror
        else:
            detail = str(exc).splitlines()[0] if str(exc) else ""
        return cls(f"{where}: unexpected {type(exc).__name__}" + (f": {detail}" if detail else ""))
