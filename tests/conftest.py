"""Fixtures: a real registry per test, skopeo as the independent checker."""

from __future__ import annotations

import contextlib
import faulthandler
import gzip
import hashlib
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

sys.path.insert(0, os.path.dirname(__file__))

from fault_proxy import FaultProxy
from registry import REGISTRY_BINARY, Registry, start_registry

from batchpush.cli import main

SKOPEO = shutil.which("skopeo") or "/usr/bin/skopeo"

#: how long the interpreter may take to end once the session is over; past it every
#: thread's stack goes to stderr and the run exits 1 (a hang at exit would otherwise
#: last until CI's own limit, saying nothing)
EXIT_DEADLINE_S = 120.0
#: how long a test's own non-daemon threads get to end after it (a pool shut down
#: without waiting lets its threads go within moments)
THREADS_GRACE_S = 5.0

def _non_daemon_threads() -> set[threading.Thread]:
    # non-daemon threads are what the interpreter's exit waits for
    return {t for t in threading.enumerate() if t is not threading.main_thread() and not t.daemon and t.is_alive()}


def _child_processes() -> set[tuple[int, str]]:
    import psutil

    found = set()
    for child in psutil.Process().children(recursive=True):
        with contextlib.suppress(psutil.Error):
            command = child.cmdline()
            # multiprocessing's forkserver and resource tracker live as long as we do
            # (not the workers the forkserver starts, which show its command line too)
            helper = child.ppid() == os.getpid() and any(word.startswith("from multiprocessing.") for word in command)
            if child.status() != psutil.STATUS_ZOMBIE and not helper:
                found.add((child.pid, " ".join(command)[:200]))
    return found


@pytest.fixture(autouse=True)
def _nothing_left_behind():
    """A test must not leave a thread the interpreter's exit would wait for (one
    blocked for good, a worker of a pool nobody shut down waiting on a socket, hangs
    the whole suite after its last test), nor a process of its own running: its
    teardown fails."""
    threads, processes = _non_daemon_threads(), _child_processes()
    yield
    deadline = time.monotonic() + THREADS_GRACE_S
    while True:
        left, running = _non_daemon_threads() - threads, _child_processes() - processes
        if not (left or running) or time.monotonic() >= deadline:
            break
        time.sleep(0.05)
    if left or running:
        pytest.fail(f"left behind after the test: threads {sorted(t.name for t in left)}, processes {sorted(running)}")


def pytest_terminal_summary(terminalreporter):
    threads, processes = _non_daemon_threads(), _child_processes()
    if threads or processes:
        terminalreporter.section("still running as the session ends")
        terminalreporter.line(f"threads {sorted(t.name for t in threads)}, processes {sorted(processes)}")


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config):
    faulthandler.dump_traceback_later(EXIT_DEADLINE_S, exit=True, file=sys.__stderr__)


def _require(path: str, package: str) -> None:
    # A missing tool is a failure, never a skip: the suite would prove nothing.
    if not os.path.exists(path):
        pytest.fail(f"{path} is missing: install the Debian package {package} (make setup)")


@pytest.fixture
def registry(tmp_path) -> Iterator[Registry]:
    _require(REGISTRY_BINARY, "docker-registry")
    started = start_registry(str(tmp_path))
    yield started
    started.stop()


@pytest.fixture
def front(source) -> Iterator[FaultProxy]:
    """Our fault proxy in front of the source registry (the ``source`` fixture of the
    test's module): batchpush reads the source through it."""
    started = FaultProxy(source.host)
    yield started
    started.stop()


@pytest.fixture
def metadata_dir(tmp_path) -> str:
    return str(tmp_path / "metadata")


@dataclass
class Run:
    code: int
    out: str
    err: str


@pytest.fixture
def batchpush(capsys, metadata_dir):
    """Run the CLI in-process; returns exit code and captured output."""

    def run(*args: str) -> Run:
        argv = list(args)
        if argv and argv[0] == "push" and "--metadata-dir" not in argv:
            argv += ["--metadata-dir", metadata_dir]
        code = main(argv)
        captured = capsys.readouterr()
        return Run(code, captured.out, captured.err)

    return run


def skopeo(*args: str) -> subprocess.CompletedProcess[str]:
    _require(SKOPEO, "skopeo")
    return subprocess.run([SKOPEO, "--insecure-policy", *args], capture_output=True, text=True, timeout=300)


