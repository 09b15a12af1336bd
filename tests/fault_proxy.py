"""A fault-injecting HTTP proxy of ours, in front of the real registry.

Rules match requests by method and path and act on the first ``times`` matches
(after skipping ``skip``): answer a status, reset the connection after N request
body bytes (``reset`` streams those bytes to the registry first, as a plain TCP
proxy would; ``reset_buffered`` holds them back, as nginx's request buffering
does), forward the request and reset before the response reaches the client, or
forward it and change the headers of the registry's answer (``headers``), forward it
and reset the connection after N bytes of the answer's body (``reset_response``: a
read that breaks mid-body), or forward it with one byte of the answer's body
flipped (``corrupt_body``), or forward it and send the answer's head and its first N
body bytes, then nothing, the connection held open (``stall``: until the client
closes it or ``stall_s`` passes), or take the request and answer nothing at all, the
connection held open (``hang``: a registry that accepts and never answers). Any
forwarding rule may drop request headers on the way (``drop_request_headers``: e.g.
``Range``, as a server that ignores it), add some
(``add_request_headers``: e.g. a storage host's own credentials), rewrite the answer's
body (``body_filter``) and send it without a Content-Length, ended by closing the
connection (``close_delimited``); ``forward`` does only that. ``stream`` answers
``stream_bytes`` bytes of filler itself, produced as they are sent (a body larger than
memory), with or without a Content-Length. In a ``headers`` rule's values, ``{n}`` is
how often the rule fired (a ``Link`` chain that never ends). A proxy may listen on
another loopback address (``bind``: another host for the client).
A ``status`` answer can be written exactly as the rule says (``raw_headers``: no
Content-Length or Content-Type of ours, so a test can omit or garble them) and be
followed by closing the connection (``close``: a body shorter than its
Content-Length then ends early). A forwarding rule counts its requests in flight
(``peak_in_flight``) and can hold its first answer until several are
(``hold_until_in_flight``): concurrency, or its absence, seen at the proxy. A reset
comes once the peer has acknowledged the bytes sent before it. Request bodies can be
throttled. Counters record every request, its body bytes and the status it was
answered with.

Concurrency is observed by order of arrival and counts, never by timings: every
request is in flight from its arrival (its head read) until its answer starts (so
the client cannot send the next one before this one is counted out), and each
records the others in flight as it arrived (``concurrent``).
``delay_s`` holds every request that long before it is handled (a WAN's round
trip, so that a client's concurrent requests overlap here). ``hold`` forwards a
request once ``until_count`` requests matching ``until_method`` and ``until_path``
have arrived since the rule was added (itself included if it matches), or
``stall_s`` has passed; the record says which (``held``): a client that sends the
two at once meets the condition, one that waits for the first answer before the
second cannot. ``until_proxy`` counts them at another proxy (another host).
"""

from __future__ import annotations

import fcntl
import http.client
import re
import socket
import socketserver
import ssl
import struct
import subprocess
import termios
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from batchpush.registry.client import SMALL_BODY_BYTES

#: ``_read_body``'s length for a chunked body read to its end
CHUNKED = -(1 << 62)


def _upto(length: int, limit: int) -> int:
    """The length to read of a body of ``length`` (or CHUNKED) to stop after ``limit`` data bytes."""
    return -limit if length == CHUNKED else min(length, limit)


