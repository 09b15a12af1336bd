"""Auth: token realm failures retried like any request, docker's config.json keys and
helpers, identity tokens exchanged by the OAuth2 refresh-token grant.

Realm faults come from our FaultProxy in front of our token issuer (the registry's
token realm points at the proxy); pushes go to the real registry and skopeo reads
them back.
"""

from __future__ import annotations

import base64
import json
import os
import stat
import sys
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from conftest import REGISTRY_BINARY, _require, assert_no_secret, pull_and_verify
from fault_proxy import FaultProxy, Rule
from images import simple_layout
from registry import Registry, start_registry
from token_issuer import TokenIssuer

from batchpush.reference import DOCKER_HUB_API
from batchpush.registry.auth import Credentials
from batchpush.registry.client import RegistryClient, RegistryOptions
from batchpush.registry.credentials import DOCKER_HUB_KEY, CredentialsError, DockerConfigCredentials
from batchpush.registry.errors import AuthError, RegistryError

ALICE = ("alice", "alice-secret-pw")
#: the identity token a login would have stored for alice
IDENTITY_TOKEN = "idtok-alice-2b7e151628aed2a6abf7158809cf4f3c"


@dataclass
class RealmSetup:
    registry: Registry
    issuer: TokenIssuer
    #: in front of the issuer: the registry's challenges name it as the realm
    realm_proxy: FaultProxy

    def token_requests(self, method: str | None = None) -> int:
        return len(self.realm_proxy.requests(method, "/token"))


def _realm_setup(tmp_path, **issuer_options) -> Iterator[RealmSetup]:
    _require(REGISTRY_BINARY, "docker-registry")
    issuer = TokenIssuer(str(tmp_path), {ALICE[0]: ALICE[1]}, **issuer_options)
    realm_proxy = FaultProxy(issuer.host)
    registry: Registry | None = None
    try:
        registry = start_registry(str(tmp_path), issuer.registry_config(realm=f"http://{realm_proxy.host}/token"))
        yield RealmSetup(registry, issuer, realm_proxy)
    finally:
        if registry is not None:
            registry.stop()
        realm_proxy.stop()
        issuer.stop()


@pytest.fixture
def realm(tmp_path) -> Iterator[RealmSetup]:
    """The real registry in token mode; its realm is a FaultProxy before our issuer (user alice)."""
    yield from _realm_setup(tmp_path)


@pytest.fixture
def refresh_realm(tmp_path) -> Iterator[RealmSetup]:
    """As ``realm``, the issuer accepting only the refresh-token grant of IDENTITY_TOKEN
    (alice's), rotating the refresh token at every grant."""
    yield from _realm_setup(tmp_path, refresh_tokens={IDENTITY_TOKEN: "alice"}, rotate_refresh_tokens=True)


def docker_config(tmp_path, monkeypatch, document: dict) -> str:
    """``document`` as config.json of a fresh DOCKER_CONFIG; returns the file's path."""
    directory = tmp_path / "docker-config"
    directory.mkdir(exist_ok=True)
    (directory / "config.json").write_text(json.dumps(document))
    monkeypatch.setenv("DOCKER_CONFIG", str(directory))
    return str(directory / "config.json")


def alice_config(tmp_path, monkeypatch, host: str, password: str = ALICE[1]) -> str:
    return docker_config(tmp_path, monkeypatch, {"auths": {host: {"auth": base64.b64encode(f"{ALICE[0]}:{password}".encode()).decode()}}})


# -- A. token realm failures ---------------------------------------------------------


def test_realm_reset_once_is_retried(realm, tmp_path, monkeypatch, batchpush):
    host = realm.registry.host
    built = simple_layout(str(tmp_path / "layout"), {"1.0": [1, 2]})
    alice_config(tmp_path, monkeypatch, host)
    realm.realm_proxy.add(Rule("GET", "^/token", "reset_buffered", times=1))
    run = batchpush("push", f"oci:{tmp_path}/layout", f"{host}/realm/reset", "--insecure", host)
    assert run.code == 0, run.err
    assert realm.token_requests("GET") >= 2  # the reset one, then the retry's
    assert pull_and_verify(realm.registry, "realm/reset:1.0", str(tmp_path / "pulled"))[0].diff_ids == built["1.0"].diff_ids


