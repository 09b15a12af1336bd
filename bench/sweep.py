"""batchpush alone, cold, behind the WAN, once per setting: how time moves with one.

``python bench/sweep.py SCENARIO "ARGS" ["ARGS" ...]`` runs batchpush's cold push of
the fleet SCENARIO (heavy, wide, tiny) on a fresh registry behind a WanProxy
(BENCH_WAN ms, default 25; the heavy fleet capped as run.py caps it) once per
ARGS (extra batchpush arguments, e.g. ``"--max-requests-in-flight 8"``), each
BENCH_REPEATS times (median kept, all printed; default 1), and prints a line per setting. No
skopeo: run.py's ratios are the results of record; this says where a default
should sit.
"""

from __future__ import annotations

import os
import shlex
import shutil
import sys
import tempfile

os.environ.setdefault("BENCH_WAN", "25")

import run  # (reads BENCH_WAN at import)


def main() -> int:
    name, settings = sys.argv[1], sys.argv[2:]
    repeats = int(os.environ.get("BENCH_REPEATS", "1"))
    work = tempfile.mkdtemp(prefix="batchpush-sweep-")
    try:
        fleet = run.fleets(run.CACHE)[name]
        print(f"# {name} cold behind {run.WAN_MS:g} ms, {len(fleet.images)} images", flush=True)
        for number, setting in enumerate(settings):
            runs = []
            for repeat in range(repeats):
                registry = run.scenario_registry(work, name)
                try:
                    command = run.batchpush_commands(work, fleet, [registry], name, f"{number}-{repeat}")[0] + shlex.split(setting)
                    runs.append(run.measure("batchpush", [command], 1, [registry]))
                finally:
                    registry.stop()
                    shutil.rmtree(registry.root, ignore_errors=True)
            best = run.median_run(runs)
            walls = "/".join(f"{r.wall_s:.2f}" for r in sorted(runs, key=lambda r: r.wall_s))
            print(f"{setting or '(defaults)':40} wall {best.wall_s:6.2f}s (all {walls}) cpu {best.cpu_s:5.2f}s registry cpu {best.registry_cpu_s:5.2f}s req {best.requests:6} "
                  f"up {best.bytes_uploaded / 1e6:7.1f}MB rss {best.peak_rss_mb:5.0f}MB fail {best.failures} in flight avg/peak {run.in_flight_text(best) or '?'}", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
