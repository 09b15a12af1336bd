"""The read side of a registry (a mirror's source): manifests, tag lists, blob streams.

The protocol steps are RegistryClient methods (``get_manifest``, ``list_tags``,
``blob_reader``); this module holds what they return and the parsing they share,
none of it trusting the registry further than it must:

- a manifest is read up to MAX_MANIFEST_BYTES and checked against the digest asked
  for and the one the registry states;
- a tag list follows ``Link: <...>; rel="next"`` only on the same origin and path,
  never to a page already read, for at most MAX_TAG_PAGES pages and MAX_TAGS tags,
  and a name that is not a valid tag is skipped (it never reaches a URL); a
  catalog (``/v2/_catalog``) the same, within MAX_CATALOG_PAGES and
  MAX_REPOSITORIES, a name that is not a repository path skipped;
- a blob streams through BlobReader, hashed as it passes: its last piece is held
  back until length and digest are known to match, so an upload it feeds can never
  complete with other bytes. A read that breaks off resumes with ``Range``.
"""

from __future__ import annotations

import hashlib
import logging
import re
import threading
from collections.abc import Iterator, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, TypeGuard
from urllib.parse import urljoin, urlsplit

from ..digest import CHUNK_BYTES, Digest
from ..errors import Cancelled, DigestMismatchError
from ..patterns import LazyPattern
from ..reference import is_repository_path
from .auth import scope_for
from .errors import BODY_ERRORS, MalformedResponseError, RegistryError, parse_decimal, release, transport_error
from .retry import HostGate, RetryPolicy, retry_fields
from .transport import Response

if TYPE_CHECKING:
    from ..sources.base import RegistryBlob

log = logging.getLogger(__name__)

#: the largest manifest read: containerd's limit (``MaxManifestSize``, 4 MiB), which
#: distribution applies to the manifests it accepts as well
MAX_MANIFEST_BYTES = 4 << 20
#: tags asked for per page of a tag list (``?n=``); registries may send fewer
TAG_PAGE_SIZE = 1000
#: pages of one tag list followed at most: a registry whose ``Link`` never ends
#: (each page naming a new one) is cut off here
MAX_TAG_PAGES = 1000
#: tags of one repository read at most
MAX_TAGS = 100_000
#: the most of one tag-list page read: a registry that ignores ``n`` and sends
#: MAX_TAGS tags of 128 characters in one page still fits
MAX_TAG_PAGE_BYTES = 16 << 20
#: a tag (distribution's grammar), ASCII only; anything else is never put in a URL
TAG = LazyPattern(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,127}", re.ASCII)
#: invalid tags named one by one in the log; the rest are counted
MAX_QUOTED_TAGS = 10
#: repositories asked for per page of a catalog (``?n=``); registries may send fewer
#: (distribution answers at most 1000 whatever is asked)
CATALOG_PAGE_SIZE = 1000
#: pages of one catalog followed at most (a ``Link`` that never ends is cut off here)
MAX_CATALOG_PAGES = 1000
#: repositories of one catalog read at most
MAX_REPOSITORIES = 100_000
#: the token scope of the catalog (distribution's token auth asks for it)
CATALOG_SCOPE = "registry:catalog:*"

#: one read from a blob's socket. The pieces yielded are CHUNK_BYTES; they are
#: filled in smaller reads because a read that breaks off raises, and what it had
#: collected is asked for again by the resume
READ_BYTES = 64 << 10


@dataclass(frozen=True, slots=True)
class FetchedManifest:
    """A manifest as the registry served it: ``raw`` is its exact bytes (what its
    digest is of), ``media_type`` the Content-Type without parameters ("" if none)."""

    raw: bytes
    media_type: str
    #: sha256 of ``raw``
    digest: Digest


@dataclass(frozen=True, slots=True)
class RateLimit:
    """A pull quota as Docker Hub states it on manifest answers
    (``RateLimit-Limit: 100;w=21600``, ``RateLimit-Remaining: 76;w=21600``).
    A field is None when its header is absent or does not parse."""

    remaining: int | None
    limit: int | None
    #: the quota's window in seconds (``w=``)
    window_s: int | None


_RATE_LIMIT = LazyPattern(r"\s*([0-9]{1,18})\s*(?:;\s*w\s*=\s*([0-9]{1,18}))?\s*(?:[,;]|$)", re.ASCII)


def parse_rate_limit_value(value: str | None) -> tuple[int, int | None] | None:
    """``N`` or ``N;w=SECONDS`` (the first quota policy of a list): the count and the
    window; None if absent or not of that form."""
    match = _RATE_LIMIT.match(value or "")
    if not match:
        return None
    return int(match.group(1)), int(match.group(2)) if match.group(2) else None


