"""The real CNCF distribution registry, started on a free loopback port for tests."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import requests
import urllib3
import yaml

urllib3.disable_warnings(urllib3.exceptions.InsecureRequestWarning)

REGISTRY_BINARY = "/usr/bin/docker-registry"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Registry:
    host: str
    root: str
    log_path: str
    process: subprocess.Popen[bytes]
    scheme: str = "http"

    @property
    def url(self) -> str:
        return f"{self.scheme}://{self.host}"

    def access_log(self) -> list[str]:
        """Request lines the registry logged (its own count, not ours)."""
        with open(self.log_path, encoding="utf-8", errors="replace") as log:
            return [line for line in log if '"' in line and "HTTP/1.1" in line and " - - [" in line]

    def count(self, method: str, path_part: str = "") -> int:
        return sum(1 for line in self.access_log() if f'"{method} ' in line and path_part in line)

    def restart(self, *, wipe: bool = False, while_down: Callable[[], None] | None = None) -> None:
        """Stop and start again on the same port; ``wipe`` loses its storage first;
        ``while_down`` is called while it is stopped (and it starts again however
        that call ends)."""
        self.stop()
        if wipe:
            wipe_storage(self)
        try:
            if while_down is not None:
                while_down()
        finally:
            self._start()

    def _start(self) -> None:
        log = open(self.log_path, "ab")
        self.process = subprocess.Popen(self.process.args, stdout=log, stderr=subprocess.STDOUT)  # type: ignore[arg-type]
        _wait_ready(self)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def start_registry(workdir: str, extra: dict[str, Any] | None = None, scheme: str = "http") -> Registry:
    if not os.path.exists(REGISTRY_BINARY):
        raise RuntimeError(f"{REGISTRY_BINARY} is missing: install the Debian package docker-registry (make setup)")
    port = free_port()
    root = os.path.join(workdir, f"registry-{port}")
    os.makedirs(root)
    config: dict[str, Any] = {
        "version": 0.1,
        "log": {"level": "info", "formatter": "text", "accesslog": {"disabled": False}},
        "storage": {
            "filesystem": {"rootdirectory": os.path.join(root, "data")},
            "delete": {"enabled": True},
            "maintenance": {"uploadpurging": {"enabled": False}},
        },
        "http": {"addr": f"127.0.0.1:{port}", "secret": "batchpush-test-secret"},
    }
    for key, value in (extra or {}).items():
        if isinstance(value, dict) and isinstance(config.get(key), dict):
            config[key].update(value)
        else:
            config[key] = value
    config_path = os.path.join(root, "config.yml")
    with open(config_path, "w") as out:
        yaml.safe_dump(config, out)
    log_path = os.path.join(root, "registry.log")
    log = open(log_path, "wb")
    process = subprocess.Popen([REGISTRY_BINARY, "serve", config_path], stdout=log, stderr=subprocess.STDOUT)
    registry = Registry(f"127.0.0.1:{port}", root, log_path, process, scheme)
    _wait_ready(registry)
    return registry


def _wait_ready(registry: Registry) -> None:
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        if registry.process.poll() is not None:
            raise RuntimeError(f"registry exited: {open(registry.log_path).read()[-2000:]}")
        try:
            requests.get(f"{registry.url}/v2/", timeout=1, verify=False)
            return
        except requests.RequestException:
            time.sleep(0.05)
    registry.stop()
    raise RuntimeError("registry did not start in 15 s")


def wipe_storage(registry: Registry) -> None:
    """The registry loses its storage (restart with an empty root)."""
    shutil.rmtree(os.path.join(registry.root, "data"), ignore_errors=True)
