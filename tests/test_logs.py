"""``--log-format json``: a real push through our fault proxy to the real registry
in token mode, with a retry and a failed image; every stderr line is one JSON object
and none carries a secret, a token or a query string."""

from __future__ import annotations

import base64
import json
import logging
import os
import signal
import subprocess
import sys

import pytest
from conftest import assert_no_secret, remote_digest
from fault_proxy import FaultProxy, Rule, signal_mid_upload
from images import LayoutWriter, random_layer, simple_layout
from registry import start_registry
from token_issuer import TokenIssuer

from batchpush.logs import JsonFormatter


def test_json_log_of_a_push_with_a_retry_and_a_failure(tmp_path):
    issuer = TokenIssuer(str(tmp_path), {"alice": "alice-secret-pw"})
    registry = start_registry(str(tmp_path), issuer.registry_config())
    proxy = FaultProxy(registry.host)
    try:
        simple_layout(str(tmp_path / "layout"), {"1.0": [11, 12]})
        proxy.add(Rule("PUT", "/v2/tok/app/blobs/uploads/", "status", status=503, body=b'{"errors":[{"code":"UNAVAILABLE","message":"injected"}]}'))
        proxy.add(Rule(None, "/v2/tok/broken/", "status", status=500, times=-1))
        config_dir = tmp_path / "docker-config"
        config_dir.mkdir()
        (config_dir / "config.json").write_text(json.dumps({"auths": {proxy.host: {"username": "alice", "password": "alice-secret-pw"}}}))
        args = ["push", f"oci:{tmp_path}/layout", f"{proxy.host}/tok/app", f"{proxy.host}/tok/broken", "--insecure", proxy.host, "--max-attempts", "2"]
        args += ["--log-format", "json", "--debug", "--metadata-dir", str(tmp_path / "md")]
        done = subprocess.run([sys.executable, "-m", "batchpush", *args], capture_output=True, text=True, env={**os.environ, "DOCKER_CONFIG": str(config_dir)}, timeout=300)
        assert done.returncode == 1, done.stderr[-3000:]
        events = [json.loads(line) for line in done.stderr.splitlines()]  # every line: one JSON object
        assert all({"time", "level", "event", "message"} <= event.keys() for event in events)
        by_kind: dict[str, list[dict]] = {}
        for event in events:
            by_kind.setdefault(event["event"], []).append(event)
        app, broken = f"{proxy.host}/tok/app:1.0", f"{proxy.host}/tok/broken:1.0"

        (started,) = [e for e in by_kind["image-started"] if e["target"] == app]
        assert started["repository"] == f"{proxy.host}/tok/app"
        layers = [e for e in by_kind["layer"] if e["target"] == app]
        assert len(layers) == 2 and all(e["outcome"] == "uploaded" and e["bytes_sent"] == e["size"] > 0 for e in layers)
        (retry,) = [e for e in by_kind["retry"] if "HTTP 503" in e["reason"]]  # the broken repository's 500s are retried too
        assert retry["attempt"] == 2 and retry["what"].startswith("layer sha256:") and "/v2/tok/app/blobs/uploads/" in retry["reason"]
        (failure,) = by_kind["failure"]
        assert failure["target"] == broken and failure["kind"] == "registry" and "HTTP 500" in failure["reason"] and "\n" not in failure["reason"]
        finished = {e["target"]: e for e in by_kind["image-finished"]}
        assert finished.keys() == {app, broken}
        assert finished[app]["status"] == "pushed" and finished[app]["digest"] == remote_digest(registry, "tok/app:1.0")
        assert finished[app]["bytes_sent"] == sum(e["size"] for e in layers) and finished[app]["seconds"] >= 0
        assert finished[broken]["status"] == "failed"
        assert by_kind["log"], "the debug log was on, as JSON too"
        (summary,) = by_kind["summary"]  # the summary line's figures, as fields
        assert summary["images"] == 2 and summary["pushed"] == 1 and summary["failed"] == 1 and summary["up_to_date"] == 0
        assert summary["bytes_sent"] >= finished[app]["bytes_sent"] and summary["requests"] > 0 and summary["message"].startswith("summary: 2 images")

        # no human line anywhere: stdout carries nothing (a log shipper reads both streams)
        assert done.stdout == ""
        assert issuer.tokens, "no token was issued"
        secrets = ["alice-secret-pw", base64.b64encode(b"alice:alice-secret-pw").decode(), *issuer.tokens]
        assert_no_secret(secrets, done.stdout, done.stderr)
        for query in ("_state=", "scope=", "account=", "digest=sha256"):
            assert query not in done.stderr, query
    finally:
        proxy.stop()
        registry.stop()
        issuer.stop()


