"""Mirroring from registries we do not control (issue #16): every answer a source
gives is untrusted input. Each test is one case of the issue, through our fault
proxy in front of the real registry (source and target are real ``docker-registry``
processes; the token issuer is ours): the image the source lies about fails with one
line naming the source and what was wrong, nothing is written for it, the rest of the
batch goes on and skopeo reads it back, and no source makes the run hang, eat memory
or leak a credential.

1. tag lists that never end (a ``Link`` chain, a loop): refused after the host's
   ``max_tag_pages``;
2. oversized documents (a manifest, a tag list of hundreds of MB; a length that is not
   the declared one): refused at their limits, peak RSS under 300 MB;
3. blob bodies longer or shorter than their descriptor: refused, at most size + 1
   bytes read, the upload session cancelled;
4. stalls: a read waits at most the host's ``read_timeout_s``, then resumes with
   ``Range``; a source that stalls every time fails its image; SIGINT ends the run;
5. redirects of blob GETs: followed to another host without ``Authorization`` or
   cookies; loops capped; https -> http refused;
6. names from the source: invalid tags skipped and never sent; redirects to another
   repository refused; unknown media types copied byte for byte, never parsed;
7. credentials stay home: an http token realm on another host gets them only when
   that host is marked insecure; each registry's credentials go to it alone.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from conftest import assert_no_secret, pull_and_verify, remote_digest, skopeo
from fault_proxy import FaultProxy, Rule
from images import OCI_MANIFEST, LayoutWriter, layer_tar, random_layer
from registry import REGISTRY_BINARY, Registry, start_registry
from test_batch import run_measured
from test_mirror_faults import assert_arrived, blob_digests, by_target, committed, fill, head_manifest, image_layout, raw_manifest, report_of, write_plan
from token_issuer import TokenIssuer

from batchpush.digest import CHUNK_BYTES, Digest
from batchpush.registry.client import MAX_REDIRECTS, BlobUpload, RegistryClient, RegistryOptions
from batchpush.registry.reads import MAX_MANIFEST_BYTES, MAX_TAG_PAGE_BYTES, READ_BYTES
from batchpush.sources.base import FileRange

#: the peak RSS the issue allows a run, whatever the source sends
PEAK_RSS_BYTES = 300 << 20
#: what a hostile source streams at us: far more than any limit, and than that RSS
HUGE_BYTES = 400 << 20
#: the read timeout of the stall tests: short, so a stall costs seconds
SHORT_READ_TIMEOUT_S = 3
#: a loopback address other than 127.0.0.1: another host for the client
OTHER_LOOPBACK = "127.0.0.2"
ALICE = ("alice", "alice-secret-pw")
BOB = ("bob", "bob-secret-pw")


# -- fixtures and helpers --------------------------------------------------------------


@pytest.fixture
def source(tmp_path) -> Iterator[Registry]:
    started = start_registry(str(tmp_path / "source"))
    yield started
    started.stop()


def mirror_plan(tmp_path: Path, front: FaultProxy, registry: Registry, sources: dict[str, str], target_settings: dict[str, Any] | None = None, **front_settings: Any) -> str:
    """A plan mirroring each ``docker://FRONT/<source>`` to ``TARGET/<target>``; the
    front host's per-registry settings are ``front_settings``, the target's
    ``target_settings``."""
    return write_plan(tmp_path, {
        "version": 1,
        "registries": {front.host: {"insecure": True, **front_settings}, registry.host: {"insecure": True, **(target_settings or {})}},
        "images": [{"source": f"docker://{front.host}/{src}", "targets": [f"{registry.host}/{dst}"]} for src, dst in sources.items()],
    })


def run_plan(batchpush, tmp_path: Path, plan: str, *args: str) -> tuple[Any, dict[str, Any]]:  # type: ignore[no-untyped-def]
    report = tmp_path / "report.json"
    run = batchpush("run", plan, "--metadata-dir", str(tmp_path / "md"), "--report", str(report), *args)
    return run, report_of(report)


def error_lines(run: Any) -> list[str]:
    """stderr without the log's warnings."""
    return [line for line in run.err.strip().splitlines() if not line.startswith("WARNING ")]


def written(registry: Registry, repository: str) -> list[str]:
    """Every write the registry's log shows into ``repository``."""
    return [line for line in registry.access_log() if f"/v2/{repository}/" in line and any(f'"{m} ' in line for m in ("POST", "PUT", "PATCH"))]


def bad_and_good(source: Registry, tmp_path: Path, bad_layers: list[bytes]) -> None:
    """``team/bad:1.0`` (of ``bad_layers``) and ``team/good:1.0`` at the source."""
    fill(source, image_layout(str(tmp_path / "bad"), {"1.0": bad_layers}), "1.0", "team/bad")
    fill(source, image_layout(str(tmp_path / "good"), {"1.0": [layer_tar(2), layer_tar(3)]}), "1.0", "team/good")


