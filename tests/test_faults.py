"""Reliability under faults: a proxy of ours injects them in front of the real registry."""

from __future__ import annotations

import email.utils
import json
import signal
import subprocess
import sys
import time

import pytest
from conftest import pull_and_verify
from fault_proxy import FaultProxy, Rule
from images import LayoutWriter, random_layer

import batchpush
from batchpush.engine import PushOptions
from batchpush.registry.auth import Credentials
from batchpush.registry.client import RegistryOptions

CHUNK = 256 << 10
LAYER_BYTES = 2 << 20


@pytest.fixture
def proxy(registry):
    started = FaultProxy(registry.host)
    yield started
    started.stop()


def big_layout(path: str, seeds=(1,), size: int = LAYER_BYTES, tag: str = "1.0") -> list[str]:
    writer = LayoutWriter(path)
    descriptor, image = writer.image([random_layer(seed, size) for seed in seeds])
    writer.tag(descriptor, tag)
    return image.diff_ids


def push(source: str, target: str, proxy: FaultProxy, metadata_dir: str, *, chunked: bool, **extra) -> batchpush.BatchResult:
    limit = CHUNK if chunked else 64 << 20
    options = RegistryOptions(insecure=True, monolithic_limit_bytes=limit, chunk_size_bytes=CHUNK, **extra)
    return batchpush.push(source, [target], PushOptions(registries={proxy.host: options}, metadata_dir=metadata_dir, jobs=1))


def layer_bytes(result: batchpush.BatchResult) -> int:
    return sum(layer.size for image in result.images for layer in image.layers)


