"""`make demo`: the job batchpush exists for, on local registries, in under a minute.

A fleet of 40 images (4 tags of 10 services in 3 teams, every image on one shared
base layer) is pushed by a plan, as a nightly cron job would, with its output in a
log file; the same plan runs again (every image up to date, one request each);
then the fleet is mirrored to a second registry, and the mirror runs again.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile

import yaml

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))

from fleet import Fleet, build, directory_tar  # noqa: E402
from registry import Registry, start_registry  # noqa: E402

from batchpush.engine import DEFAULT_MAX_CONCURRENT_IMAGES  # noqa: E402

BATCHPUSH = [sys.executable, "-m", "batchpush"]
SERVICES, TAGS, TEAMS = 10, 4, 3
#: the shared base layer: a tar of this machine's Python standard library, up to this size
BASE_BYTES = 8_000_000


def step(title: str) -> None:
    print(f"\n==> {title}", flush=True)


def run_logged(work: str, args: list[str], log: str) -> tuple[int, list[str]]:
    """Run batchpush in ``work`` with its output in ``log``, as cron would; stderr
    stays on the terminal."""
    print(f"$ batchpush {' '.join(args)} > {log}", flush=True)
    with open(os.path.join(work, log), "w") as out:
        code = subprocess.call([*BATCHPUSH, *args], stdout=out, cwd=work)
    with open(os.path.join(work, log)) as f:
        return code, f.read().splitlines()


def show(lines: list[str], indent: str = "  ") -> None:
    for line in lines:
        print(indent + line)


def totals(report: str) -> dict:
    with open(report) as f:
        document = json.load(f)
    statuses: dict[str, int] = {}
    for image in document["images"]:
        statuses[image["status"]] = statuses.get(image["status"], 0) + 1
    return {"statuses": statuses, **document["totals"]}


def compressed_digest(report: str, diff_id: str) -> str:
    """The digest a layer got when it was compressed, from the report."""
    with open(report) as f:
        layers = [layer for image in json.load(f)["images"] for layer in image["layers"]]
    return next(layer["digest"] for layer in layers if layer["diff_id"] == diff_id)


def write_plan(path: str, registries: list[Registry], images: list[tuple[str, str]]) -> None:
    plan = {
        "version": 1,
        "registries": {registry.host: {"insecure": True} for registry in registries},
        "images": [{"source": source, "targets": [target]} for source, target in images],
    }
    with open(path, "w") as f:
        yaml.safe_dump(plan, f, sort_keys=False)


def repository(fleet_path: str, index: int) -> str:
    return f"team{index % TEAMS}/{os.path.basename(fleet_path)}"


def main() -> int:
    work = tempfile.mkdtemp(prefix="batchpush-demo-")
    registry = start_registry(work)
    mirror = start_registry(work)
    problems: list[str] = []

    def expect(ok: bool, what: str) -> None:
        if not ok:
            problems.append(what)
            print(f"  UNEXPECTED: {what}")

    try:
        step(f"two real registries (docker-registry) are listening on {registry.host} and {mirror.host}")
        base = directory_tar(os.path.dirname(os.__file__), BASE_BYTES)
        fleet: Fleet = build(os.path.join(work, "layouts"), repositories=SERVICES, tags=TAGS, groups=TEAMS, bases=lambda: [base], middle_bytes=1_000_000, app_bytes=100_000)
        layouts = fleet.repositories()
        base_hex = hashlib.sha256(base).hexdigest()
        print(
            f"a fleet of {len(fleet.images)} images: {TAGS} tags of {len(layouts)} services in {TEAMS} teams, as OCI layouts.\n"
            f"Every image has the same {len(base) / 1e6:.1f} MB base layer (uncompressed, DiffID sha256:{base_hex[:12]}...), its team's layer and its own."
        )
        plan = os.path.join(work, "nightly.yaml")
        write_plan(plan, [registry], [(f"oci:layouts/{os.path.basename(path)}", f"{registry.host}/{repository(path, i)}") for i, path in enumerate(layouts)])
        with open(plan) as f:
            print("nightly.yaml:\n" + "".join(f"  {line}" for line in f.readlines()[:9]) + f"  ... ({len(layouts)} entries)")
        args = ["--metadata-dir", "metadata", "--report", "report.json"]
        report = os.path.join(work, "report.json")

        step(f"push the plan: {len(fleet.images)} images to {len(layouts)} repositories")
        code, lines = run_logged(work, ["run", "nightly.yaml", *args], "push.log")
        expect(code == 0, f"exit code {code}")
        one = f"{registry.host}/{repository(layouts[2], 2)}:v1"
        print(f"push.log has {len(lines)} lines, each naming its target (images are pushed {DEFAULT_MAX_CONCURRENT_IMAGES} at once); those of {one}:")
        show([line for line in lines if line.startswith(one + ": ")])
        first = totals(report)
        print("the shared base layer in push.log (uploaded once, mounted into every other repository):")
        base_digest = compressed_digest(report, f"sha256:{base_hex}")
        base_lines = [line for line in lines if f": {base_digest[7:19]}: " in line]
        uploaded = [line for line in base_lines if line.endswith(": Pushed")]
        mounted = [line for line in base_lines if ": Mounted from " in line]
        show(uploaded + mounted)
        print(f"  (and {len(base_lines) - len(uploaded) - len(mounted)} lines 'Layer already exists': the other tags of those repositories)")
        expect(len(uploaded) == 1 and len(mounted) == len(layouts) - 1, f"the base layer was uploaded {len(uploaded)} time(s) and mounted {len(mounted)} time(s)")
        print("the log ends with the summary:")
        show([line for line in lines if line.startswith(("summary:", "failed:"))])
        print(f"report totals: {json.dumps({k: first[k] for k in ('images', 'failed', 'blobs_mounted', 'requests')})}")

        step("the same plan again, as the next night's run: every tag already holds its image")
        code, lines = run_logged(work, ["run", "nightly.yaml", *args], "nightly.log")
        expect(code == 0, f"exit code {code}")
        show(lines[:3])
        print(f"  ... ({len(lines) - 4} more)")
        show(lines[-1:])
        again = totals(report)
        heads, pings = again["requests"].get("HEAD", 0), again["requests"].get("GET", 0)
        print(f"report: {json.dumps(again['statuses'])}, requests {json.dumps(again['requests'])}:")
        print(f"  {heads} manifest HEADs, one per image, and {pings} GET /v2/ for the whole run (the API check, over plain HTTP at once: the first run learned this insecure host does not speak TLS); nothing sent")
        expect(again["statuses"] == {"up-to-date": len(fleet.images)} and heads == len(fleet.images) and sum(again["requests"].values()) == heads + pings == heads + 1, "not every image was up to date with one request")

        step(f"mirror the fleet to the second registry ({mirror.host}): manifests byte for byte, blobs streamed")
        mirror_plan = os.path.join(work, "mirror.yaml")
        write_plan(mirror_plan, [registry, mirror], [(f"docker://{registry.host}/{repository(path, i)}", f"{mirror.host}/mirror/{repository(path, i)}") for i, path in enumerate(layouts)])
        for title, log in (("", "mirror.log"), ("the same mirror again, as cron would: a manifest HEAD at each end per tag, nothing sent", "mirror-again.log")):
            if title:
                step(title)
            code, lines = run_logged(work, ["run", "mirror.yaml", *args], log)
            expect(code == 0, f"exit code {code}")
            show(lines[-1:])
            print(f"report totals: {json.dumps({k: v for k, v in totals(report).items() if k in ('statuses', 'bytes_uploaded', 'requests')})}")

        step("skopeo, an independent client, reads one back from the mirror")
        target = f"{mirror.host}/mirror/{repository(layouts[1], 1)}:v3"
        print(f"$ skopeo inspect docker://{target}")
        inspected = subprocess.run(["skopeo", "inspect", "--tls-verify=false", f"docker://{target}"], capture_output=True, text=True)
        expect(inspected.returncode == 0, f"skopeo: {inspected.stderr.strip()}")
        if inspected.returncode == 0:
            found = json.loads(inspected.stdout)
            print(f"  {found['Name']}: {found['Digest']}, {len(found['Layers'])} layers")
    finally:
        mirror.stop()
        registry.stop()
        shutil.rmtree(work, ignore_errors=True)
    step("done: registries stopped" + (f"; {len(problems)} unexpected result(s)" if problems else ""))
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
