"""One plan on a Dask cluster (``batchpush run PLAN --scheduler tcp://HOST:PORT``).

Imported only with ``--scheduler``: a local run never imports dask.

The design: each blob of the batch belongs to one Dask task, so that Dask's own
rule — a task runs once (again elsewhere only if its worker dies first) — is the
cluster's single-flight, rather than a coordinator actor of ours that every
upload would ask (one more round trip per blob, and one more thing to lose with
a worker). The client (the machine that
runs ``batchpush run``) expands the plan as the local engine does (it reads the
sources' manifests and configs, never their layers), reads the credentials and
its metadata store, and submits:

- *blob tasks*: each distinct blob of the batch (a layer or an image config,
  known by the digest its source declares) belongs to exactly one, that of the
  first group of repositories in plan order that needs it (one task per blob
  would pay a task's overhead for a 30 KB layer). On a worker it prepares each blob — an
  uncompressed layer is compressed there, the only compression of it in the
  cluster — then, for each target registry that needs it, puts it in the first
  repository of that registry the plan names: it mounts from a repository the
  store knows, or uploads (a task run again asks the registry first, HEAD). One task
  serves every registry rather than a compress task plus an upload task per
  registry: the compressed bytes stay on that worker's spool, never moved
  between workers and never compressed again.
- a *repository task* per group of whole target repositories (a few groups
  per worker thread: a task's fixed cost, its engine, store, connections and
  round trips, is paid for many small images), submitted once the blob tasks
  of its images ended, their (small) results handed over by the client: a
  worker never fetches a result from another, so a worker that dies is never
  waited for and its finished tasks are not run again (Dask would, for a
  result still wanted). A worker's Engine pushes the repositories' images
  exactly as a local run does, its store seeded with what the blob tasks
  learned, by way of the client's store (their fingerprints: nothing is read or
  compressed again; their DiffID → digest entries) and its push state with where each blob now is: the
  blob's first repository needs no request, every other one mounts it from
  there, once (the repository's images share that push state). The manifest
  goes only once every blob it names is in the repository (the engine's rule).

Dask may run a task twice (its worker died after finishing it): every task is
idempotent. A blob task run again (each attempt notes its start in the
scheduler's event log) asks the registry before writing each blob, so it uploads
nothing the lost attempt committed; a mount of a present blob is a 201; a manifest
PUT of the same bytes changes nothing. Workers are stateless: each task has a
temporary store, seeded by the client with what its own store knows of the
task's blobs, and returns what it learned, which the client adds to its store:
the next run, local or clustered, mounts and takes the cron fast path. In a
re-run, an image whose target the client's store says it pushed to before is
first checked by the client itself, as a local run does (one tag HEAD, nothing
compressed); only images not up to date get blob tasks.

Per-registry concurrency is cluster-wide: a blob task holds a
``distributed.Semaphore`` named after the registry (``max_concurrent_uploads``
leases) while it writes a blob of SMALL_BODY_BYTES or more there (a smaller
one takes no upload slot in a local run either). Credentials are read on the client and travel
inside the tasks' arguments in an object whose repr hides them; task keys are a
run id and hashes, never a name or a secret.

Registry sources (``docker://``): their images are first checked by the client
(the source's and the target's tag HEADs, the mirror's cron fast path, as a local
run does); for those to copy, the client reads the manifests (the sources'
manifests are what the client reads of local sources too), so their blobs join
the blob tasks like any other: streamed from the source by the worker, or mounted
from the source repository on its own registry. The repository task's engine gets
the manifests and the tag's digest the client read (``_Push.resolved``), so the
source is not asked again, and copies them with their attachments as a local run
does. Pruning entries run on the client at the end (a tag list, a DELETE per tag).
A dry run writes nothing: the CLI runs it on the client alone.

A stop (SIGINT, SIGTERM: ``Interrupted``) reaches every worker (``_stop_run``):
the run's task engines cancel as a local engine does, and the client reports each
image it has no result for as interrupted.
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import hashlib
import logging
import os
import queue
import shutil
import tempfile
import threading
import time
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from . import __version__, waits
from .digest import Digest
from .engine import Engine, Entry, PushJob, PushOptions, Work
from .errors import BatchPushError, Cancelled, InternalError, InterruptedError_, UsageError
from .layer_push import Staged
from .metadata import Knowledge
from .outcome import LayerOutcome, LayerResult
from .prepare import PendingManifest, PreparedIndex, PreparedLayer, PreparedManifest, PreparedNode, Preparer
from .progress import NoProgress, Progress
from .reference import Reference
from .registry.auth import Credentials
from .registry.client import SMALL_BODY_BYTES, RegistryOptions
from .report import BatchResult, ImageResult
from .sources.base import SourceImage, SourceIndex, SourceLayer, SourceManifest, SourceNode
from .sources.registry import Platform, RemoteImage
from .state import RemoteBlob

if TYPE_CHECKING:  # imported where used: a re-run with nothing to push never imports dask
    import distributed

log = logging.getLogger(__name__)

#: how long the client tries to reach the scheduler, and waits for a first worker
CONNECT_TIMEOUT_S = 10.0
#: how often a layer's byte count is relayed, and how long the display waits for an event
RELAY_INTERVAL_S = 0.5
#: at the end, how long the display still shows events in flight
DRAIN_S = 2.0
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


class Interrupted(KeyboardInterrupt):
    """The run was stopped (Ctrl-C, SIGTERM): its tasks were told to stop; ``result``
    holds every image, those without a result from the cluster failed as interrupted."""

    def __init__(self, result: BatchResult) -> None:
        super().__init__()
        self.result = result



# -- what travels to the workers ---------------------------------------------
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

    def engine(self, metadata_dir: str) -> Engine:
        options = PushOptions(
            registry_defaults=self.defaults,
            registries=self.registries,
            credentials=self.secrets,
            metadata_dir=metadata_dir,
            jobs=1,
            max_concurrent_images=IMAGES_PER_TASK,
            progress=_Relay(f"batchpush-progress-{self.run_id}"),
        )
        return Engine(options)

    def uploads(self, host: str) -> int:
        return self.registries.get(host, self.defaults).max_concurrent_uploads

    def only(self, hosts: Iterable[str]) -> _Setup:
        """For a task that talks to ``hosts`` only: the other hosts' credentials stay here."""
        return replace(self, secrets=self.secrets.only(hosts))


