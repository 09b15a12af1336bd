"""Authentication: challenge parsing, bearer tokens per scope, basic auth.

Credentials come from a ``CredentialProvider`` (a seam: the security issue adds
docker's config.json and helpers). Tokens are cached per scope set with their
expiry; a token or a credential never appears in a message or a log line.
"""

from __future__ import annotations

import base64
import json
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import requests

from .errors import AuthError, error_from_response, read_limited
from .transport import proxies_for

#: the most of a token response we read
MAX_TOKEN_BODY_BYTES = 1 << 20
#: a token's lifetime when the issuer does not say (the spec's default)
DEFAULT_TOKEN_TTL_S = 60
#: refresh a token this long before it expires
TOKEN_EXPIRY_MARGIN_S = 5


@dataclass(frozen=True, slots=True)
class Credentials:
    """What docker calls an auth config. Never printed: ``__repr__`` hides the secrets."""

    username: str = ""
    password: str = field(default="", repr=False)
    #: base64 "user:password", as config.json stores it
    auth: str = field(default="", repr=False)
    identity_token: str = field(default="", repr=False)
    registry_token: str = field(default="", repr=False)


#: host[:port] -> credentials, or None for anonymous
CredentialProvider = Callable[[str], "Credentials | None"]


def no_credentials(host: str) -> Credentials | None:
    return None


@dataclass(frozen=True, slots=True)
class Challenge:
    scheme: str
    params: dict[str, str]


_PARAM = re.compile(r'\s*([A-Za-z0-9_.-]+)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^\s,]*))\s*,?')


def parse_challenges(header: str) -> list[Challenge]:
    """Parse ``WWW-Authenticate``: ``Bearer realm="...",service="...",scope="..."``."""
    challenges: list[Challenge] = []
    position = 0
    while position < len(header):
        match = re.compile(r"\s*([A-Za-z][A-Za-z0-9-]*)\s*").match(header, position)
        if not match:
            break
        scheme = match.group(1).lower()
        position = match.end()
        params: dict[str, str] = {}
        while True:
            param = _PARAM.match(header, position)
            if not param:
                break
            value = param.group(2) if param.group(2) is not None else param.group(3)
            params[param.group(1).lower()] = re.sub(r"\\(.)", r"\1", value)
            position = param.end()
        challenges.append(Challenge(scheme, params))
        if position < len(header) and header[position] == ",":
            position += 1
    return challenges


def scope_for(repository: str, actions: str) -> str:
    return f"repository:{repository}:{actions}"


@dataclass(slots=True)
class _Token:
    value: str
    expires_at: float
    ttl_s: float

    def fresh(self) -> bool:
        """Usable for one more request: refreshed ahead of expiry, by
        TOKEN_EXPIRY_MARGIN_S or a quarter of its lifetime if that is shorter."""
        return self.expires_at - min(TOKEN_EXPIRY_MARGIN_S, self.ttl_s / 4) > time.monotonic()


class Authenticator:
    """Holds one registry host's auth state; thread-safe.

    ``authorization(scopes)`` returns the header to send (None: anonymous).
    ``challenge(response, scopes)`` learns from a 401 and fetches a token; it returns
    False when a retry would not help (no new credentials to offer).
    """

    def __init__(self, host: str, session: requests.Session, credentials: Credentials | None, *, verify_realm: Callable[[str], None] | None = None) -> None:
        self.host = host
        self.session = session
        self.credentials = credentials
        self.verify_realm = verify_realm
        self._lock = threading.Lock()
        self._challenge: Challenge | None = None
        self._tokens: dict[tuple[str, ...], _Token] = {}
        #: one token fetch at a time per scope set (single-flight)
        self._fetching: dict[tuple[str, ...], threading.Lock] = {}

    @property
    def has_credentials(self) -> bool:
        return self.credentials is not None

    def _basic(self) -> str | None:
        c = self.credentials
        if c is None or not (c.username or c.password):
            return None
        return "Basic " + base64.b64encode(f"{c.username}:{c.password}".encode()).decode()

    def authorization(self, scopes: tuple[str, ...]) -> str | None:
        with self._lock:
            challenge = self._challenge
            if challenge is None:
                return None
            if challenge.scheme == "basic":
                return self._basic()
            token = self._tokens.get(scopes)
            if token and token.fresh():
                return f"Bearer {token.value}"
            fetching = self._fetching.setdefault(scopes, threading.Lock())
        if challenge.scheme != "bearer":
            return None
        with fetching:
            with self._lock:  # another thread may have fetched it meanwhile
                token = self._tokens.get(scopes)
                if token and token.fresh():
                    return f"Bearer {token.value}"
            return f"Bearer {self._fetch_token(challenge, scopes)}"

    def challenge(self, response: requests.Response, scopes: tuple[str, ...]) -> bool:
        """Learn from a 401; True if retrying the request may now succeed."""
        header = response.headers.get("WWW-Authenticate", "")
        known = [c for c in parse_challenges(header) if c.scheme in ("bearer", "basic")]
        if not known:
            return False
        chosen = next((c for c in known if c.scheme == "bearer"), known[0])
        with self._lock:
            first_time = self._challenge is None or self._challenge.scheme != chosen.scheme
            self._challenge = chosen
            had_token = self._tokens.pop(scopes, None) is not None
        if chosen.scheme == "basic":
            return first_time and self._basic() is not None
        # bearer: a first challenge, or an expired/insufficient token, earns one fresh token
        return first_time or had_token

    def _fetch_token(self, challenge: Challenge, scopes: tuple[str, ...]) -> str:
        realm = challenge.params.get("realm")
        if not realm:
            raise AuthError("GET", f"https://{self.host}/v2/", 401, (), "bearer challenge without a realm")
        if self.verify_realm is not None:
            self.verify_realm(realm)
        params: list[tuple[str, str]] = []
        if challenge.params.get("service"):
            params.append(("service", challenge.params["service"]))
        params.extend(("scope", s) for s in scopes)
        headers = {}
        c = self.credentials
        if c is not None and c.registry_token:
            return c.registry_token
        basic = self._basic()
        if basic:
            headers["Authorization"] = basic
        try:
            response = self.session.get(realm, params=params, headers=headers, stream=True, timeout=30, allow_redirects=False, verify=self.session.verify, proxies=proxies_for(realm))
        except requests.RequestException as exc:
            raise AuthError("GET", realm, None, (), f"token request failed: {type(exc).__name__}") from exc
        if response.status_code != 200:
            raise error_from_response(response, "GET")
        body = read_limited(response, MAX_TOKEN_BODY_BYTES)
        try:
            document = json.loads(body)
            value = document.get("token") or document.get("access_token")
            ttl = float(document.get("expires_in") or DEFAULT_TOKEN_TTL_S)
        except (ValueError, AttributeError, TypeError):
            raise AuthError("GET", realm, 200, (), "token response is not valid JSON") from None
        if not isinstance(value, str) or not value:
            raise AuthError("GET", realm, 200, (), "token response holds no token")
        with self._lock:
            self._tokens[scopes] = _Token(value, time.monotonic() + ttl, ttl)
        return value
