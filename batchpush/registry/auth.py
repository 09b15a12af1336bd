"""Authentication: challenge parsing, bearer tokens per scope, basic auth.

Credentials come from a ``CredentialProvider`` (credentials.py reads docker's
config.json and helpers). A bearer token is fetched from the challenge's realm: with
an identity token, as an OAuth2 refresh-token grant (POST), else a GET with basic
credentials, or anonymous. Tokens are cached per scope set with their expiry.

A token fetch that fails like any request may (transport error, 408, 429, 5xx) raises
a temporary RegistryError, so the caller's retry policy retries the step; a realm
that refuses the credentials (401/403, or 400 to a refresh-token grant) raises a
permanent AuthError. A token or a credential never appears in a message or a log line.
"""

from __future__ import annotations

import base64
import json
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from urllib.parse import urlencode, urlsplit, urlunsplit

from ..patterns import LazyPattern
from ..waits import Flights
from .errors import TRANSPORT_ERRORS, AuthError, RegistryError, error_from_response, is_tls_error, read_limited
from .transport import Response, Session, send

#: the most of a token response we read
MAX_TOKEN_BODY_BYTES = 1 << 20
#: a token's lifetime when the issuer does not say (the spec's default)
DEFAULT_TOKEN_TTL_S = 60
#: refresh a token this long before it expires
TOKEN_EXPIRY_MARGIN_S = 5
#: seconds to connect to the token realm, and to wait for its answer
TOKEN_CONNECT_TIMEOUT_S = 10.0
TOKEN_READ_TIMEOUT_S = 30.0
#: the OAuth2 client_id of a refresh-token grant: the form requires one (docker sends
#: "registry-client", containers/image its own name); token services log it
OAUTH_CLIENT_ID = "batchpush"


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


_SCHEME = LazyPattern(r"\s*([A-Za-z][A-Za-z0-9-]*)\s*")
_PARAM = LazyPattern(r'\s*([A-Za-z0-9_.-]+)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^\s,]*))\s*,?')


