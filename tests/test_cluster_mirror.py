"""Mirroring on the cluster (``docker://`` sources with ``--scheduler``): a real
``dask scheduler`` and two ``dask worker`` processes on loopback, real registries
at both ends, skopeo filling the source and reading back."""

from __future__ import annotations

import json
from collections import Counter

import pytest
import yaml
from conftest import pull_and_verify, remote_digest, skopeo
from registry import start_registry
from test_cluster import batchpush_cli, report_of, start_cluster, stop_cluster
from test_mirror import app_layout, attach_signature, commits, fill, multi_arch, requests_since


@pytest.fixture
def cluster(tmp_path):
    started = start_cluster(tmp_path)
    try:
        yield started
    finally:
        stop_cluster(started)


@pytest.fixture
def source(tmp_path):
    started = start_registry(str(tmp_path / "source"))
    yield started
    started.stop()


def test_a_mirror_plan_on_two_workers(cluster, source, registry, tmp_path):
    """Six repositories sharing a base layer, a signed tag, a multi-arch image whole
    and as a platform subset, a pruning entry: to two registries. Each blob crosses
    once per registry, every image equals the source's, and the re-run is HEADs only."""
    second = start_registry(str(tmp_path / "second"))
    try:
        for r in range(6):
            layout = app_layout(str(tmp_path / f"app{r}"), {"v1": [1, 10 + r], "v2": [1, 20 + r]})
            for tag in ("v1", "v2"):
                fill(source, layout, tag, f"team/app{r}")
        signed = remote_digest(source, "team/app0:v1")
        sig_tag, index_tag = attach_signature(source, "team/app0", signed, tmp_path)
        fill(source, multi_arch(str(tmp_path / "multi")), "multi", "team/multi")
        fill(second, app_layout(str(tmp_path / "gone"), {"v0": [9]}), "v0", "mirror/app1")  # a tag the source lost
        targets = (registry, second)
        plan = tmp_path / "plan.yaml"
        plan.write_text(yaml.safe_dump({
            "version": 1,
            "defaults": {"insecure": True, "max_concurrent_uploads": 2},
            "images": [
                *({"source": f"docker://{source.host}/team/app{r}", "targets": [f"{t.host}/mirror/app{r}" for t in targets], "prune": r == 1} for r in range(6)),
                {"source": f"docker://{source.host}/team/multi:multi", "targets": [f"{t.host}/whole/multi:multi" for t in targets]},
                {"source": f"docker://{source.host}/team/multi:multi", "targets": [f"{registry.host}/arm/multi:multi"], "platforms": ["linux/arm64"]},
            ],
        }))
        metadata, report = str(tmp_path / "md"), tmp_path / "r1.json"
        done = batchpush_cli("run", str(plan), "--scheduler", cluster.address, "--metadata-dir", metadata, "--report", str(report))
        assert done.returncode == 0, done.stderr
        images = report_of(report)["images"]
        assert len(images) == 6 * 2 * 2 + 2 + 1 and all(i["status"] == "pushed" for i in images), [(i["target"], i["error"]) for i in images if i["status"] != "pushed"]
        assert all(i["worker"].startswith("tcp://127.0.0.1:") for i in images)
        for target in targets:
            # each blob crossed once per registry; every other repository mounted it
            by_digest = Counter(digest for (_, digest) in commits(target).elements())
            assert by_digest and max(by_digest.values()) == 1, by_digest
            for r in range(6):
                for tag in ("v1", "v2"):
                    assert remote_digest(target, f"mirror/app{r}:{tag}") == remote_digest(source, f"team/app{r}:{tag}")
            for tag in (sig_tag, index_tag):  # the signature went with its image, byte for byte
                assert remote_digest(target, f"mirror/app0:{tag}") == remote_digest(source, f"team/app0:{tag}")
            assert remote_digest(target, "whole/multi:multi") == remote_digest(source, "team/multi:multi")
        assert len(pull_and_verify(second, "whole/multi:multi", str(tmp_path / "whole"))) == 2
        pull_and_verify(registry, "mirror/app3:v2", str(tmp_path / "app3"))
        arm = json.loads(skopeo("inspect", "--raw", "--tls-verify=false", f"docker://{registry.host}/arm/multi:multi").stdout)
        assert [m["platform"]["architecture"] for m in arm["manifests"]] == ["arm64"]
        assert len(pull_and_verify(registry, "arm/multi:multi", str(tmp_path / "arm"))) == 1
        # the pruning entry, once its images arrived: the tag its source lost is gone
        assert sorted(json.loads(skopeo("list-tags", "--tls-verify=false", f"docker://{second.host}/mirror/app1").stdout)["Tags"]) == ["v1", "v2"]
        assert [p["target"] for p in report_of(report)["pruned"] if p["deleted"]] == [f"{second.host}/mirror/app1:v0"]

        # the cron re-run: up to date, a HEAD at each end per image (the subset's index
        # is not the source's: compared, as locally, with the index it would write), no
        # blob request, no write
        marks = {t.host: len(t.access_log()) for t in (source, *targets)}
        done = batchpush_cli("run", str(plan), "--scheduler", cluster.address, "--metadata-dir", metadata, "--report", str(tmp_path / "r2.json"))
        assert done.returncode == 0, done.stderr
        again = report_of(tmp_path / "r2.json")["images"]
        assert [i["status"] for i in again] == ["up-to-date"] * len(images)
        # each image's line shown once, the subset's too (the client showed it)
        for image in again:
            assert done.stdout.count(f"{image['target']}: digest: {image['digest']} size: {image['size']} (up to date)") == 1, (image["target"], done.stdout)
        for where in (source, *targets):
            later = requests_since(where, marks[where.host])
            assert not [line for line in later if "/blobs/" in line], later
            assert not [line for line in later if line.split(" ")[0] in ("PUT", "POST", "PATCH", "DELETE")], later
    finally:
        second.stop()


