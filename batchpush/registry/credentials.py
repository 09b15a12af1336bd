"""Where credentials come from: explicit ones (CLI, plan), then docker's config.json.

Docker's conventions: ``$DOCKER_CONFIG/config.json`` (default ``~/.docker``) with
``auths`` (``auth`` = base64 "user:password", or ``username``/``password``,
``identitytoken``), ``credHelpers`` (per host) and ``credsStore`` (default helper),
run as ``docker-credential-NAME get`` with the server on stdin. A configured helper
that is missing or fails is an error for that registry, never a silent anonymous
push (CVE-2021-41092). Secrets never reach a message.

The lookup is docker's (cli/config/configfile ``GetAuthConfig``), for the key docker
files a registry under (``registry.GetAuthConfigKey``): ``https://index.docker.io/v1/``
for Docker Hub, ``host[:port]`` for any other registry.

1. The helper for the key: ``credHelpers[key]`` if the key is there (an empty name
   there means "config.json only", even with a ``credsStore``), else ``credsStore``.
   It is asked for the key on stdin (another registry's helper, which has nothing
   under ``host[:port]``, is asked again for ``https://host[:port]``).
2. Where the helper has none, or no helper is configured: the ``auths`` entry, under
   the key itself, else under a key that names the same host as a URL
   (``https://host:port``, ``http://host:port/v2/``: docker's ``ConvertToHostname``).
3. Still none: anonymous, except that a helper named in ``credHelpers`` must answer
   (an error, where docker would push anonymously).
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import shutil
from collections.abc import Mapping
from urllib.parse import urlsplit

from ..errors import BatchPushError
from ..reference import DOCKER_HUB, DOCKER_HUB_API
from .auth import Credentials

#: docker's key for Docker Hub in config.json (and the server its helpers are asked for)
DOCKER_HUB_KEY = "https://index.docker.io/v1/"
#: the hosts that are Docker Hub: the name, the API host, the legacy index
DOCKER_HUB_HOSTS = frozenset({DOCKER_HUB, DOCKER_HUB_API, "index.docker.io"})
#: seconds a credential helper may take
HELPER_TIMEOUT_S = 30
#: the most of config.json or a helper's answer we read
MAX_CONFIG_BYTES = 4 << 20
#: what a helper answers for a server it has nothing for (docker-credential-helpers'
#: ``ErrCredentialsNotFound``), on its stdout
HELPER_NOT_FOUND = b"credentials not found"
#: the Username a helper answers with an identity token in its Secret
HELPER_TOKEN_USERNAME = "<token>"  # noqa: S105 (a marker docker defines, not a secret)


class CredentialsError(BatchPushError):
    kind = "credentials"


def config_key(host: str) -> str:
    """The key docker files ``host``'s credentials under (``registry.GetAuthConfigKey``):
    DOCKER_HUB_KEY for Docker Hub, ``host[:port]`` itself for any other registry."""
    return DOCKER_HUB_KEY if host in DOCKER_HUB_HOSTS else host


def convert_to_hostname(key: str) -> str:
    """docker's ``ConvertToHostname``: an ``auths`` key written as a URL names its
    ``host[:port]`` (``https://host:5000/v2/`` -> ``host:5000``); any other key its
    text up to the first ``/``."""
    if "://" in key:
        netloc = urlsplit(key).netloc.rpartition("@")[2]
        if netloc:
            return netloc
    return key.split("/", 1)[0]


def docker_config_path() -> str:
    return os.path.join(os.environ.get("DOCKER_CONFIG") or os.path.join(os.path.expanduser("~"), ".docker"), "config.json")


class DockerConfigCredentials:
    """A CredentialProvider over docker's config.json (read once, lazily); the lookup
    is the module docstring's. Helpers run on every call (the engine asks once per host)."""

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
        key = config_key(host)
        helpers = config.get("credHelpers")
        helpers = helpers if isinstance(helpers, dict) else {}
        named = key in helpers
        helper = helpers[key] if named else config.get("credsStore")
        helper = helper if isinstance(helper, str) else ""
        if helper:
            found = run_helper(helper, key)
            if found is not None:
                return found
        found = self._auth_entry(config, key)
        if found is None and named and helper:
            raise CredentialsError(f"credential helper docker-credential-{helper} has no credentials for {key} (named in credHelpers of {self.path})")
        return found

    def _auth_entry(self, config: Mapping[str, object], key: str) -> Credentials | None:
        """docker's file store: ``auths[key]``, else the first entry whose key names the same host."""
        auths = config.get("auths")
        if not isinstance(auths, dict):
            return None
        entry = auths.get(key)
        if entry is None:
            entry = next((value for name, value in auths.items() if convert_to_hostname(str(name)) == key), None)
        return _from_auth_entry(entry, self.path, key) if isinstance(entry, dict) else None


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


def run_helper(name: str, server: str) -> Credentials | None:
    """``docker-credential-NAME get`` for ``server`` (a config key); None when the
    helper has no credentials for it. A missing or failing helper raises
    CredentialsError; the helper's output never reaches a message."""
    program = f"docker-credential-{name}"
    path = shutil.which(program)
    if path is None:
        raise CredentialsError(f"credential helper {program} for {server} is not installed (configured in {docker_config_path()})")
    # docker asks for the key only; a helper that stored another registry under its
    # URL (as some logins do) is asked for that too
    asks = (server,) if "://" in server else (server, f"https://{server}")
    import subprocess  # only a configured helper runs one

    for ask in asks:
        try:
            done = subprocess.run([path, "get"], input=ask.encode(), capture_output=True, timeout=HELPER_TIMEOUT_S, check=False)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise CredentialsError(f"credential helper {program} for {server} failed to run: {type(exc).__name__}") from None
        if done.returncode == 0:
            break
        if HELPER_NOT_FOUND not in done.stdout + done.stderr:
            raise CredentialsError(f"credential helper {program} for {server} failed (exit {done.returncode})")
    else:
        return None
    try:
        answer = json.loads(done.stdout[:MAX_CONFIG_BYTES])
        username, secret = str(answer.get("Username") or ""), str(answer.get("Secret") or "")
    except (ValueError, AttributeError):
        raise CredentialsError(f"credential helper {program} for {server} answered something that is not its JSON") from None
    if username == HELPER_TOKEN_USERNAME:
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
