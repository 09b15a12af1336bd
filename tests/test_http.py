"""The transport's HTTP/1.1 (registry/transport.py), at the level of bytes.

Against the real registry: a connection is kept for the next request once an answer
was read to its end, and a chunked request body arrives whole. Against a socket
server of ours that answers with bytes we choose (what a registry or a proxy in
front of it may send, but the real registry does not on demand): chunk extensions
and trailers, interim 100 answers, a body that ends with the connection, a body
shorter than its Content-Length (an error, never a short body taken for whole), ``Connection: close``, a connection the server
closed while it was idle, a gzip-coded answer; and a header value HTTP cannot carry
is refused before anything is sent.
"""

from __future__ import annotations

import gzip
import hashlib
import socket
import threading
from collections.abc import Callable, Iterator

import pytest

from batchpush.registry.transport import ProtocolError, _authority, new_session, send

TIMEOUT = (5.0, 5.0)


class Scripted:
    """A server on loopback: each connection is handed to ``answer`` with the
    request heads read so far; it records how many connections it was given."""

    def __init__(self, answer: Callable[[socket.socket, bytes], None]) -> None:
        self.answer = answer
        self.connections = 0
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.host = f"127.0.0.1:{self._listener.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        conn.settimeout(10)
        with conn:
            try:
                self.answer(conn, b"")
            except OSError:
                pass

    def close(self) -> None:
        self._listener.close()


def read_request(conn: socket.socket) -> bytes:
    """One request's head (and nothing after it: the tests' requests have no body)."""
    data = b""
    while b"\r\n\r\n" not in data:
        piece = conn.recv(1)
        if not piece:
            return data
        data += piece
    return data


@pytest.fixture
def scripted() -> Iterator[Callable[[Callable[[socket.socket, bytes], None]], Scripted]]:
    made: list[Scripted] = []

    def make(answer: Callable[[socket.socket, bytes], None]) -> Scripted:
        made.append(Scripted(answer))
        return made[-1]

    yield make
    for server in made:
        server.close()


def test_a_connection_is_kept_for_the_next_request_once_its_answer_is_read(registry):
    session = new_session("test", 2)
    local_ports = []
    for _ in range(3):
        response = send(session, "GET", f"http://{registry.host}/v2/", {}, None, timeout=TIMEOUT, verify=False)
        assert response.status_code == 200
        local_ports.append(response.raw._connection.sock.getsockname()[1])
        assert response.raw.read(1 << 16) == b"{}"
        response.raw.release_conn()
    session.close()
    assert len(set(local_ports)) == 1


def test_a_chunked_request_body_arrives_whole(registry):
    session = new_session("test", 2)
    started = send(session, "POST", f"http://{registry.host}/v2/http/chunked/blobs/uploads/", {}, None, timeout=TIMEOUT, verify=False)
    assert started.status_code == 202
    location = started.headers["Location"]
    started.raw.release_conn()
    pieces = [memoryview(bytes([n]) * (1000 + 7919 * n)) for n in range(1, 6)] + [memoryview(b"")]
    whole = b"".join(bytes(p) for p in pieces)
    patched = send(session, "PATCH", location, {"Content-Type": "application/octet-stream"}, iter(pieces), timeout=TIMEOUT, verify=False)
    assert patched.status_code == 202, patched.raw.read(4096)
    location = patched.headers["Location"]
    patched.raw.release_conn()
    digest = "sha256:" + hashlib.sha256(whole).hexdigest()
    closed = send(session, "PUT", f"{location}{'&' if '?' in location else '?'}digest={digest}", {}, None, timeout=TIMEOUT, verify=False)
    assert closed.status_code == 201
    closed.raw.release_conn()
    head = send(session, "HEAD", f"http://{registry.host}/v2/http/chunked/blobs/{digest}", {}, None, timeout=TIMEOUT, verify=False)
    assert head.status_code == 200 and head.headers["content-length"] == str(len(whole))
    session.close()