def test_realm_503_twice_is_retried(realm, tmp_path, monkeypatch, batchpush):
    host = realm.registry.host
    built = simple_layout(str(tmp_path / "layout"), {"1.0": [3]})
    alice_config(tmp_path, monkeypatch, host)
    realm.realm_proxy.add(Rule("GET", "^/token", "status", status=503, times=2))
    run = batchpush("push", f"oci:{tmp_path}/layout", f"{host}/realm/busy", "--insecure", host)
    assert run.code == 0, run.err
    assert realm.token_requests("GET") >= 3
    assert pull_and_verify(realm.registry, "realm/busy:1.0", str(tmp_path / "pulled"))[0].diff_ids == built["1.0"].diff_ids


def test_realm_503_forever_fails_with_one_clear_line(realm, tmp_path, monkeypatch, batchpush):
    host = realm.registry.host
    simple_layout(str(tmp_path / "layout"), {"1.0": [4]})
    alice_config(tmp_path, monkeypatch, host)
    realm.realm_proxy.add(Rule("GET", "^/token", "status", status=503, times=-1))
    run = batchpush("push", f"oci:{tmp_path}/layout", f"{host}/realm/down", "--insecure", host, "--max-attempts", "3")
    assert run.code == 1
    errors = [line for line in run.err.splitlines() if "error" in line.lower()]
    assert len(errors) == 1, run.err
    assert f"GET http://{realm.realm_proxy.host}/token: HTTP 503: token request failed" in errors[0]
    assert "scope" not in run.err and "service=" not in run.err and "?" not in errors[0]
    assert_no_secret([ALICE[1]], run.out, run.err)
    # bounded: every step gave up after its 3 attempts (a step is a layer's path, a manifest PUT, ...)
    assert 3 <= realm.token_requests("GET") <= 3 * 4
    assert realm.registry.count("PUT") == 0


def test_realm_refusing_the_password_is_not_retried(realm, tmp_path, monkeypatch, batchpush):
    host = realm.registry.host
    simple_layout(str(tmp_path / "layout"), {"1.0": [5]})
    alice_config(tmp_path, monkeypatch, host, password="wrong-password-123")
    run = batchpush("push", f"oci:{tmp_path}/layout", f"{host}/realm/refused", "--insecure", host, "--max-attempts", "5")
    assert run.code == 1
    assert "HTTP 401: the token service refused the credentials" in run.err
    assert_no_secret(["wrong-password-123"], run.out, run.err)
    # a retried step alone would have asked 5 times
    assert 1 <= realm.token_requests("GET") < 5


def _learned_client(realm: RealmSetup, credentials: Credentials | None) -> RegistryClient:
    """A client that has met the registry's bearer challenge (ping) and holds no token yet."""
    client = RegistryClient(realm.registry.host, RegistryOptions(insecure=True), credentials)
    client.ping()
    return client


def test_realm_failures_raise_temporary_errors_refusals_permanent_ones(realm):
    """What the retry policy sees, fault by fault, from one token fetch."""
    scopes = ("repository:realm/unit:pull,push",)
    realm.realm_proxy.add(Rule("GET", "^/token", "reset_buffered", times=1))
    realm.realm_proxy.add(Rule("GET", "^/token", "status", status=429, headers={"Retry-After": "7"}, times=1))
    realm.realm_proxy.add(Rule("GET", "^/token", "status", status=502, times=1))
    client = _learned_client(realm, Credentials(*ALICE))
    try:
        failures = []
        for _ in range(3):
            with pytest.raises(RegistryError) as caught:
                client.auth.authorization(scopes)
            failures.append(caught.value)
        assert client.auth.authorization(scopes).startswith("Bearer ")  # the realm is back
    finally:
        client.close()
    reset, limited, bad_gateway = failures
    assert [type(e) for e in failures] == [RegistryError] * 3
    assert all(e.temporary for e in failures)
    assert (reset.status, limited.status, bad_gateway.status) == (None, 429, 502)
    assert limited.retry_after_s == 7
    for error in failures:
        assert str(error).startswith(f"GET http://{realm.realm_proxy.host}/token: ")
        assert "scope" not in str(error) and "service" not in str(error) and ALICE[1] not in str(error)

    refused = _learned_client(realm, Credentials(ALICE[0], "wrong-password-123"))
    try:
        with pytest.raises(AuthError) as caught:
            refused.auth.authorization(scopes)
    finally:
        refused.close()
    assert caught.value.status == 401 and not caught.value.temporary