BAD_AND_GOOD = {"team/bad:1.0": "mirror/bad:1.0", "team/good:1.0": "mirror/good:1.0"}


def assert_bad_failed_good_arrived(run: Any, report: dict[str, Any], source: Registry, registry: Registry, tmp_path: Path, *needles: str) -> str:
    """The batch's one failure is mirror/bad, in one line holding ``needles``; no
    manifest of it was sent; mirror/good arrived whole. Returns the line."""
    assert run.code == 1, run.err
    (line,) = error_lines(run)
    assert f"{registry.host}/mirror/bad:1.0" in line and all(n in line for n in needles), line
    images = by_target(report)
    assert images[f"{registry.host}/mirror/bad:1.0"]["status"] == "failed"
    assert images[f"{registry.host}/mirror/good:1.0"]["status"] == "pushed"
    assert head_manifest(registry, "mirror/bad", "1.0") == 404
    assert not [line for line in written(registry, "mirror/bad") if '"PUT /v2/mirror/bad/manifests/' in line]
    assert_arrived(source, registry, "team/good:1.0", "mirror/good:1.0", tmp_path / "pulled")
    return line


# -- 1. tag lists that never end ---------------------------------------------------------


@pytest.mark.parametrize("chain", ["endless", "loop"])
def test_a_tag_list_that_never_ends_fails_its_repository_only(source, front, registry, tmp_path, batchpush, chain):
    """Every page of team/bad's tag list links to a next one: a new page each time
    (``endless``), or the first page again (``loop``). The listing stops at the host's
    ``max_tag_pages`` (5 here) or at the page already read, that repository fails with
    one line saying so, and nothing of it is written; team/good arrives."""
    bad_and_good(source, tmp_path, [layer_tar(1)])
    link = "/v2/team/bad/tags/list?last=t{n}&n=1000" if chain == "endless" else "/v2/team/bad/tags/list?n=1000"
    front.add(Rule("GET", "^/v2/team/bad/tags/list", "headers", headers={"Link": f'<{link}>; rel="next"'}, times=-1))
    plan = mirror_plan(tmp_path, front, registry, {"team/bad": "mirror/bad", "team/good:1.0": "mirror/good:1.0"}, max_tag_pages=5)
    run, report = run_plan(batchpush, tmp_path, plan)

    assert run.code == 1, run.err
    (line,) = error_lines(run)
    assert f"{front.host}/v2/team/bad/" in line and ("5 pages (max_tag_pages)" if chain == "endless" else "already read") in line, line
    assert len(front.requests("GET", "/v2/team/bad/tags/list")) == (5 if chain == "endless" else 1)
    assert not written(registry, "mirror/bad")
    assert by_target(report)[f"{registry.host}/mirror/good:1.0"]["status"] == "pushed"
    assert_arrived(source, registry, "team/good:1.0", "mirror/good:1.0", tmp_path / "pulled")


# -- 2. oversized documents ----------------------------------------------------------------


