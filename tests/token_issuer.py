"""A small token issuer for the real registry's ``auth.token`` mode: it checks basic
credentials and signs short-lived RS256 JWTs carrying the requested access.

Started with ``refresh_tokens``, it is an OAuth2 token endpoint that accepts only the
refresh-token grant (a form POST, as docker and containers/image send an identity
token) for access beyond anonymous pulls: a GET with credentials is refused with 401."""

from __future__ import annotations

import base64
import datetime
import json
import os
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.x509.oid import NameOID

SERVICE = "batchpush-test-registry"
ISSUER = "batchpush-test-issuer"


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


class TokenIssuer:
    """``users``: username -> password. ``ttl_s``: effective token lifetime.
    ``refresh_tokens``: refresh token -> subject; given, that grant is the only way to
    more than an anonymous pull.
    ``rotate_refresh_tokens``: each grant answers a new refresh token and revokes the
    one it was given (as some identity providers do)."""

    def __init__(
        self,
        workdir: str,
        users: dict[str, str],
        ttl_s: int = 300,
        advertised_ttl_s: int | None = None,
        *,
        refresh_tokens: dict[str, str] | None = None,
        rotate_refresh_tokens: bool = False,
    ) -> None:
        self.users = users
        self.refresh_tokens = dict(refresh_tokens) if refresh_tokens is not None else None
        self.rotate_refresh_tokens = rotate_refresh_tokens
        #: every refresh token handed out by rotation, to search for in outputs
        self.issued_refresh_tokens: list[str] = []
        self._lock = threading.Lock()
        self.ttl_s = ttl_s
        #: the expires_in told to clients (a liar's value tests the 401 path)
        self.advertised_ttl_s = advertised_ttl_s or ttl_s
        self.requests: list[dict[str, Any]] = []
        #: every token issued, to search for in outputs
        self.tokens: list[str] = []
        self.key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "batchpush test token signer")])
        now = datetime.datetime.now(datetime.UTC)
        self.cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=7))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(self.key, hashes.SHA256())
        )
        self.cert_path = os.path.join(workdir, "token-signer.pem")
        with open(self.cert_path, "wb") as out:
            out.write(self.cert.public_bytes(serialization.Encoding.PEM))
        issuer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:
                issuer._serve(self)

            def do_POST(self) -> None:
                issuer._serve_oauth(self)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.realm = f"http://127.0.0.1:{self.server.server_address[1]}/token"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def host(self) -> str:
        """host:port the issuer listens on (for a FaultProxy in front of it)."""
        return f"127.0.0.1:{self.server.server_address[1]}"

    def registry_config(self, realm: str | None = None) -> dict[str, Any]:
        """The registry's ``auth.token`` section; ``realm`` replaces the issuer's own
        URL in the challenges (e.g. a FaultProxy's ``http://HOST/token``)."""
        return {"auth": {"token": {"realm": realm or self.realm, "service": SERVICE, "issuer": ISSUER, "rootcertbundle": self.cert_path}}}

    def sign(self, subject: str, access: list[dict[str, Any]]) -> str:
        now = int(time.time())
        header = {"typ": "JWT", "alg": "RS256", "x5c": [base64.b64encode(self.cert.public_bytes(serialization.Encoding.DER)).decode()]}
        # the registry allows 60 s of clock leeway: subtract it so ttl_s is what counts
        claims = {"iss": ISSUER, "sub": subject, "aud": SERVICE, "iat": now, "nbf": now - 1, "exp": now + self.ttl_s - 60, "jti": uuid.uuid4().hex, "access": access}
        signing_input = f"{_b64(json.dumps(header).encode())}.{_b64(json.dumps(claims).encode())}"
        signature = self.key.sign(signing_input.encode(), padding.PKCS1v15(), hashes.SHA256())
        return f"{signing_input}.{_b64(signature)}"

    def _access(self, subject: str, scopes: list[str]) -> list[dict[str, Any]]:
        access = []
        for scope in scopes:
            kind, _, rest = scope.partition(":")
            name, _, actions = rest.rpartition(":")
            granted = actions.split(",") if subject else [a for a in actions.split(",") if a == "pull"]
            access.append({"type": kind, "name": name, "actions": granted})
        return access

    @staticmethod
    def _answer(handler: BaseHTTPRequestHandler, status: int, document: dict[str, Any] | None = None) -> None:
        body = json.dumps(document).encode() if document is not None else b""
        handler.send_response(status)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Content-Length", str(len(body)))
        handler.end_headers()
        handler.wfile.write(body)

    def _serve(self, handler: BaseHTTPRequestHandler) -> None:
        query = parse_qs(urlsplit(handler.path).query)
        subject = ""
        header = handler.headers.get("Authorization", "")
        if self.refresh_tokens is not None and header:  # the refresh-token grant only (anonymous pulls stay open)
            self.requests.append({"method": "GET", "subject": None, "scopes": query.get("scope", []), "basic": header.startswith("Basic ")})
            self._answer(handler, 401, {"error": "unauthorized_client"})
            return
        if header.startswith("Basic "):
            username, _, password = base64.b64decode(header[6:]).decode().partition(":")
            if self.users.get(username) != password:
                handler.send_response(401)
                handler.end_headers()
                return
            subject = username
        self.requests.append({"method": "GET", "subject": subject, "scopes": query.get("scope", [])})
        token = self.sign(subject, self._access(subject, query.get("scope", [])))
        self.tokens.append(token)
        self._answer(handler, 200, {"token": token, "expires_in": self.advertised_ttl_s, "issued_at": datetime.datetime.now(datetime.UTC).isoformat()})

    def _serve_oauth(self, handler: BaseHTTPRequestHandler) -> None:
        """RFC 6749's refresh-token grant as the distribution token spec (oauth.md)
        describes it: scopes space-separated in ``scope``, ``client_id`` required."""
        length = int(handler.headers.get("Content-Length") or 0)
        form = parse_qs(handler.rfile.read(length).decode("ascii", "replace"))
        if self.refresh_tokens is None:
            self._answer(handler, 404)
            return
        grant_type = form.get("grant_type", [""])[0]
        client_id = form.get("client_id", [""])[0]
        service = form.get("service", [""])[0]
        scopes = [scope for value in form.get("scope", []) for scope in value.split(" ") if scope]
        refresh_token = form.get("refresh_token", [""])[0]
        with self._lock:
            subject = self.refresh_tokens.get(refresh_token)
            seen = {"method": "POST", "subject": subject, "scopes": scopes, "grant_type": grant_type, "client_id": client_id, "service": service}
            self.requests.append(seen)
            if grant_type != "refresh_token" or not client_id or service != SERVICE:
                self._answer(handler, 400, {"error": "invalid_request"})
                return
            if subject is None:
                self._answer(handler, 400, {"error": "invalid_grant"})
                return
            answer: dict[str, Any] = {}
            if self.rotate_refresh_tokens:
                del self.refresh_tokens[refresh_token]
                rotated = f"rotated-refresh-{uuid.uuid4().hex}"
                self.refresh_tokens[rotated] = subject
                self.issued_refresh_tokens.append(rotated)
                answer["refresh_token"] = rotated
        token = self.sign(subject, self._access(subject, scopes))
        self.tokens.append(token)
        answer.update({"access_token": token, "expires_in": self.advertised_ttl_s, "scope": " ".join(scopes)})
        self._answer(handler, 200, answer)

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