def test_a_mirror_within_one_registry_sends_no_blob(cluster, registry, tmp_path):
    for r in range(3):
        fill(registry, app_layout(str(tmp_path / f"app{r}"), {"1.0": [1, 2 + r]}), "1.0", f"team/app{r}")
    before = commits(registry)
    plan = tmp_path / "plan.yaml"
    plan.write_text(yaml.safe_dump({
        "version": 1,
        "defaults": {"insecure": True},
        "images": [{"source": f"docker://{registry.host}/team/app{r}:1.0", "targets": [f"{registry.host}/copy/app{r}:1.0"]} for r in range(3)],
    }))
    done = batchpush_cli("run", str(plan), "--scheduler", cluster.address, "--metadata-dir", str(tmp_path / "md"))
    assert done.returncode == 0, done.stderr
    assert commits(registry) == before  # every blob mounted from its source repository
    for r in range(3):
        assert remote_digest(registry, f"copy/app{r}:1.0") == remote_digest(registry, f"team/app{r}:1.0")


def test_a_missing_source_tag_fails_its_image_only_and_a_dry_run_stays_here(cluster, source, registry, tmp_path):
    fill(source, app_layout(str(tmp_path / "app"), {"1.0": [1, 2]}), "1.0", "team/app")
    plan = tmp_path / "plan.yaml"
    plan.write_text(yaml.safe_dump({
        "version": 1,
        "defaults": {"insecure": True},
        "images": [
            {"source": f"docker://{source.host}/team/app:1.0", "targets": [f"{registry.host}/mirror/app:1.0"]},
            {"source": f"docker://{source.host}/team/app:nope", "targets": [f"{registry.host}/mirror/app:nope"]},
        ],
    }))
    done = batchpush_cli("run", str(plan), "--scheduler", cluster.address, "--dry-run", "--metadata-dir", str(tmp_path / "md"))
    assert "no task is sent to the cluster" in done.stdout, done.stdout
    assert registry.count("PUT") == registry.count("POST") == 0
    done = batchpush_cli("run", str(plan), "--scheduler", cluster.address, "--metadata-dir", str(tmp_path / "md"), "--report", str(tmp_path / "r.json"))
    assert done.returncode == 1, done.stderr
    ok, missing = report_of(tmp_path / "r.json")["images"]
    assert ok["status"] == "pushed" and missing["status"] == "failed", missing
    assert f"{registry.host}/mirror/app:nope" in done.stderr
    assert registry.count("PUT", "/manifests/nope") == 0
    assert remote_digest(registry, "mirror/app:1.0") == remote_digest(source, "team/app:1.0")


def test_an_unreachable_scheduler_stops_a_mirror_rerun_before_any_write(source, registry, tmp_path):
    """A mirror re-run whose image is up to date but has a new signature to copy:
    with a scheduler that cannot be reached, one line and exit 2, nothing written."""
    from registry import free_port

    fill(source, app_layout(str(tmp_path / "app"), {"1.0": [1, 2]}), "1.0", "team/app")
    plan = tmp_path / "plan.yaml"
    plan.write_text(yaml.safe_dump({
        "version": 1,
        "defaults": {"insecure": True},
        "images": [{"source": f"docker://{source.host}/team/app", "targets": [f"{registry.host}/mirror/app"]}],
    }))
    done = batchpush_cli("run", str(plan), "--metadata-dir", str(tmp_path / "md"))  # locally, first
    assert done.returncode == 0, done.stderr
    attach_signature(source, "team/app", remote_digest(source, "team/app:1.0"), tmp_path)
    mark = len(registry.access_log())
    done = batchpush_cli("run", str(plan), "--scheduler", f"tcp://127.0.0.1:{free_port()}", "--metadata-dir", str(tmp_path / "md"))
    assert done.returncode == 2, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "cannot reach the Dask scheduler" in lines[0], done.stderr
    assert not [line for line in requests_since(registry, mark) if line.split(" ")[0] in ("PUT", "POST", "PATCH", "DELETE")]