#: what a worker's engine shows that the client does not print from the results
_RELAYED = frozenset({"image_started", "layer_bytes", "layer_done", "note"})


class _Relay(NoProgress):
    """A worker's progress, sent as events to the client's display (``_Display``)
    through the scheduler's event log: plain values only (msgpack). A task's events
    go in batches, one message per RELAY_INTERVAL_S (and its last at the task's
    end, ``flush``): one message per event made the scheduler and the worker's
    event loop handle thousands of messages in a run of small images."""

    def __init__(self, topic: str) -> None:
        import distributed

        self._topic = topic
        self._worker = distributed.get_worker()
        self._lock = threading.Lock()  # guards _sent, _pending and _flushed only
        self._sent: dict[tuple[str, str], float] = {}
        self._pending: list[list[Any]] = []
        self._flushed = time.monotonic()

    def _send(self, *event: Any) -> None:
        now = time.monotonic()
        with self._lock:
            self._pending.append(list(event))
            if now - self._flushed < RELAY_INTERVAL_S:
                return
            batch, self._pending, self._flushed = self._pending, [], now
        self._log(batch)

    def flush(self) -> None:
        """The events not sent yet, now."""
        with self._lock:
            batch, self._pending = self._pending, []
        if batch:
            self._log(batch)

    def _log(self, batch: list[list[Any]]) -> None:
        try:
            self._worker.log_event(self._topic, batch)
        except Exception as exc:  # the display is not worth a push
            log.debug("progress not relayed: %s", exc)

    def image_started(self, target: str, repository: str) -> None:
        self._send("image_started", target, repository)

    def layer_bytes(self, target: str, digest: str, sent_bytes: int, size_bytes: int) -> None:
        now = time.monotonic()
        with self._lock:  # a layer's byte count crosses the network a few times a second at most
            due = sent_bytes >= size_bytes or now - self._sent.get((target, digest), 0.0) >= RELAY_INTERVAL_S
            if due:
                self._sent[(target, digest)] = now
        if due:
            self._send("layer_bytes", target, digest, sent_bytes, size_bytes)

    def layer_done(self, target: str, layer: LayerResult) -> None:
        fields = [str(layer.diff_id) if layer.diff_id else None, str(layer.digest), layer.size, layer.media_type, layer.outcome.value, layer.bytes_sent, layer.mounted_from]
        self._send("layer_done", target, fields)

    def note(self, text: str) -> None:
        self._send("note", text)


def _layer_result(fields: list[Any]) -> LayerResult:
    diff_id, digest, size, media_type, outcome, sent, mounted_from = fields
    return LayerResult(Digest.parse(diff_id) if diff_id else None, Digest.parse(digest), size, media_type, LayerOutcome(outcome), sent, mounted_from)


#: the end of the display's queue: the scheduler forwards a worker's events before
#: the results of its task (one stream, in order), so the client has them all
#: once it has every result; the display need not wait for more
_END = object()


