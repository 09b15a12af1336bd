"""The Python API for migration scripts: the README's script, run as written against
two real registries (the target behind our fault proxy, which refuses one manifest
once so that the script's retry runs), and the API's contracts."""

from __future__ import annotations

import csv
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import remote_digest
from fault_proxy import FaultProxy, Rule
from registry import start_registry
from test_migrate import catalog_of, fill, tags_of

import batchpush

README = Path(__file__).parent.parent / "README.md"


@pytest.fixture
def source(tmp_path):
    started = start_registry(str(tmp_path / "source"))
    yield started
    started.stop()


def readme_script() -> str:
    text = README.read_text()
    match = re.search(r"<!-- migration-script -->\n```python\n(.*?)```\n<!-- /migration-script -->", text, re.S)
    assert match, "README lost its migration script"
    return match.group(1)


def test_the_readme_migration_script_runs_as_written(source, registry, tmp_path):
    """The script lists the old registry, migrates team0/ and team1/ (not legacy/),
    the 3 highest 1.x releases of each repository; the first run's one failure (the
    target refuses one manifest, once) is retried and arrives; moved.csv lists every
    image that moved, digest for digest with the source."""
    fill(source, tmp_path / "layout", {"team0/svc0": ["1.0.0", "1.1.0", "1.2.0", "1.3.0", "2.0.0", "nightly"], "team1/svc2": ["1.0", "v1.5.0", "0.9"], "legacy/old": ["1.0.0"]})
    front = FaultProxy(registry.host)
    try:
        front.add(Rule("PUT", "^/v2/migrated/team1/svc2/manifests/v1.5.0", "status", status=403))
        script = tmp_path / "migrate.py"
        script.write_text(readme_script())
        env = {**os.environ, "OLD_REGISTRY": source.host, "NEW_REGISTRY": front.host, "XDG_CACHE_HOME": str(tmp_path / "cache")}
        done = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=110)
    finally:
        front.stop()
    assert done.returncode == 0, done.stdout + done.stderr
    assert "3 repositories; migrating team0, team1" in done.stdout
    assert "retrying 1 failed image(s)" in done.stdout, done.stdout
    assert re.search(rf"failed +docker://{re.escape(source.host)}/team1/svc2:v1.5.0 -> .*HTTP 403", done.stdout), done.stdout

    expected = {"team0/svc0": ["1.1.0", "1.2.0", "1.3.0"], "team1/svc2": ["1.0", "v1.5.0"]}
    assert catalog_of(registry) == sorted(f"migrated/{r}" for r in expected)
    for repository, tags in expected.items():
        assert tags_of(registry, f"migrated/{repository}") == sorted(tags)
    with open(tmp_path / "moved.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert sorted((row["source"], row["status"]) for row in rows) == sorted((f"docker://{source.host}/{r}:{t}", "pushed") for r, tags in expected.items() for t in tags)
    for row in rows:
        repository_tag = row["source"].split("/", 3)[3]
        assert row["digest"] == remote_digest(source, repository_tag) == remote_digest(registry, f"migrated/{repository_tag}")


def test_a_plan_built_in_code_is_validated_as_a_file_is():
    with pytest.raises(batchpush.PlanError, match=r"<script>: images\[0\].latest: must be a positive integer"):
        batchpush.plan_of([{"source": "docker://old.example/", "targets": ["new.example/x/"], "latest": -1}])
    with pytest.raises(batchpush.PlanError, match=r"<script>: registries\['old.example'\].max_repositories: must be a positive integer"):
        batchpush.plan_of([{"source": "docker://old.example/", "targets": ["new.example/x/"]}], registries={"old.example": {"max_repositories": 0}})
    plan = batchpush.plan_of([{"source": "docker://old.example/", "targets": ["new.example/x/"], "semver": "^1.4"}], registries={"old.example": {"insecure": True}})
    (job,) = plan.jobs()
    assert job.semver is not None and job.semver.text == "^1.4" and plan.registries["old.example"].insecure


def test_callbacks_and_retry_jobs(source, registry, tmp_path):
    """``on_image`` sees every image once, ``on_layer`` every layer; a callback that
    raises loses nothing; ``retry_jobs`` keeps the entry's settings for one image
    and returns a job that failed whole as it was."""
    fill(source, tmp_path / "layout", {"team0/svc0": ["1.0", "2.0"]})
    plan = batchpush.plan_of(
        [{"source": f"docker://{source.host}/team0/", "targets": [f"{registry.host}/new/"], "semver": ">=1", "platforms": ["linux/amd64"]}, {"source": "docker://127.0.0.1:9/gone/", "targets": [f"{registry.host}/gone/"]}],
        registries={source.host: {"insecure": True}, registry.host: {"insecure": True}, "127.0.0.1:9": {"insecure": True, "max_attempts": 1}},
    )
    images: list[batchpush.ImageResult] = []
    layers: list[str] = []

    def on_layer(target: str, layer: batchpush.LayerResult) -> None:
        layers.append(target)
        raise RuntimeError("a script's bug")

    result = batchpush.run(plan, batchpush.PushOptions(metadata_dir=str(tmp_path / "md")), on_image=images.append, on_layer=on_layer)
    assert sorted(i.target for i in images) == sorted(i.target for i in result.images) == sorted([f"{registry.host}/new/svc0:1.0", f"{registry.host}/new/svc0:2.0", f"{registry.host}/gone/"])
    assert sorted(set(layers)) == [f"{registry.host}/new/svc0:1.0", f"{registry.host}/new/svc0:2.0"]
    assert [i.target for i in result.images if not i.ok] == [f"{registry.host}/gone/"]
    (again,) = batchpush.retry_jobs(result, plan)
    assert again == list(plan.jobs())[1]

    result.images[0].status = "failed"  # as if the first image had failed: one tag again, with its entry's settings
    first, whole = batchpush.retry_jobs(result, plan)
    assert (first.source, first.targets, first.semver, first.platforms) == (result.images[0].source, (result.images[0].target,), next(plan.jobs()).semver, next(plan.jobs()).platforms)
    assert whole.source == "docker://127.0.0.1:9/gone/"