def test_chunk_extensions_trailers_and_interim_answers_are_read_past(scripted):
    def answer(conn: socket.socket, _: bytes) -> None:
        read_request(conn)
        conn.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
        conn.sendall(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nX-Twice: a\r\nx-twice: b\r\n\r\n")
        conn.sendall(b"5;name=value\r\nhello\r\n")
        conn.sendall(b"6\r\n world\r\n0\r\nX-Trailer: t\r\n\r\n")
        read_request(conn)  # the next request comes on the same connection

    server = scripted(answer)
    session = new_session("test", 2)
    response = send(session, "GET", f"http://{server.host}/", {}, None, timeout=TIMEOUT, verify=False)
    assert response.status_code == 200 and response.headers.get("X-TWICE") == "a, b"
    assert response.raw.read(3) == b"hel"
    assert response.raw.read(100) == b"lo world"
    assert response.raw.read(100) == b""
    response.raw.release_conn()
    assert len(session._idle[("http", "127.0.0.1", int(server.host.rsplit(":", 1)[1]), None, None)]) == 1
    session.close()


def test_a_body_shorter_than_its_length_raises(scripted):
    def answer(conn: socket.socket, _: bytes) -> None:
        read_request(conn)
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabcd")

    server = scripted(answer)
    session = new_session("test", 2)
    response = send(session, "GET", f"http://{server.host}/", {}, None, timeout=TIMEOUT, verify=False)
    assert response.raw.read(2) == b"ab"
    with pytest.raises(ProtocolError):
        response.raw.read(100)  # a caller never takes a short body for a whole one
    session.close()


def test_a_body_that_ends_with_its_connection_and_connection_close_are_not_kept(scripted):
    def answer(conn: socket.socket, _: bytes) -> None:
        head = read_request(conn)
        if b"/close-header" in head:
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")
        else:
            conn.sendall(b"HTTP/1.0 200 OK\r\n\r\nuntil the end")

    server = scripted(answer)
    session = new_session("test", 2)
    until_end = send(session, "GET", f"http://{server.host}/until-end", {}, None, timeout=TIMEOUT, verify=False)
    assert until_end.raw.read(1000) == b"until the end" and until_end.raw.read(10) == b""
    until_end.raw.release_conn()
    closing = send(session, "GET", f"http://{server.host}/close-header", {}, None, timeout=TIMEOUT, verify=False)
    assert closing.raw.read(1000) == b"ok"
    closing.raw.release_conn()
    assert not any(session._idle.values()) and server.connections == 2
    session.close()


def test_a_connection_the_server_closed_while_idle_is_not_used_again(scripted):
    def answer(conn: socket.socket, _: bytes) -> None:
        read_request(conn)
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        # then closes the kept connection (an idle timeout)

    server = scripted(answer)
    session = new_session("test", 2)
    for _ in range(2):
        response = send(session, "GET", f"http://{server.host}/", {}, None, timeout=TIMEOUT, verify=False)
        assert response.raw.read(10) == b"ok"
        response.raw.release_conn()
        threading.Event().wait(0.2)  # the close reaches us
    assert server.connections == 2
    session.close()


def test_a_gzip_coded_answer_is_decoded_where_asked(scripted):
    coded = gzip.compress(b'{"errors": []}')

    def answer(conn: socket.socket, _: bytes) -> None:
        read_request(conn)
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Encoding: gzip\r\nContent-Length: %d\r\n\r\n" % len(coded) + coded)

    server = scripted(answer)
    session = new_session("test", 2)
    response = send(session, "GET", f"http://{server.host}/", {}, None, timeout=TIMEOUT, verify=False)
    assert response.raw.read(1 << 16, decode_content=True) == b'{"errors": []}'
    session.close()


def test_a_header_value_holding_a_line_break_is_refused_before_anything_is_sent(scripted):
    server = scripted(lambda conn, _: read_request(conn))
    session = new_session("test", 2)
    with pytest.raises(ValueError) as refused:
        send(session, "GET", f"http://{server.host}/", {"Authorization": "Bearer abc\r\nX-Injected: 1"}, None, timeout=TIMEOUT, verify=False)
    assert "abc" not in str(refused.value)
    threading.Event().wait(0.2)
    assert server.connections == 0
    session.close()


def test_an_answer_sent_before_the_body_was_taken_is_the_requests_answer(scripted):
    """The server answers a large PUT at once (a token expired mid-upload: 401) and
    closes without reading the body: the send breaks, and the answer is still read."""

    def answer(conn: socket.socket, _: bytes) -> None:
        read_request(conn)
        conn.sendall(b'HTTP/1.1 401 Unauthorized\r\nWWW-Authenticate: Bearer realm="x"\r\nContent-Length: 0\r\nConnection: close\r\n\r\n')
        conn.shutdown(socket.SHUT_WR)
        threading.Event().wait(0.2)

    server = scripted(answer)
    session = new_session("test", 2)
    response = send(session, "PUT", f"http://{server.host}/", {}, b"x" * (32 << 20), timeout=TIMEOUT, verify=False)
    assert response.status_code == 401 and response.headers["www-authenticate"].startswith("Bearer")
    response.raw.release_conn()
    assert not any(session._idle.values())  # a connection whose request was cut is not kept
    session.close()


def test_bytes_no_request_asked_for_keep_a_connection_from_being_used_again(scripted):
    """A HEAD answered with a body (a server's mistake): those bytes would be read as
    the next request's answer; the connection is not used again."""

    def answer(conn: socket.socket, _: bytes) -> None:
        while head := read_request(conn):
            if head.startswith(b"HEAD"):
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nHTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n")
            else:
                conn.sendall(b"HTTP/1.1 201 Created\r\nContent-Length: 0\r\n\r\n")

    server = scripted(answer)
    session = new_session("test", 2)
    head = send(session, "HEAD", f"http://{server.host}/", {}, None, timeout=TIMEOUT, verify=False)
    assert head.status_code == 200 and head.raw.read(10) == b""
    head.raw.release_conn()
    threading.Event().wait(0.2)  # the stray bytes arrive
    put = send(session, "PUT", f"http://{server.host}/", {}, b"{}", timeout=TIMEOUT, verify=False)
    assert put.status_code == 201 and server.connections == 2
    session.close()


@pytest.mark.parametrize(
    ("host", "port", "scheme", "header"),
    [
        ("registry.example", 443, "https", "registry.example"),
        ("registry.example", 5000, "https", "registry.example:5000"),
        ("registry.example", 80, "http", "registry.example"),
        ("::1", 5000, "http", "[::1]:5000"),
        ("fe80::1%eth0", 443, "https", "[fe80::1]"),
        ("bücher.example", 443, "https", "xn--bcher-kva.example"),
    ],
)
def test_the_host_header_is_written_as_http_client_wrote_it(host, port, scheme, header):
    assert _authority(host, port, scheme) == header
