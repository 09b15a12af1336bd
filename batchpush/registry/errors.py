"""Registry errors: method, redacted URL, status and the OCI error codes of the body.

    RegistryError               a request that failed; ``status`` None: the transport failed
    ├── AuthError               401/403, or no usable credentials (never retried)
    ├── ManifestDigestError     the registry reports another manifest digest than ours
    ├── UploadGoneError         the upload session is unusable: a new one must be started
    ├── UploadRangeError        the registry refused a chunk's range again after saying
    │                           where the upload is (retried: the next attempt asks again)
    └── MalformedResponseError  an expected status whose headers do not parse (a size, a
                                digest): retried, never turned into an invented value

What the HTTP stack raises (transport.py's HTTPError, the socket's and TLS's OSError, a
ValueError for what HTTP cannot carry) becomes a RegistryError in one place, ``transport_error``, called where a
request is sent (the client's ``_send``) and where a body is read (``read_limited``).
"""

from __future__ import annotations

import json
import re
import sys
import time
from urllib.parse import urlsplit

from ..errors import BatchPushError
from .transport import HTTPError, ProxyError, Response

#: the most of an error body we read, and of its errors we quote
MAX_ERROR_BODY_BYTES = 64 << 10
MAX_QUOTED_ERRORS = 10
#: statuses and OCI codes worth another try (the retry issue uses ``temporary``)
TEMPORARY_STATUSES = frozenset({408, 429, 500, 502, 503, 504})
TEMPORARY_CODES = frozenset({"TOOMANYREQUESTS", "UNAVAILABLE"})