def remote_digest(registry: Registry, ref: str) -> str:
    """The manifest digest as the registry serves it, read by skopeo."""
    done = skopeo("inspect", "--raw", "--tls-verify=false", f"docker://{registry.host}/{ref}")
    assert done.returncode == 0, done.stderr
    return "sha256:" + hashlib.sha256(done.stdout.encode()).hexdigest()


@dataclass
class PulledImage:
    manifest_digest: str
    config_digest: str
    diff_ids: list[str]
    layer_media_types: list[str]


def _blob(layout: str, digest: str) -> bytes:
    algorithm, hex_ = digest.split(":")
    with open(os.path.join(layout, "blobs", algorithm, hex_), "rb") as f:
        data = f.read()
    assert hashlib.new(algorithm, data).hexdigest() == hex_, f"blob {digest} corrupt"
    return data


def _check_manifest(layout: str, digest: str) -> PulledImage:
    manifest = json.loads(_blob(layout, digest))
    config_digest = manifest["config"]["digest"]
    config = json.loads(_blob(layout, config_digest))
    diff_ids = config["rootfs"]["diff_ids"]
    assert len(diff_ids) == len(manifest["layers"])
    for layer, diff_id in zip(manifest["layers"], diff_ids, strict=True):
        data = _blob(layout, layer["digest"])
        assert len(data) == layer["size"]
        uncompressed = gzip.decompress(data) if data[:2] == b"\x1f\x8b" else data
        assert "sha256:" + hashlib.sha256(uncompressed).hexdigest() == diff_id, f"layer {layer['digest']} does not decompress to its DiffID"
    return PulledImage(digest, config_digest, diff_ids, [layer["mediaType"] for layer in manifest["layers"]])


def pull_and_verify(registry: Registry, ref: str, dest: str, source_args: tuple[str, ...] = ("--src-tls-verify=false",)) -> list[PulledImage]:
    """skopeo copies ``ref`` out (all platforms); every layer must decompress to its
    DiffID and every blob hash to its name. Returns one entry per image manifest."""
    done = skopeo("copy", "--all", "--preserve-digests", *source_args, f"docker://{registry.host}/{ref}", f"oci:{dest}:pulled")
    assert done.returncode == 0, done.stderr
    with open(os.path.join(dest, "index.json")) as f:
        top = json.load(f)["manifests"][0]
    if top["mediaType"].endswith("index.v1+json") or top["mediaType"].endswith("list.v2+json"):
        index = json.loads(_blob(dest, top["digest"]))
        return [_check_manifest(dest, child["digest"]) for child in index["manifests"]]
    return [_check_manifest(dest, top["digest"])]


@pytest.fixture
def token_registry(tmp_path):
    """The real registry in token-auth mode, with our issuer; users alice and bob."""
    from token_issuer import TokenIssuer

    _require(REGISTRY_BINARY, "docker-registry")
    issuer = TokenIssuer(str(tmp_path), {"alice": "alice-secret-pw", "bob": "bob-secret-pw"})
    started = start_registry(str(tmp_path), issuer.registry_config())
    yield started, issuer
    started.stop()
    issuer.stop()


@dataclass
class SecureRegistry:
    registry: Registry
    ca_file: str
    cert_dir: str
    username: str
    password: str


@pytest.fixture
def tls_registry(tmp_path):
    """The real registry over TLS (our own CA) with htpasswd basic auth."""
    from tls import make_htpasswd, make_tls

    _require(REGISTRY_BINARY, "docker-registry")
    cert_dir = str(tmp_path / "certs")
    ca, cert, key = make_tls(cert_dir)
    htpasswd = make_htpasswd(str(tmp_path / "htpasswd"), {"pusher": "s3cret-Pa55word-xyz"})
    started = start_registry(str(tmp_path), {"http": {"tls": {"certificate": cert, "key": key}}, "auth": {"htpasswd": {"realm": "batchpush-test", "path": htpasswd}}}, scheme="https")
    yield SecureRegistry(started, ca, os.path.dirname(ca), "pusher", "s3cret-Pa55word-xyz")
    started.stop()


def assert_no_secret(secrets: list[str], *texts: str) -> None:
    """Every secret is searched in every byte of output."""
    for secret in secrets:
        assert secret, "empty secret"
        for text in texts:
            assert secret not in text, f"a secret leaked: ...{text[max(0, text.find(secret) - 80):text.find(secret)]}"
