"""Start-up, and the one-image cron re-run, against skopeo in the same run.

``.venv/bin/python bench/startup.py`` (after ``python -m compileall -q batchpush``, as
``make bench`` does). A CI job or a cron job per service pushes one image at a time:
there the cost is start-up and one request, not throughput. Measured, each best of
``STARTUP_REPEATS`` wall times of a fresh process (the floor of a run of that tool):

- ``python -c pass`` of this interpreter: the floor under any run of ours;
- ``batchpush --version`` and ``skopeo --version``;
- the cron re-run: one image (2 layers, from an OCI layout) whose tag already holds
  it, on a fresh real registry on loopback: ``batchpush push`` (one manifest HEAD)
  and ``skopeo copy`` of the same layout to a repository of its own;
- what a general HTTP client would cost to import, for comparison: ``requests``
  and ``urllib3`` (batchpush uses neither: its transport is its own, on ``socket``).

Each figure is the best wall time and, apart, the best CPU time (user + system, of
the process and its children): on a machine others share, the CPU time moves less
with the load. It prints one line per figure and the JSON of them all.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))

from images import simple_layout  # noqa: E402
from registry import start_registry  # noqa: E402

REPEATS = int(os.environ.get("STARTUP_REPEATS", "5"))
BATCHPUSH = os.path.join(os.path.dirname(sys.executable), "batchpush")
SKOPEO = shutil.which("skopeo") or "/usr/bin/skopeo"


def _children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def best_s(command: list[str], repeats: int = REPEATS, env: dict[str, str] | None = None) -> tuple[float, float]:
    """The best wall time and the best CPU time of ``command`` (it must succeed)."""
    best, best_cpu = float("inf"), float("inf")
    for _ in range(repeats):
        started, cpu = time.monotonic(), _children_cpu_s()
        done = subprocess.run(command, capture_output=True, env=env)
        elapsed = time.monotonic() - started
        if done.returncode != 0:
            raise SystemExit(f"{command[0]} failed ({done.returncode}): {done.stderr.decode(errors='replace')[-2000:]}")
        best, best_cpu = min(best, elapsed), min(best_cpu, _children_cpu_s() - cpu)
    return best, best_cpu


def main() -> int:
    figures: dict[str, tuple[float, float]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-startup-") as work:
        figures["python -c pass"] = best_s([sys.executable, "-c", "pass"])
        figures["import urllib3"] = best_s([sys.executable, "-c", "import urllib3"])
        figures["import requests"] = best_s([sys.executable, "-c", "import requests"])
        figures["batchpush --version"] = best_s([BATCHPUSH, "--version"])
        figures["skopeo --version"] = best_s([SKOPEO, "--version"])
        layout = os.path.join(work, "layout")
        simple_layout(layout, {"1.0": [1, 2]})
        registry = start_registry(work)
        try:
            host = registry.host
            ours = [BATCHPUSH, "push", f"oci:{layout}:1.0", f"{host}/cron/ours:1.0", "--insecure", host, "--metadata-dir", os.path.join(work, "metadata")]
            # skopeo's blob-info cache kept apart, as a cron job's would be its own
            env = {**os.environ, "XDG_RUNTIME_DIR": os.path.join(work, "skopeo-run"), "HOME": os.path.join(work, "skopeo-home")}
            os.makedirs(env["XDG_RUNTIME_DIR"], mode=0o700)
            theirs = [SKOPEO, "--insecure-policy", "copy", "--dest-tls-verify=false", f"oci:{layout}:1.0", f"docker://{host}/cron/theirs:1.0"]
            best_s(ours, 1)  # the first run pushes; the re-runs find the tag holding the image
            best_s(theirs, 1, env)
            before = len(registry.access_log())
            figures["batchpush cron re-run"] = best_s(ours)
            requests_per_run = (len(registry.access_log()) - before) / REPEATS
            figures["skopeo cron re-run"] = best_s(theirs, env=env)
        finally:
            registry.stop()
    load = os.getloadavg()
    for name, (seconds, cpu_s) in figures.items():
        print(f"{name:<24} {seconds:6.3f} s  (cpu {cpu_s:5.3f} s)")
    print(f"batchpush requests per re-run: {requests_per_run:.0f}; load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    print(json.dumps({"seconds": {name: wall for name, (wall, _) in figures.items()}, "cpu_seconds": {name: cpu for name, (_, cpu) in figures.items()}, "batchpush_requests_per_rerun": requests_per_run, "load_average": load}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
