"""Mirroring under faults: a real source registry and a real target registry, faults
injected by our proxy in front of the source (never a fake registry).

Each test is one promise of the mirroring issue (#12, "Semantics"): a lying source
(a blob or a manifest whose bytes are not their digest) fails that image only, with
one line naming the source and the digest, nothing committed at the target and the
upload session cancelled; a read broken mid-blob resumes with ``Range``; a 429's
Retry-After pauses the source host; a pull budget spent (``RateLimit-*`` headers)
stops the run asking that source; a source behind htpasswd over TLS is read with config.json credentials
and no secret shows; a cron re-run follows a tag that moved; a tag deleted between
listing and copying fails that image only; a 200 MB blob streams through a process
whose peak RSS stays under 300 MB. The source is filled by skopeo, and what arrives
is read back by skopeo and compared with the source digest for digest.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
import yaml
from conftest import Run, SecureRegistry, assert_no_secret, pull_and_verify, remote_digest, skopeo
from fault_proxy import FaultProxy, Rule, Seen
from images import LayoutWriter, layer_tar, random_layer
from registry import Registry, start_registry
from test_batch import SUBPROCESS_LIMIT_S, run_measured
from test_mirror import commits

from batchpush.digest import CHUNK_BYTES
from batchpush.registry.reads import READ_BYTES

#: the Retry-After of the injected 429s, in seconds
RETRY_AFTER_S = 3
#: the peak RSS the issue allows a mirror run (the batch's bound)
PEAK_RSS_BYTES = 300 << 20
#: the large blob of the memory test
LARGE_BLOB_BYTES = 200 << 20


# -- fixtures and helpers --------------------------------------------------------------


@pytest.fixture
def source(tmp_path) -> Iterator[Registry]:
    """The source registry (a real one), deletes enabled: a tag can vanish mid-run."""
    started = start_registry(str(tmp_path / "source"), {"storage": {"delete": {"enabled": True}}})
    yield started
    started.stop()


def fill(registry: Registry, layout: str, tag: str, repository: str, *dest_args: str) -> None:
    """skopeo copies one tag of a layout into the registry, multi-arch whole."""
    done = skopeo("copy", "--all", *(dest_args or ("--dest-tls-verify=false",)), f"oci:{layout}:{tag}", f"docker://{registry.host}/{repository}:{tag}")
    assert done.returncode == 0, done.stderr


def image_layout(path: str, images: dict[str, list[bytes]]) -> str:
    """An OCI layout holding one single-platform image per tag, of these layers."""
    writer = LayoutWriter(path)
    for tag, layers in images.items():
        descriptor, _ = writer.image(layers)
        writer.tag(descriptor, tag)
    return path


def raw_manifest(registry: Registry, ref: str, *args: str) -> dict[str, Any]:
    """The manifest (or index) ``ref`` names, as the registry serves it (read by skopeo)."""
    done = skopeo("inspect", "--raw", *(args or ("--tls-verify=false",)), f"docker://{registry.host}/{ref}")
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def blob_digests(registry: Registry, ref: str) -> list[str]:
    """The config and layer digests of a single-platform image, config first."""
    manifest = raw_manifest(registry, ref)
    return [manifest["config"]["digest"], *(layer["digest"] for layer in manifest["layers"])]


def head_blob(registry: Registry, repository: str, digest: str) -> int:
    """The status of ``HEAD /v2/<repository>/blobs/<digest>`` (anonymous, plain HTTP)."""
    return requests.head(f"{registry.url}/v2/{repository}/blobs/{digest}", timeout=30).status_code


def head_manifest(registry: Registry, repository: str, reference: str) -> int:
    """The status of ``HEAD /v2/<repository>/manifests/<reference>`` (an OCI manifest or index)."""
    accept = "application/vnd.oci.image.manifest.v1+json, application/vnd.oci.image.index.v1+json"
    return requests.head(f"{registry.url}/v2/{repository}/manifests/{reference}", headers={"Accept": accept}, timeout=30).status_code


def committed(registry: Registry, repository: str, digest: str) -> int:
    """How often the registry committed an upload of ``digest`` into ``repository`` (its log)."""
    return commits(registry)[(repository, digest.removeprefix("sha256:"))]


def write_plan(tmp_path: Path, document: dict[str, Any]) -> str:
    path = tmp_path / "plan.yaml"
    path.write_text(yaml.safe_dump(document))
    return str(path)


def report_of(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())


def by_target(report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {image["target"]: image for image in report["images"]}


def two_repository_plan(tmp_path: Path, front: FaultProxy, registry: Registry) -> str:
    """A batch of two images: ``team/bad`` and ``team/good`` of the source (through the
    proxy), mirrored to ``mirror/bad`` and ``mirror/good``."""
    return write_plan(tmp_path, {
        "version": 1,
        "defaults": {"insecure": True},
        "images": [
            {"source": f"docker://{front.host}/team/bad:1.0", "targets": [f"{registry.host}/mirror/bad:1.0"]},
            {"source": f"docker://{front.host}/team/good:1.0", "targets": [f"{registry.host}/mirror/good:1.0"]},
        ],
    })


def assert_arrived(source: Registry, registry: Registry, source_ref: str, target_ref: str, dest: Path) -> None:
    """The target serves what the source does, digest for digest, and skopeo reads it whole."""
    expected = remote_digest(source, source_ref)
    assert remote_digest(registry, target_ref) == expected
    assert pull_and_verify(registry, target_ref, str(dest))


# -- a lying source ---------------------------------------------------------------------


def mirror_a_corrupt_blob(source: Registry, front: FaultProxy, registry: Registry, tmp_path: Path, batchpush: Callable[..., Run]) -> tuple[Run, dict[str, Any], str]:
    """A batch of two images whose first has one byte of its layer flipped on the way
    from the source (the layer is three pieces long: bytes were sent to the target
    before the lie was known). Returns the run, its report and the corrupt digest."""
    fill(source, image_layout(str(tmp_path / "bad"), {"1.0": [random_layer(11, 3 * CHUNK_BYTES)]}), "1.0", "team/bad")
    fill(source, image_layout(str(tmp_path / "good"), {"1.0": [layer_tar(12), layer_tar(13)]}), "1.0", "team/good")
    _, corrupt = blob_digests(source, "team/bad:1.0")
    front.add(Rule("GET", f"/blobs/{corrupt}", "corrupt_body", response_bytes=CHUNK_BYTES + 1, times=-1))
    report = tmp_path / "report.json"
    run = batchpush("run", two_repository_plan(tmp_path, front, registry), "--metadata-dir", str(tmp_path / "md"), "--report", str(report))
    return run, report_of(report), corrupt


def test_a_corrupt_blob_fails_its_image_only_and_commits_nothing(source, front, registry, tmp_path, batchpush):
    """The image with the lying blob fails with one line naming the source and the
    digest (stderr and report); the target has no manifest for it, no such blob and
    no committed upload of it, and its session was DELETEd; the other image arrives."""
    run, report, corrupt = mirror_a_corrupt_blob(source, front, registry, tmp_path, batchpush)

    assert run.code == 1, run.err
    where = f"docker://{front.host}/team/bad@{corrupt}"
    (line,) = run.err.strip().splitlines()  # one line, and nothing else
    assert f"{registry.host}/mirror/bad:1.0" in line and where in line and "expected" in line, line
    bad = by_target(report)[f"{registry.host}/mirror/bad:1.0"]
    assert bad["status"] == "failed" and where in bad["error"] and "\n" not in bad["error"]
    assert front.requests("GET", f"/blobs/{corrupt}") and all(s.action == "corrupt_body" for s in front.requests("GET", f"/blobs/{corrupt}"))

    assert head_manifest(registry, "mirror/bad", "1.0") == 404
    assert head_blob(registry, "mirror/bad", corrupt) == 404
    assert committed(registry, "mirror/bad", corrupt) == 0
    assert registry.count("DELETE", "/v2/mirror/bad/blobs/uploads/") >= 1
    assert_arrived(source, registry, "team/good:1.0", "mirror/good:1.0", tmp_path / "pulled")


def test_a_corrupt_blob_leaves_no_upload_session_at_the_target(source, front, registry, tmp_path, batchpush):
    """The lying blob's upload session is really cancelled: the data before the last
    piece goes in a PATCH, the last piece (checked first) would go with the commit, so
    the lie is found with no request in flight and the DELETE carries the session's
    newest state: the target accepts it (204), once. (distribution 2.8.2 keeps the
    session's directory after any accepted DELETE that follows a PATCH, until its
    upload purging: a registry matter, not checked here.)"""
    run, _, _ = mirror_a_corrupt_blob(source, front, registry, tmp_path, batchpush)

    assert run.code == 1, run.err
    deletes = [line for line in registry.access_log() if '"DELETE /v2/mirror/bad/blobs/uploads/' in line]
    assert len(deletes) == 1 and '" 204 ' in deletes[0], deletes


@pytest.mark.parametrize("which", ["image", "index child"])
def test_a_corrupt_manifest_fails_its_image_only_and_writes_nothing(source, front, registry, tmp_path, batchpush, which):
    """The manifest served for the digest the tag named (or, under an index, for a
    child's digest) has a byte flipped: the image fails with one line naming the source
    and that digest; nothing at all is written for it at the target (no upload is even
    started: every manifest is checked before any blob moves); the other image arrives."""
    writer = LayoutWriter(str(tmp_path / "bad"))
    amd64, _ = writer.image([layer_tar(21)], arch="amd64")
    if which == "image":
        writer.tag(amd64, "1.0")
    else:
        arm64, _ = writer.image([layer_tar(22)], arch="arm64")
        writer.tag(writer.index([amd64, arm64]), "1.0")
    fill(source, str(tmp_path / "bad"), "1.0", "team/bad")
    fill(source, image_layout(str(tmp_path / "good"), {"1.0": [layer_tar(23)]}), "1.0", "team/good")
    top = remote_digest(source, "team/bad:1.0")
    corrupt = top if which == "image" else raw_manifest(source, "team/bad:1.0")["manifests"][1]["digest"]
    front.add(Rule("GET", f"/manifests/{corrupt}", "corrupt_body", response_bytes=10, times=-1))
    report = tmp_path / "report.json"
    run = batchpush("run", two_repository_plan(tmp_path, front, registry), "--metadata-dir", str(tmp_path / "md"), "--report", str(report))

    assert run.code == 1, run.err
    where = f"docker://{front.host}/team/bad@{corrupt}"
    (line,) = run.err.strip().splitlines()  # one line, and nothing else
    assert f"{registry.host}/mirror/bad:1.0" in line and where in line and "manifest" in line, line
    bad = by_target(report_of(report))[f"{registry.host}/mirror/bad:1.0"]
    assert bad["status"] == "failed" and where in bad["error"]
    assert front.requests("GET", f"/manifests/{corrupt}")  # it was read, and refused

    assert head_manifest(registry, "mirror/bad", "1.0") == 404
    written = [line for line in registry.access_log() if "/v2/mirror/bad/" in line and re.search(r'"(POST|PUT|PATCH|DELETE) ', line)]
    assert written == []
    assert_arrived(source, registry, "team/good:1.0", "mirror/good:1.0", tmp_path / "pulled")


# -- a read broken mid-blob ------------------------------------------------------------


def test_a_source_read_broken_mid_blob_resumes_with_range(source, front, registry, tmp_path, batchpush):
    """The source's connection is reset after N bytes of a layer: the read goes on with
    ``Range: bytes=S-`` (S at most N), re-reading at most READ_BYTES (less than a
    chunk); the target's upload goes on in the same session and the image arrives."""
    layer = random_layer(31, 3 * CHUNK_BYTES)
    fill(source, image_layout(str(tmp_path / "app"), {"1.0": [layer]}), "1.0", "team/app")
    config, digest = blob_digests(source, "team/app:1.0")
    size = raw_manifest(source, "team/app:1.0")["layers"][0]["size"]
    cut = CHUNK_BYTES + 300_000
    front.add(Rule("GET", f"/blobs/{digest}", "reset_response", response_bytes=cut))
    report = tmp_path / "report.json"
    run = batchpush("push", f"docker://{front.host}/team/app:1.0", f"{registry.host}/mirror/app:1.0", "--insecure", front.host, "--insecure", registry.host, "--report", str(report))

    assert run.code == 0, run.err
    first, resumed = front.requests("GET", f"/blobs/{digest}")
    assert "range" not in first.headers and first.response_bytes == cut
    start = int(resumed.headers["range"].removeprefix("bytes=").removesuffix("-"))
    assert 0 < start <= cut and resumed.status == 206 and resumed.response_bytes == size - start
    assert first.response_bytes + resumed.response_bytes - size <= READ_BYTES <= CHUNK_BYTES  # bytes read twice
    assert registry.count("POST", "/v2/mirror/app/blobs/uploads/") == 2  # config and layer, one session each
    assert committed(registry, "mirror/app", digest) == 1 and committed(registry, "mirror/app", config) == 1
    assert report_of(report)["images"][0]["status"] == "pushed"
    assert_arrived(source, registry, "team/app:1.0", "mirror/app:1.0", tmp_path / "pulled")


# -- 429 and pull budgets -------------------------------------------------------------------


def requests_between(proxy: FaultProxy, start: float, end: float) -> list[Seen]:
    return [s for s in proxy.requests() if start < s.at < end]


@pytest.mark.parametrize("step", ["manifest", "blob"])
def test_a_429_with_retry_after_pauses_the_source_host(source, front, registry, tmp_path, batchpush, step):
    """A 429 with Retry-After on the manifest GET or a blob GET: the source host is
    asked nothing until it has passed, then the step is asked again and the run
    succeeds. (A lower bound on when the next request came, not a timing.) Two
    images are mirrored, so that the other's requests want to go during the pause,
    one request to a registry at a time (--max-requests-in-flight 1): when the 429
    is answered no other request is on its way (the client pauses the host before
    it gives the slot up), so none may come before the pause ends, with no window
    of wall-clock time allowed for requests already on their way."""
    layout = image_layout(str(tmp_path / "app"), {"1.0": [layer_tar(41), random_layer(42, CHUNK_BYTES + 5)], "2.0": [layer_tar(43), random_layer(44, CHUNK_BYTES + 5)]})
    for tag in ("1.0", "2.0"):  # 2.0's requests want to go while 1.0's step waits
        fill(source, layout, tag, "team/app")
    path = f"/manifests/{remote_digest(source, 'team/app:1.0')}" if step == "manifest" else f"/blobs/{blob_digests(source, 'team/app:1.0')[2]}"
    body = json.dumps({"errors": [{"code": "TOOMANYREQUESTS", "message": "slow down"}]}).encode()
    front.add(Rule("GET", re.escape(path), "status", status=429, headers={"Retry-After": str(RETRY_AFTER_S)}, body=body))
    run = batchpush("push", f"docker://{front.host}/team/app", f"{registry.host}/mirror/app", "--insecure", front.host, "--insecure", registry.host, "--max-requests-in-flight", "1")

    assert run.code == 0, run.err
    refused, again = front.requests("GET", path)
    assert refused.status == 429 and again.status == 200
    assert again.at - refused.at >= RETRY_AFTER_S
    assert requests_between(front, refused.at, refused.at + RETRY_AFTER_S) == []  # the whole host waited
    for tag in ("1.0", "2.0"):
        assert_arrived(source, registry, f"team/app:{tag}", f"mirror/app:{tag}", tmp_path / f"pulled-{tag}")


#: how a line names a source's pull budget
RATE_LIMIT = re.compile(r"rate.?limit|pull budget|quota", re.IGNORECASE)


def test_a_stated_pull_budget_with_room_left_changes_nothing(source, front, registry, tmp_path, batchpush):
    """Docker Hub's ``RateLimit-Limit``/``RateLimit-Remaining`` on every manifest answer,
    with plenty left: the mirror runs as usual."""
    fill(source, image_layout(str(tmp_path / "app"), {"1.0": [layer_tar(51)], "2.0": [layer_tar(52)]}), "1.0", "team/app")
    fill(source, str(tmp_path / "app"), "2.0", "team/app")
    front.add(Rule(None, "/manifests/", "headers", headers={"RateLimit-Limit": "100;w=21600", "RateLimit-Remaining": "76;w=21600"}, times=-1))
    run = batchpush("push", f"docker://{front.host}/team/app", f"{registry.host}/mirror/app", "--insecure", front.host, "--insecure", registry.host)

    assert run.code == 0, run.err
    assert not RATE_LIMIT.search(run.out + run.err)
    for tag in ("1.0", "2.0"):
        assert remote_digest(registry, f"mirror/app:{tag}") == remote_digest(source, f"team/app:{tag}")


def test_a_spent_pull_budget_stops_the_run_asking_the_source(source, front, registry, tmp_path, batchpush):
    """Every manifest answer of the source says no pull is left (``RateLimit-Remaining:
    0``; the tag's HEAD, which Docker Hub does not count as a pull, says it first): the
    run stops asking that host for pulls — no manifest GET, no blob GET, where each
    image would otherwise earn a 429 — and each image fails at once with one visible
    line naming the source and its spent budget. Nothing is written at the target."""
    tags = ("1.0", "2.0", "3.0")
    layout = image_layout(str(tmp_path / "app"), {tag: [layer_tar(61 + i)] for i, tag in enumerate(tags)})
    for tag in tags:
        fill(source, layout, tag, "team/app")
    front.add(Rule(None, "/manifests/", "headers", headers={"RateLimit-Limit": "100;w=21600", "RateLimit-Remaining": "0;w=21600"}, times=-1))
    report = tmp_path / "report.json"
    run = batchpush("push", f"docker://{front.host}/team/app", f"{registry.host}/mirror/app", "--insecure", front.host, "--insecure", registry.host, "--report", str(report))

    assert run.code == 1, run.err
    assert front.requests("HEAD", "/manifests/")  # the budget was learnt where it costs nothing
    assert [s.target for s in front.requests("GET") if "/manifests/" in s.target or "/blobs/" in s.target] == []
    lines = run.err.strip().splitlines()
    assert len(lines) == len(tags), lines
    for tag in tags:
        (line,) = [line for line in lines if f"{registry.host}/mirror/app:{tag}" in line]
        assert f"docker://{front.host}/team/app:{tag}" in line and RATE_LIMIT.search(line), line
    images = by_target(report_of(report))
    assert all(images[f"{registry.host}/mirror/app:{tag}"]["status"] == "failed" and RATE_LIMIT.search(images[f"{registry.host}/mirror/app:{tag}"]["error"]) for tag in tags)
    assert not [line for line in registry.access_log() if "/v2/mirror/app/" in line and re.search(r'"(POST|PUT|PATCH|DELETE) ', line)]


def test_a_pull_budget_spent_mid_run_stops_the_pulls_that_follow(source, front, registry, tmp_path, batchpush):
    """The first manifest GET (a pull) answers that it was the last one the budget
    allowed; later answers state nothing (the last stated budget holds). One image at
    a time: the first image arrives whole, the others are never pulled and fail with
    a line naming the budget."""
    tags = ("1.0", "2.0", "3.0")
    layout = image_layout(str(tmp_path / "app"), {tag: [layer_tar(65 + i)] for i, tag in enumerate(tags)})
    for tag in tags:
        fill(source, layout, tag, "team/app")
    front.add(Rule("GET", "/manifests/sha256:", "headers", headers={"RateLimit-Limit": "100;w=21600", "RateLimit-Remaining": "0;w=21600"}))
    report = tmp_path / "report.json"
    run = batchpush("push", f"docker://{front.host}/team/app", f"{registry.host}/mirror/app", "--insecure", front.host, "--insecure", registry.host, "--max-concurrent-images", "1", "--report", str(report))

    assert run.code == 1, run.err
    (pulled,) = front.requests("GET", "/manifests/")
    images = by_target(report_of(report))
    first = next(tag for tag in tags if remote_digest(source, f"team/app:{tag}") in pulled.target)
    assert images[f"{registry.host}/mirror/app:{first}"]["status"] == "pushed"
    assert_arrived(source, registry, f"team/app:{first}", f"mirror/app:{first}", tmp_path / "pulled")
    for tag in set(tags) - {first}:
        assert images[f"{registry.host}/mirror/app:{tag}"]["status"] == "failed" and RATE_LIMIT.search(images[f"{registry.host}/mirror/app:{tag}"]["error"])
        assert head_manifest(registry, "mirror/app", tag) == 404
    assert len(run.err.strip().splitlines()) == len(tags) - 1, run.err


# -- a source with htpasswd over TLS ------------------------------------------------------


def docker_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, host: str, username: str, password: str) -> str:
    """A fresh DOCKER_CONFIG whose config.json has ``auths[host]``; returns the encoded auth."""
    auth = base64.b64encode(f"{username}:{password}".encode()).decode()
    directory = tmp_path / "docker-config"
    directory.mkdir()
    (directory / "config.json").write_text(json.dumps({"auths": {host: {"auth": auth}}}))
    monkeypatch.setenv("DOCKER_CONFIG", str(directory))
    return auth


