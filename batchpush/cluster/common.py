"""What the client and the tasks share: the settings, the errors, and the values that travel in a task's arguments and results."""

from __future__ import annotations

import concurrent.futures as cf
import logging
import pickle
import threading
import time
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar

from .. import __version__, waits
from ..digest import Digest
from ..engine import Engine, Entry, PushOptions
from ..errors import BatchPushError, Cancelled, InternalError, UsageError
from ..metadata import Knowledge
from ..prepare import PreparedIndex, PreparedLayer, PreparedManifest, PreparedNode, Preparer
from ..progress import Progress
from ..reference import Reference
from ..registry.auth import Credentials
from ..registry.client import RegistryOptions
from ..report import BatchResult, ImageResult
from ..sources.base import SourceImage, SourceIndex, SourceLayer, SourceManifest, SourceNode
from ..sources.registry import Platform, RemoteImage
from ..state import RemoteBlob

log = logging.getLogger(__name__)


T = TypeVar("T")


#: how long the client tries to reach the scheduler, and waits for a first worker
CONNECT_TIMEOUT_S = 10.0


#: how often the client polls the workers for its run (its tasks running, their
#: progress events), and a layer's byte count is relayed at most
RELAY_INTERVAL_S = 0.5


#: the longest the client goes without word of a task: a worker running it (or,
#: for a task not started yet, any task of the run), then its result once Dask says
#: it is done; a task silent that long is tried once more, then its images fail
#: (BATCHPUSH_CLUSTER_SILENCE_S sets it; a task that runs for hours is not silent)
TASK_SILENCE_S = 120.0


#: the longest any other call to the cluster is waited for (a version check, a
#: poll, the end of the run's cleanup)
CALL_WAIT_S = 30.0


#: at the end of the run, how long the workers have to forget it (and hand over their last events)
END_WAIT_S = 10.0


#: while a worker has been silent for the bound, how often the client asks which of its tasks Dask has there
STRANDED_EVERY_S = 5.0
#: the client's polls between two listings of the workers
WORKERS_EVERY = 10


#: a task's events kept on its worker until the client's next poll, at most
OUTBOX_EVENTS = 10_000


#: a run whose client went away unheard (killed) is forgotten by the workers after this
RUN_EXPIRY_S = 3600.0


#: the longest a blob task waits for the scheduler to say whether it ran before
NOTE_WAIT_S = 30.0


#: images of one repository task pushed at once
IMAGES_PER_TASK = 4


#: tasks of each kind per worker thread of the cluster: enough to share the work
#: out and to keep every thread busy to the end, few enough that a task's fixed cost
#: is paid for many images
TASKS_PER_THREAD = 4


#: the longest a blob task waits for its registry's upload lease
LEASE_WAIT_S = 600.0


#: how often a blob task waiting for its lease looks at the run's stop
LEASE_POLL_S = 1.0


#: after a stop, how long the client waits for the workers to hear it
STOP_WAIT_S = 5.0


#: a registry source's image as the client read it: its manifests, its tag's digest and size
_Resolved = tuple[PreparedNode, tuple[Digest, int | None]]


class ClusterError(UsageError):
    """The cluster cannot run this batch (unreachable, no worker, another version)."""


class _Secrets:
    """Credentials read on the client, per registry host: a CredentialProvider whose
    repr and str hide them (a task's arguments may be shown or logged)."""

    def __init__(self, by_host: dict[str, Credentials | None]) -> None:
        self._by_host = by_host

    def __call__(self, host: str) -> Credentials | None:
        return self._by_host.get(host)

    def only(self, hosts: Iterable[str]) -> _Secrets:
        wanted = set(hosts)
        return _Secrets({host: found for host, found in self._by_host.items() if host in wanted})

    def __repr__(self) -> str:
        return f"<credentials for {len(self._by_host)} host(s), redacted>"

    __str__ = __repr__


@dataclass(frozen=True, slots=True)
class _Setup:
    """Everything a worker's engine needs, resolved on the client (no file or
    environment variable of the client is read on a worker)."""

    defaults: RegistryOptions
    registries: dict[str, RegistryOptions]
    secrets: _Secrets
    #: every task of the run knows it: a stop of the run reaches the task's engine
    run_id: str
    #: host -> the scheme the client's ping chose: a task's engine tries only that one
    schemes: dict[str, str]
    #: the client's batchpush version: a worker that joined later with another one refuses the task
    version: str = __version__
    #: the run's spool limit (each worker's spool is in its own temp directory)
    spool_limit: int | None = None

    def engine(self, metadata_dir: str, progress: Progress) -> Engine:
        options = PushOptions(
            registry_defaults=self.defaults,
            registries=self.registries,
            credentials=self.secrets,
            metadata_dir=metadata_dir,
            jobs=1,
            max_concurrent_images=IMAGES_PER_TASK,
            progress=progress,
            spool_limit=self.spool_limit,
        )
        return Engine(options)

    def uploads(self, host: str) -> int:
        return self.registries.get(host, self.defaults).max_concurrent_uploads

    def only(self, hosts: Iterable[str]) -> _Setup:
        """For a task that talks to ``hosts`` only: the other hosts' credentials stay here."""
        return replace(self, secrets=self.secrets.only(hosts))