def test_oversized_documents_are_refused_with_bounded_memory(source, front, registry, tmp_path):
    """The source streams 400 MB for three documents: the manifest a tag names (its
    HEAD stated the real size: refused after that size + 1 bytes), a manifest asked
    by digest (no size known: refused at the 4 MiB manifest limit), and a tag list
    (refused at the 16 MiB page limit); none has a Content-Length, so only our limits
    stop the reads. Each fails its image or repository with one line; team/good
    arrives; the batchpush process's peak RSS stays under 300 MB."""
    bad_and_good(source, tmp_path, [layer_tar(4)])
    fill(source, image_layout(str(tmp_path / "tags"), {"1.0": [layer_tar(5)]}), "1.0", "team/tags")
    pinned = remote_digest(source, "team/bad:1.0")
    huge = {"stream_bytes": HUGE_BYTES, "stream_length": False, "times": -1}
    front.add(Rule("GET", "^/v2/team/bad/manifests/", "stream", status=200, headers={"Content-Type": OCI_MANIFEST}, **huge))  # type: ignore[arg-type]
    front.add(Rule("GET", "^/v2/team/tags/tags/list", "stream", status=200, headers={"Content-Type": "application/json"}, **huge))  # type: ignore[arg-type]
    plan = write_plan(tmp_path, {
        "version": 1,
        "registries": {front.host: {"insecure": True}, registry.host: {"insecure": True}},
        "images": [
            {"source": f"docker://{front.host}/team/bad:1.0", "targets": [f"{registry.host}/mirror/bad:1.0"]},
            {"source": f"docker://{front.host}/team/bad@{pinned}", "targets": [f"{registry.host}/mirror/pinned:1.0"]},
            {"source": f"docker://{front.host}/team/tags", "targets": [f"{registry.host}/mirror/tags"]},
            {"source": f"docker://{front.host}/team/good:1.0", "targets": [f"{registry.host}/mirror/good:1.0"]},
        ],
    })
    report = tmp_path / "report.json"
    code, err, peak_rss_bytes = run_measured(["run", plan, "-q", "--no-signatures", "--report", str(report), "--metadata-dir", str(tmp_path / "md")], tmp_path, timeout_s=110)

    assert code == 1, err[-3000:]
    assert peak_rss_bytes < PEAK_RSS_BYTES, f"peak RSS {peak_rss_bytes >> 20} MiB"
    size = len(skopeo("inspect", "--raw", "--tls-verify=false", f"docker://{source.host}/team/bad:1.0").stdout.encode())
    lines = err.strip().splitlines()
    assert len(lines) == 3, lines
    (tagged,) = [line for line in lines if "mirror/bad:1.0" in line]
    assert f"docker://{front.host}/team/bad@{pinned}" in tagged and f"more than {size} bytes" in tagged, tagged
    (by_digest,) = [line for line in lines if "mirror/pinned:1.0" in line]
    assert str(MAX_MANIFEST_BYTES) in by_digest, by_digest
    (tag_list,) = [line for line in lines if "team/tags" in line]
    assert str(MAX_TAG_PAGE_BYTES) in tag_list, tag_list
    for stream in front.requests("GET", "/manifests/") + front.requests("GET", "/tags/list"):
        assert stream.response_bytes < HUGE_BYTES  # each read stopped early: the client closed
    for repository in ("mirror/bad", "mirror/pinned", "mirror/tags"):
        assert not written(registry, repository)
    assert_arrived(source, registry, "team/good:1.0", "mirror/good:1.0", tmp_path / "pulled")


def test_an_index_child_of_another_length_than_declared_is_refused_unread(source, front, registry, tmp_path, batchpush):
    """A child manifest is served with a Content-Length other than the size its index
    declares: refused from the header (its body is not read), naming both lengths."""
    writer = LayoutWriter(str(tmp_path / "bad"))
    amd64, _ = writer.image([layer_tar(6)], arch="amd64")
    arm64, _ = writer.image([layer_tar(7)], arch="arm64")
    writer.tag(writer.index([amd64, arm64]), "1.0")
    fill(source, str(tmp_path / "bad"), "1.0", "team/bad")
    fill(source, image_layout(str(tmp_path / "good"), {"1.0": [layer_tar(2), layer_tar(3)]}), "1.0", "team/good")
    child = raw_manifest(source, "team/bad:1.0")["manifests"][1]
    padding = 3 << 20
    front.add(Rule("GET", f"/manifests/{child['digest']}", "forward", body_filter=lambda body: body + b" " * padding, times=-1))
    run, report = run_plan(batchpush, tmp_path, mirror_plan(tmp_path, front, registry, BAD_AND_GOOD))

    assert_bad_failed_good_arrived(run, report, source, registry, tmp_path, f"docker://{front.host}/team/bad@{child['digest']}", f"{child['size']} bytes", f"{child['size'] + padding} bytes (its Content-Length)")
    assert not written(registry, "mirror/bad")  # every manifest is checked before any blob moves


# -- 3. blob bodies that lie -------------------------------------------------------------------


@pytest.mark.parametrize("lie", ["longer", "longer without Content-Length", "shorter"])
def test_a_blob_body_longer_or_shorter_than_its_descriptor_is_refused(source, front, registry, tmp_path, batchpush, lie):
    """The layer's body has bytes after the blob (the digest already matched), or
    lacks its last ones. Refused: one line naming the source and the digest; at most
    size + 1 bytes of it read (the run's bytes_read); its upload session at the
    target cancelled, nothing committed; team/good arrives."""
    bad_and_good(source, tmp_path, [random_layer(8, 2 * CHUNK_BYTES + 5)])
    _, layer = blob_digests(source, "team/bad:1.0")  # the config is small and true: it may have gone, the manifest never did (checked above)
    size = raw_manifest(source, "team/bad:1.0")["layers"][0]["size"]
    extra = 5 << 20
    body_filter = (lambda body: body[:-1000]) if lie == "shorter" else (lambda body: body + b"\0" * extra)
    front.add(Rule("GET", f"/blobs/{layer}", "forward", body_filter=body_filter, close_delimited=lie == "longer without Content-Length", times=-1))
    run, report = run_plan(batchpush, tmp_path, mirror_plan(tmp_path, front, registry, BAD_AND_GOOD))

    assert_bad_failed_good_arrived(run, report, source, registry, tmp_path, f"docker://{front.host}/team/bad@{layer}", f"{size} bytes")
    assert registry.count("DELETE", "/v2/mirror/bad/blobs/uploads/") >= 1
    assert committed(registry, "mirror/bad", layer) == 0
    others = sum(d["size"] for d in [raw_manifest(source, "team/bad:1.0")["config"], *(raw_manifest(source, "team/good:1.0")[k] for k in ("config",)), *raw_manifest(source, "team/good:1.0")["layers"]])
    reads = len(front.requests("GET", f"/blobs/{layer}"))
    assert report["totals"]["bytes_read"] <= others + reads * (size + 1), (report["bytes_read"], others, reads, size)