# -- B. docker's config.json keys and credential helpers --------------------------------


def fake_helper(tmp_path, monkeypatch, answers: dict[str, tuple[str, str]], name: str = "fake"):
    """``docker-credential-NAME`` on PATH: it answers ``answers[server]`` (Username,
    Secret), else docker-credential-helpers' "not found"; every server it is asked
    for is appended to the returned log file, one a line."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    log = tmp_path / f"helper-{name}.log"
    script = bin_dir / f"docker-credential-{name}"
    script.write_text(
        f"""#!{sys.executable}
import json, sys
answers = {json.dumps(answers)!r}
if sys.argv[1:] != ["get"]:
    sys.exit(2)
server = sys.stdin.read()
with open({str(log)!r}, "a") as log:
    log.write(server + "\\n")
answer = json.loads(answers).get(server)
if answer is None:
    print("credentials not found in native keychain")
    sys.exit(1)
print(json.dumps({{"ServerURL": server, "Username": answer[0], "Secret": answer[1]}}))
"""
    )
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    log.write_text("")
    return log


def asked(log) -> list[str]:
    return log.read_text().splitlines()


def basic_entry(username: str, password: str) -> dict[str, str]:
    return {"auth": base64.b64encode(f"{username}:{password}".encode()).decode()}


def test_docker_hub_cred_helper_is_named_and_asked_by_dockers_key(tmp_path, monkeypatch):
    log = fake_helper(tmp_path, monkeypatch, {DOCKER_HUB_KEY: ("hubuser", "hub-secret")})
    path = docker_config(tmp_path, monkeypatch, {"credHelpers": {DOCKER_HUB_KEY: "fake"}})
    found = DockerConfigCredentials(path)(DOCKER_HUB_API)
    assert found == Credentials("hubuser", "hub-secret")
    assert asked(log) == [DOCKER_HUB_KEY]


def test_docker_hub_creds_store_is_asked_by_dockers_key(tmp_path, monkeypatch):
    log = fake_helper(tmp_path, monkeypatch, {DOCKER_HUB_KEY: ("hubuser", "hub-secret")})
    path = docker_config(tmp_path, monkeypatch, {"credsStore": "fake"})
    assert DockerConfigCredentials(path)(DOCKER_HUB_API) == Credentials("hubuser", "hub-secret")
    assert asked(log) == [DOCKER_HUB_KEY]


def test_docker_hub_auths_entry_under_dockers_key(tmp_path, monkeypatch):
    path = docker_config(tmp_path, monkeypatch, {"auths": {DOCKER_HUB_KEY: basic_entry("hubuser", "hub-secret")}})
    found = DockerConfigCredentials(path)(DOCKER_HUB_API)
    assert found is not None and (found.username, found.password) == ("hubuser", "hub-secret")


def test_other_registry_helper_is_asked_for_host_and_port(tmp_path, monkeypatch):
    log = fake_helper(tmp_path, monkeypatch, {"registry.example:5000": ("user", "helper-secret")})
    path = docker_config(tmp_path, monkeypatch, {"credHelpers": {"registry.example:5000": "fake"}})
    assert DockerConfigCredentials(path)("registry.example:5000") == Credentials("user", "helper-secret")
    assert asked(log) == ["registry.example:5000"]


@pytest.mark.parametrize(
    ("key", "matches"),
    [
        ("registry.example:5000", True),
        ("https://registry.example:5000", True),
        ("http://registry.example:5000/v2/", True),
        ("https://registry.example:5000/v1/", True),
        ("registry.example:5000/v2/", True),
        ("registry.example", False),
        ("https://registry.example/", False),
        ("other.example:5000", False),
    ],
)
def test_auths_keys_name_a_host_as_docker_converts_them(tmp_path, monkeypatch, key, matches):
    path = docker_config(tmp_path, monkeypatch, {"auths": {key: basic_entry("user", "pw-value")}})
    found = DockerConfigCredentials(path)("registry.example:5000")
    assert (found is not None) == matches


def test_auths_exact_key_wins_over_a_url_of_the_same_host(tmp_path, monkeypatch):
    path = docker_config(tmp_path, monkeypatch, {"auths": {"https://registry.example:5000": basic_entry("url-user", "a"), "registry.example:5000": basic_entry("key-user", "b")}})
    found = DockerConfigCredentials(path)("registry.example:5000")
    assert found is not None and found.username == "key-user"


def test_creds_store_comes_before_auths_and_falls_back_to_them(tmp_path, monkeypatch):
    """docker's native store: the helper's answer if it has one, else the file's entry."""
    log = fake_helper(tmp_path, monkeypatch, {"with-helper:5000": ("helper-user", "helper-secret")})
    auths = {"with-helper:5000": basic_entry("file-user", "x"), "file-only:5000": basic_entry("file-user", "y")}
    path = docker_config(tmp_path, monkeypatch, {"credsStore": "fake", "auths": auths})
    provider = DockerConfigCredentials(path)
    assert provider("with-helper:5000") == Credentials("helper-user", "helper-secret")
    found = provider("file-only:5000")
    assert found is not None and found.username == "file-user"
    assert provider("anonymous:5000") is None
    assert asked(log)[0] == "with-helper:5000" and "file-only:5000" in asked(log)


