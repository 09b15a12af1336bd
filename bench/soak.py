"""A long-lived cluster, run after run (issue 27): one ``dask scheduler`` and two
``dask worker``s with their nannies (default options but the dashboard), on
loopback, serve N cold runs of the wide fleet (60 images to two registries: 120
pushes), each against fresh registries with a fresh metadata store and a deadline.

Recorded after each run: its wall time and exit, the resident memory of the
scheduler, of each worker (the nanny's child) and of each nanny, and what the
scheduler holds (event-log topics, Dask events, semaphores, variables, datasets,
tasks, task groups, spans, computations), read by one client that lives as long
as the cluster. Growth per run is the least-squares slope over the runs after
the first two (the first runs fill caches and Dask's bounded logs).

    .venv/bin/python bench/soak.py [--runs 50] [--deadline 300] [--code DIR] [--out FILE]

``--code``: the batchpush tree the client and the workers import (default: this
one), so a tree of another commit can be soaked the same way.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from typing import Any

import psutil
import yaml

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(ROOT, "tests"))
sys.path.insert(0, HERE)

from fleet import Fleet, build, directory_tar  # noqa: E402
from registry import free_port, start_registry  # noqa: E402

DASK = os.path.join(os.path.dirname(sys.executable), "dask")
#: the fleet: 20 repositories of 3 tags (a shared base, 8 middle layers, an app layer each)
REPOSITORIES = 20
#: how long the cluster has to come up
START_TIMEOUT_S = 60.0
#: after a run, before memory is read: the processes settle (late messages, timers)
SETTLE_S = 3.0


def wide(cache: str) -> Fleet:
    return build(os.path.join(cache, "soak-wide"), repositories=REPOSITORIES, tags=3, groups=8, bases=lambda: [directory_tar("/usr/share/perl", 3_000_000)], middle_bytes=400_000, app_bytes=30_000)


def _spawn(args: list[str], log: str, env: dict[str, str]) -> subprocess.Popen[bytes]:
    with open(log, "ab") as out:
        return subprocess.Popen([DASK, *args], stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)


def _rss_mb(pid: int) -> float:
    try:
        return psutil.Process(pid).memory_info().rss / 1e6
    except psutil.NoSuchProcess:
        return float("nan")


def _worker_pid(nanny: int) -> int | None:
    try:
        children = psutil.Process(nanny).children()
    except psutil.NoSuchProcess:
        return None
    for child in children:  # the worker; the other is multiprocessing's resource tracker
        try:
            if "spawn_main" in " ".join(child.cmdline()):
                return child.pid
        except psutil.NoSuchProcess:
            pass
    return None


def _descendants_rss_mb(pid: int) -> float:
    """The worker's own children (batchpush's compression processes, if any)."""
    try:
        return sum(child.memory_info().rss for child in psutil.Process(pid).children(recursive=True)) / 1e6
    except psutil.NoSuchProcess:
        return float("nan")


def _held(dask_scheduler: Any) -> dict[str, int]:
    """What the scheduler holds (run on the scheduler by the soak's own client)."""
    extensions = dask_scheduler.extensions
    broker = getattr(dask_scheduler, "_broker", None)
    topics = getattr(broker, "_topics", {})
    spans = extensions.get("spans")
    return {
        "topics": len(topics),
        "batchpush_topics": sum(1 for name in topics if str(name).startswith("batchpush")),
        "topic_events": sum(len(topic.events) for topic in topics.values()),
        "largest_topics": dict(sorted(((str(name), len(topic.events)) for name, topic in topics.items()), key=lambda item: -item[1])[:4]),
        "dask_events": len(getattr(extensions.get("events"), "_events", {})),
        "semaphores": len(getattr(extensions.get("semaphores"), "max_leases", {})),
        "variables": len(getattr(extensions.get("variables"), "variables", {})),
        "datasets": len(getattr(extensions.get("publish"), "datasets", {})),
        "tasks": len(dask_scheduler.tasks),
        "task_groups": len(dask_scheduler.task_groups),
        "spans": len(getattr(spans, "spans", {})),
        "computations": len(dask_scheduler.computations),
        "clients": len(dask_scheduler.clients),
        "transition_log": len(dask_scheduler.transition_log),
        "messages_to_workers": sum(len(getattr(stream, "recent_message_log", ())) for stream in dask_scheduler.stream_comms.values()),
    }


def _worker_held(dask_worker: Any) -> dict[str, int]:
    """Dask's own bounded logs in a worker (``distributed.admin.low-level-log-length``
    entries each): they fill with every task, whoever runs it, then stay full."""
    import sys

    stream = getattr(dask_worker, "batched_stream", None)
    module = sys.modules.get("batchpush.cluster.tasks")
    return {
        "profile_history": len(dask_worker.profile_history),
        "messages_to_scheduler": len(getattr(stream, "recent_message_log", ())),
        "state_log": len(dask_worker.state.log),
        "stimulus_log": len(dask_worker.state.stimulus_log),
        "transfer_outgoing_log": len(dask_worker.transfer_outgoing_log),
        "batchpush_runs": len(getattr(module, "_RUNS", {})),
    }


def _ask_workers(watcher: Any, function: Any) -> list[Any]:
    """``function`` on each worker, asked apart for 10 s at most (a worker whose event
    loop is stuck answers nothing): the answers, or what went wrong."""
    import concurrent.futures as cf
    import threading

    def ask(worker: str, future: cf.Future[Any]) -> None:
        try:
            future.set_result(watcher.run(function, workers=[worker], on_error="return"))
        except Exception as exc:
            future.set_exception(exc)

    asked = []
    for worker in watcher.nthreads():
        future: cf.Future[Any] = cf.Future()
        threading.Thread(target=ask, args=(worker, future), daemon=True).start()  # a daemon: one stuck does not hold the soak's exit
        asked.append(future)
    done, _ = cf.wait(asked, timeout=10)
    return [next(iter(f.result().values()), None) if f in done and f.exception() is None else "no answer within 10 s" for f in asked]


def _stacks(path: str, nannies: list[int]) -> None:
    """The native stacks of every worker process (gdb), for a run past its deadline."""
    with open(path, "w") as out:
        for nanny in nannies:
            worker = _worker_pid(nanny)
            if worker is None:
                continue
            out.write(f"== worker pid {worker}\n")
            out.flush()
            subprocess.run(["gdb", "-p", str(worker), "-batch", "-ex", "thread apply all bt 60"], stdout=out, stderr=subprocess.STDOUT, timeout=120, check=False)


def _census() -> dict[str, int]:
    """Live objects by type in this process (run on the scheduler or a worker)."""
    import collections
    import gc

    gc.collect()
    return dict(collections.Counter(type(o).__qualname__ for o in gc.get_objects()).most_common(400))


def _grown(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    return dict(sorted(((name, after.get(name, 0) - before.get(name, 0)) for name in after), key=lambda item: -item[1])[:15])


def plan_for(work: str, fleet: Fleet, hosts: list[str], run: int) -> str:
    plan = {
        "version": 1,
        "registries": {host: {"insecure": True} for host in hosts},
        "images": [{"source": f"oci:{path}", "targets": [f"{host}/soak/{os.path.basename(path)}" for host in hosts]} for path in fleet.repositories()],
    }
    path = os.path.join(work, f"plan-{run}.yaml")
    with open(path, "w") as f:
        yaml.safe_dump(plan, f)
    return path


def slope(values: list[float]) -> float:
    """Least-squares growth per run."""
    n = len(values)
    if n < 2:
        return float("nan")
    mean_x, mean_y = (n - 1) / 2, sum(values) / n
    return sum((x - mean_x) * (y - mean_y) for x, y in enumerate(values)) / sum((x - mean_x) ** 2 for x in range(n))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--deadline", type=float, default=300.0, help="seconds a run may take before it is killed (and counted as without end)")
    parser.add_argument("--code", default=ROOT, help="the batchpush tree to import (client and workers)")
    parser.add_argument("--out", default=os.path.join(HERE, "results-soak.json"))
    parser.add_argument("--no-profiler", action="store_true", help="workers without Dask's profiler (DASK_DISTRIBUTED__WORKER__PROFILE__ENABLED=False): on Python 3.11 before 3.11.9 it can deadlock a worker (CPython gh-106883)")
    parser.add_argument("--census", action="store_true", help="also record which object types grow in the scheduler and a worker between the third run and the last")
    args = parser.parse_args()
    code = os.path.abspath(args.code)
    env = dict(os.environ, PYTHONPATH=code, PYTHONFAULTHANDLER="1")
    fleet = wide(os.path.join(HERE, ".cache"))
    from distributed import Client

    record: dict[str, Any] = {"code": code, "python": sys.version.split()[0], "worker_profiler": not args.no_profiler, "load_at_start": os.getloadavg(), "runs": []}
    with tempfile.TemporaryDirectory(prefix="batchpush-soak-") as work:
        port = free_port()
        address = f"tcp://127.0.0.1:{port}"
        scheduler = _spawn(["scheduler", "--host", "127.0.0.1", "--port", str(port), "--no-dashboard"], os.path.join(work, "scheduler.log"), env)
        nannies: list[subprocess.Popen[bytes]] = []
        try:
            deadline = time.monotonic() + START_TIMEOUT_S
            while True:
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=1).close()
                    break
                except OSError:
                    if scheduler.poll() is not None or time.monotonic() > deadline:
                        raise SystemExit("the scheduler did not start") from None
                    time.sleep(0.2)
            worker_env = dict(env, DASK_DISTRIBUTED__WORKER__PROFILE__ENABLED="False") if args.no_profiler else env
            for n in range(2):
                nannies.append(_spawn(["worker", address, "--name", f"w{n}", "--host", "127.0.0.1", "--no-dashboard"], os.path.join(work, f"worker-{n}.log"), worker_env))
            with Client(address, timeout=START_TIMEOUT_S, set_as_default=False) as watcher:
                watcher.wait_for_workers(2, timeout=START_TIMEOUT_S)
                record["held_at_start"] = watcher.run_on_scheduler(_held)
                for run in range(1, args.runs + 1):
                    registries = [start_registry(os.path.join(work, f"r{run}-{k}")) for k in range(2)]
                    try:
                        plan = plan_for(work, fleet, [r.host for r in registries], run)
                        report = os.path.join(work, f"report-{run}.json")
                        command = [sys.executable, "-m", "batchpush", "run", plan, "-q", "--scheduler", address, "--metadata-dir", os.path.join(work, f"md-{run}"), "--report", report]
                        started = time.monotonic()
                        client = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env, cwd=code, start_new_session=True)
                        try:
                            _, err = client.communicate(timeout=args.deadline)
                            ended = True
                        except subprocess.TimeoutExpired:
                            _stacks(os.path.join(os.path.dirname(args.out), f"soak-run{run}-stacks.txt"), [n.pid for n in nannies])
                            os.killpg(client.pid, signal.SIGABRT)  # PYTHONFAULTHANDLER: its threads' stacks on stderr
                            try:
                                _, err = client.communicate(timeout=10)
                            except subprocess.TimeoutExpired:
                                os.killpg(client.pid, signal.SIGKILL)
                                _, err = client.communicate()
                            ended = False
                        wall = time.monotonic() - started
                    finally:
                        for registry in registries:
                            registry.stop()
                    statuses: dict[str, int] = {}
                    if os.path.exists(report):
                        with open(report) as f:
                            for image in json.load(f)["images"]:
                                statuses[image["status"]] = statuses.get(image["status"], 0) + 1
                    time.sleep(SETTLE_S)
                    workers = [_worker_pid(n.pid) for n in nannies]
                    entry = {
                        "run": run,
                        "wall_s": round(wall, 2),
                        "ended": ended,
                        "exit": client.returncode,
                        "images": statuses,
                        "scheduler_rss_mb": round(_rss_mb(scheduler.pid), 1),
                        "worker_rss_mb": [round(_rss_mb(pid), 1) if pid else None for pid in workers],
                        "worker_children_rss_mb": [round(_descendants_rss_mb(pid), 1) if pid else None for pid in workers],
                        "nanny_rss_mb": [round(_rss_mb(n.pid), 1) for n in nannies],
                        "worker_pids": workers,
                        "held": watcher.run_on_scheduler(_held),
                        "worker_held": [held if isinstance(held, dict) else repr(held) for held in _ask_workers(watcher, _worker_held)],
                        "load": [round(x, 2) for x in os.getloadavg()],
                    }
                    if client.returncode != 0:
                        entry["stderr_tail"] = err.decode(errors="replace")[-6000 if not ended else -600:]
                    if args.census and run in (3, args.runs):
                        census = {"scheduler": watcher.run_on_scheduler(_census)}
                        for counts in _ask_workers(watcher, _census):
                            if isinstance(counts, dict):  # the first worker that answers
                                census["worker"] = counts
                                break
                        if run == 3:
                            record["census_after_3"] = census
                        else:
                            record["census_growth"] = {side: _grown(record["census_after_3"][side], census[side]) for side in census if side in record["census_after_3"]}
                            del record["census_after_3"]
                    record["runs"].append(entry)
                    print(json.dumps(entry), flush=True)
        finally:
            for process in [*nannies, scheduler]:
                if process.poll() is None:
                    os.killpg(process.pid, signal.SIGKILL)
                    process.wait(timeout=30)
    runs = record["runs"]
    later = runs[2:]
    summary = {
        "runs": len(runs),
        "without_end": sum(1 for r in runs if not r["ended"]),
        "failed": sum(1 for r in runs if r["exit"] != 0),
        "wall_s_median": sorted(r["wall_s"] for r in runs)[len(runs) // 2] if runs else None,
        "scheduler_mb_per_run": round(slope([r["scheduler_rss_mb"] for r in later]), 3),
        "worker_mb_per_run": [round(slope([r["worker_rss_mb"][k] for r in later]), 3) for k in range(2)],
        "load_at_end": os.getloadavg(),
    }
    record["summary"] = summary
    with open(args.out, "w") as f:
        json.dump(record, f, indent=1)
        f.write("\n")
    print(json.dumps(summary))
    return 0 if summary["without_end"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