def json_lines(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines()]  # every line: one JSON object


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["push", "oci:/nonexistent", "--log-format", "json"], "the following arguments are required: TARGET"),  # argparse's own
        (["push", "--log-format=json", "--bogus", "oci:/x", "h/r"], "unrecognized arguments: --bogus"),
        (["push", "oci:/x", "127.0.0.1:5000/r", "--log-format", "json", "--max-attempts", "0"], "--max-attempts must be at least 1"),
        (["run", "/nonexistent/plan.yaml", "--log-format", "json"], "/nonexistent/plan.yaml"),
    ],
)
def test_json_usage_errors(tmp_path, args, says):
    done = subprocess.run([sys.executable, "-m", "batchpush", *args, *(["--metadata-dir", str(tmp_path / "md")] if "--bogus" not in args else [])], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert done.stdout == ""
    (line,) = json_lines(done.stderr)
    assert line["event"] == "usage-error" and line["level"] == "error" and says in line["message"]


def test_text_usage_error_is_argparses():
    done = subprocess.run([sys.executable, "-m", "batchpush", "push", "oci:/x"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert done.stderr.startswith("usage: batchpush push ") and done.stderr.endswith("batchpush push: error: the following arguments are required: TARGET\n")


def test_json_log_of_an_up_to_date_rerun_and_a_quiet_one(registry, tmp_path):
    """A run where all is well: image events and the summary; with -q, nothing at all."""
    simple_layout(str(tmp_path / "layout"), {"1.0": [13]})
    args = [sys.executable, "-m", "batchpush", "push", f"oci:{tmp_path}/layout", f"{registry.host}/j/app", "--insecure", registry.host, "--metadata-dir", str(tmp_path / "md"), "--log-format", "json"]
    first = subprocess.run(args, capture_output=True, text=True, timeout=120)
    assert first.returncode == 0 and first.stdout == ""
    again = subprocess.run(args, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0 and again.stdout == ""
    events = json_lines(again.stderr)
    assert [e["event"] for e in events] == ["image-started", "image-finished", "summary"]
    assert events[1]["status"] == "up-to-date" and events[2]["up_to_date"] == 1
    quiet = subprocess.run([*args, "-q"], capture_output=True, text=True, timeout=120)
    assert quiet.returncode == 0 and quiet.stdout == quiet.stderr == ""


def test_json_formatter_redacts_every_string_and_stays_json():
    """The redaction of ``--debug`` on each value (message, fields, exception), and
    a quote inside a redacted value does not break the line."""
    try:
        raise ValueError("GET https://auth.example/token?scope=SECRET")
    except ValueError:
        exc_info = sys.exc_info()
    record = logging.LogRecord("batchpush.x", logging.INFO, __file__, 1, 'PUT /v2/a/blobs/uploads/u?_state=SECRET" Bearer SECRET', None, exc_info)
    record.event = "retry"
    record.fields = {"reason": "http://h/x?digest=SECRET", "attempt": 2}
    line = json.loads(JsonFormatter().format(record))
    assert "SECRET" not in json.dumps(line)
    assert line["event"] == "retry" and line["attempt"] == 2 and line["level"] == "info" and line["time"].endswith("Z")


def test_json_log_of_a_run_stopped_by_a_signal(registry, tmp_path):
    """SIGTERM mid-upload with --log-format json: the failure, the summary and the
    line that says the run was stopped are JSON objects like the rest."""
    writer = LayoutWriter(str(tmp_path / "layout"))
    descriptor, _ = writer.image([random_layer(35, 8 << 20)])  # more than the socket buffers hold
    writer.tag(descriptor, "1.0")
    proxy = FaultProxy(registry.host)
    proxy.throttle_bytes_per_s = 1_000_000
    try:
        args = [sys.executable, "-m", "batchpush", "push", f"oci:{tmp_path}/layout", f"{proxy.host}/j/stopped", "--insecure", proxy.host, "--metadata-dir", str(tmp_path / "md"), "--jobs", "1", "--log-format", "json"]
        code, err = signal_mid_upload(args, proxy, 500_000, signal.SIGTERM)
    finally:
        proxy.stop()
    assert code == 143, err
    events = json_lines(err)
    kinds = [e["event"] for e in events]
    assert "failure" in kinds and "summary" in kinds
    (stopped,) = [e for e in events if e["event"] == "interrupted"]
    assert stopped["level"] == "error" and stopped["message"].startswith("stopped by signal 15")