def rate_limit_of(headers: Mapping[str, str]) -> RateLimit | None:
    """The quota a response states; None when it states none."""
    remaining = parse_rate_limit_value(headers.get("RateLimit-Remaining"))
    limit = parse_rate_limit_value(headers.get("RateLimit-Limit"))
    if remaining is None and limit is None:
        return None
    window = (remaining or limit or (0, None))[1]
    return RateLimit(remaining[0] if remaining else None, limit[0] if limit else None, window)


def media_type_of(content_type: str | None) -> str:
    """A Content-Type without its parameters (``; charset=utf-8``)."""
    return (content_type or "").split(";", 1)[0].strip()


# -- Link headers (RFC 8288, formerly RFC 5988) ----------------------------------
_LINK_PARAM = LazyPattern(r'\s*;\s*([!#$%&\'*+.^_`|~0-9A-Za-z-]+\*?)\s*(?:=\s*(?:"((?:[^"\\]|\\.)*)"|([^\s;,"]*)))?')


def parse_link_header(value: str) -> list[tuple[str, frozenset[str]]]:
    """Each link of a ``Link`` header (several headers arrive joined by commas): its
    target as written, and its relation types in lower case (``rel`` is a
    space-separated list; only a link's first ``rel`` counts, as RFC 8288 says).
    What does not parse is passed over up to the next link."""
    links: list[tuple[str, frozenset[str]]] = []
    position = 0
    while True:
        start = value.find("<", position)
        if start < 0:
            return links
        end = value.find(">", start + 1)
        if end < 0:
            return links
        target = value[start + 1 : end].strip()
        position = end + 1
        rels: frozenset[str] | None = None
        while param := _LINK_PARAM.match(value, position):
            name = param.group(1).lower()
            raw = param.group(2) if param.group(2) is not None else (param.group(3) or "")
            if name == "rel" and rels is None:
                rels = frozenset(re.sub(r"\\(.)", r"\1", raw).lower().split())
            position = param.end()
        links.append((target, rels or frozenset()))
        comma = value.find(",", position)
        if comma < 0:
            return links
        position = comma + 1


def next_link(value: str | None) -> str | None:
    """The target of the first ``rel="next"`` link; None if there is none."""
    for target, rels in parse_link_header(value or ""):
        if "next" in rels:
            return target
    return None


def next_page(page_url: str, link: str, *, origin: str, path: str) -> str:
    """A tag list's next page: ``link`` resolved against the page that named it. A
    page on another origin (scheme, host, port) than ``origin``, or another path
    than ``path`` (another repository, another endpoint), is refused (permanent):
    Authorization would go with it, or tags of something else would be listed."""
    try:
        target = urljoin(page_url, link)
        parts = urlsplit(target)
        base = urlsplit(origin)
    except ValueError:
        raise RegistryError("GET", page_url, 200, (), "its Link to the next page is not a URL", permanent=True) from None
    if (parts.scheme, parts.netloc) != (base.scheme, base.netloc):
        # the link's query is left out of the message: only the origin is named
        raise RegistryError("GET", page_url, 200, (), f"its Link to the next page leads to another host ({parts.scheme}://{parts.netloc.rpartition('@')[2]}): refused", permanent=True)
    if parts.path != path:
        raise RegistryError("GET", page_url, 200, (), f"its Link to the next page leads to another path ({parts.path[:200]!r}, not {path!r}): refused", permanent=True)
    return target.split("#", 1)[0]


@dataclass(frozen=True, slots=True)
class PageLimits:
    """How far a paged list (tags, catalog) is followed, and the settings that say so."""

    pages: int
    pages_setting: str
    names: int
    names_setting: str


def valid_repository(name: object) -> TypeGuard[str]:
    """A string that is a repository path (distribution's grammar): safe in a URL path."""
    return isinstance(name, str) and is_repository_path(name)


def valid_tag(tag: object) -> TypeGuard[str]:
    """A string that is a valid tag (``TAG``, ASCII): safe in a URL path."""
    return isinstance(tag, str) and TAG.fullmatch(tag) is not None


class BlobStream(Protocol):
    """A blob read as it is sent: ``views()`` reads it anew from its first byte on
    every call, each view holding until the next one is asked for, and raises
    (before its last piece) when the bytes are not the blob."""

    @property
    def size(self) -> int: ...

    @property
    def name(self) -> str:
        """Where the bytes come from, for messages."""
        ...

    def views(self) -> Iterator[memoryview]: ...


