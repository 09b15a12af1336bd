"""The compression worker pool, with real worker processes killed as the OOM killer would."""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import gzip
import json
import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

import psutil
import pytest

from batchpush.compress import compress_to_spool
from batchpush.sources.base import FileRange
from batchpush.workers import MAX_REBUILDS, WorkerPool, WorkerPoolError, _main_alive, _start_ticks

# an exception in a thread (a pool's manager thread, a future's callback) fails the test
pytestmark = pytest.mark.filterwarnings("error::pytest.PytestUnhandledThreadExceptionWarning")

REPO = str(Path(__file__).resolve().parent.parent)
#: bound on every wait for a result, a line or an exit; generous, for a loaded machine
WAIT_S = 60.0
#: how long the processes of a killed main process may take to go
GONE_WITHIN_S = 15.0
#: a task that outlasts any test that kills its worker
SLOW_TASK_S = 30

#: A main process whose two workers are busy: each has started a block (its spool
#: file is there) and waits for the layer's bytes, which never come (a FIFO
#: nobody writes). It prints its workers and helper processes, then waits.
ORPHANS_SCRIPT = """
import json, os, sys, time
from {module} import WorkerPool
from batchpush.compress import deflate_block
from batchpush.sources.base import FileRange
layer, spool = sys.argv[1], sys.argv[2]
pool = WorkerPool(2)
futures = [pool.submit(deflate_block, FileRange(layer, 0, 1 << 20), True, spool) for _ in range(2)]
deadline = time.monotonic() + 60
while len(os.listdir(spool)) < 2 and time.monotonic() < deadline:
    time.sleep(0.05)
import psutil
me = psutil.Process()
workers = [p.pid for p in me.children(recursive=True) if p.ppid() != me.pid]
print(json.dumps({{"busy": len(os.listdir(spool)), "workers": workers, "helpers": [p.pid for p in me.children()]}}), flush=True)
time.sleep(120)
"""

#: a run that makes pools and never submits: what did it load, what did it start?
UNUSED_POOL_SCRIPT = """
import json, sys
from batchpush.workers import WorkerPool
with WorkerPool(None):
    pass
WorkerPool(2).shutdown()
loaded = sorted(m for m in sys.modules if m.partition(".")[0] in ("multiprocessing", "psutil") or m == "concurrent.futures.process")
import psutil
print(json.dumps({"loaded": loaded, "children": [p.pid for p in psutil.Process().children(recursive=True)]}))
"""


#: A main process whose two-job pool loses the worker that waits for the next task
#: (it holds the call queue's read lock while it waits: the kernel says it reads a
#: pipe), its sibling busy with a task (``busy``) or idle (``idle``). It prints the
#: workers' pids, whether the busy task failed, then shuts the pool down and exits.
LOCK_HOLDER_KILLED_SCRIPT = """
import json, os, sys, time
from batchpush.workers import WorkerPool, _start_ticks
mode, seconds = sys.argv[1], float(sys.argv[2])

def waits_in(pid):
    with open(f"/proc/{pid}/wchan") as f:
        return f.read()

pool = WorkerPool(2)
for started in [pool.submit(time.sleep, 0.5) for _ in range(2)]:  # both workers up
    started.result(timeout=60)
task = pool.submit(time.sleep, seconds) if mode == "busy" else None
deadline = time.monotonic() + 60
while True:
    workers = list(pool._pool._processes)
    waiting = [pid for pid in workers if "pipe" in waits_in(pid)]
    sleeping = [pid for pid in workers if "sleep" in waits_in(pid)]
    if len(waiting) == 1 and (task is None or len(sleeping) == 1) or time.monotonic() > deadline:
        break
    time.sleep(0.01)
started = {pid: _start_ticks(pid) for pid in workers}  # (before the kill: the pids name these processes)
os.kill(waiting[0], 9)
failed = None
if task is not None:
    failed = type(task.exception(timeout=60)).__name__
else:
    while not pool._pool._broken and time.monotonic() < deadline:
        time.sleep(0.01)
print(json.dumps({"workers": started, "killed": waiting[0], "failed": failed}), flush=True)
sys.stdin.readline()  # the test looks at the workers meanwhile
pool.shutdown()
print("shut down", flush=True)
"""


@pytest.fixture
def make_pool() -> Iterator[Callable[..., WorkerPool]]:
    pools: list[WorkerPool] = []

    def make(jobs: int, *, max_rebuilds: int = MAX_REBUILDS) -> WorkerPool:
        pool = WorkerPool(jobs, max_rebuilds=max_rebuilds)
        pools.append(pool)
        return pool

    yield make
    for pool in pools:
        pool.shutdown(wait=True, cancel_futures=True)


def _gone(process: psutil.Process) -> bool:
    # a zombie has exited; whether anyone reaps it is not the pool's business
    try:
        return not process.is_running() or process.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def _survivors(processes: list[psutil.Process], within_s: float) -> list[psutil.Process]:
    deadline = time.monotonic() + within_s
    left = [p for p in processes if not _gone(p)]
    while left and time.monotonic() < deadline:
        time.sleep(0.1)
        left = [p for p in left if not _gone(p)]
    return left