@dataclass
class Rule:
    method: str | None
    path: str  # a regular expression searched in the request target
    action: str  # "status" | "reset" | "reset_buffered" | "reset_after_response" | "headers" | "reset_response" | "corrupt_body" | "stall" | "forward" | "stream" | "hang" | "hold"
    status: int = 503
    #: headers added to a ``status`` answer, or set on the registry's (``headers``)
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    #: a ``status`` answer's head carries only ``headers``, exactly as given
    raw_headers: bool = False
    #: close the connection once a ``status`` answer is written
    close: bool = False
    after_body_bytes: int = 0
    #: ``reset_response``: answer-body bytes sent before the reset; ``corrupt_body``:
    #: the offset of the flipped byte
    response_bytes: int = 0
    #: request headers not forwarded (any case)
    drop_request_headers: tuple[str, ...] = ()
    #: request headers added (or replaced) on the way to the registry
    add_request_headers: dict[str, str] = field(default_factory=dict)
    #: the registry's answer body as the client gets it
    body_filter: Callable[[bytes], bytes] | None = None
    #: the answer goes without Content-Length; closing the connection ends it
    close_delimited: bool = False
    #: ``stall``, ``hang``: the longest the connection is held silent; ``hold``: the longest a request is held
    stall_s: float = 90.0
    #: ``hold``: the requests whose arrivals (since the rule was added) end the hold, and how many of them
    until_method: str | None = None
    until_path: str = ""
    until_count: int = 1
    #: ``hold``: count the arrivals at this proxy instead (another host of the client's)
    until_proxy: FaultProxy | None = None
    #: the proxy's arrivals before the rule was added
    arrived_before: int = 0
    #: ``stream``: the filler bytes answered, and whether a Content-Length states them
    stream_bytes: int = 0
    stream_length: bool = True
    #: the first answer this rule forwards is held (not sent) until this many of its
    #: requests are in flight at once, or ``hold_s`` passes: concurrency made observable
    hold_until_in_flight: int = 0
    hold_s: float = 30.0
    #: requests this rule forwards that are in flight now (from their arrival until
    #: their answer's last byte is about to be sent; the client cannot have read that
    #: answer whole before), and the most there were at once
    in_flight: int = 0
    peak_in_flight: int = 0
    held: bool = False
    times: int = 1  # -1: every match
    skip: int = 0
    seen: int = 0
    fired: int = 0

    def matches(self, method: str, target: str) -> bool:
        return (self.method is None or self.method == method) and re.search(self.path, target) is not None


@dataclass
class Seen:
    at: float
    method: str
    target: str
    action: str
    body_bytes: int
    headers: dict[str, str] = field(default_factory=dict)
    #: the status the client was answered with (None: no answer reached it)
    status: int | None = None
    #: answer-body bytes sent to the client (a forwarded answer's)
    response_bytes: int = 0
    #: the requests ("METHOD target") in flight at the proxy as this one arrived
    concurrent: tuple[str, ...] = ()
    #: ``hold``: "met" (its condition was met) or "timed out"
    held: str = ""


#: actions that forward the request to the registry
FORWARDING = ("reset_after_response", "headers", "reset_response", "corrupt_body", "stall", "forward", "hold")


def _drop_headers(head: bytes, names: tuple[str, ...], added: dict[str, str] | None = None) -> bytes:
    """The request head without the headers ``names`` (and those ``added`` replaces),
    with ``added`` after its request line."""
    dropped = {name.lower() for name in (*names, *(added or {}))}
    lines = head.decode("latin-1").split("\r\n")
    kept = [line for line in lines if line.split(":", 1)[0].strip().lower() not in dropped or ":" not in line]
    kept[1:1] = [f"{k}: {v}" for k, v in (added or {}).items()]
    return "\r\n".join(kept).encode("latin-1")


#: the longest a reset waits for the bytes before it to be acknowledged
FLUSH_S = 30.0


def _unacknowledged_bytes(sock: socket.socket) -> int:
    """Bytes written to ``sock`` that its peer has not acknowledged yet (Linux's
    SIOCOUTQ, which is TIOCOUTQ)."""
    return struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0\0\0\0"))[0]


#: a request body this large is an upload that takes one of the host's
#: max_concurrent_uploads slots
LARGE_BODY_BYTES = SMALL_BODY_BYTES


def connection_server(bind: str, serve: Callable[[socket.socket], None]) -> socketserver.ThreadingTCPServer:
    """A server on ``bind`` (a free port) handing each connection to ``serve`` in a
    thread of its own; not yet serving (``serve_forever``)."""

    class Handler(socketserver.BaseRequestHandler):
        def handle(self) -> None:
            serve(self.request)

    class Server(socketserver.ThreadingTCPServer):
        daemon_threads = True
        allow_reuse_address = True
        #: a client's connections opened at once (up to its request limit) wait for no SYN retry
        request_queue_size = 128

    return Server((bind, 0), Handler)


