"""Credentials, TLS and secrets against the real registry (htpasswd over TLS, tokens)."""

from __future__ import annotations

import base64
import json
import os
import stat
import subprocess
import sys

import pytest
from conftest import assert_no_secret, pull_and_verify
from images import simple_layout

import batchpush.registry.client as client_module
from batchpush.registry.auth import Credentials
from batchpush.registry.client import RegistryClient, RegistryOptions
from batchpush.registry.errors import AuthError


def docker_config(tmp_path, document: dict) -> str:
    directory = tmp_path / "docker-config"
    directory.mkdir(exist_ok=True)
    (directory / "config.json").write_text(json.dumps(document))
    return str(directory)


def run_cli(args: list[str], env_extra: dict[str, str], stdin: str = "") -> subprocess.CompletedProcess[str]:
    env = {**os.environ, **env_extra}
    return subprocess.run([sys.executable, "-m", "batchpush", *args], input=stdin, capture_output=True, text=True, env=env, timeout=300)


def secure_source_args(secure) -> tuple[str, ...]:
    return ("--src-cert-dir", secure.cert_dir, "--src-creds", f"{secure.username}:{secure.password}")


def test_basic_auth_over_tls_from_docker_config(tls_registry, tmp_path):
    secure = tls_registry
    host = secure.registry.host
    built = simple_layout(str(tmp_path / "layout"), {"1.0": [1, 2]})
    auth = base64.b64encode(f"{secure.username}:{secure.password}".encode()).decode()
    config_dir = docker_config(tmp_path, {"auths": {f"https://{host}": {"auth": auth}}})
    report = tmp_path / "report.json"
    done = run_cli(["push", f"oci:{tmp_path}/layout", f"{host}/secure/app", "--ca-file", secure.ca_file, "--debug", "--report", str(report), "--metadata-dir", str(tmp_path / "md")], {"DOCKER_CONFIG": config_dir})
    assert done.returncode == 0, done.stderr[-2000:]
    assert pull_and_verify(secure.registry, "secure/app:1.0", str(tmp_path / "pulled"), secure_source_args(secure))[0].diff_ids == built["1.0"].diff_ids
    assert "_state=" not in done.stderr + done.stdout + report.read_text()
    assert_no_secret([secure.password, auth], done.stdout, done.stderr, report.read_text())
    store_bytes = (tmp_path / "md" / "metadata.db").read_bytes()
    assert secure.password.encode() not in store_bytes and auth.encode() not in store_bytes


def test_tls_is_verified_by_default(tls_registry, tmp_path, batchpush):
    host = tls_registry.registry.host
    simple_layout(str(tmp_path / "layout"), {"1.0": [1]})
    run = batchpush("push", f"oci:{tmp_path}/layout", f"{host}/secure/app")
    assert run.code == 1
    assert "TLS verification failed" in run.err
    assert tls_registry.registry.count("PUT") == 0


def test_certs_d_adds_trust(tls_registry, tmp_path, monkeypatch):
    secure = tls_registry
    certs_d = tmp_path / "certs.d"
    (certs_d / secure.registry.host).mkdir(parents=True)
    (certs_d / secure.registry.host / "ca.crt").write_bytes(open(secure.ca_file, "rb").read())
    monkeypatch.setattr(client_module, "CERTS_DIRS", (str(certs_d),))
    client = RegistryClient(secure.registry.host, RegistryOptions(), Credentials(secure.username, secure.password))
    try:
        client.ping()
        assert client.base_url.startswith("https://")
    finally:
        client.close()


def test_password_stdin(tls_registry, tmp_path):
    secure = tls_registry
    simple_layout(str(tmp_path / "layout"), {"1.0": [3]})
    done = run_cli(["push", f"oci:{tmp_path}/layout", f"{secure.registry.host}/stdin/app", "--ca-file", secure.ca_file, "--username", secure.username, "--password-stdin", "--debug", "--metadata-dir", str(tmp_path / "md")], {"DOCKER_CONFIG": str(tmp_path / "none")}, stdin=secure.password + "\n")
    assert done.returncode == 0, done.stderr[-2000:]
    assert_no_secret([secure.password], done.stdout, done.stderr)
    pull_and_verify(secure.registry, "stdin/app:1.0", str(tmp_path / "pulled"), secure_source_args(secure))


