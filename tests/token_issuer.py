"""A small token issuer for the real registry's ``auth.token`` mode: it checks basic
credentials and signs short-lived RS256 JWTs carrying the requested access."""

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
    """``users``: username -> password. ``ttl_s``: effective token lifetime."""

    def __init__(self, workdir: str, users: dict[str, str], ttl_s: int = 300, advertised_ttl_s: int | None = None) -> None:
        self.users = users
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

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.realm = f"http://127.0.0.1:{self.server.server_address[1]}/token"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def registry_config(self) -> dict[str, Any]:
        return {"auth": {"token": {"realm": self.realm, "service": SERVICE, "issuer": ISSUER, "rootcertbundle": self.cert_path}}}

    def sign(self, subject: str, access: list[dict[str, Any]]) -> str:
        now = int(time.time())
        header = {"typ": "JWT", "alg": "RS256", "x5c": [base64.b64encode(self.cert.public_bytes(serialization.Encoding.DER)).decode()]}
        # the registry allows 60 s of clock leeway: subtract it so ttl_s is what counts
        claims = {"iss": ISSUER, "sub": subject, "aud": SERVICE, "iat": now, "nbf": now - 1, "exp": now + self.ttl_s - 60, "jti": uuid.uuid4().hex, "access": access}
        signing_input = f"{_b64(json.dumps(header).encode())}.{_b64(json.dumps(claims).encode())}"
        signature = self.key.sign(signing_input.encode(), padding.PKCS1v15(), hashes.SHA256())
        return f"{signing_input}.{_b64(signature)}"

    def _serve(self, handler: BaseHTTPRequestHandler) -> None:
        query = parse_qs(urlsplit(handler.path).query)
        subject = ""
        header = handler.headers.get("Authorization", "")
        if header.startswith("Basic "):
            username, _, password = base64.b64decode(header[6:]).decode().partition(":")
            if self.users.get(username) != password:
                handler.send_response(401)
                handler.end_headers()
                return
            subject = username
        access = []
        for scope in query.get("scope", []):
            kind, _, rest = scope.partition(":")
            name, _, actions = rest.rpartition(":")
            granted = actions.split(",") if subject else [a for a in actions.split(",") if a == "pull"]
            access.append({"type": kind, "name": name, "actions": granted})
        self.requests.append({"subject": subject, "scopes": query.get("scope", [])})
        token = self.sign(subject, access)
        self.tokens.append(token)
        body = json.dumps({"token": token, "expires_in": self.advertised_ttl_s, "issued_at": datetime.datetime.now(datetime.UTC).isoformat()}).encode()
        handler.send_response(200)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Content-Length", str(len(body)))
        handler.end_headers()
        handler.wfile.write(body)

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
