"""What runs on the client (the machine that runs ``batchpush run --scheduler``): the run, its tasks followed, the workers polled, the cleanup."""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import functools
import hashlib
import logging
import math
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from .. import __version__, waits
from ..engine import Engine, PushJob, PushOptions, Work
from ..errors import BatchPushError, Cancelled, InterruptedError_
from ..metadata import Knowledge
from ..prepare import PendingManifest
from ..progress import Progress
from ..report import BatchResult, ImageResult
from ..sources.registry import RemoteImage
from .common import (
    CALL_WAIT_S,
    CONNECT_TIMEOUT_S,
    END_WAIT_S,
    RELAY_INTERVAL_S,
    STOP_WAIT_S,
    STRANDED_EVERY_S,
    TASK_SILENCE_S,
    TASKS_PER_THREAD,
    WORKERS_EVERY,
    ClusterError,
    ClusterTimeout,
    _Blob,
    _blob_failure,
    _BlobDone,
    _blobs,
    _BlobsDone,
    _bounded,
    _error,
    _hosts,
    _lease_name,
    _lost,
    _manifests,
    _note_name,
    _Packed,
    _Push,
    _RepositoryDone,
    _Resolved,
    _Secrets,
    _Setup,
    _started,
)
from .relay import _show_events
from .tasks import _blobs_task, _end_run, _poll, _repository_task, _stop_run, _unpacked, _version

if TYPE_CHECKING:  # imported where used: a re-run with nothing to push never imports dask
    import distributed

log = logging.getLogger(__name__)


class Interrupted(KeyboardInterrupt):
    """The run was stopped (Ctrl-C, SIGTERM): its tasks were told to stop; ``result``
    holds every image, those without a result from the cluster failed as interrupted."""

    def __init__(self, result: BatchResult) -> None:
        super().__init__()
        self.result = result


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


def connect(address: str) -> distributed.Client:
    """A client of the scheduler with at least one worker, every worker running this
    batchpush version; else ClusterError (nothing was sent to any worker)."""
    return _connect(address)[0]


def _connect(address: str) -> tuple[distributed.Client, dict[str, tuple[str, bool]], list[str]]:
    """``connect``, the workers that answered, with their Python (and whether Dask's
    profiler runs there), and those that did not: each is asked apart (a worker
    whose event loop is stuck does not hold the others); one that gives no answer
    within CONNECT_TIMEOUT_S gets no task of the run."""
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
        workers = _bounded(client.nthreads, f"the Dask scheduler at {address}, asked its workers", CONNECT_TIMEOUT_S)
        versions, silent = _ask_each(client, workers, _version, bound_s=CONNECT_TIMEOUT_S)
        if not versions:
            raise ClusterError(f"no worker of the Dask scheduler at {address} answered within {CONNECT_TIMEOUT_S:.0f} s")
        other = sorted(f"{worker} runs batchpush {version[0]}" for worker, version in versions.items() if version[0] != __version__)
        if other:
            raise ClusterError(f"refused: {'; '.join(other)}, this client {__version__} (install the same batchpush[cluster] on every worker)")
        for worker in silent:
            log.warning("worker %s of the Dask scheduler at %s did not answer within %.0f s: no task goes to it", worker, address, CONNECT_TIMEOUT_S)
    except BaseException:
        _close(client)
        raise
    return client, {worker: (version[1], version[2]) for worker, version in versions.items()}, silent


def _close(client: distributed.Client) -> None:
    """The client closed (its futures released), within CALL_WAIT_S."""
    try:
        client.close(timeout=CALL_WAIT_S)
    except Exception as exc:
        log.debug("the Dask client did not close cleanly: %s", exc)


def _deadlocks(python: str) -> bool:
    """A Python whose ``sys._current_frames()``, which Dask's profiler calls on a
    worker's event loop every 10 ms, can deadlock the process: a garbage collection
    inside it runs a finalizer that lets go of the GIL while it holds the runtime's
    lock, and a thread that starts (a task's pool) takes the GIL and waits for that
    lock (CPython gh-106883; fixed in 3.11.9 and 3.12). Every thread of the worker
    waits, its event loop too: its results are never handed over (issue 27's hang,
    seen again in a soak: the worker's main thread in ``_PyThread_CurrentFrames``
    then ``take_gil``, another in ``new_threadstate`` waiting for HEAD_LOCK)."""
    try:
        version = tuple(int(part) for part in python.split(".")[:3])
    except ValueError:
        return False
    return version[:2] == (3, 11) and version < (3, 11, 9)


