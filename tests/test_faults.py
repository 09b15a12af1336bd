"""Reliability under faults: a proxy of ours injects them in front of the real registry."""

from __future__ import annotations

import email.utils
import json
import signal
import subprocess
import sys
import threading
import time

import pytest
from conftest import pull_and_verify
from fault_proxy import FaultProxy, Rule, Seen, signal_mid_upload
from images import LayoutWriter, random_layer

import batchpush
from batchpush.engine import DEFAULT_MAX_CONCURRENT_IMAGES, PushOptions
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


def assert_401s_cost_one_resend_each(proxy: FaultProxy, registry, result: batchpush.BatchResult) -> int:
    """What the client guarantees when a token expires mid-upload, whatever the timing:
    a 401 earns one fresh token and the same request again. So every PATCH is answered
    202 or 401, each 401'd PATCH is followed by one with the same range, every layer
    byte is accepted exactly once, and the bytes re-sent are at most one chunk per 401
    (how many 401s there are depends on when tokens expire: it is counted, not assumed).
    Returns the number of 401'd PATCHes."""
    patches = proxy.requests("PATCH")
    refused = [i for i, seen in enumerate(patches) if seen.status == 401]
    assert all(seen.status in (202, 401) for seen in patches), [(seen.status, seen.action) for seen in patches]
    assert len(refused) == sum(1 for line in registry.access_log() if '"PATCH ' in line and '" 401 ' in line)  # the registry counts the same
    for i in refused:
        assert i + 1 < len(patches) and patches[i + 1].headers.get("content-range") == patches[i].headers.get("content-range"), "the same request again"
    assert sum(seen.body_bytes for seen in patches if seen.status == 202) == layer_bytes(result)
    assert proxy.body_bytes("PATCH") <= layer_bytes(result) + len(refused) * CHUNK
    return len(refused)


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
    uploads = "/v2/faults/stream/blobs/uploads/"
    seen = proxy.requests(path=uploads)
    broken = [i for i, s in enumerate(seen) if s.action == "reset"]
    assert len(broken) == 1, "the fault fired once"
    old = session_of(seen[broken[0]].target)
    layer = next(layer for layer in result.images[0].layers if layer.size > CHUNK)
    commits = [s for s in seen if s.method == "PUT" and "digest=" in s.target and layer.digest.hex in s.target]
    assert len(commits) == 1 and commits[0].status == 201
    assert session_of(commits[0].target) != old, "the layer was committed in a new session"
    assert [s.method for s in seen[broken[0] + 1 :] if session_of(s.target) == old] in ([], ["GET"]), "the broken session was left alone (asked where it was, at most)"
    assert len(proxy.requests("POST", uploads)) == 3  # the layer's, the config's and the new session
    assert pull_and_verify(registry, "faults/stream:1.0", str(tmp_path / "pulled"))[0].diff_ids == diff_ids


