"""Does time per image stay flat, and memory bounded, as the batch grows?

``python bench/scale.py [N ...]`` (default 1000 10000) pushes a tiny fleet of N
images (N/10 repositories x 10 tags, the *tiny* scenario's shape: a 20 KB base
shared by all, a 2 KB middle, a 500-byte app layer per image) to a fresh real
registry on loopback, cold, with one batchpush plan and a fresh metadata store, and
prints wall time, seconds per image, CPU, the registry's CPU and the peak RSS of
batchpush's process tree (measure.py). The fleets are built once in bench/.cache.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile

import run
from fleet import build, synthetic_tar


def main() -> int:
    sizes = [int(n) for n in sys.argv[1:]] or [1000, 10000]
    work = tempfile.mkdtemp(prefix="batchpush-scale-")
    try:
        for size in sizes:
            fleet = build(os.path.join(run.CACHE, f"tiny-{size}"), repositories=size // 10, tags=10, groups=1, bases=lambda: [synthetic_tar(1, 20_000)], middle_bytes=2_000, app_bytes=500)
            registry = run.scenario_registry(work, "tiny")
            try:
                measured = run.measure("batchpush", run.batchpush_commands(work, fleet, [registry], f"tiny{size}", "cold"), 1, [registry])
            finally:
                registry.stop()
                shutil.rmtree(registry.root, ignore_errors=True)
            images = len(fleet.images)
            print(f"{images:6} images: wall {measured.wall_s:7.1f}s = {measured.wall_s / images * 1e3:5.2f} ms/image, cpu {measured.cpu_s:6.1f}s ({measured.cpu_s / images * 1e3:4.2f} ms/image), "
                  f"registry cpu {measured.registry_cpu_s:6.1f}s, peak rss {measured.peak_rss_mb:4.0f} MB, requests {measured.requests}, failures {measured.failures}", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
