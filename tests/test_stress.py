"""A many-image, shared-layer batch to two registries, again and again, on a loaded machine.

Each run is ``batchpush run PLAN`` in its own process with busy loops eating both
cores: it must finish (within a bound that only a hang exceeds), exit 0, upload
each blob at most once per registry, and leave images skopeo reads back intact.
``BATCHPUSH_STRESS_RUNS`` sets the number of runs (``make test``: 4; ``make soak``: 50).
Runs alternate between pushing to new repositories (mounts from the earlier ones)
and re-running the previous plan (the cron fast path).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections import Counter

import pytest
import yaml
from conftest import pull_and_verify
from images import LayoutWriter, layer_tar, random_layer
from registry import start_registry
from test_batch import uploads_by_digest

RUNS = int(os.environ.get("BATCHPUSH_STRESS_RUNS", "4"))
#: a run that takes longer than this hangs (a cold run takes ~15 s on a loaded 2-core machine)
RUN_BOUND_S = 240
REPOSITORIES = 10


def _fleet(root: str) -> list[str]:
    """Layouts sharing a 20 MiB base (two compression blocks), a 1.5 MiB middle layer
    per pair of repositories (one worker each), and a small app layer per tag."""
    base = random_layer(1, 20 << 20)
    middles = [random_layer(10 + m, 3 << 19) for m in range(REPOSITORIES // 2)]
    layouts = []
    for r in range(REPOSITORIES):
        path = os.path.join(root, f"svc{r}")
        writer = LayoutWriter(path)
        for t in range(2):
            descriptor, _ = writer.image([base, middles[r // 2], layer_tar(1000 + 10 * r + t)])
            writer.tag(descriptor, f"v{t}")
        layouts.append(path)
    return layouts


def _load() -> list[subprocess.Popen[bytes]]:
    return [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(2)]


@pytest.mark.timeout(RUNS * RUN_BOUND_S + 120)
def test_batches_on_a_loaded_machine_always_finish(registry, tmp_path):
    other = start_registry(str(tmp_path / "other"))
    layouts = _fleet(str(tmp_path / "layouts"))
    metadata = str(tmp_path / "md")
    hogs = _load()
    try:
        prefix = ""
        for run in range(RUNS):
            if run % 2 == 0:
                prefix = f"r{run}"
            plan = tmp_path / f"plan{run}.yaml"
            plan.write_text(yaml.safe_dump({
                "version": 1,
                "defaults": {"insecure": True, "max_concurrent_uploads": 2},
                "images": [{"source": f"oci:{path}", "targets": [f"{registry.host}/{prefix}/svc{i}", f"{other.host}/{prefix}/svc{i}"]} for i, path in enumerate(layouts)],
            }))
            started = time.monotonic()
            done = subprocess.run(
                [sys.executable, "-m", "batchpush", "run", str(plan), "--jobs", "2", "--max-concurrent-images", "4", "--metadata-dir", metadata, "-q"],
                capture_output=True, text=True, timeout=RUN_BOUND_S,
            )
            print(f"run {run} ({'re-run' if run % 2 else 'cold'}): {time.monotonic() - started:.1f} s")
            assert done.returncode == 0, done.stderr
        for target in (registry, other):
            uploads = uploads_by_digest(target)
            assert uploads and max(uploads.values()) == 1, Counter(uploads.values())
        for i in (0, REPOSITORIES - 1):
            pull_and_verify(other, f"{prefix}/svc{i}:v1", str(tmp_path / f"pulled{i}"))
    finally:
        for hog in hogs:
            hog.kill()
            hog.wait()
        other.stop()
