"""Runs commands (``parallel`` at a time) and prints wall time, CPU and peak RSS as
JSON: ``python bench/measure.py PARALLEL < commands.json``.

The whole process tree is sampled (psutil, every 20 ms): CPU is summed over every
process seen (worker processes included), peak RSS is the largest sum of RSS over
the tree at one moment (so four skopeo processes at once count together)."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time

import psutil


def main() -> int:
    parallel = int(sys.argv[1])
    commands = json.load(sys.stdin)
    me = psutil.Process()
    cpu: dict[int, float] = {}
    peak_rss = 0
    done = threading.Event()

    def sample() -> None:
        nonlocal peak_rss
        while not done.is_set():
            total = 0
            for process in me.children(recursive=True):
                try:
                    times = process.cpu_times()
                    cpu[process.pid] = times.user + times.system
                    total += process.memory_info().rss
                except psutil.Error:
                    continue
            peak_rss = max(peak_rss, total)
            done.wait(0.02)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    started = time.monotonic()
    failures = 0
    pending = list(commands)
    running: list[subprocess.Popen[bytes]] = []
    while pending or running:
        while pending and len(running) < parallel:
            running.append(subprocess.Popen(pending.pop(0), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        for process in list(running):
            if process.poll() is not None:
                failures += process.returncode != 0
                running.remove(process)
        time.sleep(0.005)
    wall = time.monotonic() - started
    done.set()
    sampler.join()
    own = me.cpu_times()  # this sampler's own CPU, so a caller can tell it from other work
    json.dump({"wall_s": wall, "cpu_s": sum(cpu.values()), "peak_rss_mb": peak_rss / 2**20, "failures": failures, "sampler_cpu_s": own.user + own.system}, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
