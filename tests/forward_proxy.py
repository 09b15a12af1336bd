"""A forward HTTP proxy of ours, as a site's egress proxy would be (squid, a corporate
proxy): a plain request comes to it in absolute form (``GET http://host/path``) and
goes on to that host; ``CONNECT host:port`` opens a tunnel (the client speaks TLS to
the registry through it). It records the first request line of each connection and
its ``Proxy-Authorization``, and refuses a connection without the credentials it is
given, as such a proxy does (407).

After the first request's head the two sockets are spliced: the rest of the
connection (bodies, answers, the next requests, which a registry accepts in absolute
form too) passes through as it is.
"""

from __future__ import annotations

import base64
import socket
import threading
from dataclasses import dataclass
from urllib.parse import urlsplit

from fault_proxy import connection_server


@dataclass(frozen=True)
class Seen:
    method: str
    target: str
    #: the Proxy-Authorization credentials, decoded ("user:password"), or None
    credentials: str | None


def _read_head(sock: socket.socket) -> bytes:
    head = b""
    while b"\r\n\r\n" not in head:
        data = sock.recv(4096)
        if not data:
            return b""
        head += data
    return head


def _splice(one: socket.socket, other: socket.socket) -> None:
    """Copy both ways until either side ends."""

    def pump(source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (source, sink):
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    back = threading.Thread(target=pump, args=(other, one), daemon=True)
    back.start()
    pump(one, other)
    back.join(30)


class ForwardProxy:
    def __init__(self, credentials: str | None = None) -> None:
        #: "user:password" the proxy asks for (None: it asks for none)
        self.credentials = credentials
        self.seen: list[Seen] = []
        self._lock = threading.Lock()
        self._server = connection_server("127.0.0.1", self._serve)
        self.port = self._server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def _serve(self, client: socket.socket) -> None:
        client.settimeout(60)
        head = _read_head(client)
        if not head:
            return
        head, _, extra = head.partition(b"\r\n\r\n")  # extra: the body's first bytes
        first, _, rest = head.partition(b"\r\n")
        method, target, _version = first.decode("latin-1").split(" ", 2)
        credentials = None
        kept = []
        for line in filter(None, rest.split(b"\r\n")):
            name, _, value = line.decode("latin-1").partition(":")
            if name.strip().lower() == "proxy-authorization":
                scheme, _, token = value.strip().partition(" ")
                if scheme.lower() == "basic":
                    credentials = base64.b64decode(token).decode()
            else:
                kept.append(line)
        with self._lock:
            self.seen.append(Seen(method, target, credentials))
        if self.credentials is not None and credentials != self.credentials:
            client.sendall(b'HTTP/1.1 407 Proxy Authentication Required\r\nProxy-Authenticate: Basic realm="proxy"\r\nContent-Length: 0\r\nConnection: close\r\n\r\n')
            return
        if method == "CONNECT":
            host, _, port = target.rpartition(":")
            upstream = socket.create_connection((host.strip("[]"), int(port)), timeout=60)
            client.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
            upstream.sendall(extra)
            _splice(client, upstream)
            return
        parts = urlsplit(target)
        upstream = socket.create_connection((parts.hostname, parts.port or 80), timeout=60)
        origin_form = parts.path + (f"?{parts.query}" if parts.query else "")
        upstream.sendall(f"{method} {origin_form} HTTP/1.1\r\n".encode("latin-1") + b"".join(line + b"\r\n" for line in kept) + b"\r\n" + extra)
        _splice(client, upstream)

    def requests(self) -> list[Seen]:
        with self._lock:
            return list(self.seen)