def session_of(target: str) -> str:
    """The upload session's id in an upload URL ("" for the POST that opens one)."""
    return target.split("/blobs/uploads/", 1)[1].split("?", 1)[0]


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
    # one request at a time: none can be on its way already when the 429 comes back
    result = push(f"oci:{tmp_path}/layout", f"{proxy.host}/faults/rate", proxy, metadata_dir, chunked=False, max_concurrent_uploads=1, max_requests_in_flight=1)
    assert result.ok, result.images[0].error
    limited = next(s for s in proxy.seen if s.action == "status 429")
    after = [s for s in proxy.seen if s.at > limited.at]
    assert after, "nothing was sent after the 429"
    # the pause really happened (a lower bound, not a timing): 2 s after the 429, or
    # until the date it named (on a loaded machine the push may start late, and the
    # pause left from a date is then shorter: compared on the wall clock)
    if form == "seconds":
        assert after[0].at - limited.at >= 1.5
    else:
        wall = time.time() - time.monotonic()
        assert after[0].at + wall >= email.utils.parsedate_to_datetime(value).timestamp() - 0.25


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
    """The registry goes down mid-batch and stays down until a request of the batch
    has found it down (the proxy could not connect), then comes back: every image
    is pushed whole."""
    for i in range(4):
        big_layout(str(tmp_path / f"layout{i}"), seeds=(10 + i,), size=400_000)
    proxy.throttle_bytes_per_s = 1_000_000
    jobs = [batchpush.PushJob(f"oci:{tmp_path}/layout{i}", (f"{proxy.host}/restart/app{i}",)) for i in range(4)]
    options = PushOptions(registries={proxy.host: RegistryOptions(insecure=True)}, metadata_dir=metadata_dir, max_concurrent_images=1)
    at_restart: list[int] = []
    refused: list[Seen] = []
    done = threading.Event()

    def until(condition, timeout_s: float = 60) -> bool:  # type: ignore[no-untyped-def]
        deadline = time.monotonic() + timeout_s
        while not condition() and not done.is_set() and time.monotonic() < deadline:
            time.sleep(0.02)
        return bool(condition())

    def while_down() -> None:
        until(lambda: proxy.requests(path="/v2/restart/") and proxy.requests(path="/v2/restart/")[-1].action == "upstream down")
        refused.extend(seen for seen in proxy.requests(path="/v2/restart/") if seen.action == "upstream down")

    def restart() -> None:
        if until(lambda: proxy.live_body_bytes >= 600_000):
            at_restart.append(proxy.live_body_bytes)
            registry.restart(while_down=while_down)

    thread = threading.Thread(target=restart)
    thread.start()
    try:
        with batchpush.Engine(options) as engine:
            result = engine.run(jobs)
    finally:
        done.set()
        thread.join(60)
    assert result.ok, [i.error for i in result.images]
    assert at_restart and at_restart[0] < 4 * 400_000  # the registry went down mid-batch
    assert refused, "a request of the batch found the registry down"
    for i in range(4):
        pull_and_verify(registry, f"restart/app{i}:1.0", str(tmp_path / f"pulled{i}"))


def test_sigint_mid_upload_then_rerun(registry, proxy, tmp_path, metadata_dir):
    diff_ids = big_layout(str(tmp_path / "layout"), seeds=(20, 21), size=16 << 20)  # more than the socket buffers hold
    proxy.throttle_bytes_per_s = 2_000_000
    report = tmp_path / "report.json"
    args = [sys.executable, "-m", "batchpush", "push", f"oci:{tmp_path}/layout", f"{proxy.host}/faults/sigint", "--insecure", proxy.host, "--metadata-dir", metadata_dir, "--report", str(report), "--jobs", "1"]
    code, err = signal_mid_upload(args, proxy, 1_000_000, signal.SIGINT)
    assert code == 130, err
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
        # the upload takes 8 s or more and a token lives at most 3 s at the registry
        assert len(issuer.tokens) >= 3  # refreshed during the upload
        assert len(proxy.requests("POST", "/v2/tok/app/blobs/uploads/")) == 2  # no restart: the layer's and the config's
        # refreshed ahead of expiry, a token still meets a 401 now and then: the JWT's
        # exp is whole seconds, so at the registry it lives 2 to 3 s, and the client
        # refreshes 0.75 s before 3 s. Each such 401 costs one re-sent chunk, no more.
        assert_401s_cost_one_resend_each(proxy, registry, result)
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
        assert len(proxy.requests("POST", "/v2/tok/early/blobs/uploads/")) == 2  # the blob was not restarted
        # two or three 401s, as the expiries fall (a fixed two-chunk bound failed once)
        assert assert_401s_cost_one_resend_each(proxy, registry, result) >= 1
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


