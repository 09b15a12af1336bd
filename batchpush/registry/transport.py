"""The HTTP/1.1 client every registry client uses, and the proxies it goes through.

Our own, on the standard library's ``socket`` (and ``ssl``, imported when a request
goes to an https URL): a registry request needs a small part of HTTP/1.1 (a request
with a body of known length or a chunked one, an answer with a Content-Length, a
chunked body or one that ends with the connection, keep-alive), and the general
clients cost most of a one-image run's start-up to import (bench/startup.py: urllib3
~60 ms, http.client's email parser ~12 ms, requests 30 ms more; the run itself is a
few ms). ``send`` sends one request, never redirected, never retried (the caller's
retry policy decides), its answer streamed (``Response``): the status and headers are
read, the body is read by the caller (``Response.raw``). Connections are kept per
origin (scheme, host, port, proxy and trust setting) for the next request once an
answer has been read to its end.

What a request may raise: OSError (the socket's and TLS's failures, timeouts
included), HTTPError (an answer that is not HTTP/1.x, a body that ends short, a proxy
refusing a tunnel) and ValueError (a URL or a header value HTTP cannot carry: a
token holding a newline); errors.py maps them (``TRANSPORT_ERRORS``).

The proxy variables are read once per origin, with requests' rules (``NO_PROXY``
included: ``should_bypass_proxies``): an ``http://`` target goes to the proxy in
absolute form, an ``https://`` one through a CONNECT tunnel, with the proxy URL's
credentials as ``Proxy-Authorization`` either way. The CA bundle is certifi's, as
requests' was, or the file or directory the client names; a TLS context is made
once per trust setting and shared by every connection.

A body is handed to the socket in pieces of at most SEND_PIECE_BYTES, each with
one ``send`` (as much as the socket takes now), never ``sendall``: since Python 3.5
the socket's timeout bounds a whole ``sendall``, so once the buffers are full a
piece that takes longer than the timeout to drain (1 MiB under 100 KB/s: a remote
site, a satellite link) failed although bytes were moving. Each ``send`` waits at
most the socket's timeout for room and takes what fits, so that timeout is the
longest the link may go without taking a byte: silence, not slowness, fails a body.
Over TLS a ``send`` writes its whole piece, so there it is one piece per timeout
(64 KiB in 10 s: 6.5 KB/s) that the link must keep up. A chunked body's pieces are
framed around them, never copied.
"""

from __future__ import annotations

import base64
import functools
import os
import select
import socket
import threading
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlsplit

if TYPE_CHECKING:
    import ssl

#: the most of a body one ``send`` offers the socket (a TLS record is 16 KiB)
SEND_PIECE_BYTES = 64 << 10
#: a body this small goes in the same ``send`` as the request's head (one packet)
SMALL_BODY_BYTES = 16 << 10
#: sent with every request unless it says otherwise (no content coding asked for: a
#: registry's bodies are JSON or already compressed; one that comes anyway is decoded
#: where the caller asks, ``decode_content``)
DEFAULT_HEADERS = {"Accept-Encoding": "identity", "Accept": "*/*", "Connection": "keep-alive"}
#: the content codings a body is decoded from when the caller asks (none is asked for)
CODINGS = ("gzip", "x-gzip", "deflate")
#: the most one ``recv`` takes from a connection
RECV_BYTES = 64 << 10
#: the pieces a body is read in when all of it is asked for
READ_ALL_PIECE_BYTES = 1 << 20
#: the port of a URL that names none
DEFAULT_PORTS = {"http": 80, "https": 443}
#: the longest status or header line, and the most header lines, of an answer
MAX_LINE_BYTES = 64 << 10
MAX_HEADER_LINES = 200
#: a URL target and a header value must not hold these (http.client's rules)
_FORBIDDEN_IN_TARGET = frozenset(chr(c) for c in (*range(0x21), 0x7F))
_FORBIDDEN_IN_VALUE = ("\r", "\n", "\x00")


