"""What runs in a task, on a worker: the blob and repository tasks, their engines, and what a worker process knows of each run."""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import functools
import logging
import os
import shutil
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from ..engine import Engine, Entry, Work
from ..errors import BatchPushError, Cancelled
from ..layer_push import Staged
from ..metadata import Knowledge
from ..prepare import PreparedLayer
from ..reference import Reference
from ..registry.client import SMALL_BODY_BYTES
from ..report import BatchResult, ImageResult
from ..state import RemoteBlob
from .common import (
    CALL_WAIT_S,
    IMAGES_PER_TASK,
    LEASE_POLL_S,
    LEASE_WAIT_S,
    NOTE_WAIT_S,
    RUN_EXPIRY_S,
    ClusterError,
    ClusterTimeout,
    T,
    _Blob,
    _blob_failure,
    _BlobDone,
    _BlobsDone,
    _bounded,
    _error,
    _lease_name,
    _note_name,
    _Packed,
    _Push,
    _RepositoryDone,
    _Setup,
)
from .relay import _Outbox, _Relay

if TYPE_CHECKING:  # imported where used: a re-run with nothing to push never imports dask
    import distributed

log = logging.getLogger(__name__)


def _unpacked(task: Callable[..., T], packed: _Packed) -> T:
    """The task called with its arguments (``_Packed``)."""
    return task(*packed.unpack())


def _version() -> tuple[str, str, bool]:
    """The worker's batchpush (its own, read at call time), its Python, and whether
    Dask's profiler samples its threads."""
    import platform

    import dask.config

    import batchpush

    return batchpush.__version__, platform.python_version(), bool(dask.config.get("distributed.worker.profile.enabled", True))


def _worker() -> str:
    import distributed

    try:
        return str(distributed.get_worker().address)
    except ValueError:  # not in a worker (a test calling a task directly)
        return "local"


#: a file system in memory (Linux)
_SHM = "/dev/shm"  # noqa: S108 - only mkdtemp's own directory is made in it


@dataclass(eq=False, slots=True)
class _RunHere:
    """A run as one worker process knows it: its tasks running here (by key: their
    engine and outbox), whether its client stopped it or ended it, and when its
    client was last heard of."""

    tasks: dict[str, tuple[Engine, _Outbox]] = field(default_factory=dict)
    stopped: bool = False
    #: the client is gone (``_end_run``): forgotten here once its last task ends
    ended: bool = False
    touched: float = field(default_factory=time.monotonic)


#: in a worker process: the runs with a task here, by run id; guarded by _RUNS_LOCK
_RUNS: dict[str, _RunHere] = {}


_RUNS_LOCK = threading.Lock()


def _forget_expired(now: float) -> None:
    """Runs whose client went away without ending them (killed) and that have no
    task here any more. The caller holds _RUNS_LOCK."""
    for run_id in [run_id for run_id, run in _RUNS.items() if not run.tasks and now - run.touched > RUN_EXPIRY_S]:
        del _RUNS[run_id]


def _poll(run_id: str) -> tuple[list[str], list[list[Any]]]:
    """Sent to every worker by the client every RELAY_INTERVAL_S: the keys of the
    run's tasks running here (the client's word that they live) and their events
    not taken yet. Makes nothing for a run it does not know."""
    now = time.monotonic()
    with _RUNS_LOCK:
        _forget_expired(now)
        run = _RUNS.get(run_id)
        if run is None:
            return [], []
        run.touched = now
        running = list(run.tasks.items())
    return [key for key, _ in running], [event for _, (_, outbox) in running for event in outbox.take()]


def _stop_run(run_id: str) -> None:
    """Sent to every worker when the client is stopped: the run's engines cancel
    (uploads stop, their sessions are cancelled, no manifest goes), and a task of
    the run that starts later cancels at once."""
    with _RUNS_LOCK:
        run = _RUNS.setdefault(run_id, _RunHere())
        run.stopped = True
        run.touched = time.monotonic()
        engines = [engine for engine, _ in run.tasks.values()]
    for engine in engines:
        engine.cancel()


