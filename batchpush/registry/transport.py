"""The HTTP session every registry client uses, and the proxies it goes through.

urllib3 directly, without requests: a registry request needs none of what requests
adds around urllib3 (cookies, hooks, redirects, which the client follows itself,
``.netrc`` and ``REQUESTS_CA_BUNDLE``, which our sessions turned off anyway), and
requests costs a third of a one-image run's start-up to import (bench/startup.py).
``send`` hands a request straight to the pool manager of its proxy and trust
setting, never redirected, never retried (the caller's retry policy decides), its
answer streamed (``Response``). The headers requests sent by default are sent as
before (``DEFAULT_HEADERS``); urllib3's exceptions reach the caller as they are
(errors.py maps them, ``TRANSPORT_ERRORS``).

The proxy variables are read once per origin, with requests' rules (``NO_PROXY``
included: ``should_bypass_proxies``); the CA bundle is certifi's, as requests' was,
or the file or directory the client names.

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

import base64
import functools
import http.client
import os
import ssl
import threading
from typing import Any
from urllib.parse import unquote, urlsplit

from urllib3 import BaseHTTPResponse, HTTPHeaderDict, PoolManager, Timeout
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool
from urllib3.exceptions import ProxyError
from urllib3.poolmanager import ProxyManager
from urllib3.util.ssl_ import create_urllib3_context

#: the most of a body one ``send`` offers the socket (a TLS record is 16 KiB)
SEND_PIECE_BYTES = 64 << 10
#: sent with every request unless it says otherwise: what requests sent by default
#: (the encodings urllib3 decodes without optional modules)
DEFAULT_HEADERS = {"Accept-Encoding": "gzip, deflate", "Accept": "*/*", "Connection": "keep-alive"}
#: hosts whose pools a manager keeps (the registry and its token realm; a storage
#: host a redirect leads to takes the older one's place), as requests kept
POOLS_PER_MANAGER = 2


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


def default_ca_bundle() -> str:
    """The CA bundle trusted by default: certifi's (requests' default too)."""
    import certifi  # only a run that verifies a registry reads it

    return certifi.where()


def tls_context(verify: bool | str) -> ssl.SSLContext:
    """The client TLS context of a trust setting: ``False`` verifies nothing (no CA
    is loaded), ``True`` trusts certifi's CA bundle, a path trusts that bundle (a
    file) or directory. urllib3's defaults otherwise (protocol versions, ciphers)."""
    if verify is False:
        return create_urllib3_context(cert_reqs=ssl.CERT_NONE)  # check_hostname off too
    context = create_urllib3_context(cert_reqs=ssl.CERT_REQUIRED)
    location = default_ca_bundle() if verify is True else verify
    if os.path.isdir(location):
        context.load_verify_locations(capath=location)
    else:
        context.load_verify_locations(cafile=location)
    return context


class Response:
    """One streamed answer: its status, its headers (case-insensitive) and ``raw``,
    urllib3's response, to read the body from. ``close`` gives up the connection
    (the body's rest unread); errors.``release`` reads a small rest and gives the
    connection back to its pool."""

    __slots__ = ("headers", "method", "raw", "status_code", "url")

    def __init__(self, method: str, url: str, raw: BaseHTTPResponse) -> None:
        #: the request's method and URL (a redirect is another request)
        self.method = method
        self.url = url
        self.raw = raw
        self.status_code: int = raw.status
        self.headers: HTTPHeaderDict = raw.headers

    def close(self) -> None:
        self.raw.close()
        self.raw.release_conn()


class Session:
    """The pools of one registry client: a pool manager per proxy and trust setting,
    each made on first use, one TLS context per trust setting; thread-safe."""

    def __init__(self, user_agent: str, pool_maxsize: int) -> None:
        #: sent with every request (a request's own headers win)
        self.headers: dict[str, str] = {"User-Agent": user_agent, **DEFAULT_HEADERS}
        #: the trust setting of the session's requests: True (certifi's CAs), False
        #: (none verified), or a CA bundle file or directory
        self.verify: bool | str = True
        self.pool_maxsize = pool_maxsize
        self._lock = threading.Lock()
        self._contexts: dict[bool | str, ssl.SSLContext] = {}
        self._managers: dict[tuple[str | None, bool | str], PoolManager] = {}

    def _context(self, verify: bool | str) -> ssl.SSLContext:
        with self._lock:
            context = self._contexts.get(verify)
        if context is None:
            # made outside the lock (it reads the CA files); two threads connecting
            # first at once may both make one: the first stored is the one used
            made = tls_context(verify)
            with self._lock:
                context = self._contexts.setdefault(verify, made)
        return context

    def manager(self, proxy: str | None, verify: bool | str) -> PoolManager:
        """The pool manager for requests through ``proxy`` (None: direct) verified
        as ``verify`` says."""
        key = (proxy, verify)
        with self._lock:
            manager = self._managers.get(key)
        if manager is not None:
            return manager
        made = _use_our_connections(_new_manager(proxy, self.pool_maxsize, ssl_context=self._context(verify), cert_reqs="CERT_REQUIRED" if verify is not False else "CERT_NONE"))
        with self._lock:
            manager = self._managers.setdefault(key, made)
        if manager is not made:
            made.clear()
        return manager

    def close(self) -> None:
        with self._lock:
            managers = list(self._managers.values())
            self._managers.clear()
        for manager in managers:
            manager.clear()