class HTTPError(Exception):
    """The answer is not what HTTP/1.1 allows, or ended before it was whole."""


class ProtocolError(HTTPError):
    pass


class ProxyError(HTTPError):
    """The proxy would not carry the request; ``permanent`` when no retry can change
    that (its URL names a kind of proxy we do not speak, or it refuses our
    credentials). Its text names no credential."""

    def __init__(self, message: str, *, permanent: bool = False) -> None:
        super().__init__(message)
        self.permanent = permanent


class Headers(Mapping[str, str]):
    """An answer's headers: looked up by name whatever its case; a repeated header's
    values joined with ", " (as HTTP allows for list-valued ones)."""

    __slots__ = ("_values",)

    def __init__(self) -> None:
        self._values: dict[str, tuple[str, str]] = {}

    def add(self, name: str, value: str) -> None:
        key = name.lower()
        known = self._values.get(key)
        self._values[key] = (name, f"{known[1]}, {value}" if known else value)

    def get(self, name: str, default: Any = None) -> Any:
        known = self._values.get(name.lower())
        return known[1] if known else default

    def __getitem__(self, name: str) -> str:
        return self._values[name.lower()][1]

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name.lower() in self._values

    def __iter__(self) -> Iterator[str]:
        return (name for name, _ in self._values.values())

    def __len__(self) -> int:
        return len(self._values)

    def __repr__(self) -> str:
        return f"Headers({sorted(name for name, _ in self._values.values())})"


class _Reader:
    """What a connection received and no answer has taken yet, and the reads of it:
    our own buffer (not ``socket.makefile``'s), so that bytes an answer did not frame
    (a body longer than its length, a stray one after a HEAD) are seen and keep the
    connection from carrying another request."""

    __slots__ = ("buffer", "sock")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buffer = bytearray()

    def _fill(self) -> bool:
        data = self.sock.recv(RECV_BYTES)
        self.buffer += data
        return bool(data)

    def readline(self, limit: int) -> bytes:
        """One line, its end included; at most ``limit`` bytes; what is left at the
        connection's end."""
        start = 0
        while True:
            end = self.buffer.find(b"\n", start, limit)
            if end >= 0:
                return self._take(end + 1)
            if len(self.buffer) >= limit:
                return self._take(limit)
            start = len(self.buffer)
            if not self._fill():
                return self._take(len(self.buffer))

    def read(self, amount: int) -> bytes:
        """``amount`` bytes, fewer only at the connection's end."""
        if len(self.buffer) >= amount:
            return self._take(amount)
        pieces = [self._take(len(self.buffer))]
        got = len(pieces[0])
        while got < amount:
            data = self.sock.recv(min(amount - got, RECV_BYTES))
            if not data:
                break
            pieces.append(data)
            got += len(data)
        return pieces[0] if len(pieces) == 1 else b"".join(pieces)

    def _take(self, amount: int) -> bytes:
        data = bytes(self.buffer[:amount])
        del self.buffer[:amount]
        return data


class _Connection:
    """One socket to an origin (through its proxy, if any) and what it received."""

    __slots__ = ("key", "reader", "sock")

    def __init__(self, key: tuple[Any, ...], sock: socket.socket) -> None:
        self.key = key
        self.sock = sock
        self.reader = _Reader(sock)

    def dropped(self) -> bool:
        """Whether an idle connection can no longer carry a request: bytes no request
        asked for (received, or held decrypted by TLS), or the socket readable (the
        other end closed it, or sent them)."""
        if self.reader.buffer:
            return True
        pending = getattr(self.sock, "pending", None)  # an SSLSocket's decrypted bytes
        try:
            if pending is not None and pending():
                return True
            poller = select.poll()
            poller.register(self.sock, select.POLLIN | select.POLLERR | select.POLLHUP)
            return bool(poller.poll(0))
        except (OSError, ValueError):
            return True

    def close(self) -> None:
        self.sock.close()