# -- 4. stalls ---------------------------------------------------------------------------------


def test_a_stalled_blob_read_resumes_with_range(source, front, registry, tmp_path, batchpush):
    """The source sends the layer's headers and part of its body, then nothing: after
    the host's ``read_timeout_s`` the read resumes with ``Range`` from the last byte
    received, and the image arrives whole."""
    fill(source, image_layout(str(tmp_path / "app"), {"1.0": [random_layer(9, 3 * CHUNK_BYTES)]}), "1.0", "team/app")
    _, layer = blob_digests(source, "team/app:1.0")
    size = raw_manifest(source, "team/app:1.0")["layers"][0]["size"]
    cut = CHUNK_BYTES + 300_000
    front.add(Rule("GET", f"/blobs/{layer}", "stall", response_bytes=cut))
    run, report = run_plan(batchpush, tmp_path, mirror_plan(tmp_path, front, registry, {"team/app:1.0": "mirror/app:1.0"}, read_timeout_s=SHORT_READ_TIMEOUT_S))

    assert run.code == 0, run.err
    stalled, resumed = front.requests("GET", f"/blobs/{layer}")
    assert stalled.action == "stall" and "range" not in stalled.headers
    start = int(resumed.headers["range"].removeprefix("bytes=").removesuffix("-"))
    assert 0 < start <= cut and cut - start <= READ_BYTES and resumed.status == 206 and resumed.response_bytes == size - start
    assert committed(registry, "mirror/app", layer) == 1
    assert_arrived(source, registry, "team/app:1.0", "mirror/app:1.0", tmp_path / "pulled")


def test_a_source_that_stalls_every_time_fails_its_image_only(source, front, registry, tmp_path, batchpush):
    """Every read of the layer stalls: each waits the read timeout, a read's resumes
    are bounded by the source's retry policy (``max_attempts`` 2) and the layer's
    attempts by the target's (2 as well); then the image fails with one line; its
    session is cancelled; team/good arrives."""
    bad_and_good(source, tmp_path, [random_layer(10, 2 * CHUNK_BYTES)])
    _, layer = blob_digests(source, "team/bad:1.0")
    front.add(Rule("GET", f"/blobs/{layer}", "stall", response_bytes=CHUNK_BYTES // 2, times=-1))
    plan = mirror_plan(tmp_path, front, registry, BAD_AND_GOOD, {"max_attempts": 2}, read_timeout_s=SHORT_READ_TIMEOUT_S, max_attempts=2)
    run, report = run_plan(batchpush, tmp_path, plan)

    assert_bad_failed_good_arrived(run, report, source, registry, tmp_path, "team/bad", "broke off")
    # resumes within a read, times attempts of the layer's path: bounded
    # each read resumes twice (the source's max_attempts), and the target's retry
    # policy (max_attempts 2 too) runs the layer's path again after a failed read
    assert 3 <= len(front.requests("GET", f"/blobs/{layer}")) <= 2 * 3
    assert registry.count("DELETE", "/v2/mirror/bad/blobs/uploads/") >= 1


def test_sigint_ends_a_run_that_waits_on_a_stalled_source(source, front, registry, tmp_path):
    """A read stalls with a read timeout of 10 minutes; SIGINT ends the process well
    before that (the cancel grace, then the exit does not wait for the read): exit
    130, the report written, no manifest at the target."""
    fill(source, image_layout(str(tmp_path / "app"), {"1.0": [random_layer(12, 2 * CHUNK_BYTES)]}), "1.0", "team/app")
    _, layer = blob_digests(source, "team/app:1.0")
    front.add(Rule("GET", f"/blobs/{layer}", "stall", response_bytes=1000, stall_s=600, times=-1))
    plan = mirror_plan(tmp_path, front, registry, {"team/app:1.0": "mirror/app:1.0"}, read_timeout_s=600)
    report = tmp_path / "report.json"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.path.dirname(os.path.dirname(__file__)), os.environ.get("PYTHONPATH", "")])}
    process = subprocess.Popen([sys.executable, "-m", "batchpush", "run", plan, "-q", "--report", str(report), "--metadata-dir", str(tmp_path / "md")], stderr=subprocess.PIPE, text=True, env=env)
    try:
        for _ in range(600):  # until the read is stalled (bounded: 60 s)
            if front.requests("GET", f"/blobs/{layer}") or process.poll() is not None:
                break
            time.sleep(0.1)
        assert front.requests("GET", f"/blobs/{layer}"), "the layer was never read"
        process.send_signal(signal.SIGINT)
        _, err = process.communicate(timeout=60)  # far less than the read timeout
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 130, err
    assert "stopped by signal" in err
    assert report_of(report)["images"][0]["status"] == "failed"
    assert head_manifest(registry, "mirror/app", "1.0") == 404