def run(address: str, jobs: Iterable[PushJob], options: PushOptions, stop: threading.Event | None = None) -> BatchResult:
    """Every job's images to their targets on the cluster at ``address``; the same
    result as ``Engine.run``, each image naming the worker that pushed it. Once
    ``stop`` is set (a signal handler may set it) or on KeyboardInterrupt, raises
    Interrupted, with the result so far. Whatever the run made on the cluster is
    gone when it returns or raises."""
    if options.dry_run:
        raise ClusterError("a dry run writes nothing and runs on this machine: use Engine.run")
    silence_s = waits.bound_s("BATCHPUSH_CLUSTER_SILENCE_S", TASK_SILENCE_S)
    with Engine(replace(options, jobs=1)) as engine:
        cluster = _ClusterRun(address, engine, stop or threading.Event(), silence_s)
        try:
            return cluster._run(jobs)
        except (KeyboardInterrupt, Cancelled):
            raise Interrupted(cluster._interrupted()) from None
        finally:
            cluster.close()


def _hash(*parts: object) -> str:
    return hashlib.sha256("\0".join(map(str, parts)).encode()).hexdigest()[:24]


def _ask_each(client: distributed.Client, workers: Iterable[str], function: Callable[..., Any], *args: Any, bound_s: float) -> tuple[dict[str, Any], list[str]]:
    """``function(*args)`` run on each worker, each asked apart (a worker that does
    not answer, its event loop stuck, holds nobody else's answer): the answers by
    worker, and the workers that gave none within ``bound_s`` or could not run it."""
    asked = {worker: _started(functools.partial(client.run, function, *args, workers=[worker], on_error="return"), "ask") for worker in workers}
    cf.wait(asked.values(), timeout=bound_s)
    answers: dict[str, Any] = {}
    for worker, future in asked.items():
        if future.done() and future.exception() is None:
            reply = future.result().get(worker, _NO_ANSWER)
            if not isinstance(reply, BaseException) and reply is not _NO_ANSWER:
                answers[worker] = reply
    return answers, [worker for worker in asked if worker not in answers]


#: what a worker that gave no answer answered (``_ask_each``)
_NO_ANSWER = object()