def _new_manager(proxy: str | None, pool_maxsize: int, **pool_kw: Any) -> PoolManager:
    """A pool manager, for ``proxy`` if any (its credentials in its URL are sent
    to it as ``Proxy-Authorization``, as requests did); pools never block."""
    kw: dict[str, Any] = {"num_pools": POOLS_PER_MANAGER, "maxsize": pool_maxsize, "block": False, **pool_kw}
    if proxy is None:
        return PoolManager(**kw)
    if "://" not in proxy:
        proxy = f"http://{proxy}"  # a proxy without a scheme is an HTTP one (requests' rule)
    parts = urlsplit(proxy)
    if not parts.hostname:
        raise ProxyError("the proxy URL names no host", ValueError())
    if parts.scheme.lower().startswith("socks"):
        try:
            from urllib3.contrib.socks import SOCKSProxyManager
        except ImportError as exc:  # PySocks missing, as requests would say too
            raise ProxyError("a SOCKS proxy needs PySocks", exc) from exc
        return SOCKSProxyManager(proxy, **kw)
    headers: dict[str, str] = {}
    if parts.username is not None and parts.password is not None:
        credentials = f"{unquote(parts.username)}:{unquote(parts.password)}".encode("latin-1")
        headers["Proxy-Authorization"] = "Basic " + base64.b64encode(credentials).decode("ascii")
    return ProxyManager(proxy, proxy_headers=headers, **kw)


def new_session(user_agent: str, pool_maxsize: int) -> Session:
    return Session(user_agent, pool_maxsize)


def proxies_for(url: str) -> dict[str, str]:
    """The proxies the environment names for ``url`` (empty: connect directly), by
    scheme (``http``, ``https``, ``all``...), as requests' ``get_environ_proxies``."""
    parts = urlsplit(url)
    return _origin_proxies(parts.scheme, parts.netloc)


def proxy_for(url: str) -> str | None:
    """The proxy a request to ``url`` goes through (None: directly): the one for its
    scheme and host, its scheme, all schemes and its host, or all schemes."""
    proxies = proxies_for(url)
    if not proxies:
        return None
    parts = urlsplit(url)
    keys = (f"{parts.scheme}://{parts.hostname}", parts.scheme, f"all://{parts.hostname}", "all") if parts.hostname else (parts.scheme, "all")
    return next((proxies[key] for key in keys if key in proxies), None)


@functools.lru_cache(maxsize=64)
def _origin_proxies(scheme: str, netloc: str) -> dict[str, str]:
    if not any(name.lower().endswith("_proxy") for name in os.environ):
        return {}  # no proxy variable at all: urllib.request is not even imported
    import urllib.request

    url = f"{scheme}://{netloc}/"
    return {} if should_bypass_proxies(url) else urllib.request.getproxies()


def should_bypass_proxies(url: str) -> bool:
    """requests' ``should_bypass_proxies``: ``url``'s host (with or without its
    port) is a ``no_proxy`` entry or ends with ``.ENTRY``; an IPv4 address is one
    or is in a CIDR entry; else the standard library's ``proxy_bypass`` decides."""
    import ipaddress
    import urllib.request

    no_proxy = os.environ.get("no_proxy") or os.environ.get("NO_PROXY")
    parts = urlsplit(url)
    hostname = parts.hostname
    if hostname is None:
        return True
    if no_proxy:
        entries = [entry for entry in no_proxy.replace(" ", "").split(",") if entry]
        if _is_ipv4_address(hostname):
            for entry in entries:
                if "/" in entry:
                    try:
                        if ipaddress.IPv4Address(hostname) in ipaddress.IPv4Network(entry, strict=False):
                            return True
                    except ValueError:
                        continue
                elif hostname == entry:
                    return True
        else:
            with_port = f"{hostname}:{parts.port}" if parts.port else hostname
            for entry in entries:
                entry = entry.lstrip(".")
                if entry in (hostname, with_port) or hostname.endswith("." + entry) or with_port.endswith("." + entry):
                    return True
    try:
        return bool(urllib.request.proxy_bypass(hostname))  # type: ignore[attr-defined]
    except (TypeError, OSError):
        return False


def _is_ipv4_address(text: str) -> bool:
    import ipaddress

    try:
        ipaddress.IPv4Address(text)
    except ValueError:
        return False
    return True


def send(session: Session, method: str, url: str, headers: dict[str, str], body: Any, *, timeout: tuple[float, float], verify: bool | str | None) -> Response:
    """One request, streamed, never redirected, never retried. ``url`` is already
    quoted (built with ``quote`` or taken from the registry's Location); ``body`` is
    None, bytes, a sized iterable of bytes (sent with its Content-Length), or an
    iterable without a size (sent chunked: a stream whose length is known only at
    its end). Raises what urllib3 and http.client raise (errors.TRANSPORT_ERRORS,
    and a ValueError for a header value HTTP cannot carry)."""
    sent = HTTPHeaderDict(session.headers)
    for name, value in headers.items():
        sent[name] = value
    chunked = False
    if body is not None and not hasattr(body, "__len__"):
        sent["Transfer-Encoding"] = "chunked"
        chunked = True
    elif body is not None:
        sent["Content-Length"] = str(len(body))
    elif method not in ("GET", "HEAD"):
        sent["Content-Length"] = "0"
    manager = session.manager(proxy_for(url), session.verify if verify is None else verify)
    raw = manager.urlopen(
        method,
        url,
        body=body,
        headers=sent,
        redirect=False,
        retries=False,
        preload_content=False,
        decode_content=False,
        timeout=Timeout(connect=timeout[0], read=timeout[1]),
        chunked=chunked,
    )
    return Response(method, url, raw)