def _worker_pid(pool: WorkerPool) -> int:
    """The pid of a one-job pool's worker (starting it if need be)."""
    pid = pool.submit(os.getpid).result(timeout=WAIT_S)
    assert isinstance(pid, int)
    return pid


def _layer(tmp_path: Path) -> tuple[FileRange, bytes]:
    data = os.urandom(1 << 20) + bytes(1 << 20)
    path = tmp_path / "layer.tar"
    path.write_bytes(data)
    return FileRange(str(path), 0, len(data)), data


def _spool(tmp_path: Path) -> str:
    spool = tmp_path / "spool"
    spool.mkdir(exist_ok=True)
    return str(spool)


def test_orphaned_workers_exit_when_the_main_process_is_killed(tmp_path: Path) -> None:
    layer = tmp_path / "layer.fifo"
    os.mkfifo(layer)
    script = ORPHANS_SCRIPT.format(module="batchpush.workers")
    main = subprocess.Popen([sys.executable, "-c", script, str(layer), _spool(tmp_path)], stdout=subprocess.PIPE, cwd=REPO, text=True)
    started: list[psutil.Process] = []
    try:
        assert main.stdout is not None
        ready, _, _ = select.select([main.stdout], [], [], WAIT_S)
        assert ready, "the main process did not report its workers"
        pids = json.loads(main.stdout.readline())
        assert pids["busy"] == 2 and len(pids["workers"]) == 2, pids
        workers = [psutil.Process(pid) for pid in pids["workers"]]
        helpers = [psutil.Process(pid) for pid in pids["helpers"]]
        started = workers + helpers

        main.kill()
        main.wait(timeout=WAIT_S)

        assert not _survivors(workers, GONE_WITHIN_S), "workers outlived the main process"
        # then the forkserver and resource tracker, whose pipes the workers held
        assert not _survivors(helpers, GONE_WITHIN_S), "multiprocessing's helper processes outlived the main process"
    finally:
        main.kill()
        main.wait(timeout=WAIT_S)
        for process in started:
            with contextlib.suppress(psutil.NoSuchProcess):
                process.kill()


def test_a_broken_pool_is_rebuilt_by_the_next_submit(make_pool: Callable[..., WorkerPool], tmp_path: Path) -> None:
    pool = make_pool(1)
    worker = _worker_pid(pool)
    slow = pool.submit(time.sleep, SLOW_TASK_S)
    os.kill(worker, signal.SIGKILL)
    with pytest.raises(BrokenProcessPool):
        slow.result(timeout=WAIT_S)

    blob, data = _layer(tmp_path)
    compressed = pool.submit(compress_to_spool, blob, _spool(tmp_path)).result(timeout=WAIT_S)
    assert gzip.decompress(Path(compressed.path).read_bytes()) == data
    assert pool.breakages == 1


def test_resubmitting_futures_survive_a_killed_worker(make_pool: Callable[..., WorkerPool], tmp_path: Path) -> None:
    """The task whose worker died and the task queued behind it both run again on a
    fresh pool, and their futures get their results. The first task is seen running
    before its worker is killed (it has started a child), and its first run cannot
    end by itself within the test (it sleeps SLOW_TASK_S); its second run finds the
    mark the first left and ends at once."""
    pool = make_pool(1)
    worker = _worker_pid(pool)
    blob, data = _layer(tmp_path)
    mark = tmp_path / "started"
    script = f"if [ -e {mark} ]; then exit 0; fi; touch {mark}; exec sleep {SLOW_TASK_S}"
    running = pool.submit_resubmitting(subprocess.run, ["sh", "-c", script])
    queued = pool.submit_resubmitting(compress_to_spool, blob, _spool(tmp_path))
    deadline = time.monotonic() + WAIT_S
    while not (mark.exists() and psutil.Process(worker).children()):  # the task is under way in that worker
        assert time.monotonic() < deadline and not running.done(), "the task did not start"
        time.sleep(0.01)
    first_run = psutil.Process(worker).children(recursive=True)
    os.kill(worker, signal.SIGKILL)
    for child in first_run:  # the first run's sleep, orphaned
        with contextlib.suppress(psutil.NoSuchProcess):
            child.kill()

    assert running.result(timeout=WAIT_S).returncode == 0  # the second run's: the first never ends by itself in time
    compressed = queued.result(timeout=WAIT_S)
    assert gzip.decompress(Path(compressed.path).read_bytes()) == data
    assert pool.breakages == 1
    assert _worker_pid(pool) != worker


def test_a_cancelled_resubmitting_future_stays_cancelled(make_pool: Callable[..., WorkerPool]) -> None:
    """Cancelled while its task waits, it says so at once, its waiters are told by
    the time the task is dropped, and the pool breaking does not bring it back."""
    pool = make_pool(1)
    worker = _worker_pid(pool)
    busy = pool.submit(time.sleep, SLOW_TASK_S)
    # the call queue holds two tasks besides the running one: the last one waits
    queued = [pool.submit_resubmitting(os.getpid) for _ in range(3)]
    assert queued[-1].cancel()
    assert queued[-1].cancelled()

    os.kill(worker, signal.SIGKILL)
    with pytest.raises(BrokenProcessPool):
        busy.result(timeout=WAIT_S)
    assert all(isinstance(future.result(timeout=WAIT_S), int) for future in queued[:-1])
    done, _ = cf.wait([queued[-1]], timeout=WAIT_S)
    assert done == {queued[-1]}
    assert queued[-1].cancelled()