def redact_url(url: str) -> str:
    """Scheme, host and path only: upload locations carry state (``_state=``) in the query.
    A URL that does not parse (a registry's Location such as ``http://[::1/``) is not
    quoted at all: its query could not be told apart."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "(a URL that does not parse)"
    return f"{parts.scheme}://{parts.netloc.rpartition('@')[2]}{parts.path}"


class RegistryError(BatchPushError):
    """A registry request that failed. ``status`` is None for a transport failure."""

    kind = "registry"

    def __init__(self, method: str, url: str, status: int | None, codes: tuple[str, ...] = (), detail: str = "", *, retry_after_s: float | None = None, permanent: bool = False) -> None:
        self.method = method
        #: what the registry's Retry-After asked for, in seconds
        self.retry_after_s = retry_after_s
        #: a failure no retry can fix (e.g. TLS verification), whatever the status
        self.permanent = permanent
        self.url = redact_url(url)
        self.status = status
        self.codes = codes
        self.detail = detail
        what = f"HTTP {status}" if status is not None else "request failed"
        code_text = f" {','.join(codes)}" if codes else ""
        detail_text = f": {detail}" if detail else ""
        super().__init__(f"{method} {self.url}: {what}{code_text}{detail_text}")

    @property
    def temporary(self) -> bool:
        """Worth another try: a transport failure, 408, 429, 5xx gateway/unavailable
        statuses, or the OCI codes TOOMANYREQUESTS / UNAVAILABLE."""
        if self.permanent:
            return False
        return self.status is None or self.status in TEMPORARY_STATUSES or bool(TEMPORARY_CODES & set(self.codes))


class AuthError(RegistryError):
    kind = "auth"

    @property
    def temporary(self) -> bool:
        return False


class ManifestDigestError(RegistryError):
    kind = "manifest-digest"

    @property
    def temporary(self) -> bool:
        return False


class UploadGoneError(RegistryError):
    """The registry no longer knows an upload session, or reports it holding more
    than the blob has: a new one must be started."""

    kind = "upload-gone"

    @property
    def temporary(self) -> bool:
        return True


class UploadRangeError(RegistryError):
    """A 416 again after the registry said where the upload is: its answers disagree.
    Temporary, so the retry policy (max_attempts) bounds how often it is asked again."""

    kind = "upload-range"

    @property
    def temporary(self) -> bool:
        return True


class MalformedResponseError(RegistryError):
    """An expected status with a header that does not parse (a HEAD's Content-Length,
    a Docker-Content-Digest). Temporary: a proxy's or a registry's glitch may pass."""

    kind = "malformed-response"

    @property
    def temporary(self) -> bool:
        return True


#: what sending a request or reading its body may raise: the transport's protocol
#: errors, and the socket's and TLS's (OSError, timeouts included)
TRANSPORT_ERRORS: tuple[type[Exception], ...] = (HTTPError, OSError)
#: what reading a body may raise besides: ValueError, reading a file already closed
BODY_ERRORS: tuple[type[Exception], ...] = (*TRANSPORT_ERRORS, ValueError)


def transport_error(method: str, url: str, exc: Exception, *, sending: bool) -> RegistryError:
    """The one mapping of an HTTP stack failure to a RegistryError without a status.

    Only the exception's type is named, never its text: that may quote a header
    (``Invalid header value b'Bearer ...'``) or a URL with its query. Temporary,
    except while ``sending``: TLS refusing the connection (``is_tls_error``), and a
    ValueError (a URL or a header value HTTP cannot carry, e.g. a token holding a
    newline), which no retry can fix."""
    if sending and is_tls_error(exc):
        return RegistryError(method, url, None, (), "TLS verification failed (trust its CA with --ca-file or certs.d, or mark the host --insecure)", permanent=True)
    if isinstance(exc, ProxyError):  # its text names the proxy's refusal, never a credential
        return RegistryError(method, url, None, (), f"proxy: {exc}", permanent=exc.permanent)
    if sending and isinstance(exc, ValueError):
        return RegistryError(method, url, None, (), f"the request cannot be sent: its URL or a header value is not valid HTTP ({type(exc).__name__})", permanent=True)
    return RegistryError(method, url, None, (), type(exc).__name__)


def is_tls_error(exc: BaseException) -> bool:
    """Whether ``exc`` is TLS refusing the connection (the certificate not trusted, the
    handshake failing), not the other end closing it mid-way (``SSLEOFError``,
    ``SSLZeroReturnError``: a dropped connection, worth another try). ssl is imported
    only by a run that speaks https: without it no exception can be one of its."""
    ssl = sys.modules.get("ssl")
    return ssl is not None and isinstance(exc, ssl.SSLError) and not isinstance(exc, (ssl.SSLEOFError, ssl.SSLZeroReturnError))


#: a header's decimal number: ASCII digits only ("\u00b2".isdigit() is true, int()
#: refuses it), and few enough that int() never meets its digit limit
_DECIMAL = re.compile(r"[0-9]{1,18}")


def parse_decimal(value: str | None) -> int | None:
    """A header's non-negative decimal number (Content-Length, OCI-Chunk-Min-Length);
    None if absent or not one."""
    if value is None:
        return None
    value = value.strip()
    return int(value) if _DECIMAL.fullmatch(value) else None


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """``Retry-After`` as seconds: delta-seconds or an HTTP date."""
    if not value:
        return None
    value = value.strip()
    if value.isascii() and value.isdigit():  # "\u00b2".isdigit() is true, float() refuses it
        return float(value)
    import email.utils  # an HTTP date: rare, and the email package is slow to import

    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when is None:
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


#: what is left of a finished response's body is read, up to this much, so that its
#: connection can serve the next request; a longer rest closes the connection
MAX_DRAIN_BYTES = 64 << 10


def release(response: Response) -> None:
    """Done with a streamed ``response``. Closing it would close its connection too
    (every request would then open a new one, and the registry set up each); so the
    rest of a small body is read and the connection goes back to the pool. Never
    raises for a broken rest: its connection is closed instead."""
    raw = response.raw
    try:
        left = MAX_DRAIN_BYTES
        while left > 0:
            data = raw.read(min(left, 16 << 10), decode_content=False)
            if not data:
                raw.release_conn()
                return
            left -= len(data)
    except BODY_ERRORS:  # a broken rest: the connection is not reused
        pass
    response.close()


def read_limited(response: Response, limit_bytes: int) -> bytes:
    """At most ``limit_bytes`` of a streamed response body. A body that
    breaks off (the connection closed or timed out mid-way, a bad encoding) raises
    a RegistryError without a status (temporary), its connection closed."""
    try:
        data = response.raw.read(limit_bytes, decode_content=True) or b""
    except BODY_ERRORS as exc:
        response.close()
        raise transport_error(response.method, response.url, exc, sending=False) from exc
    release(response)
    return data


def error_from_response(response: Response, method: str | None = None) -> RegistryError:
    """Map a failed response to a RegistryError carrying the OCI error codes."""
    method = method or response.method
    codes: list[str] = []
    messages: list[str] = []
    body = b""
    if method != "HEAD":
        try:
            body = read_limited(response, MAX_ERROR_BODY_BYTES)
        except RegistryError as exc:
            # the status arrived whole and decides what the error is (and whether it
            # is retried); the body would only have added its OCI codes
            messages.append(f"its body broke off ({exc.detail})")
    try:
        document = json.loads(body) if body else {}
        errors = document.get("errors") if isinstance(document, dict) else None
        for error in errors[:MAX_QUOTED_ERRORS] if isinstance(errors, list) else ():
            if isinstance(error, dict):
                codes.append(str(error.get("code", ""))[:100])
                if error.get("message"):
                    messages.append(str(error["message"])[:200])
    except (ValueError, RecursionError):  # not JSON (or not UTF-8), or nested too deep to parse
        pass
    cls = AuthError if response.status_code in (401, 403) else RegistryError
    retry_after = parse_retry_after(response.headers.get("Retry-After")) if response.status_code in (429, 503) else None
    return cls(method, response.url, response.status_code, tuple(codes), "; ".join(messages), retry_after_s=retry_after)