class ReadingClient(Protocol):
    """What a BlobReader asks of its registry's client (``client.RegistryClient``,
    which makes it): declared here, so that this module, below the client, does not
    import it."""

    cancel: threading.Event
    policy: RetryPolicy
    gate: HostGate

    @property
    def base_url(self) -> str: ...

    def read_slot(self) -> AbstractContextManager[None]: ...

    def count_read(self, n: int) -> None: ...

    def request(self, method: str, url: str, *, scopes: tuple[str, ...], expected: frozenset[int] | set[int], headers: dict[str, str] | None = None) -> Response:
        """A GET of the blob (``RegistryClient.request``: no body here)."""
        ...


class BlobReader:
    """A blob of a registry as a BlobStream: ``GET /v2/<repo>/blobs/<digest>``.

    Each ``views()`` call is one read from the first byte: CHUNK_BYTES pieces (the
    last one shorter) through one reused buffer, hashed as they pass. At most
    ``size`` + 1 bytes are read; a length or a digest that does not match raises
    DigestMismatchError (``what`` "blob") before the last piece is yielded. A body
    that breaks off (reset, read timeout, ended early) resumes with
    ``Range: bytes=N-`` from the last byte received, the same hash going on: a 206
    must start at N and state the blob's length, a 200 (Range ignored) has its first
    N bytes skipped, a 416 means the blob is shorter than its size. Resumes per read
    are bounded by the client's RetryPolicy (``max_attempts``, with its backoff);
    then, or for a resume refused for good, the RegistryError is raised. The first
    request's failure is raised as it is (nothing read yet: the caller's retry
    policy decides). The run's cancel flag is looked at before each piece.

    Redirects are followed as ``RegistryClient.request`` does (Authorization to the
    registry's own origin only); ``Accept-Encoding: identity`` is asked, so the
    bytes are the blob's, never decoded. Bytes that were on the way when a
    connection broke are read again: at most READ_BYTES per break."""

    def __init__(self, client: ReadingClient, blob: RegistryBlob) -> None:
        self.client = client
        self.blob = blob
        self._lock = threading.Lock()
        #: bytes read from the network for this blob, over every read: resumed,
        #: skipped (a 200 to a Range) and re-read bytes included
        self.bytes_read = 0
        #: Range requests sent after a break, over every read
        self.resumes = 0

    @property
    def size(self) -> int:
        return self.blob.size

    @property
    def name(self) -> str:
        return f"docker://{self.blob.host}/{self.blob.repository}@{self.blob.digest}"

    def views(self) -> Iterator[memoryview]:
        # a read holds one of its registry's read slots (max_concurrent_uploads of
        # that host, read or written) until it is done or closed
        with self.client.read_slot():
            yield from _Read(self).pieces()

    def _counted(self, n: int) -> None:
        with self._lock:
            self.bytes_read += n
        self.client.count_read(n)


#: ``Content-Range: bytes START-END/TOTAL`` (TOTAL may be ``*``: unknown)
_CONTENT_RANGE = LazyPattern(r"\s*bytes\s+([0-9]{1,18})-([0-9]{1,18})/([0-9]{1,18}|\*)\s*", re.ASCII)