def test_reset_mid_patch_resumes_from_the_registry_offset(registry, proxy, tmp_path, metadata_dir):
    """A buffering proxy (nginx's default) drops the broken chunk: the registry's
    session survives, and the upload goes on from its offset."""
    diff_ids = big_layout(str(tmp_path / "layout"))
    proxy.add(Rule("PATCH", "/blobs/uploads/", "reset_buffered", after_body_bytes=CHUNK // 2, skip=3))
    result = push(f"oci:{tmp_path}/layout", f"{proxy.host}/faults/patch", proxy, metadata_dir, chunked=True)
    assert result.ok, result.images[0].error
    blob = layer_bytes(result)
    sent = proxy.body_bytes("PATCH", "/v2/faults/patch/") + proxy.body_bytes("PUT", "/v2/faults/patch/blobs/")
    assert blob < sent <= blob + 2 * CHUNK, (blob, sent)  # far below a whole restart
    assert proxy.requests("GET", "/blobs/uploads/"), "the client asked the registry where it was"
    assert pull_and_verify(registry, "faults/patch:1.0", str(tmp_path / "pulled"))[0].diff_ids == diff_ids


def test_reset_mid_patch_that_reached_the_registry_starts_a_new_session(registry, proxy, tmp_path, metadata_dir):
    """A plain TCP proxy lets part of the chunk through: distribution then discards
    the session (its state no longer matches), so a new one carries the blob."""
    diff_ids = big_layout(str(tmp_path / "layout"))
    proxy.add(Rule("PATCH", "/blobs/uploads/", "reset", after_body_bytes=CHUNK // 2, skip=3))
    result = push(f"oci:{tmp_path}/layout", f"{proxy.host}/faults/stream", proxy, metadata_dir, chunked=True)
    assert result.ok, result.images[0].error
    assert len(proxy.requests("POST", "/v2/faults/stream/blobs/uploads/")) >= 2
    assert pull_and_verify(registry, "faults/stream:1.0", str(tmp_path / "pulled"))[0].diff_ids == diff_ids


def test_reset_mid_monolithic_put_is_resent_from_the_spool(registry, proxy, tmp_path, metadata_dir):
    diff_ids = big_layout(str(tmp_path / "layout"))
    proxy.add(Rule("PUT", "/blobs/uploads/", "reset_buffered", after_body_bytes=LAYER_BYTES // 2))
    result = push(f"oci:{tmp_path}/layout", f"{proxy.host}/faults/mono", proxy, metadata_dir, chunked=False)
    assert result.ok, result.images[0].error
    assert result.bytes_compressed == layer_bytes(result)  # compressed once, re-sent from the spool
    assert pull_and_verify(registry, "faults/mono:1.0", str(tmp_path / "pulled"))[0].diff_ids == diff_ids


def test_reset_after_the_final_put_committed(registry, proxy, tmp_path, metadata_dir):
    diff_ids = big_layout(str(tmp_path / "layout"))
    proxy.add(Rule("PUT", r"/blobs/uploads/.*digest=", "reset_after_response"))
    result = push(f"oci:{tmp_path}/layout", f"{proxy.host}/faults/final", proxy, metadata_dir, chunked=True)
    assert result.ok, result.images[0].error
    # the blob was committed before the reset: recognised, not uploaded again
    assert proxy.body_bytes("PATCH") <= layer_bytes(result) + CHUNK
    assert len(proxy.requests("POST", "/v2/faults/final/blobs/uploads/")) == 2  # the layer's and the config's
    assert pull_and_verify(registry, "faults/final:1.0", str(tmp_path / "pulled"))[0].diff_ids == diff_ids


@pytest.mark.parametrize(("method", "path", "times"), [("HEAD", "/manifests/", 3), ("POST", "/blobs/uploads/", 3), ("PUT", "/blobs/uploads/", 2), ("PUT", "/manifests/", 2), ("PATCH", "/blobs/uploads/", 2)])
def test_503s_are_retried(registry, proxy, tmp_path, metadata_dir, method, path, times):
    diff_ids = big_layout(str(tmp_path / "layout"), size=600_000)
    if method == "HEAD":  # the tag HEAD is a re-run's: push once first
        assert push(f"oci:{tmp_path}/layout", f"{proxy.host}/faults/s503", proxy, metadata_dir, chunked=False).ok
    proxy.add(Rule(method, path, "status", status=503, body=b'{"errors":[{"code":"UNAVAILABLE","message":"injected"}]}', times=times))
    result = push(f"oci:{tmp_path}/layout", f"{proxy.host}/faults/s503", proxy, metadata_dir, chunked=method == "PATCH")
    assert result.ok, result.images[0].error
    assert method != "HEAD" or result.images[0].status == "up-to-date"
    assert len([s for s in proxy.requests(method, path) if s.action == "status 503"]) == times
    assert pull_and_verify(registry, "faults/s503:1.0", str(tmp_path / "pulled"))[0].diff_ids == diff_ids


@pytest.mark.parametrize("form", ["seconds", "http-date"])
def test_429_retry_after_pauses_the_host(registry, proxy, tmp_path, metadata_dir, form):
    big_layout(str(tmp_path / "layout"), size=100_000)
    value = "2" if form == "seconds" else email.utils.formatdate(time.time() + 3, usegmt=True)
    proxy.add(Rule("POST", "/blobs/uploads/", "status", status=429, headers={"Retry-After": value}, body=b'{"errors":[{"code":"TOOMANYREQUESTS","message":"slow down"}]}'))
    result = push(f"oci:{tmp_path}/layout", f"{proxy.host}/faults/rate", proxy, metadata_dir, chunked=False, max_concurrent_uploads=1)
    assert result.ok, result.images[0].error
    limited = next(s for s in proxy.seen if s.action == "status 429")
    after = [s for s in proxy.seen if s.at > limited.at]
    assert after, "nothing was sent after the 429"
    assert after[0].at - limited.at >= 1.5  # the pause really happened (a lower bound, not a timing)


def test_416_asks_where_the_upload_is(registry, proxy, tmp_path, metadata_dir):
    diff_ids = big_layout(str(tmp_path / "layout"))
    proxy.add(Rule("PATCH", "/blobs/uploads/", "status", status=416, skip=2))
    result = push(f"oci:{tmp_path}/layout", f"{proxy.host}/faults/r416", proxy, metadata_dir, chunked=True)
    assert result.ok, result.images[0].error
    assert proxy.requests("GET", "/blobs/uploads/")
    assert proxy.body_bytes("PATCH") <= layer_bytes(result) + CHUNK
    assert pull_and_verify(registry, "faults/r416:1.0", str(tmp_path / "pulled"))[0].diff_ids == diff_ids


def test_a_repository_that_always_fails_next_to_one_that_works(registry, proxy, tmp_path, metadata_dir):
    big_layout(str(tmp_path / "layout"), size=100_000)
    proxy.add(Rule(None, "/v2/broken/", "status", status=500, times=-1))
    options = RegistryOptions(insecure=True, max_attempts=3)
    result = batchpush.push(f"oci:{tmp_path}/layout", [f"{proxy.host}/broken/app", f"{proxy.host}/works/app"], PushOptions(registries={proxy.host: options}, metadata_dir=metadata_dir))
    assert [image.status for image in result.images] == ["failed", "pushed"]
    assert result.exit_code == 1
    assert "HTTP 500" in (result.images[0].error or "")
    assert registry.count("PUT", "/v2/broken/") == 0
    pull_and_verify(registry, "works/app:1.0", str(tmp_path / "pulled"))


def test_never_retried_statuses(registry, proxy, tmp_path, metadata_dir):
    big_layout(str(tmp_path / "layout"), size=100_000)
    proxy.add(Rule("PUT", "/manifests/", "status", status=400, body=b'{"errors":[{"code":"MANIFEST_INVALID","message":"no"}]}', times=-1))
    result = push(f"oci:{tmp_path}/layout", f"{proxy.host}/faults/bad", proxy, metadata_dir, chunked=False)
    assert not result.ok
    assert len(proxy.requests("PUT", "/manifests/")) == 1
    assert "MANIFEST_INVALID" in (result.images[0].error or "")


def test_registry_restarted_mid_batch(registry, proxy, tmp_path, metadata_dir):
    for i in range(4):
        big_layout(str(tmp_path / f"layout{i}"), seeds=(10 + i,), size=400_000)
    proxy.throttle_bytes_per_s = 1_000_000
    jobs = [batchpush.PushJob(f"oci:{tmp_path}/layout{i}", (f"{proxy.host}/restart/app{i}",)) for i in range(4)]
    options = PushOptions(registries={proxy.host: RegistryOptions(insecure=True)}, metadata_dir=metadata_dir, max_concurrent_images=1)
    with batchpush.Engine(options) as engine:
        import threading

        at_restart: list[int] = []

        def restart() -> None:
            while proxy.live_body_bytes < 600_000:
                time.sleep(0.02)
            at_restart.append(proxy.live_body_bytes)
            registry.restart()

        thread = threading.Thread(target=restart)
        thread.start()
        result = engine.run(jobs)
        thread.join()
    assert result.ok, [i.error for i in result.images]
    assert at_restart and at_restart[0] < 4 * 400_000  # the registry went down mid-batch
    for i in range(4):
        pull_and_verify(registry, f"restart/app{i}:1.0", str(tmp_path / f"pulled{i}"))


def test_sigint_mid_upload_then_rerun(registry, proxy, tmp_path, metadata_dir):
    diff_ids = big_layout(str(tmp_path / "layout"), seeds=(20, 21), size=16 << 20)  # more than the socket buffers hold
    proxy.throttle_bytes_per_s = 2_000_000
    report = tmp_path / "report.json"
    args = [sys.executable, "-m", "batchpush", "push", f"oci:{tmp_path}/layout", f"{proxy.host}/faults/sigint", "--insecure", proxy.host, "--metadata-dir", metadata_dir, "--report", str(report), "--jobs", "1"]
    process = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while proxy.live_body_bytes < 1_000_000 and time.monotonic() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 130, err
    assert "Traceback" not in err
    document = json.loads(report.read_text())
    assert document["images"][0]["status"] == "failed" and document["images"][0]["error_kind"] == "interrupted"
    assert registry.count("PUT", "/manifests/") == 0
    assert registry.count("DELETE", "/blobs/uploads/") >= 1  # the open session was cancelled
    proxy.throttle_bytes_per_s = None
    again = subprocess.run(args, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0, again.stderr
    assert pull_and_verify(registry, "faults/sigint:1.0", str(tmp_path / "pulled"))[0].diff_ids == diff_ids


def test_token_expiring_between_chunks_is_refreshed(tmp_path, metadata_dir):
    from registry import start_registry
    from token_issuer import TokenIssuer

    issuer = TokenIssuer(str(tmp_path), {"alice": "alice-secret-pw"}, ttl_s=3)
    registry = start_registry(str(tmp_path), issuer.registry_config())
    proxy = FaultProxy(registry.host)
    try:
        diff_ids = big_layout(str(tmp_path / "layout"), size=3 << 20)
        proxy.throttle_bytes_per_s = 400_000  # about 8 s of upload for a 3 s token
        options = PushOptions(registries={proxy.host: RegistryOptions(insecure=True, monolithic_limit_bytes=CHUNK, chunk_size_bytes=CHUNK)}, metadata_dir=metadata_dir, credentials=lambda host: Credentials("alice", "alice-secret-pw"), jobs=1)
        result = batchpush.push(f"oci:{tmp_path}/layout", [f"{proxy.host}/tok/app"], options)
        assert result.ok, result.images[0].error
        assert len(issuer.tokens) >= 3  # refreshed during the upload
        assert len(proxy.requests("POST", "/v2/tok/app/blobs/uploads/")) == 2  # no restart: the layer's and the config's
        assert proxy.body_bytes("PATCH") <= layer_bytes(result) + CHUNK
        pull_and_verify(registry, "tok/app:1.0", str(tmp_path / "pulled"))
        assert pull_and_verify(registry, "tok/app:1.0", str(tmp_path / "pulled2"))[0].diff_ids == diff_ids
    finally:
        proxy.stop()
        registry.stop()
        issuer.stop()


def test_token_that_expires_early_gets_a_401_then_the_same_request_again(tmp_path, metadata_dir):
    """The issuer says tokens live 300 s but signs them for 3: the registry's 401
    mid-upload earns a fresh token and the same request is sent again."""
    from registry import start_registry
    from token_issuer import TokenIssuer

    issuer = TokenIssuer(str(tmp_path), {"alice": "alice-secret-pw"}, ttl_s=3, advertised_ttl_s=300)
    registry = start_registry(str(tmp_path), issuer.registry_config())
    proxy = FaultProxy(registry.host)
    try:
        diff_ids = big_layout(str(tmp_path / "layout"), size=3 << 20)
        proxy.throttle_bytes_per_s = 400_000
        options = PushOptions(registries={proxy.host: RegistryOptions(insecure=True, monolithic_limit_bytes=CHUNK, chunk_size_bytes=CHUNK)}, metadata_dir=metadata_dir, credentials=lambda host: Credentials("alice", "alice-secret-pw"), jobs=1)
        result = batchpush.push(f"oci:{tmp_path}/layout", [f"{proxy.host}/tok/early"], options)
        assert result.ok, result.images[0].error
        assert registry.count("PATCH") > 0 and any('" 401 ' in line for line in registry.access_log())
        assert len(proxy.requests("POST", "/v2/tok/early/blobs/uploads/")) == 2  # the blob was not restarted
        assert proxy.body_bytes("PATCH") <= layer_bytes(result) + 2 * CHUNK
        assert pull_and_verify(registry, "tok/early:1.0", str(tmp_path / "pulled"))[0].diff_ids == diff_ids
    finally:
        proxy.stop()
        registry.stop()
        issuer.stop()


def test_max_attempts_flag(registry, proxy, tmp_path, metadata_dir, batchpush):
    big_layout(str(tmp_path / "layout"), size=100_000)
    proxy.add(Rule("PUT", "/manifests/", "status", status=503, times=-1))
    run = batchpush("push", f"oci:{tmp_path}/layout", f"{proxy.host}/faults/attempts", "--insecure", proxy.host, "--max-attempts", "2")
    assert run.code == 1
    assert len(proxy.requests("PUT", "/manifests/")) == 2



def test_connections_are_kept_for_the_next_request(registry, proxy, tmp_path, metadata_dir):
    """Every response is finished so its connection goes back to the pool: a batch of
    many small images opens a handful of connections, not one per request."""
    writer = LayoutWriter(str(tmp_path / "many"))
    for i in range(24):
        descriptor, _ = writer.image([random_layer(100 + i, 4096)])
        writer.tag(descriptor, f"t{i}")
    result = push(f"oci:{tmp_path / 'many'}", f"{proxy.host}/conn/many", proxy, metadata_dir, chunked=False)
    assert result.ok
    sent = len(proxy.requests())
    assert sent >= 24 * 5  # config and layer (POST+PUT each), and the manifest, per image
    # at most one per thread that talks to the registry at once, and the https probe
    assert proxy.connections <= 16, (proxy.connections, sent)