def test_a_registry_that_always_answers_416_is_given_up_on(registry, proxy, tmp_path, metadata_dir):
    """A 416 is answered once per attempt by asking where the upload is; a second 416
    in the same attempt ends it, so the PATCHes are bounded by max_attempts."""
    big_layout(str(tmp_path / "layout"))
    proxy.add(Rule("PATCH", "/blobs/uploads/", "status", status=416, times=-1))
    attempts = 3
    result = push(f"oci:{tmp_path}/layout", f"{proxy.host}/faults/always416", proxy, metadata_dir, chunked=True, max_attempts=attempts)
    assert not result.ok and result.exit_code == 1
    assert result.images[0].status == "failed" and "HTTP 416" in (result.images[0].error or "")
    patches = proxy.requests("PATCH")
    # per attempt: one PATCH, the status GET its 416 earns, one more PATCH whose 416 ends the attempt
    assert 0 < len(patches) <= 2 * attempts, len(patches)
    assert registry.count("PUT", "/manifests/") == 0


def test_a_chunk_size_of_zero_still_moves_the_upload_on(registry, proxy, tmp_path, metadata_dir):
    """distribution answers an empty PATCH with 202: chunks of 0 bytes would be sent
    for ever. A chunk size below 1 means the default."""
    diff_ids = big_layout(str(tmp_path / "layout"), size=50_000)
    options = RegistryOptions(insecure=True, monolithic_limit_bytes=1024, chunk_size_bytes=0)
    result = batchpush.push(f"oci:{tmp_path}/layout", [f"{proxy.host}/faults/zero"], PushOptions(registries={proxy.host: options}, metadata_dir=metadata_dir, jobs=1))
    assert result.ok, result.images[0].error
    assert len(proxy.requests("PATCH")) == 1  # the layer in one default-sized chunk (the config is below the limit)
    assert pull_and_verify(registry, "faults/zero:1.0", str(tmp_path / "pulled"))[0].diff_ids == diff_ids


def test_an_upload_said_to_hold_more_than_the_blob_starts_a_new_session(registry, proxy, tmp_path, metadata_dir):
    """The status GET after a 416 reports a Range past the blob's end: the session holds
    bytes that are not ours, so a new one carries the blob (never a negative-length PUT)."""
    diff_ids = big_layout(str(tmp_path / "layout"))
    proxy.add(Rule("PATCH", "/blobs/uploads/", "status", status=416, skip=2))
    proxy.add(Rule("GET", "/blobs/uploads/", "headers", headers={"Range": "0-99999999"}))
    result = push(f"oci:{tmp_path}/layout", f"{proxy.host}/faults/past", proxy, metadata_dir, chunked=True)
    assert result.ok, result.images[0].error
    assert [s.action for s in proxy.requests("GET", "/blobs/uploads/")] == ["headers"]
    assert len(proxy.requests("POST", "/v2/faults/past/blobs/uploads/")) == 3  # the layer's twice, the config's
    assert pull_and_verify(registry, "faults/past:1.0", str(tmp_path / "pulled"))[0].diff_ids == diff_ids


@pytest.mark.parametrize("content_length", [None, "abc", "-1", "\u00b2"], ids=["missing", "not-a-number", "negative", "superscript-two"])
def test_a_blob_head_without_a_valid_size_is_not_believed(registry, proxy, tmp_path, metadata_dir, content_length):
    """A 200 to a blob HEAD must carry the blob's size: without one it is a malformed
    answer (the existence check fails, the layer is mounted or uploaded instead), never
    a size of -1 in the manifest nor an exception of the wrong kind."""
    diff_ids = big_layout(str(tmp_path / "layout"), size=600_000)
    assert push(f"oci:{tmp_path}/layout", f"{proxy.host}/faults/first", proxy, metadata_dir, chunked=False).ok  # the store learns the layer
    headers = {} if content_length is None else {"Content-Length": content_length}
    proxy.add(Rule("HEAD", "/blobs/", "status", status=200, headers=headers, raw_headers=True, times=-1))
    result = push(f"oci:{tmp_path}/layout", f"{proxy.host}/faults/second", proxy, metadata_dir, chunked=False)
    assert result.ok, result.images[0].error
    assert [s for s in proxy.requests("HEAD", "/v2/faults/second/blobs/") if s.action == "status 200"], "the existence check met the malformed answer"
    assert all(layer.size > 0 for image in result.images for layer in image.layers)
    assert pull_and_verify(registry, "faults/second:1.0", str(tmp_path / "pulled"))[0].diff_ids == diff_ids  # sizes checked too