@pytest.mark.parametrize("trust", ["--ca-file", "plan ca_file"])
def test_a_source_with_basic_auth_over_tls(tls_registry, registry, tmp_path, batchpush, monkeypatch, trust):
    """The source serves TLS with our own CA and wants htpasswd basic auth: credentials
    from docker's config.json, the CA from ``--ca-file`` or the plan's per-host
    ``ca_file``; the mirror to a plain-HTTP target works, and neither the password
    nor its encoded form appears in stdout, stderr (``--debug``: every request
    logged) or the report."""
    secure: SecureRegistry = tls_registry
    host = secure.registry.host
    fill(secure.registry, image_layout(str(tmp_path / "app"), {"1.0": [layer_tar(71), layer_tar(72)]}), "1.0", "team/app", "--dest-cert-dir", secure.cert_dir, "--dest-creds", f"{secure.username}:{secure.password}")
    auth = docker_config(tmp_path, monkeypatch, host, secure.username, secure.password)
    report = tmp_path / "report.json"
    if trust == "--ca-file":
        run = batchpush("push", f"docker://{host}/team/app:1.0", f"{registry.host}/mirror/app:1.0", "--ca-file", secure.ca_file, "--insecure", registry.host, "--debug", "--report", str(report))
    else:
        plan = write_plan(tmp_path, {
            "version": 1,
            "registries": {host: {"ca_file": secure.ca_file}, registry.host: {"insecure": True}},
            "images": [{"source": f"docker://{host}/team/app:1.0", "targets": [f"{registry.host}/mirror/app:1.0"]}],
        })
        run = batchpush("run", plan, "--debug", "--metadata-dir", str(tmp_path / "md"), "--report", str(report))

    assert run.code == 0, run.err[-3000:]
    source_args = ("--tls-verify=true", "--cert-dir", secure.cert_dir, "--creds", f"{secure.username}:{secure.password}")
    expected = "sha256:" + hashlib.sha256(skopeo("inspect", "--raw", *source_args, f"docker://{host}/team/app:1.0").stdout.encode()).hexdigest()
    assert remote_digest(registry, "mirror/app:1.0") == expected
    assert report_of(report)["images"][0]["source_digest"] == expected
    assert pull_and_verify(registry, "mirror/app:1.0", str(tmp_path / "pulled"))
    assert secure.registry.count("GET", "/v2/team/app/blobs/") >= 3  # read from the source, with the credentials
    assert_no_secret([secure.password, auth], run.out, run.err, report.read_text())


