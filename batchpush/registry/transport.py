"""The HTTP session every registry client uses, and the proxies it goes through.

requests re-reads the environment on every request when ``trust_env`` is on: the
proxy variables, ``~/.netrc`` (credentials we must never send unasked) and
``REQUESTS_CA_BUNDLE`` (which would override a host's trust). That costs about half
of a small request's CPU. Our sessions turn it off; the proxy variables are read
once per origin instead, with the same rules (``NO_PROXY`` included), and the CA
bundle is always passed explicitly. ``send`` hands a request we prepare ourselves
straight to the session's adapter (its pools, TLS and proxies): a registry request
needs none of what ``Session.request`` adds around it (cookies, hooks, redirects,
which the client follows itself).

TLS contexts are made once per trust setting (``verify``) and shared by every
connection of the session: left to itself, urllib3 makes a context for each new
connection and loads the CA bundle into it (about 25 ms of CPU each time), and
loads the system's CAs even for an unverified one (the https probe of an
``--insecure`` host that speaks plain HTTP).
"""

from __future__ import annotations

import functools
import os
import ssl
import threading
from typing import Any
from urllib.parse import urlsplit

import requests
from requests import certs
from requests.adapters import HTTPAdapter
from requests.structures import CaseInsensitiveDict
from requests.utils import get_environ_proxies
from urllib3.util.ssl_ import create_urllib3_context


def tls_context(verify: bool | str) -> ssl.SSLContext:
    """The client TLS context of a trust setting: ``False`` verifies nothing (no CA
    is loaded), ``True`` trusts requests' CA bundle, a path trusts that bundle (a
    file) or directory. urllib3's defaults otherwise (protocol versions, ciphers)."""
    if verify is False:
        return create_urllib3_context(cert_reqs=ssl.CERT_NONE)  # check_hostname off too
    context = create_urllib3_context(cert_reqs=ssl.CERT_REQUIRED)
    location = certs.where() if verify is True else verify  # type: ignore[attr-defined]
    if os.path.isdir(location):
        context.load_verify_locations(capath=location)
    else:
        context.load_verify_locations(cafile=location)
    return context


class _Adapter(HTTPAdapter):
    """requests' adapter, with one TLS context per trust setting, made on first use."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._contexts: dict[bool | str, ssl.SSLContext] = {}
        self._contexts_lock = threading.Lock()

    def _context(self, verify: bool | str) -> ssl.SSLContext:
        with self._contexts_lock:  # made under the lock: two threads must not load the bundle twice
            context = self._contexts.get(verify)
            if context is None:
                context = self._contexts[verify] = tls_context(verify)
            return context

    def build_connection_pool_key_attributes(self, request: requests.PreparedRequest, verify: bool | str, cert: str | tuple[str, str] | None = None) -> Any:
        host_params, pool_kwargs = super().build_connection_pool_key_attributes(request, verify, cert)
        if host_params["scheme"] == "https":
            # the context is part of the pool's key: one pool per host and trust setting, as before
            pool_kwargs["ssl_context"] = self._context(verify)
            pool_kwargs.pop("ca_certs", None)
            pool_kwargs.pop("ca_cert_dir", None)
        return host_params, pool_kwargs

    def cert_verify(self, conn: Any, url: str, verify: bool | str, cert: Any) -> None:
        super().cert_verify(conn, url, verify, cert)
        # the shared context holds the CAs already: urllib3 would load them into it again per connection
        conn.ca_certs = None
        conn.ca_cert_dir = None


def new_session(user_agent: str, pool_maxsize: int) -> requests.Session:
    session = requests.Session()
    session.trust_env = False
    session.headers["User-Agent"] = user_agent
    adapter = _Adapter(pool_connections=2, pool_maxsize=pool_maxsize, max_retries=0)
    session.mount("https://", adapter)
    session.mount("http://", adapter)
    return session


def proxies_for(url: str) -> dict[str, str]:
    """The proxies the environment names for ``url`` (empty: connect directly)."""
    parts = urlsplit(url)
    return _origin_proxies(parts.scheme, parts.netloc)


@functools.lru_cache(maxsize=64)
def _origin_proxies(scheme: str, netloc: str) -> dict[str, str]:
    return get_environ_proxies(f"{scheme}://{netloc}/")


def send(session: requests.Session, method: str, url: str, headers: dict[str, str], body: Any, *, timeout: tuple[float, float], verify: bool | str | None) -> requests.Response:
    """One request, streamed, never redirected. ``url`` is already quoted (built
    with ``quote`` or taken from the registry's Location); ``body`` is None, bytes,
    or a sized iterable of bytes (sent with its Content-Length, not chunked)."""
    request = requests.PreparedRequest()
    request.method = method
    request.url = url
    request.headers = CaseInsensitiveDict({**session.headers, **headers})  # type: ignore[arg-type]
    request.body = body
    request.hooks = {"response": []}
    if body is not None:
        request.headers["Content-Length"] = str(len(body))
    elif method not in ("GET", "HEAD"):
        request.headers["Content-Length"] = "0"
    return session.get_adapter(url).send(request, stream=True, timeout=timeout, verify=True if verify is None else verify, proxies=proxies_for(url))
