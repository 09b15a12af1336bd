"""`make demo`: start local registries, push a sample batch, mirror it, show what arrived."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))

from images import docker25_archive, layer_tar, simple_layout  # noqa: E402
from registry import start_registry  # noqa: E402

BATCHPUSH = [sys.executable, "-m", "batchpush"]


def step(title: str) -> None:
    print(f"\n==> {title}", flush=True)


def run(argv: list[str]) -> int:
    print("$ " + " ".join(argv[2:] if argv[:3] == BATCHPUSH[:3] else argv), flush=True)
    return subprocess.call(argv)


def main() -> int:
    work = tempfile.mkdtemp(prefix="batchpush-demo-")
    registry = start_registry(work)
    mirror = start_registry(work)
    failures = 0
    try:
        step(f"a real registry (docker-registry) is listening on {registry.host}")
        layout = os.path.join(work, "layouts", "web")
        simple_layout(layout, {"1.0": [1, 2], "1.1": [1, 3], "2.0": [1, 4]}, file_size=200_000)
        archive = os.path.join(work, "worker.tar")
        docker25_archive(archive, "team/worker:0.9", [layer_tar(1, file_size=200_000), layer_tar(5)])
        metadata = ["--metadata-dir", os.path.join(work, "metadata")]
        insecure = ["--insecure", registry.host]
        report = os.path.join(work, "report.json")

        step("push every tag of an OCI layout (uncompressed layers, compressed while hashed)")
        failures += run([*BATCHPUSH, "push", f"oci:{layout}", f"{registry.host}/team/web", *insecure, *metadata]) != 0
        step("push a docker save archive; the shared base layer is mounted, not sent again")
        failures += run([*BATCHPUSH, "push", f"docker-archive:{archive}", f"{registry.host}/team/worker", *insecure, *metadata, "--report", report]) != 0
        with open(report) as f:
            totals = json.load(f)["totals"]
        print(f"report totals: {json.dumps(totals)}")
        step("skopeo reads one back")
        failures += run(["skopeo", "inspect", "--tls-verify=false", f"docker://{registry.host}/team/worker:0.9"]) != 0

        step(f"mirror every tag to a second registry ({mirror.host}): manifests byte for byte, blobs streamed")
        mirrored = [*BATCHPUSH, "push", f"docker://{registry.host}/team/web", f"{mirror.host}/mirror/web", *insecure, "--insecure", mirror.host, *metadata]
        failures += run(mirrored) != 0
        step("the same mirror again, as cron would: a manifest HEAD at each end per tag, nothing sent")
        failures += run(mirrored) != 0
    finally:
        mirror.stop()
        registry.stop()
        shutil.rmtree(work, ignore_errors=True)
    step("done: registries stopped" + (f", {failures} step(s) failed" if failures else ""))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
