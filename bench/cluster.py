"""The cluster's overhead: the wide and tiny fleets, local engine against the same
plan on a loopback Dask cluster of 2 workers (``--scheduler``), each on fresh
registries with a fresh metadata store, then the cron re-run of each.

On a 2-core machine the cluster cannot be faster (the scheduler, two workers and
the client share the cores the local run has alone); the target is its overhead:
at most 1.5x the local wall time. Recorded: wall time, CPU of the client, of the
scheduler and of the workers, and bytes moved between workers (Dask's own count).

    .venv/bin/python bench/cluster.py        # writes bench/results-cluster.json
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time

import psutil

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))
sys.path.insert(0, HERE)

from registry import start_registry  # noqa: E402
from run import CACHE, batchpush_commands, fleets  # noqa: E402
from test_cluster import start_cluster, stop_cluster  # noqa: E402


def _cpu(pids: list[int]) -> float:
    total = 0.0
    for pid in pids:
        try:
            times = psutil.Process(pid).cpu_times()
            total += times.user + times.system
        except psutil.NoSuchProcess:
            pass
    return total


def _timed(command: list[str]) -> float:
    """Wall time of one run (its CPU is counted in os.times() once waited for)."""
    started = time.monotonic()
    process = subprocess.run(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=dict(os.environ, PYTHONPATH=os.path.join(HERE, "..")), timeout=1800, check=False)
    if process.returncode != 0:
        raise SystemExit(f"{command}: exit {process.returncode}: {process.stderr.decode()[-2000:]}")
    return time.monotonic() - started


def _transferred(address: str) -> int:
    from distributed import Client

    with Client(address, set_as_default=False) as client:
        return sum(client.run(lambda dask_worker: dask_worker.transfer_outgoing_bytes_total).values())


def measure(work: str, name: str, fleet) -> dict:  # type: ignore[no-untyped-def]
    result: dict = {}
    for mode in ("local", "cluster"):
        registry = start_registry(os.path.join(work, f"{name}-{mode}"))
        cluster = start_cluster(pathlib.Path(tempfile.mkdtemp(dir=work))) if mode == "cluster" else None
        try:
            for run in ("cold", "cron"):
                (command,) = batchpush_commands(work, fleet, [registry], f"{name}-{mode}", mode)
                if cluster is not None:
                    command += ["--scheduler", cluster.address]
                pids = [cluster.scheduler.pid, *cluster.worker_pids()] if cluster else []
                scheduler_before = _cpu(pids[:1])
                workers_before = _cpu(pids[1:])
                client_before = os.times()
                wall = _timed(command)
                client_after = os.times()
                entry = {
                    "wall_s": round(wall, 2),
                    "client_cpu_s": round(client_after.children_user + client_after.children_system - client_before.children_user - client_before.children_system, 2),
                }
                if cluster is not None:
                    entry["scheduler_cpu_s"] = round(_cpu(pids[:1]) - scheduler_before, 2)
                    entry["workers_cpu_s"] = round(_cpu(pids[1:]) - workers_before, 2)
                    entry["bytes_between_workers"] = _transferred(cluster.address)
                result[f"{mode}_{run}"] = entry
                print(name, mode, run, entry, flush=True)
        finally:
            if cluster is not None:
                stop_cluster(cluster)
            registry.stop()
    for run in ("cold", "cron"):
        result[f"ratio_{run}"] = round(result[f"cluster_{run}"]["wall_s"] / result[f"local_{run}"]["wall_s"], 2)
    return result


def main() -> int:
    built = fleets(CACHE)
    results = {}
    with tempfile.TemporaryDirectory(prefix="batchpush-bench-cluster-") as work:
        for name in ("wide", "tiny"):
            results[name] = measure(work, name, built[name])
    with open(os.path.join(HERE, "results-cluster.json"), "w") as f:
        json.dump(results, f, indent=2)
        f.write("\n")
    for name, result in results.items():
        print(f"{name}: cluster/local wall time {result['ratio_cold']}x cold, {result['ratio_cron']}x cron re-run")
    return 0


if __name__ == "__main__":
    sys.exit(main())
