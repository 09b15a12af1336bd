"""The transport's way to a registry: through a site's forward proxy, and the scheme
an insecure registry answered on, remembered for the next run.

Forward proxies (``HTTP_PROXY``/``HTTPS_PROXY``/``NO_PROXY``, as docker, skopeo and
requests read them): our proxy (tests/forward_proxy.py) asks for credentials, which
the proxy URL carries; a plain-HTTP registry is reached with absolute-form requests,
a TLS one (the real registry with htpasswd over TLS) through a CONNECT tunnel; a host
``NO_PROXY`` names is reached directly. skopeo reads each image back directly.

Schemes: an ``--insecure`` host is pinged over https first and, if that fails, over
http (docker's order). The metadata store remembers the scheme it answered on, and
the next run's ping tries that one first: a plain-HTTP registry then gets no TLS
handshake that must fail on every cron run. A host remembered as plain HTTP that
speaks TLS now (the real registry over TLS) answers the plain request with an error,
and the ping goes on to https.
"""

from __future__ import annotations

import base64
import json
import os
import sqlite3
import subprocess
import sys
import time

import pytest
from conftest import pull_and_verify
from forward_proxy import ForwardProxy
from images import simple_layout

from batchpush.metadata import MetadataStore

PROXY_USER = "egress"
PROXY_PASSWORD = "pr0xy-Pa55:word"


@pytest.fixture
def forward_proxy():
    proxy = ForwardProxy(f"{PROXY_USER}:{PROXY_PASSWORD}")
    yield proxy
    proxy.stop()


def _proxy_url(proxy: ForwardProxy) -> str:
    # the password's ':' is quoted in the URL, as a user writes it
    return f"http://{PROXY_USER}:{PROXY_PASSWORD.replace(':', '%3A')}@127.0.0.1:{proxy.port}"