# -- 5. redirects --------------------------------------------------------------------------------


@pytest.fixture
def token_source(tmp_path) -> Iterator[tuple[Registry, TokenIssuer]]:
    """The real registry in token mode (our issuer; alice may push and pull)."""
    assert os.path.exists(REGISTRY_BINARY), f"{REGISTRY_BINARY} is missing"
    issuer = TokenIssuer(str(tmp_path), {ALICE[0]: ALICE[1]})
    started = start_registry(str(tmp_path / "source"), issuer.registry_config())
    yield started, issuer
    started.stop()
    issuer.stop()


def docker_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, logins: dict[str, tuple[str, str]]) -> None:
    directory = tmp_path / "docker-config"
    directory.mkdir(exist_ok=True)
    auths = {host: {"auth": base64.b64encode(f"{user}:{password}".encode()).decode()} for host, (user, password) in logins.items()}
    (directory / "config.json").write_text(json.dumps({"auths": auths}))
    monkeypatch.setenv("DOCKER_CONFIG", str(directory))


def test_a_blob_redirected_to_another_host_is_followed_without_credentials(token_source, registry, tmp_path, batchpush, monkeypatch):
    """The token-protected source answers every blob GET with a 307 to another host
    (a second proxy of ours, on another loopback address, in front of the same
    registry: a storage CDN, which admits requests by its own means, here a token of
    its own). The redirects are followed and the image arrives; the other host never
    sees the source's ``Authorization`` nor the cookie the source set."""
    source, issuer = token_source
    front, cdn = FaultProxy(source.host), FaultProxy(source.host, bind=OTHER_LOOPBACK)
    try:
        fill(source, image_layout(str(tmp_path / "app"), {"1.0": [layer_tar(13), layer_tar(14)]}), "1.0", "team/app", "--dest-tls-verify=false", "--dest-creds", ":".join(ALICE))
        cdn_token = issuer.sign("cdn", [{"type": "repository", "name": "team/app", "actions": ["pull"]}])
        front.add(Rule("GET", "^/v2/$", "headers", headers={"Set-Cookie": "origin-session=front-cookie-value; Path=/"}, times=-1))
        front.add(Rule("GET", "/blobs/sha256:", "status", status=307, headers={"Location": f"http://{cdn.host}{{target}}", "Set-Cookie": "origin-session=front-cookie-value; Path=/"}, times=-1))
        cdn.add(Rule("GET", "/blobs/sha256:", "forward", add_request_headers={"Authorization": f"Bearer {cdn_token}"}, times=-1))
        docker_config(tmp_path, monkeypatch, {front.host: ALICE})
        run = batchpush("push", f"docker://{front.host}/team/app:1.0", f"{registry.host}/mirror/app:1.0", "--insecure", front.host, "--insecure", registry.host, "--no-signatures")

        assert run.code == 0, run.err
        asked = front.requests("GET", "/blobs/sha256:")
        assert len(asked) == 3 and all(s.headers.get("authorization", "").startswith("Bearer ") for s in asked)
        followed = cdn.requests()
        assert sorted(s.target for s in followed) == sorted(s.target for s in asked) and all(s.status == 200 for s in followed)  # blobs are read in parallel
        assert all("authorization" not in s.headers and "cookie" not in s.headers for s in followed), [s.headers for s in followed]
        assert all("cookie" not in s.headers for s in front.requests())
    finally:
        front.stop()
        cdn.stop()
    assert remote_digest(registry, "mirror/app:1.0") == "sha256:" + hashlib.sha256(skopeo("inspect", "--raw", "--tls-verify=false", "--creds", ":".join(ALICE), f"docker://{source.host}/team/app:1.0").stdout.encode()).hexdigest()
    assert pull_and_verify(registry, "mirror/app:1.0", str(tmp_path / "pulled"))


