"""The batch engine against real registries: plans, fan-out, cron re-runs, failures."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections import Counter

import pytest
import yaml
from conftest import pull_and_verify
from images import LayoutWriter, layer_tar, simple_layout
from registry import start_registry

from batchpush.errors import PlanError
from batchpush.plan import load_plan

WRITE_METHODS = ("POST", "PUT", "PATCH", "DELETE")


def uploads_by_digest(registry) -> Counter[str]:
    """Blob uploads the registry completed, by digest (its own access log)."""
    pattern = re.compile(r'"PUT /v2/\S+/blobs/uploads/\S*digest=sha256%3A([0-9a-f]{64})\S* HTTP/1.1" 201')
    return Counter(m.group(1) for line in registry.access_log() if (m := pattern.search(line)))


def fleet(tmp_path, repositories: int = 6) -> list[str]:
    """Layouts sharing a base layer (seed 1), a middle layer per group, an app layer per tag."""
    layouts = []
    for r in range(repositories):
        path = str(tmp_path / "layouts" / f"svc{r}")
        simple_layout(path, {f"v{t}": [1, 100 + r % 2, 1000 + r * 10 + t] for t in range(2)}, file_size=30_000)
        layouts.append(path)
    return layouts


def fleet_plan(registry, layouts: list[str], prefix: str) -> dict:
    """Every layout to ``REGISTRY/PREFIX/svcN`` on one insecure registry."""
    return {
        "version": 1,
        "registries": {registry.host: {"insecure": True}},
        "images": [{"source": f"oci:{path}", "targets": [f"{registry.host}/{prefix}/svc{i}"]} for i, path in enumerate(layouts)],
    }


def write_plan(tmp_path, document: dict, name: str = "plan.yaml") -> str:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(document) if name.endswith(".yaml") else json.dumps(document))
    return str(path)


def test_fan_out_to_two_registries_uploads_each_blob_once_per_registry(registry, tmp_path, batchpush):
    second = start_registry(str(tmp_path))
    try:
        layouts = fleet(tmp_path)
        plan = write_plan(tmp_path, {
            "version": 1,
            "defaults": {"max_concurrent_uploads": 4},
            "registries": {registry.host: {"insecure": True}, second.host: {"insecure": True}},
            "images": [{"source": f"oci:{path}", "targets": [f"{registry.host}/team/svc{i}", f"{second.host}/mirror/svc{i}"]} for i, path in enumerate(layouts)],
        })
        report = tmp_path / "report.json"
        run = batchpush("run", plan, "--report", str(report))
        assert run.code == 0, run.err
        document = json.loads(report.read_text())
        assert len(document["images"]) == 6 * 2 * 2
        assert {image["status"] for image in document["images"]} == {"pushed"}
        for reg in (registry, second):
            uploads = uploads_by_digest(reg)
            assert uploads and max(uploads.values()) == 1, uploads
            # base + 2 middles + 12 app layers + 12 configs
            assert len(uploads) == 1 + 2 + 12 + 12
        assert document["totals"]["blobs_mounted"] > 0
        pull_and_verify(registry, "team/svc3:v1", str(tmp_path / "p1"))
        pull_and_verify(second, "mirror/svc5:v0", str(tmp_path / "p2"))
    finally:
        second.stop()


def test_cron_rerun_sends_no_blob_request(registry, tmp_path, batchpush):
    plan = write_plan(tmp_path, fleet_plan(registry, fleet(tmp_path, repositories=4), "team"))
    assert batchpush("run", plan).code == 0
    assert registry.count("HEAD", "/manifests/") == 0  # a cold push does not ask whether its tags are there
    before = len(registry.access_log())
    report = tmp_path / "again.json"
    run = batchpush("run", plan, "--report", str(report))
    assert run.code == 0, run.err
    document = json.loads(report.read_text())
    assert {image["status"] for image in document["images"]} == {"up-to-date"}
    assert document["totals"]["bytes_uploaded"] == 0
    new_lines = registry.access_log()[before:]
    assert not [line for line in new_lines if "/blobs/" in line]
    assert len(new_lines) <= 2 * len(document["images"]) + 2  # one HEAD per image, the ping


def test_a_failing_image_does_not_stop_the_others(registry, tmp_path, batchpush):
    layouts = fleet(tmp_path, repositories=2)
    plan = write_plan(tmp_path, {
        "version": 1,
        "registries": {registry.host: {"insecure": True}},
        "images": [
            {"source": f"oci:{layouts[0]}", "targets": [f"{registry.host}/ok/zero"]},
            {"source": f"oci:{tmp_path}/missing-layout", "targets": [f"{registry.host}/bad/missing"]},
            {"source": f"oci:{layouts[1]}", "targets": [f"{registry.host}/ok/one"]},
        ],
    })
    report = tmp_path / "report.json"
    run = batchpush("run", plan, "--report", str(report))
    assert run.code == 1
    assert "missing-layout" in run.err
    statuses = [(image["target"].split("/", 1)[1], image["status"]) for image in json.loads(report.read_text())["images"]]
    assert statuses == [("ok/zero:v0", "pushed"), ("ok/zero:v1", "pushed"), ("bad/missing", "failed"), ("ok/one:v0", "pushed"), ("ok/one:v1", "pushed")]
    assert registry.count("PUT", "/v2/bad/") == 0
    pull_and_verify(registry, "ok/one:v1", str(tmp_path / "pulled"))


def test_dry_run_changes_nothing(registry, tmp_path, batchpush):
    plan = write_plan(tmp_path, fleet_plan(registry, fleet(tmp_path, repositories=2), "dry"), name="plan.json")
    run = batchpush("run", plan, "--dry-run")
    assert run.code == 0, run.err
    assert "upload" in run.out and "would send" in run.out
    assert re.search(r"known|mounted from dry/svc0", run.out)  # the shared base is planned once
    assert not [line for line in registry.access_log() if any(f'"{m} ' in line for m in WRITE_METHODS)]


def test_tags_filter(registry, tmp_path, batchpush):
    path = str(tmp_path / "layout")
    simple_layout(path, {"v1": [1], "v2": [2], "beta": [3]})
    plan = write_plan(tmp_path, {"version": 1, "registries": {registry.host: {"insecure": True}}, "images": [{"source": f"oci:{path}", "targets": [f"{registry.host}/f/app"], "tags": "^v[0-9]+$"}]})
    report = tmp_path / "r.json"
    assert batchpush("run", plan, "--report", str(report)).code == 0
    assert sorted(i["target"].rsplit(":", 1)[1] for i in json.loads(report.read_text())["images"]) == ["v1", "v2"]


def test_relative_sources_are_relative_to_the_plan(registry, tmp_path, batchpush):
    simple_layout(str(tmp_path / "layouts" / "rel"), {"1": [9]})
    plan = write_plan(tmp_path, {"version": 1, "registries": {registry.host: {"insecure": True}}, "images": [{"source": "oci:./layouts/rel", "targets": [f"{registry.host}/rel/app"]}]})
    assert batchpush("run", plan).code == 0


@pytest.mark.parametrize(
    ("document", "message"),
    [
        ({"version": 2, "images": []}, "version"),
        ({"version": 1, "images": [{"source": "oci:x", "targets": ["r.example/a"], "colour": 1}]}, "images[0].colour: unknown key"),
        ({"version": 1, "images": [{"source": "oci:x", "targets": ["r.example/Bad"]}]}, "images[0].targets[0]"),
        ({"version": 1, "images": [{"source": "oci:x", "targets": ["r.example/a"], "tags": "("}]}, "images[0].tags: invalid regular expression"),
        ({"version": 1, "registries": {"r.example": {"insecure": "yes"}}, "images": [{"source": "oci:x", "targets": ["r.example/a"]}]}, "registries['r.example'].insecure"),
        ({"version": 1, "defaults": {"max_concurrent_uploads": 0}, "images": [{"source": "oci:x", "targets": ["r.example/a"]}]}, "defaults.max_concurrent_uploads"),
        ({"version": 1, "images": [{"source": "x", "targets": ["r.example/a"]}]}, "images[0].source"),
        ({"version": 1, "extra": 1, "images": []}, "extra: unknown key"),
        ({"version": 1}, "images: must be a non-empty list"),
    ],
)
def test_plan_validation_names_file_entry_and_field(tmp_path, document, message):
    path = write_plan(tmp_path, document)
    with pytest.raises(PlanError) as caught:
        load_plan(path)
    assert path in str(caught.value)
    assert message in str(caught.value)


def test_plan_errors_exit_2(tmp_path, batchpush):
    path = tmp_path / "broken.yaml"
    path.write_text("version: 1\nimages: [\n")
    run = batchpush("run", str(path))
    assert run.code == 2
    assert "broken.yaml" in run.err and "YAML" in run.err


def test_defaults_flow_into_registries(tmp_path):
    path = write_plan(tmp_path, {"version": 1, "defaults": {"max_concurrent_uploads": 3}, "registries": {"a.example": {"chunk_size_bytes": 1024}}, "images": [{"source": "oci:x", "targets": "a.example/x"}]})
    plan = load_plan(path)
    assert plan.registries["a.example"].max_concurrent_uploads == 3
    assert plan.registries["a.example"].chunk_size_bytes == 1024
    assert plan.defaults.max_concurrent_uploads == 3


#: runs the CLI (argv[2:]) and writes its own peak RSS (VmHWM, KiB) to argv[1]. Not
#: os.wait4's ru_maxrss: a child's high-water mark starts from its parent's at fork,
#: so it would count the test process's memory too
PEAK_PROBE = """
import sys
from batchpush.cli import main
code = main(sys.argv[2:])
with open("/proc/self/status") as status, open(sys.argv[1], "w") as out:
    out.write(next(line for line in status if line.startswith("VmHWM:")).split()[1])