def _end_run(run_id: str) -> list[list[Any]]:
    """Sent to every worker when the client ends the run (stopped or not): the
    events not taken yet; the run is forgotten here, at once or when its last task
    (a stopped run's) ends."""
    with _RUNS_LOCK:
        run = _RUNS.get(run_id)
        if run is None:
            return []
        if run.tasks:
            run.ended = run.stopped = True
        else:
            del _RUNS[run_id]
        outboxes = [outbox for _, outbox in run.tasks.values()]
    return [event for outbox in outboxes for event in outbox.take()]


def _current_task() -> str:
    import distributed

    try:
        return str(distributed.get_worker().get_current_task())
    except ValueError:  # not in a worker (a test calling a task directly)
        return f"local-{uuid.uuid4().hex[:8]}"


class _TaskEngine:
    """A worker's engine for one task, with a temporary store seeded by the client;
    the task is listed in its run (``_RUNS``) while it runs, and nothing of it is
    left in the worker once it ends."""

    def __init__(self, setup: _Setup, knowledge: Iterable[Knowledge]) -> None:
        if _version()[0] != setup.version:  # connect() saw every worker then; this one came later
            raise ClusterError(f"refused: worker {_worker()} runs batchpush {_version()[0]}, this client {setup.version} (install the same batchpush[cluster] on every worker)")
        # in memory where the system offers it: the store lives for one task (and
        # holds a few KB), and made on disk it cost more than many a task's work
        self._dir = tempfile.mkdtemp(prefix="batchpush-task-", dir=_SHM if os.access(_SHM, os.W_OK) else None)
        self._run_id = setup.run_id
        self.key = _current_task()
        self._outbox = _Outbox()
        self.engine = setup.engine(self._dir, _Relay(self._outbox))
        now = time.monotonic()
        with _RUNS_LOCK:
            _forget_expired(now)
            run = _RUNS.setdefault(self._run_id, _RunHere())
            run.tasks[self.key] = (self.engine, self._outbox)
            run.touched = now
            stopped = run.stopped
        if stopped:
            self.engine.cancel()
        for host, scheme in setup.schemes.items():
            self.engine.client(host).use_scheme(scheme)
        for part in knowledge:
            self.engine.store.absorb(part)

    def __enter__(self) -> Engine:
        return self.engine

    def __exit__(self, *exc: object) -> None:
        with _RUNS_LOCK:
            run = _RUNS.get(self._run_id)
            if run is not None:
                run.tasks.pop(self.key, None)
                if run.ended and not run.tasks:
                    del _RUNS[self._run_id]
        self.engine.close()
        shutil.rmtree(self._dir, ignore_errors=True)

    def events(self) -> list[list[Any]]:
        """The task's events no poll took: they go back with its result."""
        return self._outbox.take()

    def totals(self) -> BatchResult:
        totals = BatchResult()
        self.engine.add_totals(totals)
        return totals


def _blobs_task(blobs: dict[str, _Blob], setup: _Setup, knowledge: Knowledge, ask_first: bool = False) -> _BlobsDone:
    """The blobs a group of repositories needs first: each prepared once, then put
    in the first repository of each registry that needs it. ``ask_first``: the
    client tries these blobs again (an earlier task gave no result), so each is
    asked for first. Never raises: a failure is a blob's result, per registry."""
    worker = _worker()
    task = _TaskEngine(setup, (knowledge,))
    hosts = {target.api_host for blob in blobs.values() for target in blob.targets.values()}
    # a stopped run's task (it cancels at once) notes nothing the client cleared already
    ask_first = ask_first or task.engine.cancelled.is_set() or not _first_attempt(task.key)
    with task as engine, _Leases(setup, hosts) as leases:

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
        return _BlobsDone(placed, engine.store.export(done.key for done in placed.values()), task.totals(), task.events())