# -- a cron re-run after a tag moved ------------------------------------------------------------


def test_a_cron_rerun_follows_a_tag_that_moved(source, registry, tmp_path, batchpush):
    """``latest`` is retagged to another image at the source between two runs: the
    re-run copies the new image under ``latest`` (the target's digest follows the
    source's) and reports the unchanged tags ``up-to-date``."""
    first = image_layout(str(tmp_path / "first"), {"v1": [layer_tar(81), layer_tar(82)], "v2": [layer_tar(81), layer_tar(83)], "latest": [layer_tar(81), layer_tar(82)]})
    for tag in ("v1", "v2", "latest"):
        fill(source, first, tag, "team/app")
    args = ("push", f"docker://{source.host}/team/app", f"{registry.host}/mirror/app", "--insecure", source.host, "--insecure", registry.host)
    assert batchpush(*args).code == 0
    before = remote_digest(registry, "mirror/app:latest")
    assert before == remote_digest(source, "team/app:v1")

    fill(source, image_layout(str(tmp_path / "moved"), {"latest": [layer_tar(81), layer_tar(84)]}), "latest", "team/app")
    moved = remote_digest(source, "team/app:latest")
    assert moved != before
    report = tmp_path / "report.json"
    run = batchpush(*args, "--report", str(report))

    assert run.code == 0, run.err
    statuses = {image["target"].rsplit(":", 1)[1]: (image["status"], image["digest"]) for image in report_of(report)["images"]}
    assert statuses == {"v1": ("up-to-date", remote_digest(source, "team/app:v1")), "v2": ("up-to-date", remote_digest(source, "team/app:v2")), "latest": ("pushed", moved)}
    assert remote_digest(registry, "mirror/app:latest") == moved
    assert pull_and_verify(registry, "mirror/app:latest", str(tmp_path / "pulled"))