def run_cli(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    clean = {name: value for name, value in os.environ.items() if not name.lower().endswith("_proxy")}
    return subprocess.run([sys.executable, "-m", "batchpush", *args], capture_output=True, text=True, env={**clean, **env}, timeout=120)


def test_a_plain_http_registry_is_reached_through_the_proxy_in_absolute_form(registry, forward_proxy, tmp_path):
    built = simple_layout(str(tmp_path / "layout"), {"1.0": [1, 2]})
    env = {"HTTP_PROXY": _proxy_url(forward_proxy), "HTTPS_PROXY": _proxy_url(forward_proxy)}
    args = ["push", f"oci:{tmp_path}/layout:1.0", f"{registry.host}/proxied/app:1.0", "--insecure", registry.host, "--metadata-dir", str(tmp_path / "md")]
    done = run_cli(args, env)
    assert done.returncode == 0, done.stderr[-2000:]
    seen = forward_proxy.requests()
    plain = [s for s in seen if s.method != "CONNECT"]
    assert plain and all(s.target.startswith(f"http://{registry.host}/v2/") for s in plain)
    assert {s.credentials for s in seen} == {f"{PROXY_USER}:{PROXY_PASSWORD}"}
    assert pull_and_verify(registry, "proxied/app:1.0", str(tmp_path / "pulled"))[0].diff_ids == built["1.0"].diff_ids
    assert PROXY_PASSWORD not in done.stdout + done.stderr


def test_a_tls_registry_is_reached_through_a_connect_tunnel(tls_registry, forward_proxy, tmp_path):
    secure = tls_registry
    host = secure.registry.host
    built = simple_layout(str(tmp_path / "layout"), {"1.0": [3, 4]})
    config = tmp_path / "docker-config"
    config.mkdir()
    auth = base64.b64encode(f"{secure.username}:{secure.password}".encode()).decode()
    (config / "config.json").write_text(json.dumps({"auths": {host: {"auth": auth}}}))
    env = {"HTTPS_PROXY": _proxy_url(forward_proxy), "DOCKER_CONFIG": str(config)}
    done = run_cli(["push", f"oci:{tmp_path}/layout:1.0", f"{host}/tunnelled/app:1.0", "--ca-file", secure.ca_file, "--metadata-dir", str(tmp_path / "md")], env)
    assert done.returncode == 0, done.stderr[-2000:]
    seen = forward_proxy.requests()
    assert seen and {(s.method, s.target) for s in seen} == {("CONNECT", host)}
    assert {s.credentials for s in seen} == {f"{PROXY_USER}:{PROXY_PASSWORD}"}
    source = ("--src-cert-dir", secure.cert_dir, "--src-creds", f"{secure.username}:{secure.password}")
    assert pull_and_verify(secure.registry, "tunnelled/app:1.0", str(tmp_path / "pulled"), source)[0].diff_ids == built["1.0"].diff_ids


def test_no_proxy_names_a_host_reached_directly(registry, forward_proxy, tmp_path):
    simple_layout(str(tmp_path / "layout"), {"1.0": [5]})
    env = {"HTTP_PROXY": _proxy_url(forward_proxy), "HTTPS_PROXY": _proxy_url(forward_proxy), "NO_PROXY": "localhost,127.0.0.0/8"}
    done = run_cli(["push", f"oci:{tmp_path}/layout:1.0", f"{registry.host}/direct/app:1.0", "--insecure", registry.host, "--metadata-dir", str(tmp_path / "md")], env)
    assert done.returncode == 0, done.stderr[-2000:]
    assert forward_proxy.requests() == []


def test_a_proxy_refusing_the_credentials_fails_the_image_with_a_clear_line(registry, forward_proxy, tmp_path):
    simple_layout(str(tmp_path / "layout"), {"1.0": [6]})
    wrong = f"http://{PROXY_USER}:wrong@127.0.0.1:{forward_proxy.port}"
    done = run_cli(["push", f"oci:{tmp_path}/layout:1.0", f"{registry.host}/refused/app:1.0", "--insecure", registry.host, "--metadata-dir", str(tmp_path / "md"), "--max-attempts", "1"], {"HTTP_PROXY": wrong, "HTTPS_PROXY": wrong})
    assert done.returncode == 1
    assert "407" in done.stdout + done.stderr and "wrong" not in done.stdout + done.stderr
    assert registry.count("PUT") == 0


def _remembered(metadata_dir: str, host: str) -> str | None:
    with sqlite3.connect(f"{metadata_dir}/metadata.db") as db:
        row = db.execute("SELECT scheme FROM schemes WHERE host = ?", (host,)).fetchone()
    return row[0] if row else None


def test_an_insecure_plain_http_registry_is_not_sent_tls_again_on_the_next_run(registry, tmp_path, batchpush, monkeypatch):
    """12 images pushed at once, the store slow to answer: none of them pings before
    the remembered scheme is set (the first version set it after the client was
    shared with the other images' threads: a race the demo saw)."""
    simple_layout(str(tmp_path / "layout"), {"1.0": [7], "2.0": [8], "3.0": [9]})
    metadata = str(tmp_path / "md")
    report = tmp_path / "report.json"
    targets = [f"{registry.host}/cron/app{n}" for n in range(4)]
    args = ["push", f"oci:{tmp_path}/layout", *targets, "--insecure", registry.host, "--metadata-dir", metadata, "--report", str(report)]
    first = batchpush(*args)
    assert first.code == 0, first.err[-2000:]
    assert json.loads(report.read_text())["totals"]["requests"]["GET"] == 2  # the https attempt, then the ping over http
    assert _remembered(metadata, registry.host) == "http"
    remembered = MetadataStore.get_scheme

    def slowly(store: MetadataStore, host: str) -> str | None:
        time.sleep(0.5)
        return remembered(store, host)

    monkeypatch.setattr(MetadataStore, "get_scheme", slowly)
    again = batchpush(*args)
    assert again.code == 0 and again.out.count("(up to date)") == 12
    # the re-run: the ping over http, and a manifest HEAD per image
    assert json.loads(report.read_text())["totals"]["requests"] == {"GET": 1, "HEAD": 12}


def test_a_host_remembered_as_plain_http_that_speaks_tls_now_is_reached_over_https(tls_registry, tmp_path):
    secure = tls_registry
    host = secure.registry.host
    metadata = str(tmp_path / "md")
    store = MetadataStore(metadata)
    store.put_scheme(host, "http")
    store.close()
    built = simple_layout(str(tmp_path / "layout"), {"1.0": [8]})
    config = tmp_path / "docker-config"
    config.mkdir()
    auth = base64.b64encode(f"{secure.username}:{secure.password}".encode()).decode()
    (config / "config.json").write_text(json.dumps({"auths": {host: {"auth": auth}}}))
    done = run_cli(["push", f"oci:{tmp_path}/layout:1.0", f"{host}/upgraded/app:1.0", "--insecure", host, "--metadata-dir", metadata], {"DOCKER_CONFIG": str(config)})
    assert done.returncode == 0, done.stderr[-2000:]
    assert _remembered(metadata, host) == "https"
    source = ("--src-cert-dir", secure.cert_dir, "--src-creds", f"{secure.username}:{secure.password}")
    assert pull_and_verify(secure.registry, "upgraded/app:1.0", str(tmp_path / "pulled"), source)[0].diff_ids == built["1.0"].diff_ids


def test_a_proxy_refusing_the_tunnel_fails_the_image_at_once(tls_registry, forward_proxy, tmp_path):
    """A CONNECT answered 407 (credentials the proxy does not take): no retry can
    change that; the image fails with the proxy's answer in one line."""
    host = tls_registry.registry.host
    simple_layout(str(tmp_path / "layout"), {"1.0": [9]})
    wrong = f"http://{PROXY_USER}:wrong@127.0.0.1:{forward_proxy.port}"
    done = run_cli(["push", f"oci:{tmp_path}/layout:1.0", f"{host}/refused/app:1.0", "--ca-file", tls_registry.ca_file, "--metadata-dir", str(tmp_path / "md")], {"HTTPS_PROXY": wrong})
    assert done.returncode == 1
    assert "proxy: the proxy refused the tunnel (HTTP 407)" in done.stdout + done.stderr and "wrong" not in done.stdout + done.stderr
    # not retried (5 attempts by default): one ping for the image's up-to-date check,
    # one for its push
    assert len(forward_proxy.requests()) <= 2