class _Watch:
    """The client's poll of the workers, from a thread of its own every
    RELAY_INTERVAL_S (``_poll``): which of the run's tasks each worker is running
    (the client's word that a task lives), and their progress events, shown as
    they come. Each worker is asked apart, and not again until it has answered: a
    worker whose event loop is stuck (a deadlocked process) blinds the client to
    none of the others. Nothing of it is kept on the cluster: it asks, the workers
    answer."""

    def __init__(self, client: distributed.Client, run_id: str, progress: Progress, workers: Iterable[str], silent: Iterable[str] = (), silent_after_s: float = CALL_WAIT_S) -> None:
        self._client = client
        self._silent_after_s = silent_after_s
        self._run_id = run_id
        self._progress = progress
        self._lock = threading.Lock()  # guards the three dicts only
        #: task key -> when a poll last found a worker running it
        self._running_at: dict[str, float] = {}
        #: worker -> when it last answered a poll (or the version check)
        self._answered_at: dict[str, float] = dict.fromkeys(workers, time.monotonic())
        self._answered_at.update(dict.fromkeys(silent, -math.inf))  # silent from the start
        #: worker -> when its poll under way was sent
        self._asked_at: dict[str, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="cluster-watch", daemon=True)
        self._thread.start()

    def running_at(self, key: str) -> float:
        with self._lock:
            return self._running_at.get(key, 0.0)

    def last_running(self) -> float:
        """When a poll last found any task of the run running."""
        with self._lock:
            return max(self._running_at.values(), default=0.0)

    def silent(self, after_s: float | None = None) -> list[str]:
        """The workers that have not answered for ``after_s`` (``silent_after_s``:
        no task goes to them)."""
        now = time.monotonic()
        after_s = self._silent_after_s if after_s is None else after_s
        with self._lock:
            return sorted(worker for worker, answered in self._answered_at.items() if now - answered > after_s)

    def answering(self) -> list[str]:
        silent = set(self.silent())
        with self._lock:
            return sorted(worker for worker in self._answered_at if worker not in silent)

    def _run(self) -> None:
        cycle = 0
        #: the scheduler's list of workers on its way: asked as a poll is, from a thread
        #: of its own and not again until it has answered (a Dask call has no bound of
        #: its own: waited for here, a call that never returned stopped the polls for
        #: good, and every worker then looked silent)
        listing: cf.Future[Any] | None = None
        while not self._stop.wait(RELAY_INTERVAL_S):
            if listing is None and cycle % WORKERS_EVERY == 0:  # workers come and go
                listing = _started(self._client.nthreads, "workers")
            cycle += 1
            if listing is not None and listing.done():
                self._listed(listing)
                listing = None
            with self._lock:
                due = [worker for worker in self._answered_at if worker not in self._asked_at]
                asked = time.monotonic()
                self._asked_at.update(dict.fromkeys(due, asked))
            for worker in due:
                poll = _started(functools.partial(self._client.run, _poll, self._run_id, workers=[worker], on_error="return"), "poll")
                poll.add_done_callback(functools.partial(self._answered, worker, asked))

    def _listed(self, listing: cf.Future[Any]) -> None:
        """The workers as the scheduler listed them: a new one is polled, one gone is not."""
        if listing.exception() is not None:  # the run's bounds judge a scheduler that does not answer
            log.debug("workers not listed: %s", listing.exception())
            return
        workers = list(listing.result())
        with self._lock:
            for worker in workers:
                self._answered_at.setdefault(worker, time.monotonic())
            for gone in set(self._answered_at) - set(workers):
                del self._answered_at[gone]

    def _answered(self, worker: str, asked: float, poll: cf.Future[Any]) -> None:
        reply = poll.result().get(worker) if poll.exception() is None else None
        ok = isinstance(reply, tuple | list) and len(reply) == 2
        with self._lock:
            self._asked_at.pop(worker, None)
            if ok and worker in self._answered_at:
                self._answered_at[worker] = asked
                self._running_at.update(dict.fromkeys(reply[0], asked))  # type: ignore[index]
        if ok:
            _show_events(self._progress, reply[1])  # type: ignore[index]

    def close(self) -> None:
        """No poll after this returns (one under way is left to end with the client)."""
        self._stop.set()
        self._thread.join(RELAY_INTERVAL_S * 4)


@dataclass(eq=False, slots=True)
class _Task:
    """A task of the run, as the client follows it."""

    kind: str  # "blob" or "repository"
    #: its group of repositories
    number: int
    future: distributed.Future
    #: when the client last had word of it: submitted, a worker running it, Dask saying it is done
    heard_at: float
    #: the second attempt at a blob task's blobs
    retry: bool = False
    #: its result on its way to the client, once Dask says it is done
    fetch: cf.Future[Any] | None = None

    @property
    def key(self) -> str:
        return str(self.future.key)