# -- a tag deleted between listing and copying ------------------------------------------------


class HookedProxy(FaultProxy):
    """Our fault proxy, running a hook the first time a request matches, before the
    request is forwarded: something happens at the source at an exact step of the run."""

    def __init__(self, upstream: str) -> None:
        super().__init__(upstream)
        self.hooks: list[tuple[str, str, Callable[[], None]]] = []

    def before(self, method: str, path: str, hook: Callable[[], None]) -> None:
        self.hooks.append((method, path, hook))

    def _pick(self, method: str, target: str) -> Rule | None:
        for hook in [h for h in self.hooks if h[0] == method and re.search(h[1], target)]:
            self.hooks.remove(hook)
            hook[2]()
        return super()._pick(method, target)


def delete_manifest(registry: Registry, repository: str, digest: str) -> None:
    """Deletes the manifest at the real registry (which untags every tag naming it)."""
    response = requests.delete(f"{registry.url}/v2/{repository}/manifests/{digest}", timeout=30)
    assert response.status_code == 202, response.text


@pytest.mark.parametrize("when", ["before its tag is looked up", "after its tag is looked up"])
def test_a_tag_deleted_between_listing_and_copying_fails_that_image_only(source, registry, tmp_path, batchpush, when):
    """Every tag of the repository is listed; then ``gone`` is deleted at the source,
    either before batchpush's HEAD of the tag or between that HEAD and the manifest
    GET: that image fails with one line naming the source, nothing of it is written
    at the target, and the other tags arrive."""
    layout = image_layout(str(tmp_path / "app"), {"keep1": [layer_tar(91)], "gone": [layer_tar(92)], "keep2": [layer_tar(93)]})
    for tag in ("keep1", "gone", "keep2"):
        fill(source, layout, tag, "team/app")
    digest = remote_digest(source, "team/app:gone")
    front = HookedProxy(source.host)
    try:
        step = ("HEAD", "/v2/team/app/manifests/gone$") if when.startswith("before") else ("GET", f"/v2/team/app/manifests/{digest}$")
        front.before(*step, lambda: delete_manifest(source, "team/app", digest))
        report = tmp_path / "report.json"
        run = batchpush("push", f"docker://{front.host}/team/app", f"{registry.host}/mirror/app", "--insecure", front.host, "--insecure", registry.host, "--report", str(report))
    finally:
        front.stop()

    assert not front.hooks, "the hook never ran: the tag was not looked up as expected"
    assert run.code == 1, run.err
    (line,) = run.err.strip().splitlines()
    assert f"{registry.host}/mirror/app:gone" in line and front.host in line and "team/app" in line and re.search(r"no such|unknown|not found|404", line, re.IGNORECASE), line
    images = by_target(report_of(report))
    gone = images[f"{registry.host}/mirror/app:gone"]
    assert gone["status"] == "failed" and gone["source"] == f"docker://{front.host}/team/app:gone" and front.host in gone["error"] and "\n" not in gone["error"]
    assert head_manifest(registry, "mirror/app", "gone") == 404
    assert head_manifest(registry, "mirror/app", digest) == 404
    for tag in ("keep1", "keep2"):
        assert images[f"{registry.host}/mirror/app:{tag}"]["status"] == "pushed"
        assert remote_digest(registry, f"mirror/app:{tag}") == remote_digest(source, f"team/app:{tag}")
    assert pull_and_verify(registry, "mirror/app:keep2", str(tmp_path / "pulled"))