class _Body:
    """An answer's body, read by the caller: ``read`` what it wants, then
    ``release_conn`` (the connection goes back to its session once the body was read to
    its end and the answer allows another request on it; closed otherwise) or ``close``."""

    __slots__ = ("_chunk_left", "_connection", "_decoder", "_encoding", "_keep_alive", "_left", "_mode", "_session")

    def __init__(self, session: Session, connection: _Connection, mode: str, length: int, keep_alive: bool, encoding: str) -> None:
        self._session = session
        self._connection: _Connection | None = connection
        #: "length" (``_left`` bytes to come), "chunked", "close" (until the connection
        #: ends) or "done"
        self._mode = mode
        self._left = length
        self._chunk_left = 0
        self._keep_alive = keep_alive
        self._encoding = encoding
        self._decoder: Any = None

    def read(self, amount: int | None = None, decode_content: bool = False) -> bytes:
        """At most ``amount`` bytes of the body (all of the rest if None); b"" at its
        end. Raises OSError or ProtocolError when it breaks off (the connection is
        closed then); ``decode_content`` undoes a gzip or deflate coding."""
        if self._mode == "done" or self._connection is None:
            return b""
        if amount is None:  # in pieces: a read of an unbounded size would allocate it
            pieces = []
            while piece := self.read(READ_ALL_PIECE_BYTES):
                pieces.append(piece)
            data = b"".join(pieces)
            return self._decode(data, 0) if decode_content and data and self._encoding in CODINGS else data
        try:
            data = self._read(amount)
        except BaseException:
            self.close()
            raise
        if decode_content and data and self._encoding in CODINGS:
            data = self._decode(data, amount)
        return data

    def _read(self, want: int) -> bytes:
        assert self._connection is not None
        reader = self._connection.reader
        if self._mode == "length":
            asked = min(want, self._left)
            data = reader.read(asked)
            self._left -= len(data)
            if not self._left:
                self._mode = "done"
            elif len(data) < asked:  # what came is lost with it: a caller resumes from what it had
                raise ProtocolError(f"the body ended {self._left} bytes short of its Content-Length")
            return data
        if self._mode == "close":
            data = reader.read(want)
            if len(data) < want:
                self._mode = "done"
                self._keep_alive = False
            return data
        pieces: list[bytes] = []
        got = 0
        while got < want and self._mode == "chunked":
            if not self._chunk_left:
                self._chunk_left = self._chunk_size(reader)
                if not self._chunk_left:
                    self._read_trailers(reader)
                    self._mode = "done"
                    break
            piece = reader.read(min(want - got, self._chunk_left))
            if not piece:
                raise ProtocolError("the chunked body ended mid-chunk")
            pieces.append(piece)
            got += len(piece)
            self._chunk_left -= len(piece)
            if not self._chunk_left and reader.read(2) != b"\r\n":
                raise ProtocolError("a chunk does not end with CRLF")
        return pieces[0] if len(pieces) == 1 else b"".join(pieces)

    @staticmethod
    def _chunk_size(reader: Any) -> int:
        line = reader.readline(MAX_LINE_BYTES + 1)
        if not line:
            raise ProtocolError("the chunked body ended before its last chunk")
        size = line.split(b";", 1)[0].strip()
        if len(line) > MAX_LINE_BYTES or not size or len(size) > 16 or any(c not in b"0123456789abcdefABCDEF" for c in size):
            raise ProtocolError("a chunk's size line is malformed")
        return int(size, 16)

    @staticmethod
    def _read_trailers(reader: Any) -> None:
        for _ in range(MAX_HEADER_LINES):
            line = reader.readline(MAX_LINE_BYTES + 1)
            if not line:
                raise ProtocolError("the chunked body ended in its trailers")
            if line in (b"\r\n", b"\n"):
                return
        raise ProtocolError("too many trailer lines")

    def _decode(self, data: bytes, want: int) -> bytes:
        """``data`` decoded, at most ``want`` bytes of it (0: all): a caller asks for at
        most what it accepts (``errors.read_limited``), so what would decode beyond it
        is never made (a small body may decode to a great deal)."""
        import zlib

        if self._decoder is None:
            self._decoder = zlib.decompressobj(zlib.MAX_WBITS | 32 if self._encoding != "deflate" else zlib.MAX_WBITS)
        try:
            return self._decoder.decompress(self._decoder.unconsumed_tail + data, want)
        except zlib.error as exc:
            raise ProtocolError(f"the body's {self._encoding} coding does not decode") from exc

    def release_conn(self) -> None:
        connection, self._connection = self._connection, None
        if connection is None:
            return
        if self._mode == "done" and self._keep_alive:
            self._session._give_back(connection)
        else:
            connection.close()

    def close(self) -> None:
        connection, self._connection = self._connection, None
        if connection is not None:
            connection.close()