def test_wrong_password_fails_without_retry_storm(tls_registry, tmp_path):
    secure = tls_registry
    simple_layout(str(tmp_path / "layout"), {"1.0": [4], "2.0": [5]})
    config_dir = docker_config(tmp_path, {"auths": {secure.registry.host: {"username": secure.username, "password": "wrong-password-123"}}})
    done = run_cli(["push", f"oci:{tmp_path}/layout", f"{secure.registry.host}/wrong/app", "--ca-file", secure.ca_file, "--metadata-dir", str(tmp_path / "md")], {"DOCKER_CONFIG": config_dir})
    assert done.returncode == 1
    assert "HTTP 401" in done.stderr
    assert_no_secret(["wrong-password-123"], done.stdout, done.stderr)
    assert secure.registry.count("PUT") == 0
    # each image tried its requests once and a resend after the challenge: no storm
    assert secure.registry.count("HEAD") + secure.registry.count("POST") + secure.registry.count("GET") <= 20


def test_missing_credential_helper_is_an_error_not_anonymous(tls_registry, tmp_path):
    secure = tls_registry
    simple_layout(str(tmp_path / "layout"), {"1.0": [6]})
    config_dir = docker_config(tmp_path, {"credHelpers": {secure.registry.host: "batchpush-test-absent"}})
    done = run_cli(["push", f"oci:{tmp_path}/layout", f"{secure.registry.host}/helper/app", "--ca-file", secure.ca_file, "--metadata-dir", str(tmp_path / "md")], {"DOCKER_CONFIG": config_dir})
    assert done.returncode == 1
    assert "docker-credential-batchpush-test-absent" in done.stderr and "not installed" in done.stderr
    assert secure.registry.count("POST") == 0 and secure.registry.count("PUT") == 0


def test_credential_helper_is_run(tls_registry, tmp_path):
    secure = tls_registry
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    helper = bin_dir / "docker-credential-batchpushtest"
    helper.write_text(f"#!/bin/sh\nread server\nprintf '{{\"ServerURL\":\"%s\",\"Username\":\"{secure.username}\",\"Secret\":\"{secure.password}\"}}' \"$server\"\n")
    helper.chmod(helper.stat().st_mode | stat.S_IEXEC)
    simple_layout(str(tmp_path / "layout"), {"1.0": [7]})
    config_dir = docker_config(tmp_path, {"credsStore": "batchpushtest"})
    done = run_cli(["push", f"oci:{tmp_path}/layout", f"{secure.registry.host}/helper/app", "--ca-file", secure.ca_file, "--debug", "--metadata-dir", str(tmp_path / "md")], {"DOCKER_CONFIG": config_dir, "PATH": f"{bin_dir}:{os.environ['PATH']}"})
    assert done.returncode == 0, done.stderr[-2000:]
    assert_no_secret([secure.password], done.stdout, done.stderr)


def test_plan_credentials_from_env(tls_registry, tmp_path):
    secure = tls_registry
    simple_layout(str(tmp_path / "layout"), {"1.0": [8]})
    plan = tmp_path / "plan.yaml"
    plan.write_text(f"""version: 1
registries:
  "{secure.registry.host}":
    ca_file: {secure.ca_file}
    username: {secure.username}
    password_env: BATCHPUSH_TEST_PASSWORD
images:
  - source: oci:./layout
    targets: [{secure.registry.host}/plan/app]
""")
    done = run_cli(["run", str(plan), "--debug", "--metadata-dir", str(tmp_path / "md")], {"BATCHPUSH_TEST_PASSWORD": secure.password, "DOCKER_CONFIG": str(tmp_path / "none")})
    assert done.returncode == 0, done.stderr[-2000:]
    assert_no_secret([secure.password], done.stdout, done.stderr)
    pull_and_verify(secure.registry, "plan/app:1.0", str(tmp_path / "pulled"), secure_source_args(secure))