# -- peak memory -----------------------------------------------------------------------------

#: writes an OCI layout (argv[1]) of one image, tag "big", whose layer is
#: random_layer(argv[2], argv[3]); in a process of its own, so the test's stays small
BIG_LAYOUT = """
import sys
sys.path.insert(0, sys.argv[4])
from images import LayoutWriter, random_layer
writer = LayoutWriter(sys.argv[1])
descriptor, _ = writer.image([random_layer(int(sys.argv[2]), int(sys.argv[3]))])
writer.tag(descriptor, "big")
"""


def sha256_of_file(path: Path, *, gunzip: bool = False) -> str:
    """The sha256 of a file (of its gunzipped content), read in pieces."""
    digest = hashlib.sha256()
    with open(path, "rb") as raw, (gzip.open(raw) if gunzip else raw) as data:
        while piece := data.read(CHUNK_BYTES):
            digest.update(piece)
    return "sha256:" + digest.hexdigest()


def pull_and_verify_streaming(registry: Registry, ref: str, dest: Path) -> str:
    """conftest.pull_and_verify for a blob too large to hold: skopeo copies ``ref``
    out; every blob must hash to its name and every layer gunzip to its DiffID, both
    read in pieces. Returns the manifest digest."""
    done = skopeo("copy", "--preserve-digests", "--src-tls-verify=false", f"docker://{registry.host}/{ref}", f"oci:{dest}:pulled")
    assert done.returncode == 0, done.stderr

    def blob(digest: str) -> Path:
        return dest / "blobs" / "sha256" / digest.removeprefix("sha256:")

    top = json.loads((dest / "index.json").read_text())["manifests"][0]["digest"]
    manifest = json.loads(blob(top).read_bytes())
    config = json.loads(blob(manifest["config"]["digest"]).read_bytes())
    for descriptor in [manifest["config"], *manifest["layers"]]:
        assert sha256_of_file(blob(descriptor["digest"])) == descriptor["digest"]
        assert blob(descriptor["digest"]).stat().st_size == descriptor["size"]
    assert [sha256_of_file(blob(layer["digest"]), gunzip=True) for layer in manifest["layers"]] == config["rootfs"]["diff_ids"]
    return str(top)


