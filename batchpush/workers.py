"""The compression worker processes: started on demand, rebuilt when one dies, gone when we are.

``WorkerPool`` is a ``concurrent.futures.Executor`` over a ``ProcessPoolExecutor``
whose processes start at the first submit: a run that never compresses (a cron
re-run that only fingerprints) imports neither multiprocessing nor psutil and
starts no process.

A dead worker (SIGKILLed by the OOM killer) breaks a ``ProcessPoolExecutor`` for
good: every future it had not finished fails with ``BrokenProcessPool`` and every
later submit raises it. ``WorkerPool`` survives that:

- A broken pool is dropped once, as soon as one of its futures fails with
  ``BrokenProcessPool`` or a submit finds it broken, and shut down without
  waiting; the next submit builds a fresh one. A ``WorkerPool`` (one run) builds
  at most ``max_rebuilds`` (``MAX_REBUILDS``) fresh pools: after one more
  breakage every submit raises ``WorkerPoolError``, so workers that keep dying end
  the compression clearly instead of in a loop.
- The resubmission rule: a future from ``submit`` that failed with
  ``BrokenProcessPool`` did not complete (it may have started), so a task that is
  safe to repeat (every task of batchpush.compress is) may be submitted again, and
  that submit rebuilds the pool first. ``submit_resubmitting`` applies the rule for
  the caller: its future submits its task again each time the pool running it
  breaks, until the rebuild budget is spent, and so fails only with what the task
  raised or with what that submit raised (``WorkerPoolError``), or is cancelled.

A broken pool's surviving workers are SIGKILLed. CPython stops them with SIGTERM,
which ours ignore (below); and a worker killed while idle may die holding the
call queue's read lock (an idle worker waits for its next task holding it), so
its siblings, once their tasks end, wait for that lock for ever: the pool's
manager thread would wait for them, and with it ``shutdown`` and the
interpreter's exit (a run that never ends).

Workers never outlive the main process. The main process handles SIGINT/SIGTERM,
so workers ignore them; and if the main process dies without shutting the pool
down (SIGKILL), nothing would stop its workers (each holds its own call-queue pipe
open). So each worker, as it starts:

- (Linux) has the kernel SIGKILL it when its parent, the forkserver, exits, and
  closes its inherited copy of the pipe whose closing tells the forkserver the
  main process is gone (held by a worker, it would keep the forkserver, and so
  the worker, alive);
- watches the main process from a thread every ``WATCH_INTERVAL_S``, by pid and
  start time (a reused pid is not the main process), and exits once it is gone.

    BatchPushError
    └── WorkerPoolError    the compression workers keep dying (out of memory?)
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import functools
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from .errors import BatchPushError

if TYPE_CHECKING:
    import multiprocessing.context

#: memory one compression worker may need (isal state, buffers, interpreter)
WORKER_MEMORY_BYTES = 256 << 20
#: fresh pools one WorkerPool (one run) may build after breakages: a worker killed
#: now and then is survived, workers killed again and again end the run's compression
MAX_REBUILDS = 3
#: how often a worker looks for the main process
WATCH_INTERVAL_S = 1.0
#: after a cancel, how long the killed workers are given to end
KILL_WAIT_S = 2.0
#: prctl(2) option (linux/prctl.h): the signal this process gets when its parent exits
_PR_SET_PDEATHSIG = 1
#: whether a queued task's future may be cancelled: before 3.12, a pool that breaks
#: with a cancelled future queued loses its manager thread (CPython gh-107219)
_CANCEL_IS_SAFE = sys.version_info >= (3, 12)


class WorkerPoolError(BatchPushError):
    """The worker pool broke more often than its rebuild budget allows: workers keep
    being killed (most likely by the OOM killer). ``breakages`` counts the pools
    that broke."""

    kind = "worker-pool"

    def __init__(self, breakages: int) -> None:
        super().__init__(f"the compression workers keep dying (out of memory?): the worker pool broke {breakages} times; give fewer jobs or more memory")
        self.breakages = breakages


def default_jobs() -> int:
    """Compression workers: one per core, fewer if memory is short."""
    import psutil

    cores = psutil.cpu_count(logical=True) or 1
    by_memory = max(1, psutil.virtual_memory().available // WORKER_MEMORY_BYTES)
    return max(1, min(cores, by_memory))


def _worker_context() -> multiprocessing.context.BaseContext:
    """forkserver (no fork of a threaded process), its server loading only the
    compression module and this one (the workers' initializer), so each worker
    starts with them and nothing else."""
    import multiprocessing

    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["batchpush.compress", "batchpush.workers"])
    return context


def _start_ticks(pid: int) -> int | None:
    """The start time of process ``pid`` in clock ticks since boot (fixed for the
    process's life, so with the pid it names one process, unlike wall-clock start
    times, which move with the boot time the kernel reports), or None if there is
    no such process or it has exited (a zombie), or no /proc to ask."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    # the command name, in parentheses, may hold spaces and parentheses itself
    fields = stat[stat.rindex(b")") + 2 :].split()
    if fields[0] in (b"Z", b"X"):
        return None
    return int(fields[19])


def _main_alive(pid: int, start_ticks: int | None) -> bool:
    """Whether the main process (``pid``, started at ``start_ticks``) still runs.
    Without /proc (``start_ticks`` None) only the pid is checked."""
    if start_ticks is not None:
        return _start_ticks(pid) == start_ticks
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        # the pid is another user's process now: ours is gone
        return False
    return True


def _die_with_parent() -> None:
    """Have the kernel SIGKILL this process when its parent exits (Linux only;
    elsewhere, or if prctl fails, the watchdog thread is the only guard)."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(ctypes.c_int(_PR_SET_PDEATHSIG), ctypes.c_ulong(int(signal.SIGKILL)), ctypes.c_ulong(0), ctypes.c_ulong(0), ctypes.c_ulong(0))
    except (OSError, AttributeError):
        pass


def _let_forkserver_go() -> None:
    """Close this worker's copy of the forkserver's "alive" pipe.

    The forkserver exits when the write end of that pipe is closed everywhere.
    The main process holds it, and so does every forkserver child, which inherits
    it so it could start processes of its own (a worker never does): while one
    worker holds it the forkserver outlives the main process, and the workers'
    parent-death signal never comes."""
    from multiprocessing import forkserver

    server = getattr(forkserver, "_forkserver", None)
    fd = getattr(server, "_forkserver_alive_fd", None)
    if server is None or not isinstance(fd, int):
        return
    server._forkserver_alive_fd = None
    with contextlib.suppress(OSError):
        os.close(fd)


def _watch_main(pid: int, start_ticks: int | None) -> None:
    while True:
        time.sleep(WATCH_INTERVAL_S)
        if not _main_alive(pid, start_ticks):
            os._exit(1)


#: mallopt(3)'s M_MMAP_THRESHOLD: allocations above this size are their own mappings
_M_MMAP_THRESHOLD = -3
#: mallopt(3)'s M_TRIM_THRESHOLD: free memory at the heap's top beyond this goes back
_M_TRIM_THRESHOLD = -1
#: what the heap keeps of its free top: the pieces of a stream (up to 1 MiB, made and
#: freed by the thousand) reuse the same pages instead of faulting in new ones
_KEEP_HEAP_TOP_BYTES = 8 << 20


def release_big_buffers() -> None:
    """Have glibc give every buffer of 1 MiB or more back to the system when it is
    freed. By default its threshold for that rises to 32 MiB after the first large
    buffers are freed, and the compressed blocks (16 MiB and less) passing through
    a process then stay in its heap: its resident memory grows by the blocks it
    ever held at once, not the blocks it holds. Setting that threshold also leaves
    the trim threshold at 128 KiB, so the heap would shrink after each smaller
    piece and grow again for the next, every page faulted in and zeroed anew (on a
    2 GB layer, 500,000 faults and half of this process's CPU): the heap keeps
    32 MiB of its free top instead. Elsewhere (musl, macOS) a no-op."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.mallopt(ctypes.c_int(_M_MMAP_THRESHOLD), ctypes.c_int(1 << 20))
        libc.mallopt(ctypes.c_int(_M_TRIM_THRESHOLD), ctypes.c_int(_KEEP_HEAP_TOP_BYTES))
    except (OSError, AttributeError):
        pass


def _init_worker(main_pid: int, main_start_ticks: int | None) -> None:
    """A worker's first act: leave SIGINT/SIGTERM to the main process (it stops the
    run cleanly) and make sure this process ends with the main process."""
    release_big_buffers()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    parent = os.getppid()
    _die_with_parent()
    _let_forkserver_go()
    # A parent that exited before prctl took effect sends no signal: look again.
    # (One that exited before the first look is caught by the main process check.)
    if os.getppid() != parent or not _main_alive(main_pid, main_start_ticks):
        os._exit(1)
    threading.Thread(target=_watch_main, args=(main_pid, main_start_ticks), name="watch-main", daemon=True).start()


class WorkerPool(cf.Executor):
    """The compression worker processes, started by the first submit: a run that
    only fingerprints (a cron re-run) never starts them, nor multiprocessing's
    helper processes. ``jobs`` None: ``default_jobs()``, counted then. A broken
    pool is replaced, ``max_rebuilds`` times at most (see the module docstring).
    Thread-safe; no lock of its own is held while it calls into multiprocessing."""

    def __init__(self, jobs: int | None, *, max_rebuilds: int = MAX_REBUILDS) -> None:
        self._jobs = jobs
        self._max_rebuilds = max_rebuilds
        self._lock = threading.Lock()
        # guarded by _lock
        self._pool: cf.ProcessPoolExecutor | None = None
        self._closed = False
        self._breakages = 0

    @property
    def breakages(self) -> int:
        """Pools that broke (a worker died)."""
        with self._lock:
            return self._breakages

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> cf.Future[Any]:
        """``fn(*args, **kwargs)`` in a worker; ``fn`` and its arguments must pickle.

        A broken pool is replaced first. The future fails with ``BrokenProcessPool``
        if a worker dies before it is done; its task may then be submitted again.
        Raises WorkerPoolError once the rebuild budget is spent, RuntimeError after
        shutdown. On Python 3.11, cancelling the future while its task is queued
        sets a trap (CPython gh-107219): if the pool then breaks, the futures it
        had yet to fail never finish; ``submit_resubmitting``'s are safe to cancel.
        """
        return self._submit(fn, args, kwargs)[1]

    def submit_resubmitting(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> cf.Future[Any]:
        """Like ``submit``, but the task is submitted again (to a fresh pool) each
        time the pool running it breaks. The future fails only with what ``fn``
        raised, or with what submitting it again raised (WorkerPoolError once the
        rebuild budget is spent); it is cancelled if the pool is shut down before
        the task could be submitted again. ``fn`` may thus run more than once: it
        must be safe to repeat (compress_to_spool and deflate_block are).

        Cancelling the future cancels the task if it has not started; on Python
        3.11 the task runs anyway and its result is dropped (there a cancelled task
        in a pool that then breaks kills the pool's manager thread, CPython
        gh-107219, and the futures it had yet to fail would never finish)."""
        task = _Resubmitted(self, fn, args, kwargs)
        outer = task.outer  # (a task done at once lets go of it within ``follow``)
        task.follow(*self._submit(fn, args, kwargs))
        return outer

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Shut the current pool down; pools that broke were shut down then,
        without waiting, and are not waited for here. Without waiting (a cancelled
        run), the workers are killed (they ignore SIGTERM) and given a moment to
        end: a task under way would go on writing blocks into a spool that is
        about to be removed, and leave it behind."""
        with self._lock:
            self._closed = True
            pool = self._pool
        if pool is None:
            return
        # the live dict: a worker started by a submit racing this one shows up in it
        workers = getattr(pool, "_processes", None) or {}
        if not wait:
            # before the pool's lock: on 3.12+ a breaking pool's manager holds it
            # while it waits for the workers to end
            _kill(workers)
            with contextlib.suppress(OSError, ValueError):
                pool.shutdown(wait=False, cancel_futures=cancel_futures)
            deadline = time.monotonic() + KILL_WAIT_S
            for worker in _listed(workers):
                with contextlib.suppress(OSError, ValueError, AttributeError, AssertionError):
                    worker.join(max(0.0, deadline - time.monotonic()))
            return
        # the wait from a thread of its own: a pool that breaks meanwhile (or broke
        # unnoticed, no future pending) has its workers killed, or its manager thread,
        # and so this shutdown (on 3.12+ stuck at the pool's lock), would wait for ever
        closing = threading.Thread(target=pool.shutdown, kwargs={"wait": True, "cancel_futures": cancel_futures}, name="pool-shutdown", daemon=True)
        closing.start()
        killed = False
        while closing.is_alive():
            closing.join(WATCH_INTERVAL_S / 10)
            if not killed and getattr(pool, "_broken", False):
                _kill(workers)
                killed = True

    def _submit(self, fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[cf.ProcessPoolExecutor, cf.Future[Any]]:
        """``fn`` submitted, and the pool it went to."""
        while True:
            pool = self._current()
            try:
                future = pool.submit(fn, *args, **kwargs)
            except cf.BrokenExecutor:
                # not an endless loop: each pass meets another pool, and _current
                # raises once more pools broke than the budget allows
                self._retire(pool)
                continue
            # so the pool is replaced as soon as it breaks, and no later submit
            # blocks on it (on 3.12+ a breaking pool holds its lock while it fails
            # its futures and waits for its other workers to end their tasks)
            future.add_done_callback(functools.partial(self._check, pool))
            return pool, future

    def _check(self, pool: cf.ProcessPoolExecutor, future: cf.Future[Any]) -> None:
        # Runs in the thread that finished ``future``; for a breakage, ``pool``'s
        # manager thread, which on 3.12+ holds ``pool``'s lock: never call ``pool`` here.
        if not future.cancelled() and isinstance(future.exception(), cf.BrokenExecutor):
            self._retire(pool)

    def _current(self) -> cf.ProcessPoolExecutor:
        """The pool to submit to, built if there is none."""
        while True:
            with self._lock:
                self._check_usable()
                if self._pool is not None:
                    return self._pool
            # Built outside the lock: building one starts multiprocessing's resource
            # tracker process (the first time) and default_jobs() reads /proc. Two
            # threads may both build one; the one not kept never had a submit, so it
            # started no worker, and goes.
            fresh = self._new_pool()
            with self._lock:
                keep = self._pool is None and not self._closed and self._breakages <= self._max_rebuilds
                if keep:
                    self._pool = fresh
            if keep:
                return fresh
            fresh.shutdown(wait=False)

    def _check_usable(self) -> None:
        # caller holds _lock
        if self._closed:
            raise RuntimeError("cannot schedule new futures after shutdown")
        if self._breakages > self._max_rebuilds:
            raise WorkerPoolError(self._breakages)

    def _new_pool(self) -> cf.ProcessPoolExecutor:
        main_pid = os.getpid()
        return cf.ProcessPoolExecutor(max_workers=self._jobs or default_jobs(), mp_context=_worker_context(), initializer=_init_worker, initargs=(main_pid, _start_ticks(main_pid)))

    def _retire(self, broken: cf.ProcessPoolExecutor) -> None:
        """Drop ``broken``, so the next submit builds a fresh pool: one breakage,
        counted by whichever thread gets here first. Never calls ``broken`` itself."""
        with self._lock:
            if self._pool is not broken:
                return
            self._pool = None
            self._breakages += 1
        # Shut down from a thread of its own: on 3.12+ the shutdown waits for the
        # pool's lock, which its manager thread holds while it fails its futures
        # (we may be in that thread now) and waits for the workers still alive to
        # end their tasks (they ignore the SIGTERM it sends them).
        threading.Thread(target=_shut_down_broken, args=(broken,), name="retire-pool", daemon=True).start()


def _shut_down_broken(pool: cf.ProcessPoolExecutor) -> None:
    # its workers first: their tasks were failed (and resubmitted), and the
    # manager thread waits for them to end (see the module docstring); on 3.12+
    # it holds the pool's lock meanwhile, which the shutdown takes
    _kill(getattr(pool, "_processes", None) or {})
    # best effort on a dead pool: on 3.11 its manager thread may be closing the
    # pipe the shutdown writes to
    with contextlib.suppress(OSError, ValueError):
        pool.shutdown(wait=False, cancel_futures=True)


def _listed(workers: dict[int, Any]) -> list[Any]:
    """The worker processes of a pool's dict of them, as they are now."""
    with contextlib.suppress(RuntimeError):  # (the manager thread changed the dict)
        return list(workers.values())
    return []


def _kill(workers: dict[int, Any]) -> None:
    """SIGKILL ``workers`` (they ignore SIGTERM). One seen to have exited is not
    signalled: the forkserver reaps its workers, so its pid may be another's now."""
    for worker in _listed(workers):
        with contextlib.suppress(OSError, ValueError, AttributeError):
            if worker.exitcode is None:
                worker.kill()


class _Resubmitted:
    """One task of ``submit_resubmitting``: ``outer`` is the caller's future, kept
    pending while the task is submitted again after each breakage of its pool."""

    def __init__(self, pool: WorkerPool, fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        self.outer: cf.Future[Any] = cf.Future()
        self._pool = pool
        self._fn = fn
        self._args = args
        self._kwargs = kwargs
        self._inner: cf.Future[Any] | None = None
        self.outer.add_done_callback(self._outer_done)

    def follow(self, runner: cf.ProcessPoolExecutor, inner: cf.Future[Any]) -> None:
        """Finish ``outer`` with ``inner``, the task's future from ``runner``."""
        self._inner = inner
        # may call _inner_done at once, in this thread: no lock is held here
        inner.add_done_callback(functools.partial(self._inner_done, runner))

    def _outer_done(self, outer: cf.Future[Any]) -> None:
        inner = self._inner
        if outer.cancelled() and inner is not None and _CANCEL_IS_SAFE:
            inner.cancel()

    def _inner_done(self, runner: cf.ProcessPoolExecutor, inner: cf.Future[Any]) -> None:
        # Runs in the thread that finished ``inner``: for a breakage, ``runner``'s
        # manager thread (see WorkerPool._check). It must not raise: the executor
        # would only log it, and ``outer`` would never finish.
        outer = self.outer
        failure: BaseException | None = None
        if not inner.cancelled() and not outer.cancelled() and isinstance(inner.exception(), cf.BrokenExecutor):
            # retired already by WorkerPool._check, which ran first; made sure of
            # here, as submitting to ``runner`` from its own manager thread would hang
            self._pool._retire(runner)
            try:
                again = self._pool._submit(self._fn, self._args, self._kwargs)
            except RuntimeError:
                # shut down meanwhile: the caller wants no more work run
                outer.cancel()
            except Exception as exc:
                failure = exc
            else:
                self.follow(*again)
                return
        elif inner.cancelled():
            outer.cancel()
        # the caller's cancel and ours end here, with the waiters told
        if not outer.set_running_or_notify_cancel():
            self._inner = None
            return
        if failure is None:
            failure = inner.exception()
        if failure is not None:
            outer.set_exception(failure)
        else:
            outer.set_result(inner.result())
        # the outer future's callback holds this task, which holds the outer future:
        # a cycle only the garbage collector would free, with the result (a 16 MiB
        # block) in it; let go of both futures now
        self._inner = None
        self.outer = None  # type: ignore[assignment]