@pytest.mark.parametrize("headers", [{"Docker-Content-Digest": "sha256:not-hex", "Content-Length": "10"}, {"Docker-Content-Digest": "sha256:" + "0" * 64}, {"Docker-Content-Digest": "sha256:" + "0" * 64, "Content-Length": "x"}], ids=["bad-digest", "no-size", "bad-size"])
def test_a_manifest_head_that_does_not_parse_is_retried(registry, proxy, tmp_path, metadata_dir, headers):
    """A 200 to the tag HEAD whose digest or size does not parse is a malformed answer:
    retried (it is temporary), then the real answer finds the image up to date."""
    big_layout(str(tmp_path / "layout"), size=100_000)
    assert push(f"oci:{tmp_path}/layout", f"{proxy.host}/faults/tagged", proxy, metadata_dir, chunked=False).ok
    proxy.add(Rule("HEAD", "/manifests/", "status", status=200, headers=headers, raw_headers=True))
    result = push(f"oci:{tmp_path}/layout", f"{proxy.host}/faults/tagged", proxy, metadata_dir, chunked=False)
    assert result.ok, result.images[0].error
    assert result.images[0].status == "up-to-date"
    assert [s.action for s in proxy.requests("HEAD", "/manifests/")][-2:] == ["status 200", "forward"]


def test_a_manifest_head_that_never_parses_falls_back_to_a_full_push(registry, proxy, tmp_path, metadata_dir):
    """A tag HEAD whose digest never parses is a RegistryError (malformed, retried up to
    max_attempts), never an InvalidDigestError: the shortcut is given up and the push
    goes on in full."""
    diff_ids = big_layout(str(tmp_path / "layout"), size=100_000)
    assert push(f"oci:{tmp_path}/layout", f"{proxy.host}/faults/garbled", proxy, metadata_dir, chunked=False).ok
    proxy.add(Rule("HEAD", "/manifests/", "status", status=200, headers={"Docker-Content-Digest": "md5:abc", "Content-Length": "10"}, raw_headers=True, times=-1))
    result = push(f"oci:{tmp_path}/layout", f"{proxy.host}/faults/garbled", proxy, metadata_dir, chunked=False, max_attempts=2)
    assert result.ok, result.images[0].error
    assert result.images[0].status == "pushed"
    assert [s.action for s in proxy.requests("HEAD", "/manifests/")] == ["status 200"] * 2  # one per attempt (a cold push sends none)
    assert pull_and_verify(registry, "faults/garbled:1.0", str(tmp_path / "pulled"))[0].diff_ids == diff_ids


def test_numbers_in_upload_headers_that_do_not_parse_are_ignored(registry, proxy, tmp_path, metadata_dir):
    """``"\u00b2".isdigit()`` is true but ``int()`` refuses it: an OCI-Chunk-Min-Length or a
    Range that does not parse is read as absent, never raised as a ValueError."""
    diff_ids = big_layout(str(tmp_path / "layout"))
    proxy.add(Rule("POST", "/blobs/uploads/", "headers", headers={"OCI-Chunk-Min-Length": "\u00b2"}, times=-1))
    proxy.add(Rule("PATCH", "/blobs/uploads/", "headers", headers={"Range": "0-\u00b2"}, times=-1))
    result = push(f"oci:{tmp_path}/layout", f"{proxy.host}/faults/digits", proxy, metadata_dir, chunked=True)
    assert result.ok, result.images[0].error
    assert [s for s in proxy.requests("PATCH") if s.action == "headers"], "the chunked path met the garbled Range"
    assert pull_and_verify(registry, "faults/digits:1.0", str(tmp_path / "pulled"))[0].diff_ids == diff_ids