def test_a_200_mb_blob_streams_under_300_mb_of_peak_rss(source, registry, tmp_path):
    """A 200 MB layer is mirrored by a batchpush process of its own whose peak RSS
    (its own VmHWM: test_batch.run_measured) stays under 300 MB: blobs stream, never held
    whole. The layer arrives intact: skopeo reads it back, every byte checked."""
    deadline = time.monotonic() + SUBPROCESS_LIMIT_S  # both subprocesses, in all
    made = subprocess.run([sys.executable, "-c", BIG_LAYOUT, str(tmp_path / "big"), "101", str(LARGE_BLOB_BYTES), os.path.dirname(__file__)], capture_output=True, text=True, timeout=deadline - time.monotonic())
    assert made.returncode == 0, made.stderr
    fill(source, str(tmp_path / "big"), "big", "team/big")
    layer = raw_manifest(source, "team/big:big")["layers"][0]
    assert layer["size"] >= LARGE_BLOB_BYTES
    report = tmp_path / "report.json"
    args = ["push", f"docker://{source.host}/team/big:big", f"{registry.host}/mirror/big:big", "--insecure", source.host, "--insecure", registry.host, "-q", "--report", str(report), "--metadata-dir", str(tmp_path / "md")]
    returncode, err, peak_rss_bytes = run_measured(args, tmp_path, timeout_s=deadline - time.monotonic())
    assert returncode == 0, err[-3000:]
    assert peak_rss_bytes < PEAK_RSS_BYTES, f"peak RSS {peak_rss_bytes >> 20} MiB"
    assert report_of(report)["images"][0]["status"] == "pushed"
    assert committed(registry, "mirror/big", layer["digest"]) == 1
    expected = remote_digest(source, "team/big:big")
    assert remote_digest(registry, "mirror/big:big") == expected
    assert pull_and_verify_streaming(registry, "mirror/big:big", tmp_path / "pulled") == expected
