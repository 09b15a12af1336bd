"""Registry errors: method, redacted URL, status and the OCI error codes of the body."""

from __future__ import annotations

import json
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

    def __init__(self, method: str, url: str, status: int | None, codes: tuple[str, ...] = (), detail: str = "") -> None:
        self.method = method
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
        return self.status is None or self.status in TEMPORARY_STATUSES or bool(TEMPORARY_CODES & set(self.codes))


class AuthError(RegistryError):
    kind = "auth"


class ManifestDigestError(RegistryError):
    kind = "manifest-digest"


def read_limited(response: requests.Response, limit_bytes: int) -> bytes:
    """At most ``limit_bytes`` of a (streamed or not) response body."""
    if not response.raw or response._content_consumed:  # type: ignore[attr-defined]
        return response.content[:limit_bytes]
    data = response.raw.read(limit_bytes, decode_content=True) or b""
    response.close()
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
    return cls(method, response.url, response.status_code, tuple(codes), "; ".join(messages))