class _ClusterRun:
    def __init__(self, address: str, engine: Engine, stop: threading.Event, silence_s: float = TASK_SILENCE_S) -> None:
        self.address = address
        self.engine = engine
        #: set by the caller (a signal): the run stops where it waits
        self.stop = stop
        self.silence_s = silence_s
        self.progress = engine.options.progress
        #: every key of this run holds it: two runs on one scheduler never share a task.
        #: It ends with a digit, so Dask's task prefix (its words before the first
        #: that is not all letters) is the kind alone, never one per run
        self.run_id = uuid.uuid4().hex[:11] + str(uuid.uuid4().int % 10)
        self.result = BatchResult()
        #: set by _connect, once there is something to push
        self.client: distributed.Client
        self._watch: _Watch | None = None
        #: the tasks submitted and not done with, by key
        self.tasks: dict[str, _Task] = {}
        #: when the client last had word of any task of the run
        self._heard_at = time.monotonic()
        #: the run's tasks Dask has on workers silent for the bound, and when the scheduler was last asked
        self._stranded_keys: dict[str, str] = {}
        self._stranded_at = -math.inf
        #: what the run made in the scheduler, cleared at its end: its blob tasks'
        #: attempt notes (Dask Events), the registries of its upload leases (Semaphores)
        self._notes: list[str] = []
        self._lease_hosts: set[str] = set()
        #: each image's result as it comes, and its work
        self.slots: list[ImageResult | None] = []
        self.expanded: list[Work] = []

    def _connect(self) -> None:
        """The cluster, reached once some image is to be pushed: a re-run whose
        images are all up to date (checked here) is over without it, as quick as
        a local one (dask's import and a client's start cost about as much as the
        whole re-run of a hundred images)."""
        self.client, pythons, silent = _connect(self.address)
        try:
            threads = _bounded(self.client.nthreads, f"the Dask scheduler at {self.address}, asked its workers' threads", stop=self.stop)
            self._watch = _Watch(self.client, self.run_id, self.progress, pythons, silent, min(CALL_WAIT_S, self.silence_s))
        except BaseException:
            _close(self.client)
            raise
        for worker, (python, profiled) in sorted(pythons.items()):
            if profiled and _deadlocks(python):
                self._note(f"worker {worker} runs Python {python}: its Dask profiler can deadlock it (CPython gh-106883, fixed in 3.11.9), and its tasks then never end; "
                           "run the workers on a later Python, or with DASK_DISTRIBUTED__WORKER__PROFILE__ENABLED=False")
        #: repository tasks (and blob tasks) to make of the batch: a few per worker thread
        self.tasks_wanted = TASKS_PER_THREAD * max(1, sum(threads[worker] for worker in pythons if worker in threads))

    def close(self) -> None:
        """Whatever the run made on the cluster is gone, a stopped or failed run's
        too: its state in the workers (their last events shown), its attempt notes
        and upload leases in the scheduler, its futures (the client closed). Each
        call is bounded: a cluster that does not answer is left as it is."""
        if self._watch is None:
            return
        self._watch.close()
        try:
            _bounded(self._clean, f"the Dask scheduler at {self.address}, cleaned after the run")
        except Exception as exc:
            log.warning("%s", exc)
        # the workers that answer (one whose event loop is stuck forgets the run in RUN_EXPIRY_S)
        ended, silent = _ask_each(self.client, self._watch.answering(), _end_run, self.run_id, bound_s=END_WAIT_S)
        _show_events(self.progress, (event for events in ended.values() for event in events))
        if silent:
            log.warning("worker %s did not hear that the run ended", ", ".join(silent))
        _close(self.client)

    def _clean(self) -> None:
        scheduler = self.client.scheduler
        names = list(self._notes)
        leases = [_lease_name(self.run_id, host) for host in sorted(self._lease_hosts)]

        async def forget() -> None:
            for name in names:  # an Event neither set nor waited for is deleted
                await scheduler.event_clear(name=name)
            for name in leases:  # one never used is not known: nothing to do
                await scheduler.semaphore_close(name=name)

        self.client.sync(forget)

    def _interrupted(self) -> BatchResult:
        """Every worker told to stop the run's tasks; each image the cluster did not
        give a result for fails as interrupted (its manifest goes only after all its
        blobs: a task that was writing it may still finish it)."""
        self.engine.cancel()  # its own requests (checks, manifests read) end now
        if self._watch is not None:  # connected: some tasks may be running
            try:  # a scheduler gone silent must not hold the stop
                _bounded(lambda: self.client.run(_stop_run, self.run_id), "the workers, told to stop", STOP_WAIT_S)
            except Exception as exc:  # each task still ends, on its own timeouts
                log.warning("the workers could not be told to stop: %s", exc)
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
        if self._watch is None:  # said, so that a scheduler that is down does not go unnoticed for long
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
        return _Setup(defaults, registries, _Secrets(secrets), self.run_id, self._schemes(registries), spool_limit=self.engine.options.spool_limit), refused

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

    def _submit_blobs(self, number: int, blobs: dict[str, _Blob], setup: _Setup, *, retry: bool = False) -> None:
        """The blob task of group ``number``; ``retry``: its second attempt, under a
        key of its own, asking the registry first for each blob."""
        key = f"batchpush-blobs-{self.run_id}-{number}" + ("-retry" if retry else "")
        hosts = {host for blob in blobs.values() for host in blob.hosts()}
        self._notes.append(_note_name(key))
        self._lease_hosts.update(target.api_host for blob in blobs.values() for target in blob.targets.values())
        future = self.client.submit(_unpacked, _blobs_task, _Packed.of(blobs, setup.only(hosts), self._knowledge(b.key for b in blobs.values()), retry), key=key, pure=False, workers=self._workers())
        self._follow(_Task("blob", number, future, time.monotonic(), retry))

    def _submit_repository(self, number: int, pushes: list[_Push], setup: _Setup, blobs: dict[str, _BlobDone], *, retry: bool = False) -> None:
        """The repository task of group ``number``; ``retry``: its second attempt."""
        keys = [b.key for push in pushes for b in _blobs(push)]
        hosts = {host for push in pushes for host in _hosts(push.target, push.image)}
        key = f"batchpush-repository-{self.run_id}-{pushes[0].index}" + ("-retry" if retry else "")
        future = self.client.submit(_unpacked, _repository_task, _Packed.of(pushes, setup.only(hosts), self._knowledge(keys), blobs), key=key, pure=False, workers=self._workers())
        self._follow(_Task("repository", number, future, time.monotonic(), retry))

    def _workers(self) -> list[str] | None:
        """Where a task may go: anywhere, unless some worker has not answered the
        client's polls for a while (its event loop stuck): then only to those that do."""
        assert self._watch is not None
        return (self._watch.answering() or None) if self._watch.silent() else None

    def _tried_again(self, task: _Task, outcome: Any) -> bool:
        """Whether the task is to be tried once more: the cluster had no word of it
        (a task that failed, or that Dask says it lost, is not)."""
        if not isinstance(outcome, ClusterTimeout) or task.retry:
            return False
        assert self._watch is not None
        if not self._watch.answering():  # nowhere to try it
            return False
        self._note(f"{outcome.message}; tried once more")
        return True

    def _follow(self, task: _Task) -> None:
        self.tasks[task.key] = task
        self._heard_at = task.heard_at

    def _next_done(self) -> tuple[_Task, Any]:
        """The next task of the run with its result, or with why there is none: its
        exception, Dask's, or ClusterTimeout once the client has had no word of it
        for ``silence_s`` (its future released: the scheduler forgets it). A task not
        done and not running waits its turn while any other task of the run is heard
        from: it fails once the whole run has been silent that long (a worker
        paused, or gone with a task the scheduler does not give to another). A task
        Dask says is done must hand over its result within ``silence_s`` too: the
        scheduler, asked for a result its worker no longer holds, asks that worker
        again and again without a word in its log (a done-callback fired, then
        ``Future.result()`` waited for ever: issue 27)."""
        while True:
            self._check_stop()
            now = time.monotonic()
            assert self._watch is not None
            run_heard = max(self._heard_at, self._watch.last_running())
            stranded = self._stranded(now)
            fetching = []
            for task in list(self.tasks.values()):
                if task.fetch is None and task.future.done():  # finished, erred or cancelled (a result lost is not done)
                    task.fetch = _started(task.future.result, "result")
                    task.heard_at = now
                if task.fetch is None:
                    task.heard_at = max(task.heard_at, self._watch.running_at(task.key))
                    if task.key in stranded:
                        return self._forget(task), ClusterTimeout(f"task {task.key}: the Dask cluster at {self.address} has it on worker {stranded[task.key]}, which has not answered for {self.silence_s:.0f} s")
                    if now - max(task.heard_at, run_heard) > self.silence_s:
                        return self._forget(task), ClusterTimeout(f"task {task.key}: no word of it from the Dask cluster at {self.address} for {self.silence_s:.0f} s (no worker ran it){self._unheard()}")
                elif task.fetch.done():
                    del self.tasks[task.key]
                    self._heard_at = now
                    try:
                        return task, task.fetch.result()
                    except Exception as exc:
                        return task, exc
                elif task.key in stranded:
                    return self._forget(task), ClusterTimeout(f"task {task.key}: its result is on worker {stranded[task.key]} of the Dask cluster at {self.address}, which has not answered for {self.silence_s:.0f} s")
                elif now - task.heard_at > self.silence_s:
                    return self._forget(task), ClusterTimeout(f"task {task.key}: done, said the Dask cluster at {self.address}, but its result did not come within {self.silence_s:.0f} s{self._unheard()}")
                else:
                    fetching.append(task.fetch)
            if fetching:
                cf.wait(fetching, timeout=waits.POLL_S, return_when=cf.FIRST_COMPLETED)
            else:
                self.stop.wait(waits.POLL_S)

    def _stranded(self, now: float) -> dict[str, str]:
        """The run's tasks (key -> worker) that Dask has on workers silent for the whole
        bound (running there, or their results held there): given up at once, not
        when the rest of the run falls silent too (a worker still busy with the
        run's other tasks kept a frozen one's waiting). Asked of the scheduler every
        STRANDED_EVERY_S at most, only while some worker is that silent."""
        assert self._watch is not None
        silent = self._watch.silent(self.silence_s)
        if not silent:
            return {}
        if now - self._stranded_at < STRANDED_EVERY_S:
            return self._stranded_keys
        self._stranded_at = now
        held = [task.future for task in self.tasks.values() if task.fetch is not None]
        try:
            processing = _bounded(lambda: self.client.processing(workers=silent), f"the Dask scheduler at {self.address}, asked its tasks on silent workers", stop=self.stop)
            holders = _bounded(lambda: self.client.who_has(held), f"the Dask scheduler at {self.address}, asked where results are", stop=self.stop) if held else {}
        except ClusterTimeout as exc:
            log.warning("%s", exc)
            return self._stranded_keys
        away = set(silent)
        self._stranded_keys = {str(key): worker for worker, keys in processing.items() for key in keys}
        self._stranded_keys.update({str(key): workers[0] for key, workers in holders.items() if workers and set(workers) <= away})
        return self._stranded_keys

    def _unheard(self) -> str:
        silent = self._watch.silent() if self._watch is not None else []
        return f"; worker {', '.join(silent)} has not answered the client for over {min(CALL_WAIT_S, self.silence_s):.0f} s" if silent else ""

    def _forget(self, task: _Task) -> _Task:
        """The task given up: its future released, so the scheduler forgets it (and
        stops asking a worker for its result); a fetch under way ends with that."""
        del self.tasks[task.key]
        task.future.release()
        return task

    def _checked(self, works: list[tuple[int, Work]]) -> Iterator[tuple[int, ImageResult | None]]:
        """The cron fast path, run here as a local run does: one tag HEAD per image
        the client's store saw go to its target (nothing compressed); None for an
        image not up to date. A task per group of them, as it was, paid the
        cluster's round trips and a task's engine for one request per image.
        An unexpected error fails its image alone (an up-to-date mirror's
        attachments are copied here: the engine's path may raise)."""
        with self._pool("check") as pool:
            futures = [pool.submit(_up_to_date, self.engine, work) for _, work in works]
            for (index, work), future in zip(works, futures, strict=True):
                try:
                    result = waits.result(future, self.stop)
                except Cancelled:
                    raise
                except Exception as exc:
                    log.debug("%s: unexpected error", work.target, exc_info=True)
                    yield index, self.engine.failed(work.source, work.target, _error(exc, work.source), time.monotonic())
                    continue
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
        groups = _by_repository(pending, self.tasks_wanted, resolved)
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
        for number, own in enumerate(owned):
            if own:
                self._submit_blobs(number, own, setup)
        done: dict[str, _BlobDone] = {}
        left = [len(names) for names in needs]
        while self.tasks:
            task, outcome = self._next_done()
            if task.kind == "repository":
                if self._tried_again(task, outcome):
                    self._submit_repository(task.number, groups[task.number], setup, {name: done[name] for name in needs[task.number]}, retry=True)
                else:
                    yield from self._repository_done(task, outcome, groups[task.number])
                continue
            if self._tried_again(task, outcome):
                self._submit_blobs(task.number, owned[task.number], setup, retry=True)
                continue
            placed = self._blobs_done(task, outcome, owned[task.number])
            done.update(placed)
            for name in placed:
                for user in users[name]:
                    left[user] -= 1
                    if left[user] == 0:
                        yield from self._repository(user, groups[user], setup, {name: done[name] for name in needs[user]})

    def _repository(self, number: int, pushes: list[_Push], setup: _Setup, blobs: dict[str, _BlobDone]) -> Iterator[tuple[int, ImageResult | None]]:
        """The repository task of group ``number``, once its blobs are placed; not
        sent when none of its images can go (a blob of each is missing): the
        client fails them itself, as the task would have."""
        failures = [_blob_failure(push, blobs) for push in pushes]
        if any(failure is None for failure in failures):
            self._submit_repository(number, pushes, setup, blobs)
            return
        for push, failure in zip(pushes, failures, strict=True):
            assert failure is not None
            work = self.works[push.index]
            failed = self.engine.failed(work.source, work.target, failure, time.monotonic())
            self._show(failed, work)
            yield push.index, failed

    def _blobs_done(self, task: _Task, outcome: Any, blobs: dict[str, _Blob]) -> dict[str, _BlobDone]:
        """A blob task's results, its work counted; a task the cluster lost (or had
        no word of, twice) fails its blobs in every registry."""
        if isinstance(outcome, BaseException):
            failure = (_lost("blob", outcome, self.address) + _AGAIN * (task.retry and isinstance(outcome, ClusterTimeout)), "cluster")
            return {name: _BlobDone(blob.key, None, {}, dict.fromkeys(blob.targets, failure)) for name, blob in blobs.items()}
        result: _BlobsDone = outcome
        _show_events(self.progress, result.events)
        _add(self.result, result.totals)
        # into the client's store now: kept even if no repository task comes back, and
        # what the repository tasks are seeded with (_submit_repository)
        self.engine.store.absorb(result.learned)
        return result.blobs

    def _repository_done(self, task: _Task, outcome: Any, pushes: list[_Push]) -> Iterator[tuple[int, ImageResult | None]]:
        """A repository task's results: its events shown, its store knowledge
        absorbed, its totals added, each image's line shown. A task the cluster
        lost, or had no word of, fails its images."""
        if isinstance(outcome, BaseException):
            error = BatchPushError(_lost("repository", outcome, self.address) + _AGAIN * (task.retry and isinstance(outcome, ClusterTimeout)))
            error.kind = "cluster"
            for push in pushes:
                work = self.works[push.index]
                yield push.index, self.engine.failed(work.source, work.target, error, time.monotonic())
            return
        done: _RepositoryDone = outcome
        _show_events(self.progress, done.events)
        self.engine.store.absorb(done.learned)
        _add(self.result, done.totals)
        for index, result in done.results.items():
            self._show(result, self.works[index])
            yield index, result

    def _note(self, text: str) -> None:
        log.warning("%s", text)
        try:
            self.progress.note(text)
        except Exception:  # a renderer's fault must not stop the run
            log.exception("progress renderer failed")

    def _show(self, image: ImageResult, work: Work) -> None:
        assert work.reference is not None
        try:
            if image.ok and image.digest is not None:
                self.progress.pushed(image.target, work.reference.tag or "latest", image.digest, image.size or 0, up_to_date=image.status == "up-to-date")
            elif not image.ok:
                self.progress.failed(image.target, image.error or "failed")
        except Exception:  # a renderer's fault must not lose the image's result
            log.exception("progress renderer failed")


#: said of a task given up the second time
_AGAIN = "; its first attempt gave none either"


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


def _add(result: BatchResult, totals: BatchResult) -> None:
    result.bytes_read += totals.bytes_read
    result.bytes_compressed += totals.bytes_compressed
    result.bytes_uploaded += totals.bytes_uploaded
    result.requests_by_method.update(totals.requests_by_method)
    result.requests_by_registry.update(totals.requests_by_registry)
    result.errors_by_registry.update(totals.errors_by_registry)
