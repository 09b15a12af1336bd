"""The OCI 1.1 referrers API, added in front of the real registry by a proxy of ours.

distribution 2.8.2 (the registry the tests run) does not serve
``GET /v2/<name>/referrers/<digest>``; registries that do index a manifest by its
``subject`` when it is pushed, and answer the PUT with an ``OCI-Subject`` header.
This proxy does exactly that for the manifests that pass through it and forwards
every request to the real registry, which stores everything: the listing it serves
names only manifests the registry holds. Bodies are small in these tests: each
request and answer is read whole.
"""

from __future__ import annotations

import http.client
import http.server
import json
import re
import threading
from hashlib import sha256

INDEX = "application/vnd.oci.image.index.v1+json"
_MANIFEST_PUT = re.compile(r"^/v2/(.+)/manifests/([^/?]+)$")
_REFERRERS = re.compile(r"^/v2/(.+)/referrers/([^/?]+)$")
#: hop-by-hop headers, not passed on
_HOP = {"connection", "keep-alive", "transfer-encoding", "content-length"}


class ReferrersApi:
    """Serves on 127.0.0.1 (``host``) in front of ``upstream`` (``HOST:PORT``)."""

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream
        self._lock = threading.Lock()
        #: (repository, subject digest) -> {manifest digest: descriptor}
        self._index: dict[tuple[str, str], dict[str, dict]] = {}
        #: the referrers listings asked, as (repository, digest)
        self.asked: list[tuple[str, str]] = []
        api = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:
                found = _REFERRERS.match(self.path.split("?", 1)[0])
                if found:
                    api._listing(self, found.group(1), found.group(2))
                else:
                    api._forward(self)

            do_HEAD = do_PUT = do_POST = do_PATCH = do_DELETE = lambda self: api._forward(self)

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.host = f"127.0.0.1:{self._server.server_address[1]}"
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def _listing(self, handler: http.server.BaseHTTPRequestHandler, repository: str, subject: str) -> None:
        with self._lock:
            self.asked.append((repository, subject))
            manifests = list(self._index.get((repository, subject), {}).values())
        body = json.dumps({"schemaVersion": 2, "mediaType": INDEX, "manifests": manifests}).encode()
        handler.send_response(200)
        handler.send_header("Content-Type", INDEX)
        handler.send_header("Content-Length", str(len(body)))
        handler.end_headers()
        handler.wfile.write(body)

    def _forward(self, handler: http.server.BaseHTTPRequestHandler) -> None:
        body = _request_body(handler)
        connection = http.client.HTTPConnection(self.upstream, timeout=30)
        try:
            headers = {name: value for name, value in handler.headers.items() if name.lower() not in _HOP}
            connection.request(handler.command, handler.path, body=body if body or handler.command in ("PUT", "POST", "PATCH") else None, headers=headers)
            answer = connection.getresponse()
            data = answer.read()
            extra = {}
            put = _MANIFEST_PUT.match(handler.path.split("?", 1)[0])
            if handler.command == "PUT" and put and answer.status == 201:
                subject = self._indexed(put.group(1), body, handler.headers.get("Content-Type", ""))
                if subject:
                    extra["OCI-Subject"] = subject
            handler.send_response(answer.status)
            for name, value in answer.getheaders():
                if name.lower() not in _HOP:
                    handler.send_header(name, value)
            for name, value in extra.items():
                handler.send_header(name, value)
            # a HEAD's length is the registry's: the size of what a GET would give
            handler.send_header("Content-Length", (answer.getheader("Content-Length") or "0") if handler.command == "HEAD" else str(len(data)))
            handler.end_headers()
            if handler.command != "HEAD":
                handler.wfile.write(data)
        finally:
            connection.close()

    def _indexed(self, repository: str, body: bytes, media_type: str) -> str | None:
        """Indexes a pushed manifest by its subject; the subject's digest, if any."""
        try:
            document = json.loads(body)
        except ValueError:
            return None
        subject = document.get("subject") if isinstance(document, dict) else None
        if not isinstance(subject, dict) or not isinstance(subject.get("digest"), str):
            return None
        digest = "sha256:" + sha256(body).hexdigest()
        descriptor = {"mediaType": document.get("mediaType") or media_type, "digest": digest, "size": len(body)}
        artifact_type = document.get("artifactType") or (document.get("config") or {}).get("mediaType")
        if artifact_type:
            descriptor["artifactType"] = artifact_type
        if document.get("annotations"):
            descriptor["annotations"] = document["annotations"]
        with self._lock:
            self._index.setdefault((repository, subject["digest"]), {})[digest] = descriptor
        return subject["digest"]


def _request_body(handler: http.server.BaseHTTPRequestHandler) -> bytes:
    """The request's body, whole (Content-Length or chunked)."""
    if handler.headers.get("Transfer-Encoding", "").lower() == "chunked":
        parts = []
        while True:
            size = int(handler.rfile.readline().split(b";")[0].strip(), 16)
            if size == 0:
                while handler.rfile.readline() not in (b"\r\n", b"\n", b""):
                    pass
                return b"".join(parts)
            parts.append(handler.rfile.read(size))
            handler.rfile.readline()
    return handler.rfile.read(int(handler.headers.get("Content-Length") or 0))