def test_an_upload_location_that_is_not_a_url_is_a_registry_error(registry, proxy, tmp_path, metadata_dir):
    """urllib.parse raises ValueError on ``http://[::1/``: the answer is malformed (a
    RegistryError, retried), and the URL is not quoted."""
    diff_ids = big_layout(str(tmp_path / "layout"), size=100_000)
    proxy.add(Rule("POST", "/blobs/uploads/", "headers", headers={"Location": "http://[::1/upload?_state=secret-state"}))
    result = push(f"oci:{tmp_path}/layout", f"{proxy.host}/faults/location", proxy, metadata_dir, chunked=False)
    assert result.ok, result.images[0].error
    posts = proxy.requests("POST", "/v2/faults/location/blobs/uploads/")
    # the garbled answer, then the same layer's retry (the config's POST may come in between)
    assert [s.action for s in posts].count("headers") == 1 and len(posts) >= 3
    assert pull_and_verify(registry, "faults/location:1.0", str(tmp_path / "pulled"))[0].diff_ids == diff_ids


@pytest.mark.parametrize(
    ("status", "headers", "body"),
    [(503, {}, b'{"errors": 5}'), (503, {}, b"[" * 60_000), (503, {}, b"\xff\xfe not utf-8"), (429, {"Retry-After": "\u00b2"}, b"")],
    ids=["errors-not-a-list", "nested-too-deep", "not-utf8", "retry-after-superscript"],
)
def test_error_answers_that_do_not_parse_are_still_their_status(registry, proxy, tmp_path, metadata_dir, status, headers, body):
    """An error body or a Retry-After that does not parse adds nothing to the error,
    and raises nothing else: the status decides (here: retried)."""
    diff_ids = big_layout(str(tmp_path / "layout"), size=100_000)
    proxy.add(Rule("PUT", "/manifests/", "status", status=status, headers=headers, body=body))
    result = push(f"oci:{tmp_path}/layout", f"{proxy.host}/faults/garbage", proxy, metadata_dir, chunked=False)
    assert result.ok, result.images[0].error
    assert [s.status for s in proxy.requests("PUT", "/manifests/")] == [status, 201]
    assert pull_and_verify(registry, "faults/garbage:1.0", str(tmp_path / "pulled"))[0].diff_ids == diff_ids


def test_an_error_body_cut_short_is_still_the_registry_error(registry, proxy, tmp_path, metadata_dir):
    """The connection closes before a 503's body is all there: the transport raises
    while we read it. The answer is still a RegistryError for the 503, retried like
    any other."""
    diff_ids = big_layout(str(tmp_path / "layout"), size=100_000)
    body = b'{"errors":[{"code":"UNAVAILABLE"'
    proxy.add(Rule("PUT", "/manifests/", "status", status=503, headers={"Content-Type": "application/json", "Content-Length": "4096"}, body=body, raw_headers=True, close=True))
    result = push(f"oci:{tmp_path}/layout", f"{proxy.host}/faults/cut", proxy, metadata_dir, chunked=False)
    assert result.ok, result.images[0].error
    assert [s.action for s in proxy.requests("PUT", "/manifests/")] == ["status 503", "forward"]
    assert pull_and_verify(registry, "faults/cut:1.0", str(tmp_path / "pulled"))[0].diff_ids == diff_ids


