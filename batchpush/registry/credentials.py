"""Where credentials come from: explicit ones (CLI, plan), then docker's config.json.

Docker's conventions: ``$DOCKER_CONFIG/config.json`` (default ``~/.docker``) with
``auths`` (``auth`` = base64 "user:password", or ``username``/``password``,
``identitytoken``), ``credHelpers`` (per host) and ``credsStore`` (default helper),
run as ``docker-credential-NAME get`` with the server on stdin. A configured helper
that is missing or fails is an error for that registry, never a silent anonymous
push (CVE-2021-41092). Secrets never reach a message.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import shutil
import subprocess
from collections.abc import Mapping

from ..errors import BatchPushError
from ..reference import DOCKER_HUB, DOCKER_HUB_API
from .auth import Credentials

#: docker's key for Docker Hub in config.json
DOCKER_HUB_KEY = "https://index.docker.io/v1/"
#: seconds a credential helper may take
HELPER_TIMEOUT_S = 30
#: the most of config.json or a helper's answer we read
MAX_CONFIG_BYTES = 4 << 20


class CredentialsError(BatchPushError):
    kind = "credentials"


def _host_of(key: str) -> str:
    """config.json keys may be URLs: ``https://host:port/v1/`` -> ``host:port``."""
    host = key.split("://", 1)[-1].split("/", 1)[0]
    return DOCKER_HUB_API if host in ("index.docker.io", DOCKER_HUB) else host


def docker_config_path() -> str:
    return os.path.join(os.environ.get("DOCKER_CONFIG") or os.path.join(os.path.expanduser("~"), ".docker"), "config.json")


class DockerConfigCredentials:
    """A CredentialProvider over docker's config.json (read once, lazily)."""

    def __init__(self, path: str | None = None) -> None:
        self.path = path or docker_config_path()
        self._document: Mapping[str, object] | None = None

    def _config(self) -> Mapping[str, object]:
        if self._document is None:
            try:
                with open(self.path, "rb") as f:
                    data = f.read(MAX_CONFIG_BYTES + 1)
            except FileNotFoundError:
                data = b"{}"
            except OSError as exc:
                raise CredentialsError(f"{self.path}: cannot read: {exc.strerror or exc}") from exc
            if len(data) > MAX_CONFIG_BYTES:
                raise CredentialsError(f"{self.path}: over {MAX_CONFIG_BYTES} bytes")
            try:
                document = json.loads(data)
            except json.JSONDecodeError as exc:
                raise CredentialsError(f"{self.path}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
            except UnicodeDecodeError:
                raise CredentialsError(f"{self.path}: not UTF-8 text") from None
            self._document = document if isinstance(document, dict) else {}
        return self._document

    def __call__(self, host: str) -> Credentials | None:
        config = self._config()
        helpers = config.get("credHelpers")
        helper = helpers.get(host) if isinstance(helpers, dict) else None
        if helper is None and host == DOCKER_HUB_API and isinstance(helpers, dict):
            helper = helpers.get(DOCKER_HUB) or helpers.get("index.docker.io")
        store = config.get("credsStore")
        if isinstance(helper, str) and helper:
            return run_helper(helper, host)
        auths = config.get("auths")
        if isinstance(auths, dict):
            for key, entry in auths.items():
                if _host_of(str(key)) == host and isinstance(entry, dict):
                    found = _from_auth_entry(entry, self.path, host)
                    if found is not None:
                        return found
        if isinstance(store, str) and store:
            return run_helper(store, host, missing_ok=True)
        return None


def _from_auth_entry(entry: Mapping[str, object], path: str, host: str) -> Credentials | None:
    username = str(entry.get("username") or "")
    password = str(entry.get("password") or "")
    auth = str(entry.get("auth") or "")
    identity_token = str(entry.get("identitytoken") or "")
    if auth:
        try:
            username, sep, password = base64.b64decode(auth, validate=True).decode().partition(":")
        except (binascii.Error, UnicodeDecodeError):
            raise CredentialsError(f"{path}: the auth entry for {host} is not base64 of user:password") from None
        if not sep:
            raise CredentialsError(f"{path}: the auth entry for {host} is not base64 of user:password")
    if not (username or password or identity_token):
        return None
    return Credentials(username, password, auth=auth, identity_token=identity_token)


def run_helper(name: str, host: str, *, missing_ok: bool = False) -> Credentials | None:
    """``docker-credential-NAME get``; its "credentials not found" means anonymous
    only for the default store (``missing_ok``) — a helper named for this host must answer."""
    program = f"docker-credential-{name}"
    path = shutil.which(program)
    if path is None:
        raise CredentialsError(f"credential helper {program} for {host} is not installed (configured in {docker_config_path()})")
    for server in (host, f"https://{host}"):
        try:
            done = subprocess.run([path, "get"], input=server.encode(), capture_output=True, timeout=HELPER_TIMEOUT_S, check=False)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise CredentialsError(f"credential helper {program} for {host} failed to run: {type(exc).__name__}") from None
        if done.returncode == 0:
            break
        if b"credentials not found" not in done.stdout + done.stderr:
            raise CredentialsError(f"credential helper {program} for {host} failed (exit {done.returncode})")
    else:
        if missing_ok:
            return None
        raise CredentialsError(f"credential helper {program} has no credentials for {host}")
    try:
        answer = json.loads(done.stdout[:MAX_CONFIG_BYTES])
        username, secret = str(answer.get("Username") or ""), str(answer.get("Secret") or "")
    except (ValueError, AttributeError):
        raise CredentialsError(f"credential helper {program} for {host} answered something that is not its JSON") from None
    if username == "<token>":
        return Credentials(identity_token=secret)
    return Credentials(username, secret)


class ChainedCredentials:
    """Explicit credentials per host first, then the fallback provider."""

    def __init__(self, explicit: Mapping[str, Credentials], fallback: DockerConfigCredentials | None = None) -> None:
        self.explicit = dict(explicit)
        self.fallback = fallback

    def __call__(self, host: str) -> Credentials | None:
        if host in self.explicit:
            return self.explicit[host]
        return self.fallback(host) if self.fallback is not None else None


def password_from(host: str, *, password_env: str | None, password_file: str | None) -> str:
    """A password named by a plan: an environment variable or a file (first line)."""
    if password_env:
        value = os.environ.get(password_env)
        if value is None:
            raise CredentialsError(f"{host}: environment variable {password_env} (password_env) is not set")
        return value
    if password_file:
        try:
            with open(os.path.expanduser(password_file), encoding="utf-8") as f:
                return f.readline().rstrip("\r\n")
        except OSError as exc:
            raise CredentialsError(f"{host}: cannot read password_file {password_file}: {exc.strerror or exc}") from None
    raise CredentialsError(f"{host}: username given without password_env or password_file")
