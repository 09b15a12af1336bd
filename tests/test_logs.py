"""``--log-format json``: a real push through our fault proxy to the real registry
in token mode, with a retry and a failed image; every stderr line is one JSON object
and none carries a secret, a token or a query string."""

from __future__ import annotations

import base64
import json
import logging
import os
import subprocess
import sys

from conftest import assert_no_secret, remote_digest
from fault_proxy import FaultProxy, Rule
from images import simple_layout
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

        # the human lines are all on stdout, none on stderr
        assert f"error: {broken}:" in done.stdout and not any(line.startswith("{") for line in done.stdout.splitlines())
        assert issuer.tokens, "no token was issued"
        secrets = ["alice-secret-pw", base64.b64encode(b"alice:alice-secret-pw").decode(), *issuer.tokens]
        assert_no_secret(secrets, done.stdout, done.stderr)
        for query in ("_state=", "scope=", "account=", "digest=sha256"):
            assert query not in done.stderr, query
    finally:
        proxy.stop()
        registry.stop()
        issuer.stop()


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