@dataclass(slots=True)
class _Blob:
    """A blob of the batch: a local layer to prepare, or a blob prepared already (a
    config, a registry source's blob), and the first target repository of each
    registry that needs it."""

    layer: SourceLayer | None
    prepared: PreparedLayer | None
    is_config: bool = False
    #: the registry source's repository that holds it (a mount from there, on its registry)
    held_by: Reference | None = None
    targets: dict[str, Reference] = field(default_factory=dict)

    @property
    def key(self) -> Digest | None:
        """Its identity in the push state and the stores (``PreparedLayer.key``)."""
        if self.prepared is not None:
            return self.prepared.key
        assert self.layer is not None
        return self.layer.diff_id or self.layer.descriptor.digest

    def hosts(self) -> set[str]:
        """The registries its task talks to for it: its targets', its source's."""
        return {target.api_host for target in self.targets.values()} | ({self.held_by.api_host} if self.held_by is not None else set())

    @property
    def declared(self) -> Digest | str:
        """The digest its source declares (its name in the batch)."""
        if self.prepared is not None:
            return self.prepared.digest
        assert self.layer is not None
        return self.layer.descriptor.digest or self.layer.diff_id or str(self.layer.blob)


@dataclass(frozen=True, slots=True)
class _BlobDone:
    """Where a blob is now, per registry, or why it is not."""

    key: Any
    remote: RemoteBlob | None
    #: registry -> repository that holds the blob
    repositories: dict[str, str]
    #: registry -> why the blob is not there: (message, error kind)
    failures: dict[str, tuple[str, str]]


@dataclass(frozen=True, slots=True)
class _BlobsDone:
    #: by the blob task's name
    blobs: dict[str, _BlobDone]
    #: what the task learned of its blobs (DiffID -> digest, fingerprints, where each is)
    learned: Knowledge
    totals: BatchResult
    #: its progress events no poll took (``_Relay``)
    events: list[list[Any]] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class _Push:
    """One (image, target) of a repository task, and the names of its blobs' tasks."""

    index: int
    image: SourceImage
    target: Reference
    blobs: tuple[str, ...] = ()
    platforms: tuple[Platform, ...] = ()
    #: a registry source's image as the client resolved it: its manifests, and its
    #: tag's digest (and size) then, so the worker reads neither again
    resolved: _Resolved | None = None

    def entry(self) -> Entry:
        """The engine's entry for the image, holding what the client resolved."""
        entry = Entry(self.image, 0, self.platforms)
        if self.resolved is not None:
            for name, value in zip(("node", "digest"), self.resolved, strict=True):
                future: cf.Future[Any] = cf.Future()
                future.set_result(value)
                entry.once[name] = future
        return entry


@dataclass(frozen=True, slots=True)
class _RepositoryDone:
    #: by the push's index
    results: dict[int, ImageResult]
    learned: Knowledge
    totals: BatchResult
    #: its progress events no poll took (``_Relay``)
    events: list[list[Any]] = field(default_factory=list)


class _Packed:
    """A task's arguments, pickled and compressed by the client. The scheduler
    unpickles what a task is given, keeps it while the task lives, and its log of
    the recent messages to each worker (``distributed.admin.low-level-log-length``,
    a thousand) keeps it longer: given as objects (images, manifests, store
    knowledge), the arguments made the scheduler grow by megabytes a run until
    those logs were full; as these bytes, by a fraction of that. Its repr hides
    its content (the credentials travel in it)."""

    __slots__ = ("data",)

    def __init__(self, data: bytes) -> None:
        self.data = data

    @classmethod
    def of(cls, *args: Any) -> _Packed:
        return cls(zlib.compress(pickle.dumps(args, protocol=pickle.HIGHEST_PROTOCOL), 1))

    def unpack(self) -> tuple[Any, ...]:
        return tuple(pickle.loads(zlib.decompress(self.data)))  # noqa: S301 - made by this run's client

    def __repr__(self) -> str:
        return f"<batchpush task arguments, {len(self.data)} bytes>"

    __str__ = __repr__