class _Read:
    """One read of a BlobReader's blob: its response, where it is, its resumes."""

    def __init__(self, reader: BlobReader) -> None:
        self.reader = reader
        self.client = reader.client
        self.blob = reader.blob
        self.url = f"{self.client.base_url}/v2/{self.blob.repository}/blobs/{self.blob.digest}"
        self.scopes = (scope_for(self.blob.repository, "pull"),)
        #: blob bytes received so far (hashed, or in the piece being filled)
        self.position = 0
        #: bytes at the start of the current response to drop (a 200 to a Range)
        self.skip = 0
        self.resumes = 0
        self.response: Response | None = None
        #: why the response last broke off
        self._broken: RegistryError | None = None

    def _mismatch(self, expected: str, actual: str) -> DigestMismatchError:
        return DigestMismatchError(self.reader.name, "blob", expected, actual)

    def _get(self, headers: dict[str, str], expected: set[int]) -> Response:
        # identity: the bytes must be the blob's, as stored (a decoded body would not be)
        return self.client.request("GET", self.url, scopes=self.scopes, expected=expected, headers={"Accept-Encoding": "identity", **headers})

    def _check_length(self, response: Response) -> None:
        """A 200's Content-Length, when stated, is the blob's whole length."""
        length = parse_decimal(response.headers.get("Content-Length"))
        if length is not None and length != self.blob.size:
            response.close()
            raise self._mismatch(f"{self.blob.size} bytes", f"{length} bytes (its Content-Length)")

    def pieces(self) -> Iterator[memoryview]:
        size = self.blob.size
        hasher = hashlib.new(self.blob.digest.algorithm)
        buffer = memoryview(bytearray(max(1, min(CHUNK_BYTES, size))))
        self.response = self._get({}, {200})
        try:
            self._check_length(self.response)
            hashed = 0
            while True:
                if self.client.cancel.is_set():
                    raise Cancelled()
                length = min(len(buffer), size - hashed)
                filled = 0
                while filled < length:
                    filled += self._fill(buffer[filled:length])
                hasher.update(buffer[:length])
                hashed += length
                if hashed == size:
                    self._check_end(Digest(self.blob.digest.algorithm, hasher.hexdigest()))
                    if length:
                        yield buffer[:length]
                    return
                yield buffer[:length]
        finally:
            if self.response is not None:
                self.response.close()  # mid-way: its connection is not reused

    def _read(self, amount: int) -> bytes | None:
        """Up to ``amount`` bytes of the response; None if it broke off or ended."""
        assert self.response is not None
        try:
            data = self.response.raw.read(amount, decode_content=False)
        except BODY_ERRORS as exc:
            self._broken = transport_error("GET", self.url, exc, sending=False)
            return None
        if not data:
            self._broken = RegistryError("GET", self.url, None, (), f"the body ended at byte {self.position} of {self.blob.size}")
            return None
        self.reader._counted(len(data))
        return data

    def _fill(self, target: memoryview) -> int:
        """Some bytes of the blob at ``position`` into ``target`` (at least one),
        resuming the read as often as the policy allows."""
        while True:
            while self.skip:
                dropped = self._read(min(self.skip, READ_BYTES))
                if dropped is None:
                    break
                self.skip -= len(dropped)
            data = None if self.skip else self._read(min(len(target), READ_BYTES))
            if data is None:
                self._resume()
                continue
            target[: len(data)] = data
            self.position += len(data)
            return len(data)

    def _check_end(self, actual: Digest) -> None:
        """Every byte arrived: the body holds no more, and they are the blob."""
        assert self.response is not None
        try:
            extra = self.response.raw.read(1, decode_content=False)
        except BODY_ERRORS:
            extra = b""  # the blob's bytes are all here and checked below; a broken end adds none
        if extra:
            self.reader._counted(len(extra))
            raise self._mismatch(f"{self.blob.size} bytes", f"more than {self.blob.size} bytes")
        if actual != self.blob.digest:
            raise self._mismatch(str(self.blob.digest), str(actual))
        release(self.response)
        self.response = None

    def _resume(self) -> None:
        """A new response from ``position``: a Range request, after the policy's
        backoff, until one answers or the policy's attempts are spent."""
        assert self.response is not None
        self.response.close()  # broken: its connection is not reused
        self.response = None
        cause = self._broken or RegistryError("GET", self.url, None, (), "the body broke off")
        policy = self.client.policy
        while True:
            if self.resumes >= policy.max_attempts:
                raise RegistryError(
                    "GET",
                    self.url,
                    cause.status,
                    cause.codes,
                    f"the blob's read broke off {self.resumes + 1} times, the last at byte {self.position} of {self.blob.size} ({cause.detail or 'no detail'})",
                ) from cause
            self.resumes += 1
            with self.reader._lock:
                self.reader.resumes += 1
            log.info("%s: the read broke off at byte %d of %d (%s); resuming (%d of %d)", self.reader.name, self.position, self.blob.size, cause.detail, self.resumes, policy.max_attempts, extra=retry_fields(f"read of {self.blob.digest}", self.resumes, str(cause)))
            self.client.gate.sleep(policy.backoff_s(self.resumes))
            try:
                response = self._get({"Range": f"bytes={self.position}-"}, {200, 206, 416})
            except RegistryError as exc:
                if not exc.temporary:
                    raise
                cause = exc
                continue
            if response.status_code == 416:
                release(response)
                raise self._mismatch(f"{self.blob.size} bytes", f"{self.position} bytes (bytes {self.position}- were refused as out of range)")
            if response.status_code == 206:
                self._check_range(response)
                self.skip = 0
            else:  # the registry ignored Range: the body starts at byte 0 again
                self._check_length(response)
                self.skip = self.position
            self.response = response
            return

    def _check_range(self, response: Response) -> None:
        """A 206 starts where it was asked to, and states the blob's length."""
        value = response.headers.get("Content-Range", "")
        match = _CONTENT_RANGE.fullmatch(value)
        if not match or int(match.group(1)) != self.position or int(match.group(2)) < self.position:
            response.close()
            raise MalformedResponseError("GET", self.url, 206, (), f"its Content-Range {value[:100]!r} is not the range asked for (from byte {self.position})")
        if match.group(3) != "*" and int(match.group(3)) != self.blob.size:
            response.close()
            raise self._mismatch(f"{self.blob.size} bytes", f"{match.group(3)} bytes (its Content-Range)")
