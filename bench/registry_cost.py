"""The registry's own CPU per request, by kind: what bounds a batch of small images.

A fresh registry, one client connection kept alive, 200 requests of each kind; the
registry process's CPU time (psutil) before and after. Printed by ``make bench``;
``python bench/registry_cost.py`` alone.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Callable

import psutil
import requests

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))

from registry import start_registry  # noqa: E402

REPEATS = 200


def measure(work: str) -> dict[str, float]:
    """Milliseconds of registry CPU per request, by kind."""
    registry = start_registry(work)
    process = psutil.Process(registry.process.pid)
    session = requests.Session()
    base = registry.url

    def cpu_s() -> float:
        times = process.cpu_times()
        return times.user + times.system

    def upload(repository: str, data: bytes) -> str:
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        location = session.post(f"{base}/v2/{repository}/blobs/uploads/").headers["Location"]
        location = location if location.startswith("http") else base + location
        session.put(f"{location}&digest={digest}", data=data).raise_for_status()
        return digest

    layer = upload("cost/a", os.urandom(30_000))
    config = upload("cost/a", b"{}")

    def manifest(i: int) -> None:
        document = {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config, "size": 2},
            "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": layer, "size": 30_000}],
            "annotations": {"n": str(i)},
        }
        headers = {"Content-Type": "application/vnd.oci.image.manifest.v1+json"}
        session.put(f"{base}/v2/cost/a/manifests/t{i}", data=json.dumps(document), headers=headers).raise_for_status()

    kinds: dict[str, tuple[int, Callable[[int], object]]] = {
        "GET /v2/": (1, lambda i: session.get(f"{base}/v2/")),
        "HEAD blob": (1, lambda i: session.head(f"{base}/v2/cost/a/blobs/{layer}")),
        "mount": (1, lambda i: session.post(f"{base}/v2/cost/m{i}/blobs/uploads/?mount={layer}&from=cost/a")),
        "upload (POST+PUT, 30 KB)": (2, lambda i: upload("cost/a", os.urandom(30_000))),
        "manifest PUT": (1, manifest),
    }
    costs: dict[str, float] = {}
    try:
        for name, (requests_each, step) in kinds.items():
            before = cpu_s()
            for i in range(REPEATS):
                step(i)
            costs[name] = (cpu_s() - before) / (REPEATS * requests_each) * 1e3
    finally:
        session.close()
        registry.stop()
    return costs


def main() -> int:
    work = tempfile.mkdtemp(prefix="batchpush-cost-")
    try:
        costs = measure(work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print("registry CPU per request: " + ", ".join(f"{name} {ms:.1f} ms" for name, ms in costs.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