def test_token_auth_debug_output_has_no_secret(token_registry, tmp_path):
    registry, issuer = token_registry
    simple_layout(str(tmp_path / "layout"), {"1.0": [9, 10]})
    config_dir = docker_config(tmp_path, {"auths": {registry.host: {"username": "alice", "password": "alice-secret-pw"}}})
    report = tmp_path / "report.json"
    done = run_cli(["push", f"oci:{tmp_path}/layout", f"{registry.host}/tok/app", "--insecure", registry.host, "--debug", "--report", str(report), "--metadata-dir", str(tmp_path / "md")], {"DOCKER_CONFIG": config_dir})
    assert done.returncode == 0, done.stderr[-2000:]
    assert issuer.tokens, "no token was issued"
    secrets = ["alice-secret-pw", base64.b64encode(b"alice:alice-secret-pw").decode(), *issuer.tokens]
    assert_no_secret(secrets, done.stdout, done.stderr, report.read_text())
    assert "_state=" not in done.stderr
    assert "DEBUG" in done.stderr  # the debug log was on


def test_token_realm_must_be_https_unless_insecure():
    client = RegistryClient("registry.example:5000", RegistryOptions())
    with pytest.raises(AuthError, match="not https"):
        client._check_realm("http://auth.example/token")
    client._check_realm("https://auth.example/token")
    insecure = RegistryClient("127.0.0.1:5000", RegistryOptions(insecure=True))
    insecure._check_realm("http://127.0.0.1:6000/token")


def test_credentials_repr_hides_secrets():
    text = repr(Credentials("user", "pw-value", auth="YXV0aA==", identity_token="id-tok", registry_token="reg-tok"))
    assert_no_secret(["pw-value", "YXV0aA==", "id-tok", "reg-tok"], text)


def test_redirect_to_another_host_never_carries_authorization(token_registry, tmp_path):
    """A redirect of the manifest PUT to another host (our second proxy in front of
    the same registry): the request follows it without the Authorization header, so
    the token-protected registry refuses it and the push fails with a clear error."""
    from fault_proxy import FaultProxy, Rule

    registry, issuer = token_registry
    front = FaultProxy(registry.host)
    elsewhere = FaultProxy(registry.host)
    try:
        simple_layout(str(tmp_path / "layout"), {"1.0": [11]})
        front.add(Rule("PUT", "/manifests/", "status", status=307, headers={"Location": f"http://{elsewhere.host}{{target}}"}, times=-1))
        config_dir = docker_config(tmp_path, {"auths": {front.host: {"username": "alice", "password": "alice-secret-pw"}}})
        done = run_cli(["push", f"oci:{tmp_path}/layout", f"{front.host}/redir/app", "--insecure", front.host, "--metadata-dir", str(tmp_path / "md")], {"DOCKER_CONFIG": config_dir})
        assert done.returncode == 1
        assert "HTTP 401" in done.stderr
        assert front.requests("PUT", "/manifests/")[0].headers.get("authorization", "").startswith("Bearer ")
        redirected = elsewhere.requests("PUT", "/manifests/")
        assert redirected, "the redirect was not followed"
        assert all("authorization" not in seen.headers for seen in redirected)
        stored = [line for line in registry.access_log() if '"PUT /v2/redir/app/manifests/' in line and '" 201 ' in line]
        assert not stored  # the registry saw the redirected PUTs only without a token, and refused them
    finally:
        front.stop()
        elsewhere.stop()


def test_netrc_is_never_read(registry, tmp_path, metadata_dir, monkeypatch):
    """requests would add a ~/.netrc login to every request; ours never send one unasked."""
    from fault_proxy import FaultProxy

    proxy = FaultProxy(registry.host)
    try:
        netrc = tmp_path / "netrc"
        netrc.write_text("machine 127.0.0.1 login someone password netrc-secret-pw\n")
        netrc.chmod(0o600)
        monkeypatch.setenv("NETRC", str(netrc))
        simple_layout(str(tmp_path / "layout"), {"1.0": [1]})
        import batchpush
        from batchpush.engine import PushOptions

        result = batchpush.push(f"oci:{tmp_path / 'layout'}", [f"{proxy.host}/netrc/app"], PushOptions(registries={proxy.host: RegistryOptions(insecure=True)}, metadata_dir=metadata_dir))
        assert result.ok
        assert proxy.requests() and not any("authorization" in seen.headers for seen in proxy.requests())
    finally:
        proxy.stop()