def _first_attempt(key: str) -> bool:
    """Whether this is the task's first attempt. Dask runs a task again when its
    worker is lost, and the lost attempt may have written blobs already: each
    attempt asks whether the task's Dask Event (``_note_name``) is set, then sets
    it, before it writes any blob. An Event keeps no history, and the client
    clears (deletes) its run's at the end of the run. False when it cannot say."""
    import distributed
    from distributed.utils import sync

    try:
        worker = distributed.get_worker()
        name = _note_name(key)
        started = sync(worker.loop, worker.scheduler.event_is_set, name=name, callback_timeout=NOTE_WAIT_S)
        sync(worker.loop, worker.scheduler.event_set, name=name, callback_timeout=NOTE_WAIT_S)
    except Exception as exc:
        log.debug("attempt not known: %s", exc)
        return False
    return not started


class _Leases:
    """The run's upload leases per registry a blob task writes to: a
    ``distributed.Semaphore`` each (``max_concurrent_uploads`` leases), named after
    the run (the client closes them when the run ends: a name per registry and
    limit, as before, was a semaphore for ever in the scheduler per registry ever
    used). Made in the task's own thread (a Semaphore needs the worker's context);
    at the task's end each stops refreshing (its timer on the worker's event loop
    otherwise kept it, and ran, for as long as the worker)."""

    def __init__(self, setup: _Setup, hosts: Iterable[str]) -> None:
        import distributed

        self._made = {host: distributed.Semaphore(max_leases=setup.uploads(host), name=_lease_name(setup.run_id, host)) for host in hosts}
        for lease in self._made.values():
            _ = lease.scheduler, lease.loop  # bound to the worker now: its calls run in threads that see no worker (_leased)

    def __enter__(self) -> dict[str, distributed.Semaphore]:
        return self._made

    def __exit__(self, *exc: object) -> None:
        for lease in self._made.values():
            refresh = getattr(lease, "refresh_callback", None)  # none with an infinite lease timeout
            if refresh is not None:
                lease.loop.add_callback(refresh.stop)


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
    """One of ``host``'s upload leases held for the block. ``acquire(timeout=...)``
    bounds the scheduler's wait for a free lease, not the call (a Dask call has no
    bound of its own): each call runs in a thread of its own (``_bounded``), given
    up after CALL_WAIT_S more, with the run's stop in view. A call given up may
    still take its lease: it is refreshed until the task ends, then the scheduler
    frees it after its lease timeout, as it does one whose release was given up."""
    deadline = time.monotonic() + LEASE_WAIT_S
    asked = f"the Dask scheduler, asked for an upload lease for {host}"
    while True:  # the run's stop in view, looked at first: a stopped run's task makes no lease again
        if cancelled.is_set():
            raise Cancelled(f"stopped while waiting for an upload lease for {host}")
        try:
            if _bounded(functools.partial(lease.acquire, timeout=LEASE_POLL_S), asked, LEASE_POLL_S + CALL_WAIT_S, stop=cancelled):
                break
        except Cancelled:
            raise Cancelled(f"stopped while waiting for an upload lease for {host}") from None
        if time.monotonic() > deadline:
            raise BatchPushError(f"no upload lease for {host} within {LEASE_WAIT_S:.0f} s")
    try:
        yield
    finally:
        try:
            _bounded(lease.release, f"the Dask scheduler, told an upload lease for {host} is free", CALL_WAIT_S)
        except ClusterTimeout as exc:
            log.warning("%s: the scheduler frees it after its lease timeout", exc)


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
            failure = _blob_failure(push, blobs)
            if failure is not None:
                results[push.index] = engine.failed(push.image.name, str(push.target), failure, time.monotonic())
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
            try:
                result = engine.run_work(work)
            except Exception as exc:  # that image's failure: the task's other images go on, and say how they went
                log.debug("%s: unexpected error", work.target, exc_info=True)
                result = engine.failed(work.source, work.target, _error(exc, work.source), time.monotonic())
            return replace(result, worker=worker, error=f"on worker {worker}: {result.error}" if result.error else None)

        with cf.ThreadPoolExecutor(max_workers=IMAGES_PER_TASK, thread_name_prefix="image") as pool:
            for push, result in zip(runnable, pool.map(run, runnable), strict=True):
                results[push.index] = result
        engine.store.absorb(later)
        return _RepositoryDone(results, engine.store.export(), task.totals(), task.events())


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