def _note_name(key: str) -> str:
    """The Dask Event an attempt of the task ``key`` sets when it starts."""
    return f"batchpush-started-{key}"


def _lease_name(run_id: str, host: str) -> str:
    """The run's upload leases for a registry (a Dask Semaphore)."""
    return f"batchpush-uploads-{run_id}-{host}"


def _blob_failure(push: _Push, blobs: dict[str, _BlobDone]) -> BatchPushError | None:
    """Why a blob of the push's image is not in its target's registry, if one is not."""
    registry = push.target.registry
    failure = next((blobs[name].failures[registry] for name in push.blobs if registry in blobs[name].failures), None)
    if failure is None:
        return None
    error = BatchPushError(failure[0])
    error.kind = failure[1]
    return error


def _lost(kind: str, exc: BaseException, address: str) -> str:
    """Why a task gave no result: a worker's refusal as it said it, the scheduler's
    loss (this client cancels no task: a cancel is the scheduler dropping it), else
    what the cluster said."""
    if isinstance(exc, ClusterError | ClusterTimeout):
        return exc.message
    if isinstance(exc, cf.CancelledError):
        return f"the cluster dropped the {kind}'s task: is the Dask scheduler at {address} still running?"
    return f"the cluster lost the {kind}'s task: {_error(exc, kind).message}"


def _error(exc: BaseException, where: str) -> BatchPushError:
    return exc if isinstance(exc, BatchPushError) else InternalError.of(exc, where)


class ClusterTimeout(BatchPushError):
    """The cluster gave no word of a task, or no answer to a call, within its bound."""

    kind = "cluster"


def _started(call: Callable[[], T], name: str) -> cf.Future[T]:
    """``call()`` under way in a daemon thread of its own: a Dask call waits without
    a bound of its own, so the caller waits for this future with one. A call left
    behind ends when its answer comes, or with the client (the run closes it at
    its end) or the worker process."""
    future: cf.Future[T] = cf.Future()

    def target() -> None:
        try:
            future.set_result(call())
        except BaseException as exc:  # handed to whoever waits for it
            future.set_exception(exc)

    threading.Thread(target=target, name=f"cluster-{name}", daemon=True).start()
    return future


def _bounded(call: Callable[[], T], what: str, bound_s: float = CALL_WAIT_S, stop: threading.Event | None = None) -> T:
    """``call()``'s result within ``bound_s``, else ClusterTimeout naming ``what``;
    with ``stop`` in view (Cancelled once it is set)."""
    future = _started(call, "call")
    deadline = time.monotonic() + bound_s
    while True:
        left = deadline - time.monotonic()
        done, _ = cf.wait((future,), timeout=max(0.0, min(waits.POLL_S, left)))
        if done:
            return future.result()
        if stop is not None and stop.is_set():
            raise Cancelled()
        if left <= 0:
            raise ClusterTimeout(f"{what}: no answer within {bound_s:.0f} s")


def _manifests(node: SourceNode) -> Iterator[SourceManifest]:
    if isinstance(node, SourceIndex):
        for child in node.children:
            yield from _manifests(child)
    else:
        yield node


def _hosts(target: Reference, image: SourceImage) -> Iterator[str]:
    """The registries a push talks to: its target's, its registry source's."""
    yield target.api_host
    if isinstance(image.node, RemoteImage):
        yield image.node.reference.api_host


def _blobs(push: _Push) -> Iterator[_Blob]:
    """The blobs of a push's image: a local image's configs and layers (foreign ones
    stay where they are), or a registry source's, as the client resolved them."""
    if push.resolved is not None:
        source = push.image.node.reference  # type: ignore[union-attr]
        yield from _remote_blobs(push.resolved[0], source)
    elif not isinstance(push.image.node, RemoteImage):
        for manifest in _manifests(push.image.node):
            yield _Blob(None, Preparer.config_layer(manifest), is_config=True)
            yield from (_Blob(layer, None) for layer in manifest.layers if layer.blob is not None)


def _remote_blobs(node: PreparedNode, source: Reference) -> Iterator[_Blob]:
    if isinstance(node, PreparedIndex):
        for child in node.children:
            yield from _remote_blobs(child, source)
    elif isinstance(node, PreparedManifest):
        yield _Blob(None, node.config, is_config=True, held_by=source)
        yield from (_Blob(None, layer, held_by=source) for layer in node.layers if not layer.urls)
