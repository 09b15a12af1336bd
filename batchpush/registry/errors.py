"""Registry errors: method, redacted URL, status and the OCI error codes of the body."""

from __future__ import annotations

import email.utils
import json
import time
from urllib.parse import urlsplit

import requests

from ..errors import BatchPushError

#: the most of an error body we read
MAX_ERROR_BODY_BYTES = 64 << 10
#: statuses and OCI codes worth another try (the retry issue uses ``temporary``)
TEMPORARY_STATUSES = frozenset({408, 429, 500, 502, 503, 504})
TEMPORARY_CODES = frozenset({"TOOMANYREQUESTS", "UNAVAILABLE"})


def redact_url(url: str) -> str:
    """Scheme, host and path only: upload locations carry state (``_state=``) in the query."""
    parts = urlsplit(url)
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
    """The registry no longer knows an upload session (a new one must be started)."""

    kind = "upload-gone"

    @property
    def temporary(self) -> bool:
        return True


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """``Retry-After`` as seconds: delta-seconds or an HTTP date."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
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


def release(response: requests.Response) -> None:
    """Done with a streamed ``response``. Closing it would close its connection too
    (every request would then open a new one, and the registry set up each); so the
    rest of a small body is read and the connection goes back to the pool."""
    raw = response.raw
    if raw is None or response._content_consumed:  # type: ignore[attr-defined]
        response.close()
        return
    try:
        left = MAX_DRAIN_BYTES
        while left > 0:
            data = raw.read(min(left, 16 << 10), decode_content=False)
            if not data:
                raw.release_conn()
                return
            left -= len(data)
    except Exception:  # a broken rest: the connection is not reused
        pass
    response.close()


def read_limited(response: requests.Response, limit_bytes: int) -> bytes:
    """At most ``limit_bytes`` of a (streamed or not) response body."""
    if not response.raw or response._content_consumed:  # type: ignore[attr-defined]
        return response.content[:limit_bytes]
    data = response.raw.read(limit_bytes, decode_content=True) or b""
    release(response)
    return data


def error_from_response(response: requests.Response, method: str | None = None) -> RegistryError:
    """Map a failed response to a RegistryError carrying the OCI error codes."""
    method = method or (response.request.method if response.request else "?") or "?"
    codes: list[str] = []
    messages: list[str] = []
    body = read_limited(response, MAX_ERROR_BODY_BYTES) if method != "HEAD" else b""
    try:
        document = json.loads(body) if body else {}
        for error in document.get("errors") or []:
            if isinstance(error, dict):
                codes.append(str(error.get("code", "")))
                if error.get("message"):
                    messages.append(str(error["message"])[:200])
    except (ValueError, AttributeError):
        pass
    cls = AuthError if response.status_code in (401, 403) else RegistryError
    retry_after = parse_retry_after(response.headers.get("Retry-After")) if response.status_code in (429, 503) else None
    return cls(method, response.url, response.status_code, tuple(codes), "; ".join(messages), retry_after_s=retry_after)