def test_empty_cred_helper_means_config_json_only(tmp_path, monkeypatch):
    """docker: a host named in credHelpers with no helper skips the credsStore."""
    log = fake_helper(tmp_path, monkeypatch, {"registry.example:5000": ("helper-user", "helper-secret")})
    path = docker_config(tmp_path, monkeypatch, {"credsStore": "fake", "credHelpers": {"registry.example:5000": ""}, "auths": {"registry.example:5000": basic_entry("file-user", "z")}})
    found = DockerConfigCredentials(path)("registry.example:5000")
    assert found is not None and found.username == "file-user"
    assert asked(log) == []


def test_named_cred_helper_without_an_answer_is_an_error_unless_auths_has_one(tmp_path, monkeypatch):
    fake_helper(tmp_path, monkeypatch, {})
    path = docker_config(tmp_path, monkeypatch, {"credHelpers": {"a.example": "fake", "b.example": "fake"}, "auths": {"b.example": basic_entry("file-user", "w")}})
    provider = DockerConfigCredentials(path)
    with pytest.raises(CredentialsError, match=r"docker-credential-fake has no credentials for a\.example"):
        provider("a.example")
    found = provider("b.example")
    assert found is not None and found.username == "file-user"


def test_helper_answering_token_gives_an_identity_token(tmp_path, monkeypatch):
    fake_helper(tmp_path, monkeypatch, {DOCKER_HUB_KEY: ("<token>", IDENTITY_TOKEN)})
    path = docker_config(tmp_path, monkeypatch, {"credsStore": "fake"})
    found = DockerConfigCredentials(path)(DOCKER_HUB_API)
    assert found == Credentials(identity_token=IDENTITY_TOKEN)
    assert_no_secret([IDENTITY_TOKEN], repr(found))


# -- C. identity tokens: the OAuth2 refresh-token grant ---------------------------------


def _push_two_targets(setup: RealmSetup, tmp_path, batchpush, seeds: list[int]):
    host = setup.registry.host
    built = simple_layout(str(tmp_path / "layout"), {"1.0": seeds})
    report = tmp_path / "report.json"
    run = batchpush("push", f"oci:{tmp_path}/layout", f"{host}/idtok/one", f"{host}/idtok/two", "--insecure", host, "--debug", "--report", str(report))
    return built["1.0"], run, report


def _assert_pushed_by_refresh_grants(setup: RealmSetup, tmp_path, image, run, report) -> None:
    assert run.code == 0, run.err[-3000:]
    grants = [r for r in setup.issuer.requests if r["method"] == "POST"]
    # no GET reached the issuer (it would have granted pulls only), and every grant was
    # alice's: the issuer revokes a refresh token once used, so after the first grant
    # only the rotated ones it handed out could succeed
    assert setup.token_requests("GET") == 0
    assert len(grants) >= 2 and all(g["subject"] == "alice" for g in grants)
    assert len(setup.issuer.issued_refresh_tokens) == len(grants)
    assert {g["grant_type"] for g in grants} == {"refresh_token"} and {g["client_id"] for g in grants} == {"batchpush"}
    assert any("repository:idtok/one:pull,push" in g["scopes"] for g in grants)
    assert "DEBUG" in run.err  # the debug log was on, and is searched too
    assert_no_secret([IDENTITY_TOKEN, *setup.issuer.issued_refresh_tokens, *setup.issuer.tokens], run.out, run.err, report.read_text())
    for repository in ("idtok/one", "idtok/two"):  # anonymously (the identity token is spent)
        pulled = pull_and_verify(setup.registry, f"{repository}:1.0", str(tmp_path / repository.replace("/", "-")), ("--src-tls-verify=false", "--src-no-creds"))
        assert pulled[0].diff_ids == image.diff_ids