def test_a_redirect_loop_is_capped(source, front, registry, tmp_path, batchpush):
    """team/bad's layer is redirected from the source to another host and back, for
    ever: the request gives up after MAX_REDIRECTS hops, the image fails with one
    line, and team/good arrives."""
    bad_and_good(source, tmp_path, [layer_tar(15)])
    _, layer = blob_digests(source, "team/bad:1.0")
    other = FaultProxy(source.host, bind=OTHER_LOOPBACK)
    try:
        front.add(Rule("GET", f"/blobs/{layer}", "status", status=307, headers={"Location": f"http://{other.host}{{target}}"}, times=-1))
        other.add(Rule("GET", f"/blobs/{layer}", "status", status=307, headers={"Location": f"http://{front.host}{{target}}"}, times=-1))
        run, report = run_plan(batchpush, tmp_path, mirror_plan(tmp_path, front, registry, BAD_AND_GOOD))
        hops = len(front.requests("GET", f"/blobs/{layer}")) + len(other.requests("GET", f"/blobs/{layer}"))
    finally:
        other.stop()
    assert_bad_failed_good_arrived(run, report, source, registry, tmp_path, f"more than {MAX_REDIRECTS} redirects")
    assert hops == MAX_REDIRECTS + 1  # refused for good: not retried


def test_a_redirect_from_https_to_http_is_refused(source, registry, tmp_path, batchpush):
    """The source is served over TLS (our proxy terminates it, trusted with the
    plan's ``ca_file``) and redirects team/bad's layer to plain http: refused, the
    image fails with one line; team/good arrives over https."""
    from tls import make_tls

    ca, cert, key = make_tls(str(tmp_path / "certs"))
    bad_and_good(source, tmp_path, [layer_tar(16)])
    _, layer = blob_digests(source, "team/bad:1.0")
    front, plain = FaultProxy(source.host, tls=(cert, key)), FaultProxy(source.host)
    try:
        front.add(Rule("GET", f"/blobs/{layer}", "status", status=307, headers={"Location": f"http://{plain.host}{{target}}"}, times=-1))
        plan = write_plan(tmp_path, {
            "version": 1,
            "registries": {front.host: {"ca_file": ca}, registry.host: {"insecure": True}},
            "images": [{"source": f"docker://{front.host}/{src}", "targets": [f"{registry.host}/{dst}"]} for src, dst in BAD_AND_GOOD.items()],
        })
        run, report = run_plan(batchpush, tmp_path, plan)
        assert plain.requests() == []
        assert front.requests("GET", f"/blobs/{layer}")
    finally:
        front.stop()
        plain.stop()
    assert_bad_failed_good_arrived(run, report, source, registry, tmp_path, "https to plain http")


# -- 6. names and media types from the source ----------------------------------------------------

#: names a hostile tag list may hold: none is a tag
NOT_TAGS = ["../x", "../../v2/team/other/manifests/1.0", "a b", "t" * 200, "%2e%2e", "x/y", "-dash", ".dot", "ünï", "1.0\n"]


def test_names_that_are_not_tags_are_skipped_and_never_sent(source, front, registry, tmp_path, batchpush):
    """The source's tag list holds, besides its real tags, names that are not tags:
    each is skipped with a warning; no request, at the source or the target, ever
    carries one; the real tags arrive."""
    layout = image_layout(str(tmp_path / "app"), {"1.0": [layer_tar(17)], "2.0": [layer_tar(18)]})
    for tag in ("1.0", "2.0"):
        fill(source, layout, tag, "team/app")

    def add_names(body: bytes) -> bytes:
        document = json.loads(body)
        return json.dumps({**document, "tags": [*document["tags"], *NOT_TAGS]}).encode()

    front.add(Rule("GET", "/tags/list", "forward", body_filter=add_names, times=-1))
    run, report = run_plan(batchpush, tmp_path, mirror_plan(tmp_path, front, registry, {"team/app": "mirror/app"}))

    assert run.code == 0, run.err
    warnings = [line for line in run.err.splitlines() if line.startswith("WARNING ")]
    assert len(warnings) == len(NOT_TAGS) and all("not a valid tag name" in line for line in warnings), warnings
    assert sorted(image["target"] for image in report["images"]) == [f"{registry.host}/mirror/app:1.0", f"{registry.host}/mirror/app:2.0"]
    sent = [s.target for s in front.requests()] + [line for line in registry.access_log() if "/v2/mirror/app/" in line]
    for name in ("..", "%2e", "%2E", "%20", "ttttttttttttttttttttttttttttttttttttttttttttt", "x/y", "-dash", ".dot", "%C3", "%0A"):
        assert not [target for target in sent if name in target], name
    for tag in ("1.0", "2.0"):
        assert remote_digest(registry, f"mirror/app:{tag}") == remote_digest(source, f"team/app:{tag}")
    assert pull_and_verify(registry, "mirror/app:2.0", str(tmp_path / "pulled"))


