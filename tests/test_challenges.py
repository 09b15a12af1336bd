"""401 challenges answered whenever they come, not only at the ping.

Some registries answer ``GET /v2/`` with 200 (anonymous reads allowed: Nexus and
caching proxies configured so) and challenge only when a repository is written.
Here our fault proxy answers the ping 200 in front of the real registry, which
challenges every other request: token auth (our issuer) or htpasswd (Basic).
skopeo reads back what arrived.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator

import pytest
import requests
from conftest import REGISTRY_BINARY, _require, assert_no_secret, pull_and_verify
from fault_proxy import FaultProxy, Rule
from images import OCI_MANIFEST, layer_tar, simple_layout
from registry import Registry, start_registry
from test_mirror_faults import fill, image_layout
from tls import make_htpasswd

from batchpush.registry.auth import Authenticator, Credentials, scope_for
from batchpush.registry.client import RegistryClient, RegistryOptions
from batchpush.registry.errors import RegistryError
from batchpush.registry.transport import new_session

PUSHER = ("pusher", "s3cret-Pa55word-xyz")
ALICE = ("alice", "alice-secret-pw")
HTPASSWD_REALM = "batchpush-test"
#: another loopback address: another host for the client
OTHER_LOOPBACK = "127.0.0.2"


def open_ping(upstream: str) -> FaultProxy:
    """A proxy before ``upstream`` that answers the ping 200 itself, without a challenge."""
    front = FaultProxy(upstream)
    front.add(Rule("GET", "^/v2/$", "status", status=200, body=b"{}", times=-1))
    return front


def docker_config(tmp_path, monkeypatch, host: str, user: tuple[str, str]) -> None:
    directory = tmp_path / "docker-config"
    directory.mkdir(exist_ok=True)
    auth = base64.b64encode(f"{user[0]}:{user[1]}".encode()).decode()
    (directory / "config.json").write_text(json.dumps({"auths": {host: {"auth": auth}}}))
    monkeypatch.setenv("DOCKER_CONFIG", str(directory))


@pytest.fixture
def htpasswd_registry(tmp_path) -> Iterator[Registry]:
    """The real registry with htpasswd (Basic) auth, plain HTTP (our proxy speaks to it)."""
    _require(REGISTRY_BINARY, "docker-registry")
    path = make_htpasswd(str(tmp_path / "htpasswd"), {PUSHER[0]: PUSHER[1]})
    started = start_registry(str(tmp_path), {"auth": {"htpasswd": {"realm": HTPASSWD_REALM, "path": path}}})
    yield started
    started.stop()


def challenged_then_sent(front: FaultProxy) -> tuple[int, int]:
    """(401 answers to requests without credentials, requests that carried some)."""
    after_ping = [s for s in front.requests() if s.target != "/v2/"]
    return sum(s.status == 401 and "authorization" not in s.headers for s in after_ping), sum("authorization" in s.headers for s in after_ping)


def pushes_behind_the_open_ping(registry: Registry, front: FaultProxy, user: tuple[str, str], repository: str, seeds: list[int], tmp_path, monkeypatch, batchpush) -> None:
    """With ``user``'s credentials in docker's config.json, an image pushed through
    ``front`` arrives (skopeo reads it back with them), the writes having been
    challenged after an open ping, and nothing prints the password."""
    docker_config(tmp_path, monkeypatch, front.host, user)
    built = simple_layout(str(tmp_path / "layout"), {"1.0": seeds})
    run = batchpush("push", f"oci:{tmp_path}/layout", f"{front.host}/{repository}", "--insecure", front.host)
    assert run.code == 0, run.err
    assert front.requests()[0].status == 200  # the ping was open...
    challenged, _ = challenged_then_sent(front)
    assert challenged >= 1  # ...the writes were challenged
    pulled = pull_and_verify(registry, f"{repository}:1.0", str(tmp_path / "pulled"), ("--src-tls-verify=false", "--src-creds", ":".join(user)))
    assert pulled[0].diff_ids == built["1.0"].diff_ids
    assert_no_secret([user[1]], run.out, run.err)


def test_token_registry_challenging_only_writes(token_registry, tmp_path, monkeypatch, batchpush):
    registry, _ = token_registry
    front = open_ping(registry.host)
    try:
        pushes_behind_the_open_ping(registry, front, ALICE, "late/app", [1, 2, 3], tmp_path, monkeypatch, batchpush)
    finally:
        front.stop()


@pytest.mark.parametrize("scheme", ["Basic", "BASIC"])
def test_htpasswd_registry_challenging_only_writes(htpasswd_registry, tmp_path, monkeypatch, batchpush, scheme):
    front = open_ping(htpasswd_registry.host)
    if scheme != "Basic":  # the scheme's name is case-insensitive (RFC 9110 11.1)
        front.add(Rule(None, "^/v2/.", "headers", headers={"WWW-Authenticate": f'{scheme} realm="{HTPASSWD_REALM}"'}, times=-1))
    try:
        pushes_behind_the_open_ping(htpasswd_registry, front, PUSHER, "late/basic", [4, 5, 6], tmp_path, monkeypatch, batchpush)
    finally:
        front.stop()


def test_refused_credentials_are_sent_once_per_request(htpasswd_registry, tmp_path, monkeypatch, batchpush):
    """A 401 after the credentials went is final: the image fails, and each request
    carries the credentials once at most (as its one resend, or from the start when
    it was sent after the challenge was known), never a second time.

    The image's three blobs (two layers, the config) go up at once: each upload's
    first request is refused for good, so the push makes three such requests; how
    many of them went before the challenge was known depends on the timing."""
    front = open_ping(htpasswd_registry.host)
    try:
        docker_config(tmp_path, monkeypatch, front.host, (PUSHER[0], "not-the-password-7f3a"))
        simple_layout(str(tmp_path / "layout"), {"1.0": [7, 8]})
        run = batchpush("push", f"oci:{tmp_path}/layout", f"{front.host}/late/refused", "--insecure", front.host)
        assert run.code == 1, run.err
        assert "401" in run.err
        challenged, carried = challenged_then_sent(front)
        assert challenged >= 1
        assert all(s.status == 401 for s in front.requests() if "authorization" in s.headers)
        assert carried <= 3  # the three uploads' requests, each with the credentials once
        assert htpasswd_registry.count("PUT", "/manifests/") == 0
        assert_no_secret(["not-the-password-7f3a"], run.out, run.err)
    finally:
        front.stop()


def test_each_request_sent_before_the_challenge_was_known_earns_its_retry(token_registry):
    """Uploads sent at once, before any challenge is known, each get a 401: the second
    to arrive must be answered too, not taken for a refusal of credentials it never
    carried (it was: the first one's challenge made it "not new"). A request that
    carried the token just fetched earns one more (expired or too narrow); Basic
    credentials just refused earn none."""
    registry, issuer = token_registry
    front = open_ping(registry.host)
    client = RegistryClient(front.host, RegistryOptions(insecure=True), Credentials(*ALICE))
    try:
        client.ping()
        scopes = (scope_for("late/race", "pull,push"),)
        url = f"http://{front.host}/v2/late/race/blobs/uploads/"
        first, second = (requests.post(url, timeout=30) for _ in range(2))
        assert first.status_code == second.status_code == 401
        assert client.auth.challenge(first, scopes, None)
        assert client.auth.challenge(second, scopes, None)
        token = client.auth.authorization(scopes)
        assert token is not None and token.startswith("Bearer ")
        assert client.auth.challenge(requests.post(url, timeout=30), scopes, token)  # a fresh token is fetched for it
        assert client.auth.authorization(scopes) != token
    finally:
        client.close()
        front.stop()


def test_basic_credentials_refused_earn_no_retry(htpasswd_registry):
    """Basic: a request sent without credentials earns one retry with them; one that
    carried them, refused, earns none (they would be refused again)."""
    auth = Authenticator(htpasswd_registry.host, new_session("test", 1), Credentials(*PUSHER))
    scopes = (scope_for("late/basic", "pull,push"),)
    answer = requests.post(f"{htpasswd_registry.url}/v2/late/basic/blobs/uploads/", timeout=30)
    assert answer.status_code == 401
    assert auth.challenge(answer, scopes, None)
    assert auth.challenge(answer, scopes, None)  # another request sent before: it earns its retry too
    sent = auth.authorization(scopes)
    assert sent is not None and sent.startswith("Basic ")
    assert not auth.challenge(answer, scopes, sent)


def test_a_storage_hosts_challenge_is_not_the_registrys(token_registry, registry, tmp_path, monkeypatch, batchpush):
    """A source's blob GET is redirected to a storage host (our proxy on another
    loopback address) that answers 401 with a challenge naming a token realm of its
    own. That challenge is not the registry's: it is not learned, nothing goes to
    that realm (the registry's credentials would), and the image fails with one line."""
    source, issuer = token_registry
    front, storage, realm = FaultProxy(source.host), FaultProxy(source.host, bind=OTHER_LOOPBACK), FaultProxy(issuer.host, bind=OTHER_LOOPBACK)
    try:
        fill(source, image_layout(str(tmp_path / "app"), {"1.0": [layer_tar(51)]}), "1.0", "team/app", "--dest-tls-verify=false", "--dest-creds", ":".join(ALICE))
        front.add(Rule("GET", "/blobs/sha256:", "status", status=307, headers={"Location": f"http://{storage.host}{{target}}"}, times=-1))
        storage.add(Rule(None, "/blobs/", "status", status=401, headers={"WWW-Authenticate": f'Bearer realm="http://{realm.host}/token",service="storage"'}, times=-1))
        docker_config(tmp_path, monkeypatch, front.host, ALICE)
        hosts = (front.host, registry.host, realm.host)
        run = batchpush("push", f"docker://{front.host}/team/app:1.0", f"{registry.host}/mirror/app:1.0", *(f"--insecure={host}" for host in hosts), "--no-signatures")
        assert run.code == 1
        (line,) = [line for line in run.err.splitlines() if line.startswith("error: ")]
        assert "401" in line and storage.host in line
        assert storage.requests() and all("authorization" not in s.headers for s in storage.requests())
        assert realm.requests() == []
        assert_no_secret([ALICE[1], *issuer.tokens], run.out, run.err)
        # the registry's own challenge still rules: a request for scopes with no
        # token yet, after the storage host's 401, gets its token from the issuer
        client = RegistryClient(front.host, RegistryOptions(insecure=True), Credentials(*ALICE), marked_insecure=lambda host: host == realm.host)
        try:
            layer = next(s.target for s in storage.requests()).rsplit("/", 1)[1]
            with pytest.raises(RegistryError) as refused:
                client.request("GET", f"{client.base_url}/v2/team/app/blobs/{layer}", scopes=(scope_for("team/app", "pull"),), expected={200})
            assert refused.value.status == 401
            assert client.head_manifest("team/app", "1.0", OCI_MANIFEST) is not None  # scopes pull,push: a new token
        finally:
            client.close()
        assert realm.requests() == []
    finally:
        for proxy in (front, storage, realm):
            proxy.stop()