class Response:
    """One streamed answer: its status, its headers (case-insensitive) and ``raw``,
    its body, to read from. ``close`` gives up the connection (the body's rest
    unread); errors.``release`` reads a small rest and gives the connection back."""

    __slots__ = ("headers", "method", "raw", "reason", "status_code", "url")

    def __init__(self, method: str, url: str, status: int, reason: str, headers: Headers, raw: _Body) -> None:
        #: the request's method and URL (a redirect is another request)
        self.method = method
        self.url = url
        self.status_code = status
        self.reason = reason
        self.headers = headers
        self.raw = raw

    def close(self) -> None:
        self.raw.close()


def default_ca_bundle() -> str:
    """The CA bundle trusted by default: certifi's (requests' default too)."""
    import certifi  # only a run that verifies a registry reads it

    return certifi.where()


def tls_context(verify: bool | str) -> ssl.SSLContext:
    """The client TLS context of a trust setting: ``False`` verifies nothing (no CA
    is loaded), ``True`` trusts certifi's CA bundle, a path trusts that bundle (a
    file) or directory. TLS 1.2 at least, the standard library's ciphers, HTTP/1.1
    offered by ALPN."""
    import ssl

    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_alpn_protocols(["http/1.1"])
    if verify is False:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        return context
    location = default_ca_bundle() if verify is True else verify
    if os.path.isdir(location):
        context.load_verify_locations(capath=location)
    else:
        context.load_verify_locations(cafile=location)
    return context


class Session:
    """The connections of one registry client, kept per origin for the next request
    (at most ``pool_maxsize`` idle ones each), and its TLS contexts, one per trust
    setting; thread-safe. No I/O is done under its lock."""

    def __init__(self, user_agent: str, pool_maxsize: int) -> None:
        #: sent with every request (a request's own headers win)
        self.headers: dict[str, str] = {"User-Agent": user_agent, **DEFAULT_HEADERS}
        #: the trust setting of the session's requests: True (certifi's CAs), False
        #: (none verified), or a CA bundle file or directory
        self.verify: bool | str = True
        self.pool_maxsize = pool_maxsize
        self._lock = threading.Lock()
        self._contexts: dict[bool | str, ssl.SSLContext] = {}
        self._idle: dict[tuple[Any, ...], list[_Connection]] = {}
        self._closed = False

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

    def _take(self, key: tuple[Any, ...]) -> _Connection | None:
        """An idle connection for ``key`` still open, if any (the most recent first)."""
        while True:
            with self._lock:
                idle = self._idle.get(key)
                connection = idle.pop() if idle else None
            if connection is None:
                return None
            if not connection.dropped():
                return connection
            connection.close()

    def _give_back(self, connection: _Connection) -> None:
        with self._lock:
            idle = self._idle.setdefault(connection.key, [])
            kept = not self._closed and len(idle) < self.pool_maxsize
            if kept:
                idle.append(connection)
        if not kept:
            connection.close()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            idle = [connection for connections in self._idle.values() for connection in connections]
            self._idle.clear()
        for connection in idle:
            connection.close()

    def _connect(self, key: tuple[Any, ...], scheme: str, host: str, port: int, proxy: _Proxy | None, verify: bool | str, timeout_s: float) -> _Connection:
        """A new connection to the origin (through ``proxy``'s tunnel for https)."""
        name, number = (proxy.host, proxy.port) if proxy is not None else (host, port)
        # an ASCII name goes as bytes: for a str, getaddrinfo loads the IDNA codec
        sock = socket.create_connection((name.encode("ascii") if name.isascii() else name, number), timeout=timeout_s)  # type: ignore[arg-type]
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if scheme == "https":
                if proxy is not None:
                    _open_tunnel(sock, host, port, proxy)
                sock = self._context(verify).wrap_socket(sock, server_hostname=host)
        except BaseException:
            sock.close()
            raise
        return _Connection(key, sock)