@pytest.mark.parametrize("what", ["manifest", "blob", "manifest elsewhere"])
def test_a_redirect_to_another_repository_or_a_manifest_to_another_host_is_refused(source, front, registry, tmp_path, batchpush, what):
    """team/bad's manifest or layer is redirected, on the source's own host, to the
    same content in another repository (team/other holds it: followed, the copy
    would succeed with bytes the repository asked for never gave); or its manifest
    to another host. Refused: one line, nothing written; team/good arrives."""
    bad_and_good(source, tmp_path, [layer_tar(19)])
    fill(source, str(tmp_path / "bad"), "1.0", "team/other")
    digest = remote_digest(source, "team/bad:1.0") if what.startswith("manifest") else blob_digests(source, "team/bad:1.0")[1]
    kind = "manifests" if what.startswith("manifest") else "blobs"
    other = FaultProxy(source.host, bind=OTHER_LOOPBACK)
    try:
        location = f"http://{other.host}/v2/team/bad/{kind}/{digest}" if what == "manifest elsewhere" else f"/v2/team/other/{kind}/{digest}"
        front.add(Rule("GET", f"^/v2/team/bad/{kind}/{digest}", "status", status=307, headers={"Location": location}, times=-1))
        run, report = run_plan(batchpush, tmp_path, mirror_plan(tmp_path, front, registry, BAD_AND_GOOD))
        assert other.requests() == []
    finally:
        other.stop()
    assert not front.requests("GET", "/v2/team/other/")
    assert_bad_failed_good_arrived(run, report, source, registry, tmp_path, "another host" if what == "manifest elsewhere" else "another repository")


def push_artifact(registry: Registry, tmp_path: Path) -> tuple[bytes, dict[str, bytes]]:
    """An OCI artifact in ``team/art:1.0``, pushed by our client: a config of an
    unknown media type that is not JSON, a layer of an unknown media type, and one
    labelled gzip whose bytes are not gzip. Returns its manifest and its blobs."""
    blobs = {
        "application/vnd.example.thing.config.v1+json": b"\x00\xffnot json at all",
        "application/vnd.example.thing.layer.v1": os.urandom(CHUNK_BYTES + 17),
        "application/vnd.oci.image.layer.v1.tar+gzip": b"not gzip, not a tar" * 1000,
    }
    descriptors = []
    client = RegistryClient(registry.host, RegistryOptions(insecure=True))
    try:
        for i, (media_type, data) in enumerate(blobs.items()):
            path = tmp_path / f"blob-{i}"
            path.write_bytes(data)
            digest = Digest.sha256_of(data)
            client.upload_blob("team/art", BlobUpload(client.start_upload("team/art")), FileRange(str(path), 0, len(data)), digest)
            descriptors.append({"mediaType": media_type, "digest": str(digest), "size": len(data)})
        manifest = json.dumps({"schemaVersion": 2, "mediaType": OCI_MANIFEST, "artifactType": "application/vnd.example.thing.v1", "config": descriptors[0], "layers": descriptors[1:], "annotations": {"x": "y"}}, indent=3).encode()
        client.put_manifest("team/art", "1.0", OCI_MANIFEST, manifest)
    finally:
        client.close()
    return manifest, {d["digest"]: data for d, data in zip(descriptors, blobs.values(), strict=True)}


def test_unknown_media_types_are_copied_byte_for_byte_never_parsed(source, front, registry, tmp_path, batchpush):
    """An artifact whose config and layers have media types batchpush does not know
    (one labelled gzip is not gzip, the config is not JSON) is copied as it is: the
    target serves the same manifest bytes and the same blobs; nothing was parsed."""
    manifest, blobs = push_artifact(source, tmp_path)
    run, report = run_plan(batchpush, tmp_path, mirror_plan(tmp_path, front, registry, {"team/art:1.0": "mirror/art:1.0"}))

    assert run.code == 0, run.err
    assert report["images"][0]["status"] == "pushed"
    served = requests.get(f"{registry.url}/v2/mirror/art/manifests/1.0", headers={"Accept": OCI_MANIFEST}, timeout=30)
    assert served.content == manifest and served.headers["Content-Type"] == OCI_MANIFEST
    for digest, data in blobs.items():
        assert requests.get(f"{registry.url}/v2/mirror/art/blobs/{digest}", timeout=30).content == data
    assert remote_digest(registry, "mirror/art:1.0") == "sha256:" + hashlib.sha256(manifest).hexdigest()


# -- 7. credentials stay home --------------------------------------------------------------------


