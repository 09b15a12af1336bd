"""Prometheus metrics of real runs: the textfile read back with prometheus-client's
parser, and a push to the real Pushgateway (Debian's), read back from its /metrics."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import bcrypt
import pytest
import requests
import yaml
from conftest import _require, pull_and_verify, remote_digest
from fault_proxy import FaultProxy, Rule, signal_mid_upload
from images import LayoutWriter, random_layer, simple_layout
from prometheus_client.parser import text_string_to_metric_families
from registry import free_port

PUSHGATEWAY = "/usr/bin/prometheus-pushgateway"


def value(text: str, name: str, **labels: str) -> float | None:
    """The one sample ``name`` whose labels include ``labels``; None: there is none."""
    found = [s.value for f in text_string_to_metric_families(text) for s in f.samples if s.name == name and labels.items() <= s.labels.items()]
    assert len(found) <= 1, f"{name}{labels}: {found}"
    return found[0] if found else None


def start_pushgateway(workdir: str, web_config: dict | None = None) -> tuple[str, subprocess.Popen[bytes]]:
    _require(PUSHGATEWAY, "prometheus-pushgateway")
    port = free_port()
    args = [PUSHGATEWAY, f"--web.listen-address=127.0.0.1:{port}", "--persistence.file=", "--log.level=warn"]
    auth = None
    if web_config is not None:
        config = os.path.join(workdir, "pushgateway-web.yml")
        with open(config, "w") as out:
            yaml.safe_dump(web_config, out)
        args.append(f"--web.config.file={config}")
        auth = ("ops", "gw-secret-pw")
    log = open(os.path.join(workdir, f"pushgateway-{port}.log"), "wb")
    process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 15
    while True:
        assert process.poll() is None, open(log.name).read()[-2000:]
        try:
            if requests.get(f"{url}/-/ready", timeout=1, auth=auth).status_code == 200:
                return url, process
        except requests.RequestException:
            pass
        if time.monotonic() > deadline:
            process.kill()
            pytest.fail("the pushgateway did not answer in 15 s")
        time.sleep(0.05)


def stop(process: subprocess.Popen[bytes]) -> None:
    process.terminate()
    try:
        process.wait(10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


@pytest.fixture
def pushgateway(tmp_path):
    url, process = start_pushgateway(str(tmp_path))
    yield url
    stop(process)


@pytest.fixture
def proxy(registry):
    started = FaultProxy(registry.host)
    yield started
    started.stop()


def test_metrics_file_of_a_batch_with_a_failed_image(registry, proxy, tmp_path, batchpush):
    simple_layout(str(tmp_path / "layout"), {"1.0": [1, 2], "2.0": [1, 3]})
    proxy.add(Rule(None, "/v2/broken/", "status", status=500, times=-1))
    (tmp_path / "textfile").mkdir()
    prom = tmp_path / "textfile" / "batchpush.prom"
    report = tmp_path / "report.json"
    targets = [f"{proxy.host}/broken/app", f"{proxy.host}/works/app", f"{proxy.host}/works/copy"]
    before = time.time()
    run = batchpush("push", f"oci:{tmp_path}/layout", *targets, "--insecure", proxy.host, "--max-attempts", "2", "--metrics-file", str(prom), "--metrics-label", "site=lab", "--report", str(report))
    after = time.time()
    assert run.code == 1
    assert os.listdir(prom.parent) == ["batchpush.prom"]  # the temporary file was renamed over it
    text = prom.read_text()
    totals = json.loads(report.read_text())["totals"]
    assert value(text, "batchpush_images", status="failed", site="lab") == 2
    assert value(text, "batchpush_images", status="pushed", site="lab") == 4
    assert value(text, "batchpush_images", status="up-to-date", site="lab") == 0
    assert value(text, "batchpush_last_run_success") == 0
    assert value(text, "batchpush_last_success_timestamp_seconds") is None  # no run has succeeded yet
    start, end = value(text, "batchpush_last_run_start_timestamp_seconds"), value(text, "batchpush_last_run_end_timestamp_seconds")
    assert start is not None and end is not None and before <= start <= end <= after
    assert value(text, "batchpush_last_run_duration_seconds") is not None
    assert value(text, "batchpush_read_bytes") == totals["bytes_read"] > 0
    assert value(text, "batchpush_compressed_bytes") == totals["bytes_compressed"] > 0
    assert value(text, "batchpush_sent_bytes") == totals["bytes_uploaded"] > 0
    assert value(text, "batchpush_blobs_mounted") == totals["blobs_mounted"] > 0  # works/copy mounts from works/app
    # every request the proxy saw was ours, and every 500 it answered is an error
    answered_500 = [seen for seen in proxy.requests() if seen.status == 500]
    assert value(text, "batchpush_request_errors", registry=proxy.host) == len(answered_500) >= 2
    assert value(text, "batchpush_requests", registry=proxy.host) >= len(proxy.requests()) == sum(totals["requests"].values()) - 1  # and the https probe
    assert remote_digest(registry, "works/copy:2.0")
    pull_and_verify(registry, "works/app:1.0", str(tmp_path / "pulled"))

    # the nightly run again, without the broken target: a success, timed
    run = batchpush("push", f"oci:{tmp_path}/layout", *targets[1:], "--insecure", proxy.host, "--metrics-file", str(prom), "--metrics-label", "site=lab")
    assert run.code == 0
    text = prom.read_text()
    success = value(text, "batchpush_last_success_timestamp_seconds", site="lab")
    assert success == value(text, "batchpush_last_run_end_timestamp_seconds")
    assert value(text, "batchpush_images", status="up-to-date") == 4
    assert value(text, "batchpush_last_run_success") == 1
    assert value(text, "batchpush_request_errors", registry=proxy.host) == 0

    # a failed run keeps the last success time in the file it replaces
    run = batchpush("push", f"oci:{tmp_path}/layout", *targets, "--insecure", proxy.host, "--max-attempts", "1", "--metrics-file", str(prom), "--metrics-label", "site=lab")
    assert run.code == 1
    text = prom.read_text()
    assert value(text, "batchpush_last_success_timestamp_seconds") == success
    assert value(text, "batchpush_images", status="failed") == 2
    assert value(text, "batchpush_last_run_success") == 0


def test_pushgateway_gets_the_job_the_grouping_labels_and_keeps_the_last_success(registry, pushgateway, tmp_path, batchpush):
    simple_layout(str(tmp_path / "layout"), {"1.0": [4, 5]})
    plan = tmp_path / "plan.yaml"
    plan.write_text(yaml.safe_dump({"version": 1, "registries": {registry.host: {"insecure": True}}, "images": [{"source": f"oci:{tmp_path}/layout", "targets": [f"{registry.host}/gw/app"]}]}))
    flags = ["--pushgateway", pushgateway, "--metrics-job", "nightly-mirror", "--metrics-label", "site=lab", "--metrics-label", "plan=p1", "--metadata-dir", str(tmp_path / "md")]
    run = batchpush("run", str(plan), *flags)
    assert run.code == 0, run.err
    assert run.err == ""
    text = requests.get(f"{pushgateway}/metrics", timeout=10).text
    group = {"job": "nightly-mirror", "site": "lab", "plan": "p1"}
    assert value(text, "batchpush_images", status="pushed", **group) == 1
    assert value(text, "batchpush_images", status="failed", **group) == 0
    assert value(text, "batchpush_last_run_success", **group) == 1
    success = value(text, "batchpush_last_success_timestamp_seconds", **group)
    assert success == value(text, "batchpush_last_run_end_timestamp_seconds", **group)
    ours = [line for line in registry.access_log() if '"batchpush/' in line]
    assert value(text, "batchpush_requests", registry=registry.host, **group) == len(ours) + 1  # and the https probe, refused unlogged
    assert value(text, "push_failure_time_seconds", **group) == 0  # the gateway accepted every push

    # a failed run (the registry is gone) replaces the run's metrics, not the last success time
    registry.stop()
    plan.write_text(yaml.safe_dump({"version": 1, "registries": {registry.host: {"insecure": True, "max_attempts": 1}}, "images": [{"source": f"oci:{tmp_path}/layout", "targets": [f"{registry.host}/gw/other"]}]}))
    run = batchpush("run", str(plan), *flags)
    assert run.code == 1
    text = requests.get(f"{pushgateway}/metrics", timeout=10).text
    assert value(text, "batchpush_images", status="failed", **group) == 1
    assert value(text, "batchpush_images", status="pushed", **group) == 0
    assert value(text, "batchpush_last_run_success", **group) == 0
    assert value(text, "batchpush_request_errors", registry=registry.host, **group) >= 1  # each step found the host down
    assert value(text, "batchpush_last_success_timestamp_seconds", **group) == success


def test_pushgateway_with_basic_auth_from_the_url(registry, tmp_path, batchpush):
    """Userinfo in --pushgateway is sent as basic auth, and printed nowhere."""
    hashed = bcrypt.hashpw(b"gw-secret-pw", bcrypt.gensalt(rounds=4)).decode()
    url, process = start_pushgateway(str(tmp_path), {"basic_auth_users": {"ops": hashed}})
    try:
        simple_layout(str(tmp_path / "layout"), {"1.0": [6]})
        with_userinfo = url.replace("http://", "http://ops:gw-secret-pw@")
        run = batchpush("push", f"oci:{tmp_path}/layout", f"{registry.host}/gw/auth", "--insecure", registry.host, "--pushgateway", with_userinfo, "--debug")
        assert run.code == 0 and "metrics not pushed" not in run.err, run.err
        assert "gw-secret-pw" not in run.out + run.err
        # without the userinfo the gateway refuses: one warning, the exit code unchanged
        run = batchpush("push", f"oci:{tmp_path}/layout", f"{registry.host}/gw/auth", "--insecure", registry.host, "--pushgateway", url)
        assert run.code == 0
        assert [line for line in run.err.splitlines() if line] == [f"WARNING batchpush.metrics: metrics not pushed to {url}: HTTP Error 401: Unauthorized"]
        text = requests.get(f"{url}/metrics", timeout=10, auth=("ops", "gw-secret-pw")).text
        assert value(text, "batchpush_images", job="batchpush", status="pushed") == 1  # the first run's
    finally:
        stop(process)


@pytest.mark.parametrize(("gateway", "password"), [("refusing", "gw-secret-pw"), ("silent", "gw-secret-pw"), ("refusing", "gw#se/cr?et")])
def test_a_pushgateway_that_is_down_only_warns(registry, tmp_path, batchpush, gateway, password):
    """Nothing listening (refused at once), or a listener that never answers (the
    push's timeout ends it): the run's result and exit code are its own, the metrics
    file is still written, and the warning shows the URL without its userinfo."""
    simple_layout(str(tmp_path / "layout"), {"1.0": [7]})
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        if gateway == "silent":
            listener.listen(8)  # connections complete in the backlog, nobody answers
        port = listener.getsockname()[1]
        # a password with / ? #, not percent-encoded, must not end the host part early
        url = f"http://ops:{password}@127.0.0.1:{port}/"
        prom = tmp_path / "batchpush.prom"
        run = batchpush("push", f"oci:{tmp_path}/layout", f"{registry.host}/gw/down", "--insecure", registry.host, "--pushgateway", url, "--metrics-file", str(prom))
    assert run.code == 0
    warnings = [line for line in run.err.splitlines() if line]
    assert len(warnings) == 1 and warnings[0].startswith(f"WARNING batchpush.metrics: metrics not pushed to http://127.0.0.1:{port}/: "), warnings
    assert password not in run.out + run.err and "ops:" not in run.err and "gw#" not in run.err
    assert value(prom.read_text(), "batchpush_images", status="pushed") == 1


def test_bad_metrics_label_is_a_usage_error(batchpush, tmp_path):
    for bad in ("novalue", "job=x", "__name__=x", "1abc=x"):
        run = batchpush("push", f"oci:{tmp_path}/layout", "127.0.0.1:1/x/y", "--metrics-label", bad)
        assert run.code == 2
        assert "--metrics-label" in run.err


def test_a_run_stopped_by_a_signal_publishes_a_failure(registry, proxy, tmp_path):
    writer = LayoutWriter(str(tmp_path / "layout"))
    descriptor, _ = writer.image([random_layer(30, 8 << 20)])  # more than the socket buffers hold
    writer.tag(descriptor, "1.0")
    proxy.throttle_bytes_per_s = 1_000_000
    prom = tmp_path / "batchpush.prom"
    args = [sys.executable, "-m", "batchpush", "push", f"oci:{tmp_path}/layout", f"{proxy.host}/gw/stopped", "--insecure", proxy.host, "--metadata-dir", str(tmp_path / "md"), "--metrics-file", str(prom), "--jobs", "1"]
    code, err = signal_mid_upload(args, proxy, 500_000, signal.SIGTERM)
    assert code == 143, err
    text = prom.read_text()
    assert value(text, "batchpush_last_run_success") == 0
    assert value(text, "batchpush_images", status="failed") == 1
    assert value(text, "batchpush_last_success_timestamp_seconds") is None