class _Proxy:
    """A forward proxy: where it listens and the credentials its URL holds."""

    __slots__ = ("authorization", "host", "port")

    def __init__(self, url: str) -> None:
        if "://" not in url:
            url = f"http://{url}"  # a proxy without a scheme is an HTTP one (requests' rule)
        parts = urlsplit(url)
        if not parts.hostname:
            raise ProxyError("the proxy URL names no host", permanent=True)
        if parts.scheme.lower() != "http":
            raise ProxyError(f"a {parts.scheme}:// proxy is not supported (an http:// one is)", permanent=True)
        self.host = parts.hostname
        self.port = parts.port or DEFAULT_PORTS["http"]
        self.authorization: str | None = None
        if parts.username is not None and parts.password is not None:
            credentials = f"{unquote(parts.username)}:{unquote(parts.password)}".encode("latin-1")
            self.authorization = "Basic " + base64.b64encode(credentials).decode("ascii")


@functools.lru_cache(maxsize=16)
def _proxy(url: str) -> _Proxy:
    return _Proxy(url)


def _open_tunnel(sock: socket.socket, host: str, port: int, proxy: _Proxy) -> None:
    """CONNECT through ``proxy`` to the origin: its answer's head is read byte by byte
    (nothing of the TLS that follows is taken with it)."""
    authority = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    lines = [f"CONNECT {authority} HTTP/1.1", f"Host: {authority}"]
    if proxy.authorization:
        lines.append(f"Proxy-Authorization: {proxy.authorization}")
    _send_all(sock, ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
    head = bytearray()
    while not (head.endswith(b"\r\n\r\n") or head.endswith(b"\n\n")):
        byte = sock.recv(1)
        if not byte:
            raise ProxyError("the proxy closed the connection before answering the CONNECT")
        head += byte
        if len(head) > MAX_LINE_BYTES:
            raise ProxyError("the proxy's answer to the CONNECT is too long")
    status = head.split(b"\n", 1)[0].split(None, 2)
    code = status[1].decode("latin-1", "replace")[:3] if len(status) > 1 else "no status"
    if not code.startswith("2"):
        # 407: the proxy wants other credentials; no retry will change that
        raise ProxyError(f"the proxy refused the tunnel (HTTP {code})", permanent=code in ("403", "407"))


def _send_all(sock: socket.socket, data: Any) -> None:
    """``data`` to the socket, a ``send`` (what fits now) per piece: each waits at most
    the socket's timeout for room, so a slow link never times out while it moves."""
    view = memoryview(data).cast("B")
    while view:
        view = view[sock.send(view[:SEND_PIECE_BYTES]) :]


def _send_body(sock: socket.socket, body: Any, chunked: bool) -> None:
    if isinstance(body, (bytes, bytearray, memoryview)):
        _send_all(sock, body)
        return
    if not chunked:
        sent = 0
        for piece in body:
            _send_all(sock, piece)
            sent += memoryview(piece).nbytes
        if sent != len(body):  # the connection is closed: the server must not take more or wait for less
            raise ValueError(f"the request body held {sent} bytes, not the {len(body)} its Content-Length said")
        return
    framing = b""
    for piece in body:
        size = memoryview(piece).nbytes
        if size:
            _send_all(sock, framing + b"%X\r\n" % size)
            _send_all(sock, piece)
            framing = b"\r\n"
    _send_all(sock, framing + b"0\r\n\r\n")


def _read_head(reader: Any) -> tuple[str, int, str, Headers]:
    """The status line and headers of an answer (1xx interim answers skipped)."""
    while True:
        line = reader.readline(MAX_LINE_BYTES + 1)
        if not line:
            raise ProtocolError("the connection closed before an answer")
        if len(line) > MAX_LINE_BYTES:
            raise ProtocolError("the status line is too long")
        parts = line.decode("latin-1").rstrip("\r\n").split(None, 2)
        if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or len(parts[1]) != 3 or not parts[1].isascii() or not parts[1].isdigit():
            raise ProtocolError("the answer is not HTTP/1.x")
        version, status, reason = parts[0], int(parts[1]), parts[2] if len(parts) > 2 else ""
        headers = Headers()
        last: str | None = None
        for _ in range(MAX_HEADER_LINES + 1):
            line = reader.readline(MAX_LINE_BYTES + 1)
            if not line:
                raise ProtocolError("the connection closed in the answer's headers")
            if len(line) > MAX_LINE_BYTES:
                raise ProtocolError("a header line is too long")
            if line in (b"\r\n", b"\n"):
                break
            text = line.decode("latin-1").rstrip("\r\n")
            if text[:1] in (" ", "\t") and last is not None:  # an obsolete folded line
                headers._values[last.lower()] = (last, f"{headers[last]} {text.strip()}")
                continue
            name, colon, value = text.partition(":")
            if not colon or not name or name != name.strip():
                raise ProtocolError("a header line is malformed")
            headers.add(name, value.strip())
            last = name
        else:
            raise ProtocolError("too many header lines")
        if 100 <= status < 200 and status != 101:
            continue
        return version, status, reason, headers


def _body_of(session: Session, connection: _Connection, method: str, version: str, status: int, headers: Headers, *, reusable: bool) -> _Body:
    """The body's framing, and whether the connection may carry another request after
    it (never when ``reusable`` is false: the request was cut off while it went)."""
    tokens = {token.strip().lower() for token in headers.get("Connection", "").split(",")}
    keep_alive = reusable and "close" not in tokens and (version != "HTTP/1.0" or "keep-alive" in tokens) and status != 101
    encoding = headers.get("Content-Encoding", "").strip().lower()
    if method == "HEAD" or status in (204, 304) or 100 <= status < 200:
        return _Body(session, connection, "done", 0, keep_alive, encoding)
    codings = headers.get("Transfer-Encoding")
    if codings is not None:
        # chunked must be the last coding, else the body ends with the connection; a
        # Content-Length beside it is ignored, and the connection not kept (RFC 9112 6.3)
        chunked = codings.rsplit(",", 1)[-1].strip().lower() == "chunked"
        keep_alive = keep_alive and chunked and "Content-Length" not in headers
        return _Body(session, connection, "chunked" if chunked else "close", 0, keep_alive, encoding)
    stated = headers.get("Content-Length")
    if stated is not None:
        values = {value.strip() for value in stated.split(",")}
        if len(values) != 1 or not (value := values.pop()).isascii() or not value.isdigit() or len(value) > 18:
            raise ProtocolError("the answer's Content-Length is malformed")
        length = int(value)
        return _Body(session, connection, "length" if length else "done", length, keep_alive, encoding)
    return _Body(session, connection, "close", 0, False, encoding)


def _authority(host: str, port: int, scheme: str) -> str:
    """The Host header of an origin, as http.client wrote it: the name (IDNA-encoded
    if not ASCII; an IPv6 address in brackets, without its zone), and the port unless
    it is the scheme's default (a storage host's signed URL names none)."""
    name = host if host.isascii() else host.encode("idna").decode("ascii")
    if ":" in name:
        name = f"[{name.partition('%')[0]}]"
    return name if port == DEFAULT_PORTS[scheme] else f"{name}:{port}"


def new_session(user_agent: str, pool_maxsize: int) -> Session:
    return Session(user_agent, pool_maxsize)


def send(session: Session, method: str, url: str, headers: dict[str, str], body: Any, *, timeout: tuple[float, float], verify: bool | str | None) -> Response:
    """One request, streamed, never redirected, never retried. ``url`` is already
    quoted (built with ``quote`` or taken from the registry's Location); ``body`` is
    None, bytes, a sized iterable of bytes (sent with its Content-Length), or an
    iterable without a size (sent chunked: a stream whose length is known only at
    its end). ``timeout`` is (connect, read): the first bounds the connection and each
    wait for room while sending, the second each wait for the answer. Raises
    OSError, HTTPError or ValueError (see the module's text)."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("only http:// and https:// URLs naming a host can be requested")
    host, port = parts.hostname, parts.port or DEFAULT_PORTS[scheme]
    target = parts.path or "/"
    if parts.query:
        target = f"{target}?{parts.query}"
    if any(c in _FORBIDDEN_IN_TARGET for c in target):
        raise ValueError("the URL holds a character a request line cannot carry")
    proxy_url = proxy_for(url)
    proxy = _proxy(proxy_url) if proxy_url is not None else None
    trust = (session.verify if verify is None else verify) if scheme == "https" else None
    key = (scheme, host, port, proxy_url, trust)

    sent: dict[str, tuple[str, str]] = {"host": ("Host", _authority(host, port, scheme))}
    for name, value in (*session.headers.items(), *headers.items()):
        sent[name.lower()] = (name, value)
    chunked = False
    if body is not None and not hasattr(body, "__len__"):
        sent["transfer-encoding"] = ("Transfer-Encoding", "chunked")
        chunked = True
    elif body is not None:
        sent["content-length"] = ("Content-Length", str(len(body)))
    elif method not in ("GET", "HEAD"):
        sent["content-length"] = ("Content-Length", "0")
    if proxy is not None and scheme == "http":
        target = f"http://{sent['host'][1]}{target}"  # absolute form, to a forward proxy
        if proxy.authorization:
            sent["proxy-authorization"] = ("Proxy-Authorization", proxy.authorization)
    lines = [f"{method} {target} HTTP/1.1"]
    for name, value in sent.values():
        if any(c in value for c in _FORBIDDEN_IN_VALUE):
            raise ValueError(f"the value of the {name} header holds a line break")
        lines.append(f"{name}: {value}")
    head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")  # UnicodeEncodeError is a ValueError

    connection = session._take(key)
    if connection is None:
        connection = session._connect(key, scheme, host, port, proxy, trust if trust is not None else False, timeout[0])
    try:
        sock = connection.sock
        sock.settimeout(timeout[0])
        cut: OSError | None = None
        try:
            if isinstance(body, (bytes, bytearray)) and len(body) <= SMALL_BODY_BYTES:
                _send_all(sock, head + body)
            else:
                _send_all(sock, head)
                if body is not None:
                    _send_body(sock, body, chunked)
        except (BrokenPipeError, ConnectionResetError) as exc:
            # the server may have answered before it took the whole body, and closed
            # (a 401 for a token that expired mid-upload, a 404, a 413): that answer is
            # the request's, as urllib3 read it too
            cut = exc
        sock.settimeout(timeout[1])
        try:
            version, status, reason, answer = _read_head(connection.reader)
        except (OSError, HTTPError):
            if cut is not None:
                raise cut from None
            raise
        raw = _body_of(session, connection, method, version, status, answer, reusable=cut is None)
    except BaseException:
        connection.close()
        raise
    return Response(method, url, status, reason, answer, raw)


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
