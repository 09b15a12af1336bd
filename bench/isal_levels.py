"""isal levels 0-3 on the heavy fleet: is another level than the recipe's (1) faster
through a link of BENCH_WAN_RATE bytes/s (default 100 MB/s)?

``python bench/isal_levels.py`` deflates every unique layer of the heavy fleet as the
recipe does (16 MB blocks from a fresh state, 1 MB pieces; compress.py) at each
level, and prints the compressed bytes, the CPU seconds, and what bounds a push of
those layers on this machine: the compression spread over the cores, or the bytes
through the link (``max(cpu / cores, bytes / rate)``; the two overlap in batchpush,
which sends a layer's blocks as they are joined). The sha256 passes, the same at
every level, are left out of both.
"""

from __future__ import annotations

import glob
import os
import sys
import time

import run
from isal import isal_zlib

LEVELS = (0, 1, 2, 3)


def deflated_size(path: str, level: int) -> int:
    size = 0
    with open(path, "rb") as f:
        while block := f.read(16 << 20):
            compressor = isal_zlib.compressobj(level, isal_zlib.DEFLATED, -isal_zlib.MAX_WBITS)
            view = memoryview(block)
            for start in range(0, len(view), 1 << 20):
                size += len(compressor.compress(view[start : start + (1 << 20)]))
            size += len(compressor.flush(isal_zlib.Z_FULL_FLUSH))
    return size


def main() -> int:
    fleet = run.fleets(run.CACHE)["heavy"]
    layers = {os.path.basename(p): p for layout in fleet.repositories() for p in glob.glob(os.path.join(layout, "blobs", "sha256", "*")) if os.path.getsize(p) > 1 << 20}
    total = sum(os.path.getsize(p) for p in layers.values())
    cores = os.cpu_count() or 1
    print(f"# heavy fleet: {len(layers)} unique layers, {total / 1e6:,.0f} MB; link {run.WAN_RATE / 1e6:g} MB/s, {cores} cores")
    for level in LEVELS:
        started = time.process_time()
        out = sum(deflated_size(path, level) for path in sorted(layers.values()))
        cpu = time.process_time() - started
        bound = max(cpu / cores, out / run.WAN_RATE)
        print(f"level {level}: {out / 1e6:7.1f} MB ({out / total:5.1%}), cpu {cpu:5.2f} s ({total / cpu / 1e6:4.0f} MB/s per core), "
              f"link {out / run.WAN_RATE:5.2f} s, bound {bound:5.2f} s ({'link' if out / run.WAN_RATE >= cpu / cores else 'cpu'})", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