class FaultProxy:
    def __init__(self, upstream: str, bind: str = "127.0.0.1", tls: tuple[str, str] | None = None) -> None:
        """``tls``: a certificate and its key; the proxy then speaks https to its
        clients (and plain http to the registry)."""
        self.upstream_host, port = upstream.rsplit(":", 1)
        self.upstream_port = int(port)
        self.rules: list[Rule] = []
        self.seen: list[Seen] = []
        self.throttle_bytes_per_s: float | None = None
        #: request bodies of LARGE_BODY_BYTES or more (blob uploads) being read now, and their peak
        self.large_bodies_in_flight = 0
        self.peak_large_bodies = 0
        #: request body bytes read so far, updated while bodies stream
        self.live_body_bytes = 0
        #: TCP connections accepted
        self.connections = 0
        #: every request held this long before it is handled (a WAN's round trip)
        self.delay_s = 0.0
        #: requests arrived and not yet answered ("METHOD target" by arrival number), and their peak
        self.in_flight: dict[int, str] = {}
        self.peak_in_flight = 0
        #: (method, target) of every request, in order of arrival
        self.arrivals: list[tuple[str, str]] = []
        self.lock = threading.Lock()
        #: notified when a rule's in_flight grows (a held answer waits on it)
        self._in_flight_grew = threading.Condition(self.lock)
        #: notified at every arrival (``hold`` waits on it)
        self._arrived = threading.Condition(self.lock)
        #: the request this thread is serving: the others in flight as it arrived
        self._current = threading.local()
        self._tls: ssl.SSLContext | None = None
        if tls is not None:
            self._tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            self._tls.load_cert_chain(*tls)
        self.server = connection_server(bind, self._serve)
        self.host = f"{bind}:{self.server.server_address[1]}"
        #: set by stop(): stalled connections end
        self._stopping = threading.Event()
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def add(self, rule: Rule) -> Rule:
        with self.lock:
            self.rules.append(rule)
        counted = rule.until_proxy or self
        with counted.lock:
            rule.arrived_before = len(counted.arrivals)
        return rule

    def body_bytes(self, method: str, path: str = "") -> int:
        with self.lock:
            return sum(s.body_bytes for s in self.seen if s.method == method and path in s.target)

    def requests(self, method: str | None = None, path: str = "") -> list[Seen]:
        with self.lock:
            return [s for s in self.seen if (method is None or s.method == method) and path in s.target]

    def stop(self) -> None:
        self._stopping.set()
        self.server.shutdown()
        self.server.server_close()

    # -- serving -----------------------------------------------------------------
    def _pick(self, method: str, target: str) -> Rule | None:
        with self.lock:
            for rule in self.rules:
                if rule.matches(method, target):
                    rule.seen += 1
                    if rule.seen > rule.skip and (rule.times < 0 or rule.fired < rule.times):
                        rule.fired += 1
                        return rule
        return None

    def _record(self, method: str, target: str, action: str, body_bytes: int, headers: dict[str, str] | None = None, status: int | None = None) -> Seen:
        seen = Seen(time.monotonic(), method, target, action, body_bytes, headers or {}, status, concurrent=getattr(self._current, "concurrent", ()))
        with self.lock:
            self.seen.append(seen)
        return seen

    def _arrive(self, method: str, target: str) -> int:
        """Counts the request in flight; returns its arrival number."""
        with self.lock:
            self.in_flight.pop(getattr(self._current, "number", -1), None)  # the previous one was answered
            number = len(self.arrivals)
            self.arrivals.append((method, target))
            self._current.concurrent = tuple(self.in_flight.values())
            self._current.number = number
            self.in_flight[number] = f"{method} {target}"
            self.peak_in_flight = max(self.peak_in_flight, len(self.in_flight))
            self._arrived.notify_all()
        return number

    def _answering(self) -> None:
        """The request this thread serves is no longer in flight: its answer starts."""
        with self.lock:
            self.in_flight.pop(getattr(self._current, "number", -1), None)

    def _wait_until(self, rule: Rule) -> str:
        """Until ``rule``'s requests have arrived ("met"), or its ``stall_s`` has passed."""

        counted = rule.until_proxy or self

        def met() -> bool:
            arrivals = list(counted.arrivals)  # (another proxy's: a copy, its lock not taken under ours)
            return sum(1 for method, target in arrivals[rule.arrived_before :] if (rule.until_method is None or method == rule.until_method) and re.search(rule.until_path, target)) >= rule.until_count

        deadline = time.monotonic() + rule.stall_s
        with self._arrived:
            # woken by each arrival here; another proxy's are looked at every 50 ms
            while not self._arrived.wait_for(met, timeout=min(0.05, max(0.0, deadline - time.monotonic()))):
                if time.monotonic() >= deadline:
                    return "timed out"
            return "met"

    @staticmethod
    def _reset(sock: socket.socket) -> None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()

    def _flush_then_reset(self, sock: socket.socket) -> None:
        """Reset ``sock`` once the peer has acknowledged every byte written to it, so
        exactly what was sent is what the peer can read before the reset (a reset
        throws away what its own send queue still holds). The peer's kernel holds
        acknowledged bytes for its reader; Linux lets them be read before the reset
        is reported. Bounded: a peer that stops reading is reset after FLUSH_S."""
        deadline = time.monotonic() + FLUSH_S
        while _unacknowledged_bytes(sock) > 0 and time.monotonic() < deadline and not self._stopping.is_set():
            time.sleep(0.005)
        self._reset(sock)

    def _read_body(self, reader, length: int, sink=None) -> int:  # type: ignore[no-untyped-def]
        """The request body's bytes (``length``; a chunked body: ``CHUNKED``, or
        ``-n`` for its first n data bytes), handed to ``sink`` as they come (a
        chunked body with its framing, as it came). Returns the data bytes read."""
        large = length >= LARGE_BODY_BYTES or length < 0
        if large:
            with self.lock:
                self.large_bodies_in_flight += 1
                self.peak_large_bodies = max(self.peak_large_bodies, self.large_bodies_in_flight)
        try:
            if length < 0:
                return self._read_chunked(reader, -length, sink)
            return self._read_body_bytes(reader, length, sink)
        finally:
            if large:
                with self.lock:
                    self.large_bodies_in_flight -= 1

    def _read_chunked(self, reader, limit: int, sink=None) -> int:  # type: ignore[no-untyped-def]
        """A chunked body, framing and all, until its last chunk or ``limit`` data bytes."""
        got = 0
        while got < limit:
            size_line = reader.readline(1024)
            if not size_line:
                break
            if sink is not None:
                sink(size_line)
            size = int(size_line.split(b";")[0].strip() or b"0", 16)
            if size == 0:
                while (line := reader.readline(1024)) not in (b"\r\n", b"\n", b""):  # trailers, then the blank line
                    if sink is not None:
                        sink(line)
                if sink is not None:
                    sink(b"\r\n")
                break
            take = min(size, limit - got)
            got += self._read_body_bytes(reader, take, sink)
            if take < size:
                break
            crlf = reader.readline(1024)
            if sink is not None:
                sink(crlf)
        return got

    def _read_body_bytes(self, reader, length: int, sink=None) -> int:  # type: ignore[no-untyped-def]
        got = 0
        while got < length:
            piece = reader.read(min(65536 if self.throttle_bytes_per_s is None else 16384, length - got))
            if not piece:
                break
            got += len(piece)
            with self.lock:
                self.live_body_bytes += len(piece)
            if sink is not None:
                sink(piece)
            if self.throttle_bytes_per_s:
                time.sleep(len(piece) / self.throttle_bytes_per_s)
        return got

    def _serve(self, client: socket.socket) -> None:
        with self.lock:
            self.connections += 1
        # an answer's last byte may go on its own (see _forward_answer): not held back by Nagle
        client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self._tls is not None:
            try:
                client = self._tls.wrap_socket(client, server_side=True)
            except (OSError, ValueError):
                return
        reader = client.makefile("rb")
        try:
            while True:
                if self._tls is None and reader.peek(1)[:1] == b"\x16":  # a TLS hello (the https probe): refuse it, as the registry does
                    client.sendall(b"HTTP/1.0 400 Bad Request\r\n\r\n")
                    return
                head = b""
                while not head.endswith(b"\r\n\r\n"):
                    line = reader.readline(65537)
                    if not line:
                        return
                    head += line
                request_line, *header_lines = head.decode("latin-1").split("\r\n")
                method, target, _ = request_line.split(" ", 2)
                headers = [h.split(":", 1) for h in header_lines if ":" in h]
                self._arrive(method, target)  # in flight until its answer starts (or the next request, or the connection's end)
                if self.delay_s:
                    time.sleep(self.delay_s)
                length = int(next((v for k, v in headers if k.strip().lower() == "content-length"), "0"))
                if any(k.strip().lower() == "transfer-encoding" and "chunked" in v.lower() for k, v in headers):
                    length = CHUNKED
                rule = self._pick(method, target)
                request_headers = {k.strip().lower(): v.strip() for k, v in headers}
                if rule is None or rule.action in FORWARDING:
                    if not self._forward(client, reader, head, method, target, length, rule=rule, request_headers=request_headers):
                        return
                    continue
                if rule.action == "status":
                    got = self._read_body(reader, length)
                    self._record(method, target, f"status {rule.status}", got, request_headers, rule.status)
                    location = rule.headers.get("Location", "")
                    if "{target}" in location:  # a redirect to the same path elsewhere
                        rule_headers = {**rule.headers, "Location": location.replace("{target}", target)}
                    else:
                        rule_headers = rule.headers
                    ours = "" if rule.raw_headers else f"Content-Length: {len(rule.body)}\r\nContent-Type: application/json\r\n"
                    extra = "".join(f"{k}: {v}\r\n" for k, v in rule_headers.items())
                    self._answering()
                    client.sendall(f"HTTP/1.1 {rule.status} Injected\r\n{ours}{extra}\r\n".encode("latin-1") + (b"" if method == "HEAD" else rule.body))
                    if rule.close:
                        return
                    continue
                if rule.action == "stream":
                    self._read_body(reader, length)
                    self._stream(client, method, target, rule, request_headers)
                    return
                if rule.action == "hang":
                    got = self._read_body(reader, length)
                    self._record(method, target, "hang", got, request_headers)
                    self._hold(client, rule.stall_s)
                    return
                if rule.action == "reset_buffered":
                    got = self._read_body(reader, _upto(length, rule.after_body_bytes))
                    self._record(method, target, "reset_buffered", got)
                    self._reset(client)
                    return
                if rule.action == "reset":
                    upstream = socket.create_connection((self.upstream_host, self.upstream_port))
                    upstream.sendall(head)
                    got = self._read_body(reader, _upto(length, rule.after_body_bytes), upstream.sendall)
                    self._record(method, target, "reset", got)
                    self._flush_then_reset(upstream)
                    self._reset(client)
                    return
        except (OSError, ValueError):
            return
        finally:
            self._answering()  # (the connection ends: what it was serving got no answer)
            reader.close()

    def _stream(self, client: socket.socket, method: str, target: str, rule: Rule, request_headers: dict[str, str]) -> None:
        """A ``status`` answer whose body is ``stream_bytes`` of filler, made as it is
        sent; the connection is closed after it (or when the client goes away)."""
        seen = self._record(method, target, "stream", 0, request_headers, rule.status)
        self._answering()
        length = f"Content-Length: {rule.stream_bytes}\r\n" if rule.stream_length else ""
        extra = "".join(f"{k}: {v}\r\n" for k, v in rule.headers.items())
        client.sendall(f"HTTP/1.1 {rule.status} Injected\r\n{length}{extra}Connection: close\r\n\r\n".encode("latin-1"))
        piece = b" " * 65536
        left = rule.stream_bytes
        while left > 0 and not self._stopping.is_set():
            sent = piece[: min(left, len(piece))]
            client.sendall(sent)  # an OSError (the client closed) ends the answer
            left -= len(sent)
            with self.lock:
                seen.response_bytes += len(sent)

    def _hold(self, client: socket.socket, seconds: float) -> None:
        """Send nothing for ``seconds``, or until the client closes or the proxy stops."""
        client.settimeout(0.2)
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline and not self._stopping.is_set():
            try:
                if not client.recv(65536):
                    return
            except TimeoutError:
                continue

    def _forward(self, client: socket.socket, reader, head: bytes, method: str, target: str, length: int, *, rule: Rule | None, request_headers: dict[str, str]) -> bool:  # type: ignore[no-untyped-def]
        if rule is None:
            return self._forward_answer(client, reader, head, method, target, length, rule=rule, request_headers=request_headers)
        with self.lock:
            rule.in_flight += 1
            rule.peak_in_flight = max(rule.peak_in_flight, rule.in_flight)
            hold = rule.hold_until_in_flight > 0 and not rule.held
            rule.held = rule.held or hold
            self._in_flight_grew.notify_all()
        left = False

        def leave() -> None:
            nonlocal left
            with self.lock:
                if not left:
                    left = True
                    rule.in_flight -= 1

        try:
            return self._forward_answer(client, reader, head, method, target, length, rule=rule, request_headers=request_headers, hold=hold, leave=leave)
        finally:
            leave()

    def _hold_answer(self, rule: Rule) -> None:
        """Wait until ``rule.hold_until_in_flight`` of its requests are in flight, at
        most ``rule.hold_s``."""
        deadline = time.monotonic() + rule.hold_s
        with self._in_flight_grew:
            while rule.peak_in_flight < rule.hold_until_in_flight and not self._stopping.is_set():
                left = deadline - time.monotonic()
                if left <= 0:
                    return
                self._in_flight_grew.wait(min(left, 0.5))

    def _forward_answer(self, client: socket.socket, reader, head: bytes, method: str, target: str, length: int, *, rule: Rule | None, request_headers: dict[str, str], hold: bool = False, leave: Callable[[], None] = lambda: None) -> bool:  # type: ignore[no-untyped-def]
        reset_after = rule is not None and rule.action == "reset_after_response"
        replaced = {k.lower(): (k, v.replace("{n}", str(rule.fired))) for k, v in rule.headers.items()} if rule is not None and rule.action == "headers" else {}
        if rule is not None and (rule.drop_request_headers or rule.add_request_headers):
            head = _drop_headers(head, rule.drop_request_headers, rule.add_request_headers)
        held = self._wait_until(rule) if rule is not None and rule.action == "hold" else ""
        try:
            upstream = socket.create_connection((self.upstream_host, self.upstream_port), timeout=60)
        except OSError:
            self._record(method, target, "upstream down", 0)
            self._reset(client)
            return False
        with upstream:
            upstream.sendall(head)
            got = self._read_body(reader, length, upstream.sendall)
            seen = self._record(method, target, rule.action if rule is not None else "forward", got, request_headers)
            seen.held = held
            response = http.client.HTTPResponse(upstream, method=method)
            response.begin()
            body = response.read()
            if reset_after:
                self._reset(client)
                return False
            cut = rule is not None and rule.action == "reset_response"
            if rule is not None and rule.action == "corrupt_body" and rule.response_bytes < len(body):
                body = body[: rule.response_bytes] + bytes([body[rule.response_bytes] ^ 0xFF]) + body[rule.response_bytes + 1 :]
            if rule is not None and rule.body_filter is not None:
                body = rule.body_filter(body)
            close_delimited = rule is not None and rule.close_delimited
            cut = cut or (rule is not None and rule.action == "stall")
            with self.lock:
                seen.status = response.status
            lines = [f"HTTP/1.1 {response.status} {response.reason}"]
            for key, value in response.getheaders():
                if key.lower() not in ("transfer-encoding", "content-length", "connection", *replaced):
                    lines.append(f"{key}: {value}")
            lines.extend(f"{key}: {value}" for key, value in replaced.values())
            if close_delimited:
                lines.append("Connection: close")
            elif method != "HEAD" or "content-length" not in {k.lower() for k, _ in response.getheaders()}:
                lines.append(f"Content-Length: {len(body)}")
            else:
                lines.append(f"Content-Length: {response.getheader('Content-Length')}")
            sent = b"" if method == "HEAD" else body[: rule.response_bytes] if cut and rule is not None else body
            with self.lock:
                seen.response_bytes = len(sent)
            if hold and rule is not None:
                self._hold_answer(rule)
            self._answering()
            answer = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + sent
            if rule is None:
                client.sendall(answer)
            else:  # the request leaves the rule's in-flight count before the last byte goes
                client.sendall(answer[:-1])
                leave()  # the client cannot have the answer whole yet
                client.sendall(answer[-1:])
            if rule is not None and rule.action == "stall":
                self._hold(client, rule.stall_s)
                return False
            if close_delimited:
                return False
            if cut:
                self._flush_then_reset(client)  # the bytes sent reach the client before the reset does
                return False
        return True


def signal_mid_upload(args: list[str], proxy: FaultProxy, at_bytes: int, signum: int) -> tuple[int, str]:
    """Run ``args``; once the proxy has taken ``at_bytes`` of request bodies (or 60 s
    have passed) send ``signum``. Returns the exit code and stderr."""
    process = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while proxy.live_body_bytes < at_bytes and time.monotonic() < deadline:
        time.sleep(0.05)
    process.send_signal(signum)
    _, err = process.communicate(timeout=60)
    return process.returncode, err