def parse_challenges(header: str) -> list[Challenge]:
    """Parse ``WWW-Authenticate``: ``Bearer realm="...",service="...",scope="..."``."""
    challenges: list[Challenge] = []
    position = 0
    while position < len(header):
        match = _SCHEME.match(header, position)
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
    ``challenge(response, scopes, sent)`` learns from a 401, whichever request it
    answers (a registry may answer the ping 200 and challenge only a write); it
    returns False when sending that request again would not help: no challenge
    it can answer, or the credentials it would send are the ones just refused.
    """

    def __init__(self, host: str, session: Session, credentials: Credentials | None, *, verify_realm: Callable[[str], None] | None = None, cancel: threading.Event | None = None) -> None:
        self.host = host
        self.session = session
        self.credentials = credentials
        self.verify_realm = verify_realm
        self._lock = threading.Lock()
        self._challenge: Challenge | None = None
        self._tokens: dict[tuple[str, ...], _Token] = {}
        #: one token fetch at a time per scope set, and one refresh-token grant at a
        #: time (single-flight; no lock is held while a token is fetched)
        self._fetching = Flights()
        #: the refresh token the grants send: the identity token, until a realm
        #: hands out another (read and replaced only by the grant in flight)
        self._refresh_token: str | None = None
        #: set when the run is interrupted: a thread waiting for another's fetch stops
        self.cancel = cancel or threading.Event()

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
        if challenge.scheme != "bearer":
            return None
        with self._fetching.hold(scopes, self.cancel):
            with self._lock:  # another thread may have fetched it meanwhile
                token = self._tokens.get(scopes)
                if token and token.fresh():
                    return f"Bearer {token.value}"
            return f"Bearer {self._fetch_token(challenge, scopes)}"

    def challenge(self, response: Response, scopes: tuple[str, ...], sent: str | None = None) -> bool:
        """Learn from a 401 to a request for ``scopes`` that carried the Authorization
        ``sent`` (None: none); True if sending it again may now succeed. The caller
        sends a request again once at most, so a second 401 after fresh credentials
        is final. Each request is judged by what it carried, not by what the
        authenticator knew before: requests sent at once, before any challenge was
        known, each earn their retry."""
        header = response.headers.get("WWW-Authenticate", "")
        known = [c for c in parse_challenges(header) if c.scheme in ("bearer", "basic")]
        if not known:
            return False
        chosen = next((c for c in known if c.scheme == "bearer"), known[0])
        with self._lock:
            self._challenge = chosen
            token = self._tokens.get(scopes)
            if token is not None and sent == f"Bearer {token.value}":
                # the token this request carried expired or does not cover it: the
                # next authorization() fetches another (one sent by a request that
                # fetched it since is kept)
                del self._tokens[scopes]
        if chosen.scheme == "basic":
            basic = self._basic()
            return basic is not None and sent != basic
        # bearer: a token for these scopes, fresh or fetched since the request went
        return True

    def _fetch_token(self, challenge: Challenge, scopes: tuple[str, ...]) -> str:
        """A token for ``scopes`` from the challenge's realm, cached with its expiry.
        Raises a temporary RegistryError when the realm fails as any server may, a
        permanent AuthError when it refuses the credentials."""
        realm = challenge.params.get("realm")
        if not realm:
            raise AuthError("GET", f"https://{self.host}/v2/", 401, (), "bearer challenge without a realm")
        if self.verify_realm is not None:
            self.verify_realm(realm)
        c = self.credentials
        if c is not None and c.registry_token:
            return c.registry_token
        service = challenge.params.get("service", "")
        if c is not None and c.identity_token:
            # one refresh-token grant at a time: a realm that rotates refresh tokens
            # may revoke the one a concurrent grant is still using
            with self._fetching.hold("refresh-token grant", self.cancel):
                value, ttl_s = self._token_by_refresh(realm, service, scopes)
        else:
            value, ttl_s = self._token_by_get(realm, service, scopes)
        with self._lock:
            self._tokens[scopes] = _Token(value, time.monotonic() + ttl_s, ttl_s)
        return value

    def _token_by_get(self, realm: str, service: str, scopes: tuple[str, ...]) -> tuple[str, float]:
        """The distribution token spec's GET: scopes in the query, basic credentials if any."""
        params = [("service", service)] if service else []
        params.extend(("scope", s) for s in scopes)
        basic = self._basic()
        headers = {"Authorization": basic} if basic else {}
        document = self._ask_realm("GET", realm, headers, params=params, refused="the token service refused the credentials" if basic else "the token service refused anonymous access")
        return _token_from(document, "GET", realm)

    def _token_by_refresh(self, realm: str, service: str, scopes: tuple[str, ...]) -> tuple[str, float]:
        """The OAuth2 refresh-token grant docker and containers/image make with an
        identity token: a form POST, the scopes space-separated in one ``scope``. A
        ``refresh_token`` in the answer replaces the identity token for later grants.
        Called by the one refresh-token grant in flight."""
        if self._refresh_token is None:
            assert self.credentials is not None
            self._refresh_token = self.credentials.identity_token
        form = [("grant_type", "refresh_token"), ("refresh_token", self._refresh_token), ("service", service), ("client_id", OAUTH_CLIENT_ID)]
        if scopes:
            form.append(("scope", " ".join(scopes)))
        document = self._ask_realm("POST", realm, {"Content-Type": "application/x-www-form-urlencoded"}, data=form, refused="the token service refused the identity token")
        refreshed = document.get("refresh_token")
        if isinstance(refreshed, str) and refreshed:
            self._refresh_token = refreshed
        return _token_from(document, "POST", realm)

    def _ask_realm(
        self, method: str, realm: str, headers: dict[str, str], *, refused: str, params: list[tuple[str, str]] | None = None, data: list[tuple[str, str]] | None = None
    ) -> dict[str, object]:
        """One request to the token realm, its JSON answer on a 200. Errors name the
        realm without its query (the scopes) and never carry what was sent; ``refused``
        is the detail of the AuthError a refusal raises."""
        timeout = (TOKEN_CONNECT_TIMEOUT_S, TOKEN_READ_TIMEOUT_S)
        try:
            response = send(self.session, method, _with_params(realm, params), headers, urlencode(data).encode() if data is not None else None, timeout=timeout, verify=self.session.verify)
        except ValueError as exc:
            # a URL or a header value HTTP cannot carry: its text may quote the
            # credentials, so it is not chained (a traceback would print it)
            raise RegistryError(method, realm, None, (), f"token request: {type(exc).__name__}") from None
        except TRANSPORT_ERRORS as exc:
            if is_tls_error(exc):
                raise RegistryError(method, realm, None, (), "token request: TLS verification failed", permanent=True) from exc
            raise RegistryError(method, realm, None, (), f"token request: {type(exc).__name__}") from exc
        if response.status_code != 200:
            error = error_from_response(response, method)
            # an OAuth2 token endpoint answers a bad grant with 400 invalid_grant (RFC 6749 5.2)
            if response.status_code in (401, 403) or (method == "POST" and response.status_code == 400):
                raise AuthError(method, realm, response.status_code, error.codes, refused)
            raise RegistryError(method, realm, response.status_code, error.codes, "token request failed", retry_after_s=error.retry_after_s)
        # a body that breaks off raises a temporary RegistryError (read_limited)
        body = read_limited(response, MAX_TOKEN_BODY_BYTES)
        try:
            document = json.loads(body)
        except ValueError:
            raise AuthError(method, realm, 200, (), "token response is not valid JSON") from None
        if not isinstance(document, dict):
            raise AuthError(method, realm, 200, (), "token response is not a JSON object")
        return document


def _with_params(url: str, params: list[tuple[str, str]] | None) -> str:
    """``url`` with ``params`` added to its query (form-encoded, as requests did),
    its fragment dropped (never sent)."""
    parts = urlsplit(url)
    query = "&".join(part for part in (parts.query, urlencode(params or [])) if part)
    return urlunsplit((parts.scheme, parts.netloc, parts.path, query, ""))


def _token_from(document: dict[str, object], method: str, realm: str) -> tuple[str, float]:
    """The token and its lifetime in seconds from a realm's answer. ``access_token``
    is OAuth2's name, ``token`` the distribution spec's; both mean the same."""
    value = document.get("access_token") or document.get("token")
    if not isinstance(value, str) or not value:
        raise AuthError(method, realm, 200, (), "token response holds no token")
    expires_in = document.get("expires_in")
    ttl_s = float(expires_in) if isinstance(expires_in, (int, float)) and expires_in > 0 else DEFAULT_TOKEN_TTL_S
    return value, ttl_s