def test_a_token_body_cut_short_is_a_registry_error_and_retried(tmp_path, metadata_dir):
    """The token endpoint's answer ends early (our proxy in front of the issuer): the
    read raises in the transport; it becomes a temporary RegistryError, and the next
    attempt fetches a token again."""
    from registry import start_registry
    from token_issuer import TokenIssuer

    issuer = TokenIssuer(str(tmp_path), {"alice": "alice-secret-pw"})
    token_proxy = FaultProxy(issuer.host)
    registry = start_registry(str(tmp_path), issuer.registry_config(realm=f"http://{token_proxy.host}/token"))
    proxy = FaultProxy(registry.host)
    try:
        diff_ids = big_layout(str(tmp_path / "layout"), size=100_000)
        token_proxy.add(Rule("GET", "/token", "status", status=200, headers={"Content-Type": "application/json", "Content-Length": "4096"}, body=b'{"token": "eyJ', raw_headers=True, close=True))
        options = PushOptions(registries={proxy.host: RegistryOptions(insecure=True)}, metadata_dir=metadata_dir, credentials=lambda host: Credentials("alice", "alice-secret-pw"), jobs=1)
        result = batchpush.push(f"oci:{tmp_path}/layout", [f"{proxy.host}/tok/cut"], options)
        assert result.ok, result.images[0].error
        assert [s.action for s in token_proxy.requests("GET", "/token")][:2] == ["status 200", "forward"]
        assert pull_and_verify(registry, "tok/cut:1.0", str(tmp_path / "pulled"))[0].diff_ids == diff_ids
    finally:
        proxy.stop()
        token_proxy.stop()
        registry.stop()
        issuer.stop()


def test_a_token_http_cannot_carry_fails_cleanly_and_is_never_quoted(tmp_path, metadata_dir):
    """An issuer hands out a token holding a newline: the transport refuses the header
    with a ValueError. The push fails that image (exit 1, not retried),
    and the token is in no message."""
    from registry import start_registry
    from token_issuer import TokenIssuer

    issuer = TokenIssuer(str(tmp_path), {"alice": "alice-secret-pw"})
    token_proxy = FaultProxy(issuer.host)
    registry = start_registry(str(tmp_path), issuer.registry_config(realm=f"http://{token_proxy.host}/token"))
    proxy = FaultProxy(registry.host)
    secret = "tok-secret-part"
    try:
        big_layout(str(tmp_path / "layout"), size=100_000)
        token_proxy.add(Rule("GET", "/token", "status", status=200, body=json.dumps({"token": f"{secret}\nInjected: yes", "expires_in": 300}).encode(), times=-1))
        options = PushOptions(registries={proxy.host: RegistryOptions(insecure=True, max_attempts=3)}, metadata_dir=metadata_dir, credentials=lambda host: Credentials("alice", "alice-secret-pw"), jobs=1)
        result = batchpush.push(f"oci:{tmp_path}/layout", [f"{proxy.host}/tok/newline"], options)
        assert result.exit_code == 1 and result.images[0].status == "failed"
        error = result.images[0].error or ""
        assert "not valid HTTP" in error and secret not in error
        assert len(token_proxy.requests("GET", "/token")) == 1  # not retried: no attempt can send it
        assert not proxy.requests("POST")  # nothing carried it to the registry
    finally:
        proxy.stop()
        token_proxy.stop()
        registry.stop()
        issuer.stop()


def test_connections_are_kept_for_the_next_request(registry, proxy, tmp_path, metadata_dir):
    """Every response is finished so its connection goes back to the pool: a batch of
    many small images opens a handful of connections, not one per request."""
    writer = LayoutWriter(str(tmp_path / "many"))
    for i in range(24):
        descriptor, _ = writer.image([random_layer(100 + i, 4096)])
        writer.tag(descriptor, f"t{i}")
    result = push(f"oci:{tmp_path / 'many'}", f"{proxy.host}/conn/many", proxy, metadata_dir, chunked=False, max_requests_in_flight=8)
    assert result.ok
    sent = len(proxy.requests())
    assert sent >= 24 * 5  # config and layer (POST+PUT each), and the manifest, per image
    # at most one per thread that may talk to the registry at once (8 layer threads,
    # one per request slot, and the image threads), and the https probe
    assert proxy.connections <= 8 + DEFAULT_MAX_CONCURRENT_IMAGES + 1, (proxy.connections, sent)