@pytest.mark.parametrize("marked", [False, True])
def test_an_http_token_realm_on_another_host_gets_credentials_only_if_marked_insecure(tmp_path, registry, batchpush, monkeypatch, marked):
    """The source's challenges name a plain-http token realm on another host (our
    proxy on another loopback address, in front of our issuer). Unless that host is
    marked insecure, nothing is sent there — not the credentials, not even an
    anonymous token request — and the image fails with one line naming the realm's
    host; marked (``--insecure``), it gets alice's credentials and the image arrives."""
    issuer = TokenIssuer(str(tmp_path), {ALICE[0]: ALICE[1]})
    realm = FaultProxy(issuer.host, bind=OTHER_LOOPBACK)
    source = start_registry(str(tmp_path / "source"), issuer.registry_config(realm=f"http://{realm.host}/token"))
    try:
        fill(source, image_layout(str(tmp_path / "app"), {"1.0": [layer_tar(20)]}), "1.0", "team/app", "--dest-tls-verify=false", "--dest-creds", ":".join(ALICE))
        issued = len(realm.requests())
        docker_config(tmp_path, monkeypatch, {source.host: ALICE})
        report = tmp_path / "report.json"
        mark = ("--insecure", realm.host) if marked else ()
        run = batchpush("push", f"docker://{source.host}/team/app:1.0", f"{registry.host}/mirror/app:1.0", "--insecure", source.host, "--insecure", registry.host, *mark, "--no-signatures", "--report", str(report))
        asked = realm.requests()[issued:]
        if marked:
            assert run.code == 0, run.err
            assert asked and all(s.headers.get("authorization") == "Basic " + base64.b64encode(":".join(ALICE).encode()).decode() for s in asked)
            assert pull_and_verify(registry, "mirror/app:1.0", str(tmp_path / "pulled"))
        else:
            assert run.code == 1, run.err
            (line,) = error_lines(run)
            assert f"{registry.host}/mirror/app:1.0" in line and f"token realm on {realm.host} is not https" in line, line
            assert asked == []
            assert not written(registry, "mirror/app")
        assert_no_secret([ALICE[1], *issuer.tokens], run.out, run.err, report.read_text())
    finally:
        source.stop()
        realm.stop()
        issuer.stop()


def test_each_registrys_credentials_go_to_it_alone(tmp_path, batchpush, monkeypatch):
    """Source and target are two token registries with their own issuers and users
    (alice at the source, bob at the target), both behind our proxies. Every token
    request and every Authorization each side sees is its own user's and its own
    issuer's; ``--debug`` shows no password and no token."""
    (tmp_path / "target-issuer").mkdir()
    issuers = {"source": TokenIssuer(str(tmp_path), {ALICE[0]: ALICE[1]}), "target": TokenIssuer(str(tmp_path / "target-issuer"), {BOB[0]: BOB[1]})}
    realms = {side: FaultProxy(issuer.host) for side, issuer in issuers.items()}
    registries = {side: start_registry(str(tmp_path / side), issuers[side].registry_config(realm=f"http://{realms[side].host}/token")) for side in issuers}
    fronts = {side: FaultProxy(registries[side].host) for side in issuers}
    try:
        fill(registries["source"], image_layout(str(tmp_path / "app"), {"1.0": [layer_tar(21), layer_tar(22)]}), "1.0", "team/app", "--dest-tls-verify=false", "--dest-creds", ":".join(ALICE))
        seen_before = {side: len(realms[side].requests()) for side in issuers}
        docker_config(tmp_path, monkeypatch, {fronts["source"].host: ALICE, fronts["target"].host: BOB})
        report = tmp_path / "report.json"
        hosts = [fronts["source"].host, fronts["target"].host]
        run = batchpush("push", f"docker://{hosts[0]}/team/app:1.0", f"{hosts[1]}/mirror/app:1.0", "--insecure", hosts[0], "--insecure", hosts[1], "--no-signatures", "--debug", "--report", str(report))

        assert run.code == 0, run.err[-3000:]
        for side, user in (("source", ALICE), ("target", BOB)):
            basic = "Basic " + base64.b64encode(":".join(user).encode()).decode()
            asked = realms[side].requests()[seen_before[side]:]
            assert asked and all(s.headers.get("authorization") == basic for s in asked), side
            bearers = {s.headers["authorization"].removeprefix("Bearer ") for s in fronts[side].requests() if "authorization" in s.headers}
            assert bearers and bearers <= set(issuers[side].tokens), side
        secrets = [ALICE[1], BOB[1], *issuers["source"].tokens, *issuers["target"].tokens]
        assert_no_secret(secrets, run.out, run.err, report.read_text())
        assert "DEBUG" in run.err
        assert pull_and_verify(registries["target"], "mirror/app:1.0", str(tmp_path / "pulled"), ("--src-tls-verify=false", "--src-creds", ":".join(BOB)))
    finally:
        for proxy in (*fronts.values(), *realms.values()):
            proxy.stop()
        for started in registries.values():
            started.stop()
        for issuer in issuers.values():
            issuer.stop()