class _Display:
    """The client's live display, fed by the workers' relays: the scheduler hands
    their events to a queue (on the client's event loop), and a thread of ours
    hands them to the renderer (foreign code: no lock is held, the loop never waits)."""

    def __init__(self, client: distributed.Client, topic: str, progress: Progress) -> None:
        self._client = client
        self._topic = topic
        self._progress = progress
        self._events: queue.Queue[Any] = queue.Queue()
        self._stop = threading.Event()
        client.subscribe_topic(topic, self._events.put)
        self._thread = threading.Thread(target=self._run, name="cluster-progress", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            try:
                item = self._events.get(timeout=RELAY_INTERVAL_S)
            except queue.Empty:
                if self._stop.is_set():
                    return  # nothing more in flight
                continue
            if item is _END:
                return  # every event received before the results was shown
            _, event = item
            if self._stop.is_set() and time.monotonic() > self._stopped_at + DRAIN_S:
                return
            for one in event if isinstance(event, list | tuple) else ():  # a batch (_Relay)
                self._show(one)

    def _show(self, event: Any) -> None:
        if not (isinstance(event, list | tuple) and event and event[0] in _RELAYED):
            return
        name, *args = event
        if name == "layer_done":
            args[1] = _layer_result(args[1])
        try:
            getattr(self._progress, name)(*args)
        except Exception:  # a renderer's fault must not stop the run
            log.exception("progress renderer failed")

    def close(self) -> None:
        """The events received are shown (for DRAIN_S at most): a task's events
        came before its result, so none is still in flight."""
        self._stopped_at = time.monotonic()
        self._stop.set()
        self._events.put(_END)
        self._thread.join(DRAIN_S + RELAY_INTERVAL_S * 2)
        try:
            self._client.unsubscribe_topic(self._topic)
        except Exception as exc:
            log.debug("progress topic: %s", exc)


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


# -- tasks (run on workers) -----------------------------------------------------
def _version() -> str:
    import batchpush  # the worker's own, read at call time

    return batchpush.__version__


def _worker() -> str:
    import distributed

    try:
        return str(distributed.get_worker().address)
    except ValueError:  # not in a worker (a test calling a task directly)
        return "local"


#: a file system in memory (Linux)
_SHM = "/dev/shm"  # noqa: S108 - only mkdtemp's own directory is made in it


#: in a worker process: the engines of the tasks running now, by run id, and the
#: runs stopped by their client (``_stop_run``); guarded by _RUNNING_LOCK
_RUNNING: dict[str, set[Engine]] = {}
_STOPPED: set[str] = set()
_RUNNING_LOCK = threading.Lock()


def _stop_run(run_id: str) -> None:
    """Sent to every worker when the client is stopped: the run's engines cancel
    (uploads stop, their sessions are cancelled, no manifest goes), and a task of
    the run that starts later cancels at once."""
    with _RUNNING_LOCK:
        _STOPPED.add(run_id)
        engines = list(_RUNNING.get(run_id, ()))
    for engine in engines:
        engine.cancel()


class _TaskEngine:
    """A worker's engine for one task, with a temporary store seeded by the client."""

    def __init__(self, setup: _Setup, knowledge: Iterable[Knowledge]) -> None:
        if _version() != setup.version:  # connect() saw every worker then; this one came later
            raise ClusterError(f"refused: worker {_worker()} runs batchpush {_version()}, this client {setup.version} (install the same batchpush[cluster] on every worker)")
        # in memory where the system offers it: the store lives for one task (and
        # holds a few KB), and made on disk it cost more than many a task's work
        self._dir = tempfile.mkdtemp(prefix="batchpush-task-", dir=_SHM if os.access(_SHM, os.W_OK) else None)
        self._run_id = setup.run_id
        self.engine = setup.engine(self._dir)
        with _RUNNING_LOCK:
            _RUNNING.setdefault(self._run_id, set()).add(self.engine)
            stopped = self._run_id in _STOPPED
        if stopped:
            self.engine.cancel()
        for host, scheme in setup.schemes.items():
            self.engine.client(host).use_scheme(scheme)
        for part in knowledge:
            self.engine.store.absorb(part)

    def __enter__(self) -> Engine:
        return self.engine

    def __exit__(self, *exc: object) -> None:
        with _RUNNING_LOCK:
            engines = _RUNNING.get(self._run_id, set())
            engines.discard(self.engine)
            if not engines:
                _RUNNING.pop(self._run_id, None)
        self.engine.close()
        shutil.rmtree(self._dir, ignore_errors=True)
        relay = self.engine.options.progress
        if isinstance(relay, _Relay):
            relay.flush()

    def totals(self) -> BatchResult:
        totals = BatchResult()
        self.engine.add_totals(totals)
        return totals


def _blobs_task(blobs: dict[str, _Blob], setup: _Setup, knowledge: Knowledge) -> _BlobsDone:
    """The blobs a group of repositories needs first: each prepared once, then put
    in the first repository of each registry that needs it. Never raises: a failure is a blob's
    result, per registry."""
    import distributed

    worker = _worker()
    task = _TaskEngine(setup, (knowledge,))
    hosts = {target.api_host for blob in blobs.values() for target in blob.targets.values()}
    # made in the task's own thread: a Semaphore needs the worker's context
    leases = {host: distributed.Semaphore(max_leases=setup.uploads(host), name=f"batchpush-uploads-{host}-{setup.uploads(host)}") for host in hosts}
    ask_first = not _first_attempt()
    with task as engine:

        def place(blob: _Blob) -> _BlobDone:
            try:
                prepared = blob.prepared or engine.preparer.prepare_layer(blob.layer)  # type: ignore[arg-type]
            except Exception as exc:
                error = _error(exc, "blob")
                return _BlobDone(blob.key, None, {}, dict.fromkeys(blob.targets, (f"on worker {worker}: {error.message}", error.kind)))
            repositories, failures = {}, {}
            remote = RemoteBlob(prepared.digest, prepared.size, prepared.media_type)
            if blob.held_by is not None:  # on the source's registry, a mount sends nothing
                engine.state.add_layer(blob.held_by.registry, blob.held_by.repository, prepared.key, remote)
            for registry, target in blob.targets.items():
                try:
                    _put(engine, leases[target.api_host], target, prepared, is_config=blob.is_config, ask_first=ask_first)
                    repositories[registry] = target.repository
                except Exception as exc:
                    error = _error(exc, str(target))
                    failures[registry] = (f"blob {prepared.digest} on worker {worker}: {error.message}", error.kind)
            return _BlobDone(prepared.key, remote, repositories, failures)

        with cf.ThreadPoolExecutor(max_workers=IMAGES_PER_TASK, thread_name_prefix="blob") as pool:
            placed = dict(zip(blobs, pool.map(place, blobs.values()), strict=True))
        return _BlobsDone(placed, engine.store.export(done.key for done in placed.values()), task.totals())


def _first_attempt() -> bool:
    """Whether this is the task's first attempt. Dask runs a task again when its
    worker is lost, and the lost attempt may have written blobs already: each
    attempt notes its start in the scheduler's event log, under its run's topic,
    after reading it (the note is answered before any blob is written). False
    when it cannot say: also once the topic is as long as the scheduler keeps
    (``distributed.admin.low-level-log-length``), as an early note may be gone."""
    import dask.config
    import distributed

    try:
        key = str(distributed.get_worker().get_current_task())
        client = distributed.get_client()
        topic = key.rpartition("-")[0]  # the task's kind and run
        notes = client.get_events(topic)
        started = any(event == key for _, event in notes) or len(notes) >= int(dask.config.get("distributed.admin.low-level-log-length", 1000))
        client.log_event(topic, key)
    except Exception as exc:
        log.debug("attempt not known: %s", exc)
        return False
    return not started


def _put(engine: Engine, lease: distributed.Semaphore, target: Reference, layer: PreparedLayer, *, is_config: bool, ask_first: bool) -> None:
    """The blob in ``target``'s repository: already there, mounted, or uploaded. With
    ``ask_first`` (the task ran before: some blobs may be there already) a HEAD
    comes first, so a rerun writes nothing the lost attempt committed; otherwise
    the engine asks only where its store says the blob may be, as a local run
    does (a HEAD per blob was a third of a small blob's requests). A blob of
    SMALL_BODY_BYTES or more is written under the registry's cluster-wide lease;
    a smaller one (a config, a small layer) costs a round trip, not bandwidth,
    and takes no upload slot in a local run either: a lease each made the
    scheduler pace a batch of small images."""
    client = engine.client(target.api_host)
    layers = engine.pusher(client, target).layers
    if ask_first and client.with_retries(lambda: client.head_blob(target.repository, layer.digest), f"blob {layer.digest}") is not None:
        layers.remember(layer, RemoteBlob(layer.digest, layer.size, layer.media_type), layer.recipe)
        return
    with _leased(lease, target.api_host, engine.cancelled) if layer.size >= SMALL_BODY_BYTES else contextlib.nullcontext():
        pushed = layers.push(layer, is_config=is_config)
    if isinstance(pushed, Staged):
        # only a push that waits for a gate, or for another push's staged data,
        # comes back Staged; no push of this task's engine has either
        raise BatchPushError(f"blob {layer.digest}: left uncommitted in {target.name}")


@contextlib.contextmanager
def _leased(lease: distributed.Semaphore, host: str, cancelled: threading.Event) -> Iterator[None]:
    deadline = time.monotonic() + LEASE_WAIT_S
    while not lease.acquire(timeout=LEASE_POLL_S):  # the run's stop in view
        if cancelled.is_set():
            raise Cancelled(f"stopped while waiting for an upload lease for {host}")
        if time.monotonic() > deadline:
            raise BatchPushError(f"no upload lease for {host} within {LEASE_WAIT_S:.0f} s")
    try:
        yield
    finally:
        lease.release()


def _repository_task(pushes: list[_Push], setup: _Setup, knowledge: Knowledge, blobs: dict[str, _BlobDone]) -> _RepositoryDone:
    """Every image of the batch to some target repositories, pushed by one
    worker's engine as a local run would, their blobs already in the registry.
    A repository's images are all in one task, so they share one push state: a
    blob is mounted into it once (two mounts of one blob into one repository at
    once can make the registry lose a manifest's blob while it writes the link).
    Never raises: a failure is its image's result."""
    worker = _worker()
    seeds, later = _held_back((knowledge,), pushes)
    task = _TaskEngine(setup, seeds)
    results: dict[int, ImageResult] = {}
    with task as engine:
        runnable = []
        for push in pushes:
            registry = push.target.registry
            failure = next((blobs[name].failures[registry] for name in push.blobs if registry in blobs[name].failures), None)
            if failure is not None:
                error = BatchPushError(failure[0])
                error.kind = failure[1]
                results[push.index] = engine.failed(push.image.name, str(push.target), error, time.monotonic())
                continue
            for name in push.blobs:
                blob = blobs[name]
                assert blob.remote is not None
                engine.state.add_layer(registry, blob.repositories[registry], blob.key, blob.remote)
            runnable.append(push)
        entries: dict[int, Entry] = {}
        for push in runnable:  # an image to several tags is prepared once
            if id(push.image) not in entries:
                entries[id(push.image)] = push.entry()
            entries[id(push.image)].uses += 1

        def run(push: _Push) -> ImageResult:
            work = Work(push.image.name, str(push.target), entries[id(push.image)], push.target)
            result = engine.run_work(work)
            return replace(result, worker=worker, error=f"on worker {worker}: {result.error}" if result.error else None)

        with cf.ThreadPoolExecutor(max_workers=IMAGES_PER_TASK, thread_name_prefix="image") as pool:
            for push, result in zip(runnable, pool.map(run, runnable), strict=True):
                results[push.index] = result
        engine.store.absorb(later)
        return _RepositoryDone(results, engine.store.export(), task.totals())


def _held_back(parts: Iterable[Knowledge], pushes: list[_Push]) -> tuple[list[Knowledge], Knowledge]:
    """A repository task's seed knowledge, less the entries that say a blob is in
    one of its own target repositories, and those entries: they are absorbed once
    the images are pushed. The client decided already that these images are not up
    to date (checked, or never pushed there), and the push state says where each
    blob is; with them, the engine would ask each tag first (the cron fast path's
    HEAD, one per image for nothing)."""
    names = {push.target.name for push in pushes}
    parts = list(parts)
    held = tuple(entry for part in parts for entry in part.entries if entry[1].source_repository in names)
    return [replace(part, entries=tuple(entry for entry in part.entries if entry[1].source_repository not in names)) for part in parts], Knowledge(held)


def _up_to_date(engine: Engine, work: Work) -> ImageResult | None:
    """The cron fast path alone: the image as the store knows it (nothing
    compressed), its tag HEAD; None when it is not up to date or cannot say. A
    registry source's image is compared by digest at both ends, but for a platform
    subset: its index is not the source's, so it is compared, as a local run does,
    by the index it would push (its manifests are read now, once)."""
    assert work.entry is not None and work.reference is not None
    image = work.entry.image.node
    if isinstance(image, RemoteImage) and not work.entry.platforms:
        return _mirror_up_to_date(engine, work, image)
    started = time.monotonic()
    try:
        node = engine.prepared(work.entry)
        if isinstance(node, PendingManifest):
            if not node.ready():  # the store did not know every layer after all
                return None
            node = node.wait(engine.cancelled)
        current = engine.pusher(engine.client(work.reference.api_host), work.reference).up_to_date(node, work.reference.tag or "latest")
        source_digest = str(engine.source_head(work.entry, image)[0]) if current is not None and isinstance(image, RemoteImage) else None
    except Exception as exc:
        log.info("%s: not checked (%s); pushing in full", work.target, exc)
        return None
    if current is None:
        return None
    return ImageResult(work.source, work.target, "up-to-date", str(current.digest), current.size, seconds=time.monotonic() - started, source_digest=source_digest)


def _mirror_up_to_date(engine: Engine, work: Work, image: RemoteImage) -> ImageResult | None:
    """A registry source's image whose target tag names the source's digest already
    (a HEAD at each end): its result, its attachments copied as a local run copies
    them; None when the image must be copied (its blobs go by blob tasks first)."""
    assert work.entry is not None and work.reference is not None
    started = time.monotonic()
    try:
        pusher = engine.pusher(engine.client(work.reference.api_host), work.reference)
        current = engine.mirror_up_to_date(work.entry, image, pusher, work.reference.tag or "latest")
    except Exception as exc:  # the copy says it again, as the image's failure
        log.info("%s: not checked (%s)", work.target, exc)
        return None
    if current is None:
        return None
    if image.attachments or image.referrers:
        return engine.run_work(work)  # the same HEADs again, then its attachments
    digest, size = current
    return ImageResult(work.source, work.target, "up-to-date", str(digest), size, seconds=time.monotonic() - started, source_digest=str(digest))


def _lost(kind: str, exc: BaseException, address: str) -> str:
    """Why a task gave no result: a worker's refusal as it said it, the scheduler's
    loss (this client cancels no task: a cancel is the scheduler dropping it), else
    what the cluster said."""
    if isinstance(exc, ClusterError):
        return exc.message
    if isinstance(exc, cf.CancelledError):
        return f"the cluster dropped the {kind}'s task: is the Dask scheduler at {address} still running?"
    return f"the cluster lost the {kind}'s task: {_error(exc, kind).message}"


def _error(exc: BaseException, where: str) -> BatchPushError:
    return exc if isinstance(exc, BatchPushError) else InternalError.of(exc, where)


# -- the client -------------------------------------------------------------------
def connect(address: str) -> distributed.Client:
    """A client of the scheduler with at least one worker, every worker running this
    batchpush version; else ClusterError (nothing was sent to any worker)."""
    import distributed

    try:
        client = distributed.Client(address, timeout=CONNECT_TIMEOUT_S, set_as_default=False)
    except Exception as exc:
        raise ClusterError(f"cannot reach the Dask scheduler at {address}: {exc}") from None
    try:
        try:
            client.wait_for_workers(1, timeout=CONNECT_TIMEOUT_S)
        except Exception:
            raise ClusterError(f"the Dask scheduler at {address} has no worker") from None
        versions = client.run(_version)
        other = sorted(f"{worker} runs batchpush {version}" for worker, version in versions.items() if version != __version__)
        if other:
            raise ClusterError(f"refused: {'; '.join(other)}, this client {__version__} (install the same batchpush[cluster] on every worker)")
    except BaseException:
        client.close()
        raise
    return client


def run(address: str, jobs: Iterable[PushJob], options: PushOptions, stop: threading.Event | None = None) -> BatchResult:
    """Every job's images to their targets on the cluster at ``address``; the same
    result as ``Engine.run``, each image naming the worker that pushed it. Once
    ``stop`` is set (a signal handler may set it) or on KeyboardInterrupt, raises
    Interrupted, with the result so far."""
    if options.dry_run:
        raise ClusterError("a dry run writes nothing and runs on this machine: use Engine.run")
    with Engine(replace(options, jobs=1)) as engine:
        cluster = _ClusterRun(address, engine, stop or threading.Event())
        try:
            return cluster._run(jobs)
        except (KeyboardInterrupt, Cancelled):
            raise Interrupted(cluster._interrupted()) from None
        finally:
            cluster.close()


def _manifests(node: SourceNode) -> Iterator[SourceManifest]:
    if isinstance(node, SourceIndex):
        for child in node.children:
            yield from _manifests(child)
    else:
        yield node


def _hash(*parts: object) -> str:
    return hashlib.sha256("\0".join(map(str, parts)).encode()).hexdigest()[:24]


class _ClusterRun:
    def __init__(self, address: str, engine: Engine, stop: threading.Event) -> None:
        self.address = address
        self.engine = engine
        #: set by the caller (a signal): the run stops where it waits
        self.stop = stop
        self.progress = engine.options.progress
        #: every key of this run starts with it: two runs on one scheduler never share a task
        self.run_id = uuid.uuid4().hex[:12]
        self.result = BatchResult()
        #: set by _connect, once there is something to push
        self.client: distributed.Client
        self._display: _Display | None = None
        #: each image's result as it comes, and its work
        self.slots: list[ImageResult | None] = []
        self.expanded: list[Work] = []

    def _connect(self) -> None:
        """The cluster, reached once some image is to be pushed: a re-run whose
        images are all up to date (checked here) is over without it, as quick as
        a local one (dask's import and a client's start cost about as much as the
        whole re-run of a hundred images)."""
        self.client = connect(self.address)
        try:
            self._display = _Display(self.client, f"batchpush-progress-{self.run_id}", self.progress)
        except BaseException:
            self.client.close()
            raise
        #: repository tasks (and blob tasks) to make of the batch: a few per worker thread
        self.tasks = TASKS_PER_THREAD * max(1, sum(self.client.nthreads().values()))

    def close(self) -> None:
        if self._display is not None:
            self._display.close()
            self.client.close()

    def _interrupted(self) -> BatchResult:
        """Every worker told to stop the run's tasks; each image the cluster did not
        give a result for fails as interrupted (its manifest goes only after all its
        blobs: a task that was writing it may still finish it)."""
        self.engine.cancel()  # its own requests (checks, manifests read) end now
        if self._display is not None:  # connected: some tasks may be running
            told = threading.Thread(target=self._stop_tasks, name="cluster-stop", daemon=True)
            told.start()
            told.join(STOP_WAIT_S)  # a scheduler gone silent must not hold the stop
        error = InterruptedError_("stopped before the cluster gave its result; no manifest was written after the stop")
        now = time.monotonic()
        self.result.images = [slot or self.engine.failed(work.source, work.target, error, now) for slot, work in zip(self.slots, self.expanded, strict=True)]
        self.engine.add_totals(self.result)
        return self.result

    @contextlib.contextmanager
    def _pool(self, name: str) -> Iterator[cf.ThreadPoolExecutor]:
        """Threads for the client's own requests; on a stop, those under way are
        cancelled (the engine's requests end) and those not started never start."""
        pool = cf.ThreadPoolExecutor(max_workers=self.engine.options.max_concurrent_images, thread_name_prefix=name)
        try:
            yield pool
        finally:
            if self.stop.is_set():
                self.engine.cancel()
            pool.shutdown(wait=True, cancel_futures=True)

    def _check_stop(self) -> None:
        """Raises Cancelled once the run is stopped."""
        if self.stop.is_set():
            raise Cancelled()

    def _stop_tasks(self) -> None:
        try:
            self.client.run(_stop_run, self.run_id)
        except Exception as exc:  # each task still ends, on its own timeouts
            log.warning("the workers could not be told to stop: %s", exc)

    def _run(self, jobs: Iterable[PushJob]) -> BatchResult:
        self.slots = slots = []
        #: each slot's work, for the pruning entries (which need every image of theirs arrived)
        self.expanded = expanded = []
        works: list[tuple[int, Work]] = []
        for job in self.engine.repository_jobs(jobs):  # the client lists catalogs, as it reads manifests
            for work in self.engine.expand(job):
                self._check_stop()
                slot = self.engine.failed(work.source, work.target, work.error, time.monotonic()) if work.error is not None else None
                expanded.append(work)
                slots.append(slot)
                if work.error is None:
                    works.append((len(slots) - 1, work))
        setup, refused = self._setup(work for _, work in works)
        pending = []
        for index, work in works:
            error = next((refused[host] for host in _work_hosts(work) if host in refused), None)
            if error is not None:
                slots[index] = self.engine.failed(work.source, work.target, error, time.monotonic())
            else:
                pending.append((index, work))
        self.works = dict(pending)
        # first the cron fast path, here: images pushed here before, and every registry source's (two HEADs)
        checks = [w for w in pending if _mirrored(w[1]) or self._pushed_before(w[1])]
        if any(_tells_itself(work) for _, work in checks):
            self._connect()  # an up-to-date mirror's attachments are copied here: the cluster is reached before any write
        for index, checked in self._checked(checks):
            slots[index] = checked
        todo = [(index, work) for index, work in pending if slots[index] is None]
        resolved, unresolved = self._resolve([(index, work) for index, work in todo if _mirrored(work)])
        for index, failed in unresolved:
            slots[index] = failed
        for index, pushed in self._pushes([(index, work) for index, work in todo if slots[index] is None], setup, resolved):
            work = self.works[index]
            slots[index] = pushed or self.engine.failed(work.source, work.target, BatchPushError("the repository task returned nothing for it"), time.monotonic())
        self.result.images = [image for image in slots if image is not None]
        arrived = {id(work) for work, image in zip(expanded, slots, strict=True) if image is not None and image.ok}
        self.engine.run_prunes(arrived, self.result)  # here: a tag list and a DELETE per tag gone
        self.engine.add_totals(self.result)  # the client's own requests: pings, checks, manifests read, prunes
        if self._display is None:  # said, so that a scheduler that is down does not go unnoticed for long
            self.progress.note(f"nothing was left to push: the Dask scheduler at {self.address} was not contacted")
        return self.result

    def _resolve(self, works: list[tuple[int, Work]]) -> tuple[dict[int, _Resolved], list[tuple[int, ImageResult]]]:
        """Each registry source's image to copy, read here (its tag's digest, its
        manifests; never a layer), so the batch knows its blobs: by ``id`` of the
        work; and the failures, by the work's index."""
        if not works:
            return {}, []

        def resolve(work: Work) -> _Resolved:
            assert work.entry is not None
            node = self.engine.prepared(work.entry)
            assert not isinstance(node, PendingManifest)
            return node, self.engine.source_head(work.entry, work.entry.image.node)  # type: ignore[arg-type]

        resolved: dict[int, _Resolved] = {}
        unresolved: list[tuple[int, ImageResult]] = []
        with self._pool("resolve") as pool:
            for index, work, future in [(index, work, pool.submit(resolve, work)) for index, work in works]:
                try:
                    resolved[id(work)] = waits.result(future, self.stop)
                except Cancelled:
                    raise
                except Exception as exc:
                    unresolved.append((index, self.engine.failed(work.source, work.target, _error(exc, work.source), time.monotonic())))
        return resolved, unresolved

    def _setup(self, works: Iterable[Work]) -> tuple[_Setup, dict[str, BatchPushError]]:
        """The registries' options and credentials (targets' and registry sources'),
        read here; a host whose credentials cannot be read fails its images."""
        registries, secrets, refused = {}, {}, {}
        for host in (host for work in works for host in _work_hosts(work)):
            if host in registries or host in refused:
                continue
            options = self.engine.registry_options(host)
            try:
                secrets[host] = self.engine.credentials(host, options)
            except BatchPushError as exc:
                refused[host] = exc
                continue
            registries[host] = replace(options, username=None, password_env=None, password_file=None)
        defaults = replace(self.engine.options.registry_defaults, username=None, password_env=None, password_file=None)
        return _Setup(defaults, registries, _Secrets(secrets), self.run_id, self._schemes(registries)), refused

    def _schemes(self, hosts: Iterable[str]) -> dict[str, str]:
        """Each registry's scheme, chosen once here (a ping, as a local run does)
        rather than by every task: a registry that does not answer is left to the
        tasks, whose images fail with the registry's own error."""
        chosen = {}
        for host in hosts:
            try:
                chosen[host] = self.engine.client(host).base_url.split("://", 1)[0]
            except BatchPushError as exc:
                log.info("%s: not pinged (%s)", host, exc)
        return chosen

    def _pushed_before(self, work: Work) -> bool:
        """The client's store saw every config of the image go to this target: a re-run."""
        assert work.entry is not None and work.reference is not None
        if _mirrored(work):
            return False
        name = work.reference.name
        configs = [m.config_descriptor.digest for m in _manifests(work.entry.image.node)]
        return all(digest is not None and any(e.source_repository == name for e in self.engine.store.get_metadata(digest)) for digest in configs)

    def _knowledge(self, keys: Iterable[Any]) -> Knowledge:
        return self.engine.store.export(key for key in keys if key is not None)

    def _submit_repository(self, pushes: list[_Push], setup: _Setup, blobs: dict[str, _BlobDone]) -> distributed.Future:
        keys = [b.key for push in pushes for b in _blobs(push)]
        hosts = {host for push in pushes for host in _hosts(push.target, push.image)}
        return self.client.submit(_repository_task, pushes, setup.only(hosts), self._knowledge(keys), blobs, key=f"batchpush-repository-{self.run_id}-{pushes[0].index}", pure=False)

    def _checked(self, works: list[tuple[int, Work]]) -> Iterator[tuple[int, ImageResult | None]]:
        """The cron fast path, run here as a local run does: one tag HEAD per image
        the client's store saw go to its target (nothing compressed); None for an
        image not up to date. A task per group of them, as it was, paid the
        cluster's round trips and a task's engine for one request per image."""
        with self._pool("check") as pool:
            futures = [pool.submit(_up_to_date, self.engine, work) for _, work in works]
            for (index, work), future in zip(works, futures, strict=True):
                result = waits.result(future, self.stop)
                if result is not None and not _tells_itself(work):
                    self._show(result, work)
                yield index, result

    def _pushes(self, pending: list[tuple[int, Work]], setup: _Setup, resolved: dict[int, _Resolved]) -> Iterator[tuple[int, ImageResult | None]]:
        """The blob tasks (each blob in the task of the first repository that needs
        it; placed in its first repository per registry, in plan order); a
        repository's task once all its images' blobs are placed. The
        client hands each blob's (small) result to the repository tasks itself
        and lets go of it: no worker ever fetches from another, so a dead worker's
        results are never waited for, nor computed again."""
        if not pending:
            return
        self._connect()
        blobs: dict[str, _Blob] = {}
        #: each group's own blobs: those no earlier group needs
        owned: list[dict[str, _Blob]] = []
        groups = _by_repository(pending, self.tasks, resolved)
        needs: list[set[str]] = []
        users: dict[str, list[int]] = {}
        for number, group in enumerate(groups):
            owned.append({})
            names: set[str] = set()
            for i, push in enumerate(group):
                mine = []
                for blob in _blobs(push):
                    name = _hash(blob.declared)
                    if name not in blobs:
                        blobs[name] = owned[number][name] = blob
                    blobs[name].targets.setdefault(push.target.registry, push.target)
                    mine.append(name)
                group[i] = replace(push, blobs=tuple(dict.fromkeys(mine)))
                names.update(mine)
            needs.append(names)
            for name in names:
                users.setdefault(name, []).append(number)
        running: dict[distributed.Future, tuple[str, int]] = {}
        #: each task's future once it is done (Dask calls back from a thread of its own)
        finished: queue.Queue[distributed.Future] = queue.Queue()

        def watch(future: distributed.Future, kind: str, number: int) -> None:
            running[future] = (kind, number)
            future.add_done_callback(finished.put)

        for number, own in enumerate(owned):
            if own:
                key = f"batchpush-blobs-{self.run_id}-{number}"
                hosts = {host for blob in own.values() for host in blob.hosts()}
                watch(self.client.submit(_blobs_task, own, setup.only(hosts), self._knowledge(b.key for b in own.values()), key=key, pure=False), "blobs", number)
        done: dict[str, _BlobDone] = {}
        left = [len(names) for names in needs]
        while running:
            self._check_stop()
            try:
                future = finished.get(timeout=waits.POLL_S)
            except queue.Empty:
                continue
            kind, number = running.pop(future)
            if kind == "repository":
                yield from self._repository_done(future, groups[number])
                continue
            placed = self._blobs_done(future, owned[number])
            future.release()
            done.update(placed)
            for name in placed:
                for user in users[name]:
                    left[user] -= 1
                    if left[user] == 0:
                        watch(self._submit_repository(groups[user], setup, {name: done[name] for name in needs[user]}), "repository", user)

    def _blobs_done(self, future: distributed.Future, blobs: dict[str, _Blob]) -> dict[str, _BlobDone]:
        """A blob task's results, its work counted; a task the cluster lost fails
        its blobs in every registry."""
        try:
            result: _BlobsDone = future.result()
        except Exception as exc:
            failure = (_lost("blob", exc, self.address), "error")
            return {name: _BlobDone(blob.key, None, {}, dict.fromkeys(blob.targets, failure)) for name, blob in blobs.items()}
        _add(self.result, result.totals)
        # into the client's store now: kept even if no repository task comes back, and
        # what the repository tasks are seeded with (_submit_repository)
        self.engine.store.absorb(result.learned)
        return result.blobs

    def _repository_done(self, future: distributed.Future, pushes: list[_Push]) -> Iterator[tuple[int, ImageResult | None]]:
        """A repository task's results: its store knowledge absorbed, its totals
        added, each image's line shown. A task the cluster lost fails its images."""
        try:
            done: _RepositoryDone = future.result()
        except Exception as exc:
            error = BatchPushError(_lost("repository", exc, self.address))
            for push in pushes:
                work = self.works[push.index]
                yield push.index, self.engine.failed(work.source, work.target, error, time.monotonic())
            return
        self.engine.store.absorb(done.learned)
        _add(self.result, done.totals)
        for index, result in done.results.items():
            self._show(result, self.works[index])
            yield index, result

    def _show(self, image: ImageResult, work: Work) -> None:
        assert work.reference is not None
        try:
            if image.ok and image.digest is not None:
                self.progress.pushed(image.target, work.reference.tag or "latest", image.digest, image.size or 0, up_to_date=image.status == "up-to-date")
            elif not image.ok:
                self.progress.failed(image.target, image.error or "failed")
        except Exception:  # a renderer's fault must not lose the image's result
            log.exception("progress renderer failed")


def _by_repository(works: list[tuple[int, Work]], tasks: int, resolved: dict[int, _Resolved]) -> list[list[_Push]]:
    """The pushes grouped by target repository, in plan order, whole repositories
    packed into about ``tasks`` groups (a repository is never split: its images
    share one push state). A task has a fixed cost (an engine, a store,
    connections, the scheduler's round trips), paid once per group rather than
    once per repository of a few small images."""
    repositories: dict[str, list[_Push]] = {}
    for index, work in works:
        assert work.entry is not None and work.reference is not None
        push = _Push(index, work.entry.image, work.reference, platforms=work.entry.platforms, resolved=resolved.get(id(work)))
        repositories.setdefault(work.reference.name, []).append(push)
    size = -(-len(works) // max(tasks, 1))
    groups: list[list[_Push]] = []
    for pushes in repositories.values():
        if groups and len(groups[-1]) < size:
            groups[-1].extend(pushes)
        else:
            groups.append(pushes)
    return groups


def _mirrored(work: Work) -> bool:
    return work.entry is not None and isinstance(work.entry.image.node, RemoteImage)


def _tells_itself(work: Work) -> bool:
    """A registry source's image with attachments to copy: checked up to date, it
    went through the engine's whole path, which showed its line already."""
    if work.entry is None or work.entry.platforms:  # a subset's attachments are not copied
        return False
    image = work.entry.image.node
    return isinstance(image, RemoteImage) and bool(image.attachments or image.referrers)


def _work_hosts(work: Work) -> Iterator[str]:
    assert work.reference is not None and work.entry is not None
    return _hosts(work.reference, work.entry.image)


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


def _add(result: BatchResult, totals: BatchResult) -> None:
    result.bytes_read += totals.bytes_read
    result.bytes_compressed += totals.bytes_compressed
    result.bytes_uploaded += totals.bytes_uploaded
    result.requests_by_method.update(totals.requests_by_method)
    result.requests_by_registry.update(totals.requests_by_registry)
    result.errors_by_registry.update(totals.errors_by_registry)


__all__ = ["CONNECT_TIMEOUT_S", "ClusterError", "Interrupted", "connect", "run"]
