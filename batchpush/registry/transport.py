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

A body is handed to the socket in pieces of at most SEND_PIECE_BYTES, each with
one ``send`` (as much as the socket takes now), never ``sendall``: since Python 3.5
the socket's timeout bounds a whole ``sendall``, so once the buffers are full a
piece that takes longer than the timeout to drain (1 MiB under 100 KB/s: a remote
site, a satellite link) failed although bytes were moving. Each ``send`` waits at
most the socket's timeout for room and takes what fits, so that timeout is now the
longest the link may go without taking a byte: silence, not slowness, fails a body.
Over TLS a ``send`` writes its whole piece, so there it is one piece per timeout
(64 KiB in 10 s: 6.5 KB/s) that the link must keep up.
"""

from __future__ import annotations

import functools
import http.client
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
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool
from urllib3.poolmanager import PoolManager
from urllib3.util.ssl_ import create_urllib3_context

#: the most of a body one ``send`` offers the socket (a TLS record is 16 KiB)
SEND_PIECE_BYTES = 64 << 10


def _send_while_it_moves(connection: http.client.HTTPConnection, data: Any) -> None:
    """``http.client.HTTPConnection.send`` for bytes-like ``data``, with ``send`` in
    a loop instead of ``sendall``: each call waits at most the socket's timeout for
    room and takes what fits, so a slow link never times out while it moves."""
    sock = connection.sock
    if sock is None or not isinstance(data, (bytes, bytearray, memoryview)):
        http.client.HTTPConnection.send(connection, data)  # connects, or a file or iterable: as ever
        return
    view = memoryview(data).cast("B")
    while view:
        view = view[sock.send(view[:SEND_PIECE_BYTES]) :]


class _HTTPConnection(HTTPConnection):
    send = _send_while_it_moves  # type: ignore[assignment]


class _HTTPSConnection(HTTPSConnection):
    send = _send_while_it_moves  # type: ignore[assignment]


class _HTTPConnectionPool(HTTPConnectionPool):
    ConnectionCls = _HTTPConnection


class _HTTPSConnectionPool(HTTPSConnectionPool):
    ConnectionCls = _HTTPSConnection


def _use_our_connections(manager: PoolManager) -> PoolManager:
    """``manager`` making our connections, where it would make urllib3's plain ones
    (a SOCKS proxy's keep their own)."""
    ours = {HTTPConnectionPool: _HTTPConnectionPool, HTTPSConnectionPool: _HTTPSConnectionPool}
    manager.pool_classes_by_scheme = {scheme: ours.get(pool, pool) for scheme, pool in manager.pool_classes_by_scheme.items()}
    return manager


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
    """requests' adapter, with one TLS context per trust setting, made on first use,
    and connections that send a body while it moves."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._contexts: dict[bool | str, ssl.SSLContext] = {}
        self._contexts_lock = threading.Lock()

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        super().init_poolmanager(*args, **kwargs)
        _use_our_connections(self.poolmanager)

    def proxy_manager_for(self, proxy: str, **proxy_kwargs: Any) -> Any:
        return _use_our_connections(super().proxy_manager_for(proxy, **proxy_kwargs))

    def _context(self, verify: bool | str) -> ssl.SSLContext:
        with self._contexts_lock:
            context = self._contexts.get(verify)
        if context is None:
            # made outside the lock (it reads the CA files); two threads connecting
            # first at once may both make one: the first stored is the one used
            made = tls_context(verify)
            with self._contexts_lock:
                context = self._contexts.setdefault(verify, made)
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
    a sized iterable of bytes (sent with its Content-Length), or an iterable without
    a size (sent chunked: a stream whose length is known only at its end)."""
    request = requests.PreparedRequest()
    request.method = method
    request.url = url
    request.headers = CaseInsensitiveDict({**session.headers, **headers})  # type: ignore[arg-type]
    request.body = body
    request.hooks = {"response": []}
    if body is not None and not hasattr(body, "__len__"):
        request.headers["Transfer-Encoding"] = "chunked"
    elif body is not None:
        request.headers["Content-Length"] = str(len(body))
    elif method not in ("GET", "HEAD"):
        request.headers["Content-Length"] = "0"
    return session.get_adapter(url).send(request, stream=True, timeout=timeout, verify=True if verify is None else verify, proxies=proxies_for(url))