sys.exit(code)
"""


#: the longest a test's subprocess may run: below the per-test timeout (pyproject.toml's
#: 120 s), so that a hang ends as the test's own TimeoutExpired with the child killed,
#: not as pytest-timeout's thread dump with the child left running
SUBPROCESS_LIMIT_S = 100.0  # (in all, when a test runs several)


def test_subprocess_limits_are_below_the_per_test_timeout(pytestconfig):
    assert float(pytestconfig.getini("timeout")) > SUBPROCESS_LIMIT_S


def run_measured(args: list[str], tmp_path, *, timeout_s: float = SUBPROCESS_LIMIT_S) -> tuple[int, str, int]:
    """``batchpush ARGS`` in a process of its own: exit code, stderr, its peak RSS in bytes."""
    peak = tmp_path / "peak_kib"
    done = subprocess.run([sys.executable, "-c", PEAK_PROBE, str(peak), *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, timeout=timeout_s)
    return done.returncode, done.stderr, int(peak.read_text()) << 10 if peak.exists() else 0


def test_thousand_small_images_with_flat_memory(registry, tmp_path):
    writer = LayoutWriter(str(tmp_path / "many"))
    base = layer_tar(1, files=1, file_size=2_000)
    for i in range(1000):
        descriptor, _ = writer.image([base, layer_tar(10_000 + i, files=1, file_size=200)])
        writer.tag(descriptor, f"t{i}")
    plan = write_plan(tmp_path, {"version": 1, "registries": {registry.host: {"insecure": True}}, "images": [{"source": f"oci:{tmp_path}/many", "targets": [f"{registry.host}/many/app"]}]})
    report = tmp_path / "report.json"
    returncode, err, peak_rss_bytes = run_measured(["run", plan, "-q", "--report", str(report), "--metadata-dir", str(tmp_path / "md"), "--max-concurrent-images", "16"], tmp_path)
    assert returncode == 0, err[-3000:]
    document = json.loads(report.read_text())
    assert len(document["images"]) == 1000
    assert {i["status"] for i in document["images"]} == {"pushed"}
    assert peak_rss_bytes < 300 << 20, f"peak RSS {peak_rss_bytes >> 20} MiB"
    uploads = uploads_by_digest(registry)
    assert max(uploads.values()) == 1 and len(uploads) == 1 + 1000 + 1000  # the base once; app layers and configs
    pull_and_verify(registry, "many/app:t999", str(tmp_path / "pulled"))


def test_live_display_on_a_terminal(registry, tmp_path):
    """On a terminal the rich display runs (here under script(1), a real pty)."""
    import shlex
    import shutil

    script = shutil.which("script")
    assert script, "script(1) (util-linux) is missing"
    simple_layout(str(tmp_path / "layout"), {"1": [61, 62]}, file_size=200_000)
    command = shlex.join([sys.executable, "-m", "batchpush", "push", f"oci:{tmp_path}/layout", f"{registry.host}/tty/app", "--insecure", registry.host, "--metadata-dir", str(tmp_path / "md")])
    done = subprocess.run([script, "-qec", command, str(tmp_path / "typescript")], capture_output=True, text=True, timeout=SUBPROCESS_LIMIT_S)
    assert done.returncode == 0, done.stdout[-2000:]
    screen = (tmp_path / "typescript").read_text(errors="replace")
    assert "images" in screen and "done" in screen  # the live header
    assert f"{registry.host}/tty/app:1: digest: sha256:" in screen
    assert "Traceback" not in screen
    pull_and_verify(registry, "tty/app:1", str(tmp_path / "pulled"))