def test_identity_token_from_config_json_is_exchanged_by_refresh_grant(refresh_realm, tmp_path, monkeypatch, batchpush):
    docker_config(tmp_path, monkeypatch, {"auths": {refresh_realm.registry.host: {"identitytoken": IDENTITY_TOKEN}}})
    image, run, report = _push_two_targets(refresh_realm, tmp_path, batchpush, [21, 22])
    _assert_pushed_by_refresh_grants(refresh_realm, tmp_path, image, run, report)


def test_identity_token_from_a_helper_is_exchanged_by_refresh_grant(refresh_realm, tmp_path, monkeypatch, batchpush):
    host = refresh_realm.registry.host
    log = fake_helper(tmp_path, monkeypatch, {host: ("<token>", IDENTITY_TOKEN)})
    docker_config(tmp_path, monkeypatch, {"credHelpers": {host: "fake"}})
    image, run, report = _push_two_targets(refresh_realm, tmp_path, batchpush, [23])
    _assert_pushed_by_refresh_grants(refresh_realm, tmp_path, image, run, report)
    assert set(asked(log)) == {host}  # (the engine may ask once per image starting at once)


def test_refresh_only_issuer_refuses_a_password(refresh_realm, tmp_path, monkeypatch, batchpush):
    """The issuer's mode the identity-token tests rely on: a GET with basic credentials is refused."""
    host = refresh_realm.registry.host
    simple_layout(str(tmp_path / "layout"), {"1.0": [24]})
    alice_config(tmp_path, monkeypatch, host)
    run = batchpush("push", f"oci:{tmp_path}/layout", f"{host}/idtok/password", "--insecure", host)
    assert run.code == 1
    assert "HTTP 401" in run.err
    assert refresh_realm.issuer.requests and all(r["method"] == "GET" and r["basic"] for r in refresh_realm.issuer.requests)


def test_refused_identity_token_is_a_permanent_auth_error(refresh_realm, tmp_path, monkeypatch, batchpush):
    host = refresh_realm.registry.host
    simple_layout(str(tmp_path / "layout"), {"1.0": [25]})
    docker_config(tmp_path, monkeypatch, {"auths": {host: {"identitytoken": "idtok-revoked-0000"}}})
    run = batchpush("push", f"oci:{tmp_path}/layout", f"{host}/idtok/revoked", "--insecure", host, "--max-attempts", "5")
    assert run.code == 1
    assert f"POST http://{refresh_realm.realm_proxy.host}/token: HTTP 400: the token service refused the identity token" in run.err
    assert_no_secret(["idtok-revoked-0000"], run.out, run.err)
    assert 1 <= refresh_realm.token_requests("POST") < 5  # a retried step alone would have asked 5 times


def test_refresh_grant_failing_at_the_realm_is_retried(refresh_realm, tmp_path, monkeypatch, batchpush):
    host = refresh_realm.registry.host
    built = simple_layout(str(tmp_path / "layout"), {"1.0": [26]})
    docker_config(tmp_path, monkeypatch, {"auths": {host: {"identitytoken": IDENTITY_TOKEN}}})
    refresh_realm.realm_proxy.add(Rule("POST", "^/token", "status", status=503, times=1))
    run = batchpush("push", f"oci:{tmp_path}/layout", f"{host}/idtok/retried", "--insecure", host)
    assert run.code == 0, run.err
    assert refresh_realm.token_requests("POST") >= 2
    pulled = pull_and_verify(refresh_realm.registry, "idtok/retried:1.0", str(tmp_path / "pulled"), ("--src-tls-verify=false", "--src-no-creds"))
    assert pulled[0].diff_ids == built["1.0"].diff_ids