def test_a_pool_that_keeps_breaking_raises_worker_pool_error(make_pool: Callable[..., WorkerPool]) -> None:
    pool = make_pool(1, max_rebuilds=2)
    for _ in range(3):
        worker = _worker_pid(pool)  # after a breakage, this submit rebuilds the pool
        doomed = pool.submit(time.sleep, SLOW_TASK_S)
        os.kill(worker, signal.SIGKILL)
        with pytest.raises(BrokenProcessPool):
            doomed.result(timeout=WAIT_S)

    with pytest.raises(WorkerPoolError) as caught:
        pool.submit(os.getpid)
    assert caught.value.kind == "worker-pool"
    assert caught.value.breakages == 3
    assert "keep dying" in caught.value.message
    with pytest.raises(WorkerPoolError):
        pool.submit(os.getpid)
    assert pool.breakages == 3


def test_a_resubmitting_future_fails_with_worker_pool_error_when_the_budget_is_spent(make_pool: Callable[..., WorkerPool]) -> None:
    pool = make_pool(1, max_rebuilds=0)
    worker = _worker_pid(pool)
    doomed = pool.submit_resubmitting(time.sleep, SLOW_TASK_S)
    os.kill(worker, signal.SIGKILL)
    assert isinstance(doomed.exception(timeout=WAIT_S), WorkerPoolError)


def test_a_pool_never_submitted_to_starts_no_process_and_loads_no_multiprocessing() -> None:
    run = subprocess.run([sys.executable, "-c", UNUSED_POOL_SCRIPT], capture_output=True, text=True, cwd=REPO, timeout=WAIT_S, check=True)
    assert json.loads(run.stdout) == {"loaded": [], "children": []}


def test_the_main_process_check_sees_exit_zombies_and_reused_pids() -> None:
    me = os.getpid()
    ticks = _start_ticks(me)
    assert ticks is not None
    assert _main_alive(me, ticks)
    assert not _main_alive(me, ticks - 1), "a process with our pid but another start time is not us"

    child = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    try:
        child_ticks = _start_ticks(child.pid)
        assert child_ticks is not None
        assert _main_alive(child.pid, child_ticks)
        assert child.stdin is not None
        child.stdin.close()
        # exited but not reaped yet (nobody waits for it): a zombie is gone too
        deadline = time.monotonic() + WAIT_S
        while _main_alive(child.pid, child_ticks) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _main_alive(child.pid, child_ticks)
    finally:
        child.kill()
        child.wait(timeout=WAIT_S)
    assert not _main_alive(child.pid, child_ticks)


@pytest.mark.parametrize("sibling", ["busy", "idle"])
def test_a_worker_killed_holding_the_queue_lock_leaves_no_sibling_waiting_for_it(sibling: str) -> None:
    """The OOM killer takes the worker that waits for the next task (it holds the
    call queue's read lock while it waits). Its sibling, once its task is over (or
    at once, idle), would wait for that lock for ever, ignoring the SIGTERM CPython
    sends it: the broken pool's manager thread waited for it, then the shutdown,
    then the interpreter's exit (the suite's CI run hung after its last test so).
    Now a broken pool's workers are killed: as soon as a failed task shows it
    broken (the busy sibling is gone before the pool is shut down), or when it is
    shut down (nothing showed it: the idle sibling); the process ends."""
    main = subprocess.Popen([sys.executable, "-c", LOCK_HOLDER_KILLED_SCRIPT, sibling, str(SLOW_TASK_S)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, cwd=REPO, text=True)
    try:
        assert main.stdout is not None and main.stdin is not None
        ready, _, _ = select.select([main.stdout], [], [], WAIT_S)
        assert ready, "the main process did not report its workers"
        seen = json.loads(main.stdout.readline())
        assert seen["failed"] == ("BrokenProcessPool" if sibling == "busy" else None), seen
        # (by pid and start time: the forkserver reaps its workers, the pid may be reused)
        [(other, ticks)] = [(int(pid), ticks) for pid, ticks in seen["workers"].items() if int(pid) != seen["killed"]]

        def sibling_gone() -> bool:
            deadline = time.monotonic() + GONE_WITHIN_S
            while _main_alive(other, ticks) and time.monotonic() < deadline:
                time.sleep(0.05)
            return not _main_alive(other, ticks)

        if sibling == "busy":  # its task failed: the broken pool was dropped, its workers killed
            assert sibling_gone(), "the sibling outlived its broken pool"
        main.stdin.write("\n")
        main.stdin.flush()
        out, _ = main.communicate(timeout=WAIT_S)
        assert out.strip() == "shut down" and main.returncode == 0, (out, main.returncode)
        assert sibling_gone(), "the sibling outlived the shutdown"
    finally:
        main.kill()
        main.wait(timeout=WAIT_S)
