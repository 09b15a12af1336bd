"""The registry client: one small method per protocol step of the OCI distribution spec.

Each step declares the statuses it expects; anything else becomes a RegistryError
carrying method, redacted URL, status and OCI error codes. A 401 is answered once:
the authenticator learns the challenge, fetches a token, and the request is sent
again with its body reopened from its factory. Retries of failed steps are the
caller's (one policy around a whole step sequence, never nested here).

Nothing but a RegistryError leaves a step for what the registry or the network did:
a transport failure is mapped where the request is sent (``_send``) or its body read
(``errors.read_limited``), and a header that must carry a number or a digest and
does not is a MalformedResponseError, never a ValueError nor an invented value.

The read side (a mirror's source: ``get_manifest``, ``list_tags``, ``blob_reader``)
returns the types of ``reads.py``, where its limits and checks are described. A
stream (``reads.BlobStream``) can be uploaded as it is read (``upload_blob``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import quote, urljoin, urlsplit

from .. import __version__
from .. import mediatypes as mt
from ..digest import CHUNK_BYTES, Digest, InvalidDigestError
from ..errors import DigestMismatchError, ReferenceError_, SourceError
from ..patterns import LazyPattern
from ..sources.base import FileRange, read_views
from ..waits import POLL_S, Flights, Slots
from .auth import Authenticator, Credentials, scope_for
from .errors import (
    TRANSPORT_ERRORS,
    AuthError,
    MalformedResponseError,
    ManifestDigestError,
    RegistryError,
    UploadGoneError,
    UploadRangeError,
    error_from_response,
    is_tls_error,
    parse_decimal,
    parse_retry_after,
    read_limited,
    redact_url,
    release,
    transport_error,
)
from .reads import (
    CATALOG_PAGE_SIZE,
    CATALOG_SCOPE,
    MAX_CATALOG_PAGES,
    MAX_MANIFEST_BYTES,
    MAX_QUOTED_TAGS,
    MAX_REPOSITORIES,
    MAX_TAG_PAGE_BYTES,
    MAX_TAG_PAGES,
    MAX_TAGS,
    TAG_PAGE_SIZE,
    BlobReader,
    BlobStream,
    FetchedManifest,
    PageLimits,
    RateLimit,
    media_type_of,
    next_link,
    next_page,
    rate_limit_of,
    valid_repository,
    valid_tag,
)
from .retry import DEFAULT_MAX_ATTEMPTS, DEFAULT_RETRY_AFTER_CAP_S, Cancelled, HostGate, RetryPolicy, run_with_retries
from .transport import Response, default_ca_bundle, new_session, send

if TYPE_CHECKING:
    from ..sources.base import RegistryBlob

#: blobs up to this size go in one PUT; larger ones in PATCH chunks
DEFAULT_MONOLITHIC_LIMIT_BYTES = 512 << 20
#: the size of each PATCH of a chunked upload
DEFAULT_CHUNK_SIZE_BYTES = 64 << 20
#: uploads in flight at once to one registry (docker's default is 5)
DEFAULT_MAX_CONCURRENT_UPLOADS = 5
#: requests to one host at once (bench/README.md: a registry 25 ms away)
DEFAULT_MAX_REQUESTS_IN_FLIGHT = 32
#: a blob body smaller than this is one request like any other, not one of the
#: host's max_concurrent_uploads: a config or a small layer costs a round trip,
#: not bandwidth, and behind a far registry five at a time would pace the batch
SMALL_BODY_BYTES = 1 << 20
#: after a cancel, how long a DELETE that cancels an upload session may wait for a request slot
CANCEL_SLOT_WAIT_S = 2.0
#: seconds to connect
CONNECT_TIMEOUT_S = 10.0
#: the longest any one read from a registry's socket may wait (for the answer's
#: head, or for the next bytes of its body): a source that stalls mid-body costs
#: this much, then the read resumes with ``Range`` or fails
DEFAULT_READ_TIMEOUT_S = 60.0

USER_AGENT = f"batchpush/{__version__}"
T = TypeVar("T")
log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True, kw_only=True)
class RegistryOptions:
    """Per-registry settings."""

    #: plain HTTP, or HTTPS without verification, for this host only
    insecure: bool = False
    #: extra CA bundle to trust for this host (docker's certs.d is read as well)
    ca_file: str | None = None
    #: credentials named by a plan: a username and where its password is (never the password)
    username: str | None = None
    password_env: str | None = None
    password_file: str | None = None
    monolithic_limit_bytes: int = DEFAULT_MONOLITHIC_LIMIT_BYTES
    #: 0 or less: the default (an empty chunk would never move the upload on)
    chunk_size_bytes: int = DEFAULT_CHUNK_SIZE_BYTES
    #: blob bodies sent to this host at once (and blob reads from it as a source)
    max_concurrent_uploads: int = DEFAULT_MAX_CONCURRENT_UPLOADS
    #: requests to this host at once, whatever they are for (each held from its
    #: sending until its answer's head arrives): what hides a far registry's latency
    max_requests_in_flight: int = DEFAULT_MAX_REQUESTS_IN_FLIGHT
    #: attempts of each step sequence (retry policy), the first included
    max_attempts: int = DEFAULT_MAX_ATTEMPTS
    #: the longest pause a 429's Retry-After may impose on this host
    retry_after_cap_s: float = DEFAULT_RETRY_AFTER_CAP_S
    #: push foreign (non-distributable) layers too, as docker's daemon option does
    allow_nondistributable_artifacts: bool = False
    #: the longest wait for any one read from this host's socket (an answer's head,
    #: the next bytes of a body); a stalled blob read then resumes with ``Range``
    read_timeout_s: float = DEFAULT_READ_TIMEOUT_S
    #: a tag list (source or prune) longer than this many pages, or tags, is refused
    max_tag_pages: int = MAX_TAG_PAGES
    max_tags: int = MAX_TAGS
    #: a catalog (a ``docker://HOST/`` source) longer than this many pages, or
    #: repositories, is refused
    max_catalog_pages: int = MAX_CATALOG_PAGES
    max_repositories: int = MAX_REPOSITORIES


@dataclass(frozen=True, slots=True)
class UploadSession:
    """An open upload: its location (kept exactly as given, query included) and the
    registry's minimum chunk size if it sent ``OCI-Chunk-Min-Length``."""

    location: str
    chunk_min_bytes: int = 0


@dataclass(slots=True)
class BlobUpload:
    """An upload in progress, kept across attempts so a retry resumes it."""

    session: UploadSession
    #: bytes the registry has confirmed
    offset: int = 0
    #: a request broke mid-way: ask the registry where it is before going on
    interrupted: bool = False


def _range_end(value: str | None) -> int:
    """Bytes received from ``Range: 0-<last>``. distribution answers ``0-0`` for an
    empty upload, so ``0-0`` counts as none (a one-byte upload is resent whole). A
    Range that does not parse counts as none too."""
    _, sep, end = (value or "").partition("-")
    last = parse_decimal(end) if sep else None
    return last + 1 if last else 0


@dataclass(frozen=True, slots=True)
class MountResult:
    mounted: bool
    #: the upload session the registry opened instead of mounting (202), if any
    session: UploadSession | None


class _Body:
    """A request body over a file range: sized (so it is sent with its Content-Length)
    and iterated in CHUNK_BYTES pieces, counting bytes as they go; a cancelled run
    stops it mid-way."""

    def __init__(self, blob: FileRange, on_bytes: Callable[[int], None], cancel: threading.Event) -> None:
        self.blob = blob
        self.on_bytes = on_bytes
        self.cancel = cancel

    def __len__(self) -> int:
        return self.blob.size

    def __iter__(self) -> Iterator[memoryview]:
        for chunk in read_views(self.blob):
            if self.cancel.is_set():
                raise Cancelled()
            yield chunk
            self.on_bytes(len(chunk))


class _StreamBody:
    """A request body of ``length`` bytes taken from a stream (``pieces``): sized (so
    it is sent with its Content-Length), counted as it goes, stopped by a cancelled run.
    What the stream raised is kept in ``failure``: whatever the HTTP stack makes of
    an exception raised inside its send loop, upload_blob raises this one."""

    def __init__(self, pieces: Iterator[memoryview], length: int, on_bytes: Callable[[int], None], cancel: threading.Event) -> None:
        self.pieces = pieces
        self.length = length
        self.on_bytes = on_bytes
        self.cancel = cancel
        self.failure: Exception | None = None

    def __len__(self) -> int:
        return self.length

    def __iter__(self) -> Iterator[memoryview]:
        try:
            for piece in self.pieces:
                if self.cancel.is_set():
                    raise Cancelled()
                yield piece
                self.on_bytes(len(piece))
        except Exception as exc:
            self.failure = exc
            raise


#: the pieces of a streamed body (the transport frames each chunk around it, no copy):
#: a cancel is seen, and the send loop starts afresh, a piece at a time
STREAM_PIECE_BYTES = 512 << 10


def _cut_each(pieces: Iterator[memoryview]) -> Iterator[memoryview]:
    """``pieces`` in views of STREAM_PIECE_BYTES at most: a cancel is seen, and a slow link
    moves, a piece at a time (a block of 16 MiB handed whole to the socket would
    hold both for as long as it takes to drain)."""
    for piece in pieces:
        for start in range(0, len(piece), STREAM_PIECE_BYTES):
            yield piece[start : start + STREAM_PIECE_BYTES]


class _UnsizedBody:
    """A request body of unknown length (sent chunked), counted as it goes, stopped
    by a cancelled run."""

    def __init__(self, pieces: Iterator[memoryview], on_bytes: Callable[[int], None], cancel: threading.Event) -> None:
        self.pieces = pieces
        self.on_bytes = on_bytes
        self.cancel = cancel

    def __iter__(self) -> Iterator[memoryview]:
        for piece in self.pieces:
            if self.cancel.is_set():
                raise Cancelled()
            yield piece
            self.on_bytes(len(piece))


class _Cutter:
    """One read of a stream, cut into consecutive pieces of the lengths asked for
    (PATCH chunks): no byte is read twice. A piece held over between two chunks is
    a view of the stream's buffer, valid because the stream is not asked for its
    next piece before that one is sent."""

    def __init__(self, stream: BlobStream, start: int = 0) -> None:
        self.name = stream.name
        # only a resumable stream is read from mid-way (``start``)
        self._views = stream.views(start) if start else stream.views()  # type: ignore[call-arg]
        self._rest = memoryview(b"")
        self.taken = start

    def take(self, length: int) -> Iterator[memoryview]:
        left = length
        while left:
            if not self._rest:
                piece = next(self._views, None)
                if piece is None:
                    raise SourceError(self.name, f"the stream ended after {self.taken} bytes")
                self._rest = piece
            part = self._rest[:left]
            self._rest = self._rest[len(part) :]
            left -= len(part)
            self.taken += len(part)
            yield part

    def close(self) -> None:
        close = getattr(self._views, "close", None)
        if close is not None:
            close()  # a read left mid-way gives up its response


class _StreamSpent(Exception):
    """A chunk of a stream was asked for again (a 401's resend): it was read once."""


#: redirect statuses followed, and how many hops at most
REDIRECTS = frozenset({301, 302, 303, 307, 308})
MAX_REDIRECTS = 5
#: pages of one referrers listing read at most (each at most MAX_MANIFEST_BYTES)
MAX_REFERRER_PAGES = 20
#: answers that say a registry does not serve the referrers API: 404 (the spec's
#: word; one that serves it never answers 404), and what registries answer a route
#: they do not know (400, 405, 406, 501): the fallback tag carries the referrers
REFERRERS_NOT_SERVED = frozenset({400, 404, 405, 406, 501})
#: a registry API path: its repository, and the endpoint after it
_REPOSITORY_PATH = LazyPattern(r"/v2/(.+?)/(manifests|blobs|tags|referrers)/")
#: docker's per-host trust directories
CERTS_DIRS = ("/etc/docker/certs.d", os.path.join(os.path.expanduser("~"), ".docker", "certs.d"))


def _resolve(base: str, location: str, method: str, status: int) -> str:
    """A Location header resolved against the URL that answered it. One that is not a
    URL (``http://[::1/``: urllib.parse raises ValueError) is a malformed answer."""
    try:
        target = urljoin(base, location)
        urlsplit(target)
    except ValueError as exc:
        raise MalformedResponseError(method, base, status, (), "its Location is not a URL") from exc
    return target


def _referrer_page(body: bytes, url: str) -> list[dict[str, Any]]:
    """The descriptors of one page of a referrers listing (an OCI index): each a
    manifest's, with a digest that parses and a size that is a count."""
    try:
        document = json.loads(body)
    except (ValueError, RecursionError):
        raise MalformedResponseError("GET", url, 200, (), "the referrers listing is not JSON") from None
    manifests = document.get("manifests") if isinstance(document, dict) else None
    if not isinstance(manifests, list):
        raise MalformedResponseError("GET", url, 200, (), "the referrers listing is not an index")
    for entry in manifests:
        size = entry.get("size") if isinstance(entry, dict) else None
        if not (isinstance(entry, dict) and isinstance(entry.get("mediaType"), str) and isinstance(size, int) and not isinstance(size, bool) and 0 <= size <= MAX_MANIFEST_BYTES):
            raise MalformedResponseError("GET", url, 200, (), f"a referrer's descriptor is malformed: {str(entry)[:140]}")
        try:
            Digest.parse(str(entry.get("digest")))
        except InvalidDigestError:
            raise MalformedResponseError("GET", url, 200, (), f"a referrer's digest does not parse: {str(entry.get('digest'))[:100]!r}") from None
    return manifests


def same_origin(url: str, base: str) -> bool:
    a, b = urlsplit(url), urlsplit(base)
    return (a.scheme, a.netloc) == (b.scheme, b.netloc)


def trusted_ca_files(host: str, ca_file: str | None) -> list[str]:
    """Extra CAs for ``host``: ``ca_file`` and docker's ``certs.d/HOST/*.crt``."""
    found = [ca_file] if ca_file else []
    for directory in CERTS_DIRS:
        path = os.path.join(directory, host)
        if os.path.isdir(path):
            found.extend(os.path.join(path, name) for name in sorted(os.listdir(path)) if name.endswith(".crt"))
    return found


def combined_bundle(extra: list[str]) -> str:
    """The default CA bundle plus ``extra`` in one file (a trust setting is one path)."""
    fd, path = tempfile.mkstemp(prefix="batchpush-ca-", suffix=".pem")
    with os.fdopen(fd, "wb") as out:
        for source in [default_ca_bundle(), *extra]:
            try:
                with open(source, "rb") as f:
                    out.write(f.read() + b"\n")
            except OSError as exc:
                raise RegistryError("GET", f"file://{source}", None, (), f"cannot read CA file: {exc.strerror or exc}") from exc
    return path


def _with_query(url: str, key: str, value: str) -> str:
    return f"{url}{'&' if '?' in url else '?'}{key}={quote(value, safe='')}"


class RegistryClient:
    """One registry host: a pooled session, its auth state and request counters."""

    #: a blob check costs a request here: the layer path follows the seed's order
    #: (an OCI layout target, layout.py, checks first: a stat)
    checks_are_free = False

    def __init__(
        self,
        host: str,
        options: RegistryOptions | None = None,
        credentials: Credentials | None = None,
        *,
        cancel: threading.Event | None = None,
        other_threads: int = 4,
        marked_insecure: Callable[[str], bool] | None = None,
    ) -> None:
        self.host = host
        #: whether the run marks another host insecure (its plan settings, ``--insecure``):
        #: a token realm there may then be plain http, as docker would allow
        self.marked_insecure = marked_insecure or (lambda other: False)
        self.options = options or RegistryOptions()
        #: set when the run is interrupted: bodies stop, pauses end
        self.cancel = cancel or threading.Event()
        self.gate = HostGate(self.cancel)
        self.policy = RetryPolicy(max_attempts=self.options.max_attempts, retry_after_cap_s=self.options.retry_after_cap_s)
        # a pooled connection for every thread that may talk to this host at once (a
        # request gives its slot back at its answer's head, its connection once the
        # answer is read): none is ever discarded and opened again
        self.session = new_session(USER_AGENT, self.options.max_requests_in_flight + self.options.max_concurrent_uploads + other_threads)
        #: the limit on requests in flight (its ``peak``: the most at once in this run)
        self.in_flight = Slots(self.options.max_requests_in_flight)
        self._upload_slots = Slots(self.options.max_concurrent_uploads)
        self._bundle: str | None = None
        if self.options.insecure:
            self.session.verify = False
        else:
            extra = trusted_ca_files(host, self.options.ca_file)
            if extra:
                self._bundle = combined_bundle(extra)
                self.session.verify = self._bundle
        self.auth = Authenticator(host, self.session, credentials, verify_realm=self._check_realm, cancel=self.cancel)
        self.insecure_hosts: frozenset[str] = frozenset({host} if self.options.insecure else ())
        self.requests_by_method: Counter[str] = Counter()
        #: requests that failed: no answer, or a status the step did not expect
        self.errors = 0
        self.bytes_sent = 0
        #: body bytes read from this registry by blob streams (resumed and skipped ones included)
        self.bytes_read = 0
        #: the pull quota the last manifest answer stated (Docker Hub's RateLimit-*
        #: headers); None when it stated none. Exposed only: no decision reads it here.
        self.rate_limit: RateLimit | None = None
        #: whether this registry serves the referrers API (None: not asked yet)
        self.serves_referrers: bool | None = None
        self._referrers_probe = Flights()
        self._count_lock = threading.Lock()
        self._base_url: str | None = None
        #: the scheme the ping tries alone (``use_scheme``), else https then (insecure) http
        self._scheme: str | None = None
        #: the scheme the ping of an insecure host tries first (``prefer_scheme``)
        self._preferred: str | None = None
        #: whether this host's https attempt was answered with something not TLS
        self._not_tls = False
        self._pinging = Flights()
        self._read_slots = threading.BoundedSemaphore(max(1, self.options.max_concurrent_uploads))
        self._reading = 0
        #: the most blob reads from this host at once in this run
        self.max_concurrent_reads = 0

    # -- plumbing ------------------------------------------------------------
    @property
    def base_url(self) -> str:
        if self._base_url is None:
            self.ping()
        assert self._base_url is not None
        return self._base_url

    def _count(self, method: str, sent_bytes: int = 0) -> None:
        with self._count_lock:
            self.requests_by_method[method] += 1
            self.bytes_sent += sent_bytes

    def _count_error(self) -> None:
        with self._count_lock:
            self.errors += 1

    def _count_bytes(self, n: int) -> None:
        with self._count_lock:
            self.bytes_sent += n

    @contextlib.contextmanager
    def read_slot(self) -> Iterator[None]:
        """One of this host's ``max_concurrent_uploads`` blob reads at a time (its
        setting bounds reads from it as a source, as it bounds uploads to it); the
        wait looks at the cancel flag."""
        while not self._read_slots.acquire(timeout=POLL_S):
            if self.cancel.is_set():
                raise Cancelled()
        with self._count_lock:
            self._reading += 1
            self.max_concurrent_reads = max(self.max_concurrent_reads, self._reading)
        try:
            yield
        finally:
            with self._count_lock:
                self._reading -= 1
            self._read_slots.release()

    def count_read(self, n: int) -> None:
        """``n`` body bytes read from this registry (a BlobReader's)."""
        with self._count_lock:
            self.bytes_read += n

    @property
    def rate_limit_remaining(self) -> int | None:
        """Pulls left in the quota's window, as the last manifest answer said; None
        if it said nothing."""
        limit = self.rate_limit
        return limit.remaining if limit is not None else None

    def _check_realm(self, realm: str) -> None:
        """A token realm must be https, unless the user marked its host insecure."""
        try:
            parts = urlsplit(realm)
        except ValueError:
            raise AuthError("GET", realm, None, (), "the token realm is not a URL") from None
        if parts.scheme == "https":
            return
        insecure = {h.rsplit(":", 1)[0] if not h.startswith("[") else h for h in self.insecure_hosts} | set(self.insecure_hosts)
        if parts.scheme == "http" and (parts.netloc in insecure or parts.hostname in insecure or self.marked_insecure(parts.netloc)):
            return
        # nothing is sent there: neither the credentials nor an anonymous token request
        raise AuthError("GET", realm, None, (), f"token realm on {parts.netloc.rpartition('@')[2]} is not https and its host is not marked insecure")

    def _send(self, method: str, url: str, headers: dict[str, str], data: Any) -> Response:
        """One of the host's request slots, from the sending to the answer's head (a
        DELETE cancelling an upload session still goes for a while after a cancel).
        A Retry-After pauses the host before the slot is given up, and a slot taken
        while a pause began is given back for the pause: no request follows a 429
        before its time."""
        while True:
            with self.in_flight.hold(self.cancel, after_cancel_s=CANCEL_SLOT_WAIT_S if method == "DELETE" else 0.0):
                if not self.gate.closed:
                    self._count(method)
                    response = self._send_now(method, url, headers, data)
                    retry_after = parse_retry_after(response.headers.get("Retry-After")) if response.status_code in (429, 503) else None
                    if retry_after is not None:
                        self.gate.pause(min(retry_after, self.policy.retry_after_cap_s))
                    return response
            self.gate.wait()

    def _send_now(self, method: str, url: str, headers: dict[str, str], data: Any) -> Response:
        try:
            # verify is passed explicitly (the session does not read the environment)
            response = send(self.session, method, url, headers, data, timeout=(CONNECT_TIMEOUT_S, self.options.read_timeout_s), verify=self.session.verify)
        except ValueError as exc:
            # not a transport failure: the transport refuses the request itself (a URL
            # or a header value HTTP cannot carry). Its text may quote the value, which
            # may be a token, so it is not chained: a traceback would print it.
            raise transport_error(method, url, exc, sending=True) from None
        except TRANSPORT_ERRORS as exc:
            log.debug("%s %s: %s", method, redact_url(url), type(exc).__name__)
            raise transport_error(method, url, exc, sending=True) from exc
        log.debug("%s %s: %d", method, redact_url(url), response.status_code)  # never the query: an upload's state
        return response

    def request(
        self,
        method: str,
        url: str,
        *,
        scopes: tuple[str, ...],
        expected: frozenset[int] | set[int],
        headers: dict[str, str] | None = None,
        body: Callable[[], Any] | None = None,
    ) -> Response:
        """Send one request; a 401 with a challenge (on any request: a registry may
        answer the ping 200 and challenge a write) earns fresh credentials for
        ``scopes`` and one resend. Redirects
        are followed (at most MAX_REDIRECTS): never from https to http, and the
        Authorization header goes to the registry's own host only."""
        challenged = False
        hops = 0
        first = url
        while True:
            # a cancelled run sends nothing more, but the DELETEs that cancel its sessions
            if self.cancel.is_set() and method != "DELETE":
                raise Cancelled()
            self.gate.wait()
            sent = dict(headers or {})
            try:
                authorization = self.auth.authorization(scopes)
            except RegistryError as refused:
                if refused.retry_after_s is not None:  # the realm's 429/503 pauses the host like the registry's own
                    self.gate.pause(min(refused.retry_after_s, self.policy.retry_after_cap_s))
                raise
            if authorization and same_origin(url, self.base_url if self._base_url else url):
                sent["Authorization"] = authorization
            try:
                response = self._send(method, url, sent, body() if body else None)
            except RegistryError:
                self._count_error()
                raise
            # a 401 of the registry's own origin, whichever request it answers (not
            # of a storage host a redirect led to: its challenge is not this registry's)
            own = same_origin(url, self.base_url if self._base_url else url)
            if response.status_code == 401 and not challenged and own and self.auth.challenge(response, scopes, sent.get("Authorization")):
                challenged = True
                release(response)
                continue
            if response.status_code in REDIRECTS and response.status_code not in expected and response.headers.get("Location"):
                release(response)
                target = _resolve(url, response.headers["Location"], method, response.status_code)
                refusal = self._redirect_refusal(first, url, target, method)
                if refusal:
                    raise RegistryError(method, url, response.status_code, (), refusal, permanent=True)
                hops += 1
                if hops > MAX_REDIRECTS:
                    raise RegistryError(method, url, response.status_code, (), f"more than {MAX_REDIRECTS} redirects")
                url = target
                continue
            if response.status_code not in expected:
                self._count_error()
                # (a Retry-After paused the whole host already, in _send)
                raise error_from_response(response, method)
            return response

    def _redirect_refusal(self, first: str, url: str, target: str, method: str) -> str | None:
        """Why a redirect from ``url`` (of a request first sent to ``first``) to
        ``target`` is not followed; None if it is. Never from https to http. On the
        registry's own origin, only within the repository first asked for (its token
        would name another one). A read (GET, HEAD) goes to another host only for a
        blob: its storage or CDN, as registries do; a manifest or tag list is the
        registry's own answer."""
        if urlsplit(url).scheme == "https" and urlsplit(target).scheme != "https":
            return "refusing a redirect from https to plain http"
        asked = _REPOSITORY_PATH.match(urlsplit(first).path)
        if same_origin(target, self.base_url if self._base_url else first):
            goes = _REPOSITORY_PATH.match(urlsplit(target).path)
            if asked and (goes is None or goes.group(1) != asked.group(1)):
                return f"refusing a redirect to another repository ({urlsplit(target).path[:200]!r})"
            return None
        if method in ("GET", "HEAD") and not (asked and asked.group(2) == "blobs"):
            return f"refusing a redirect of a {asked.group(2) if asked else 'read'} request to another host ({urlsplit(target).netloc.rpartition('@')[2]})"
        return None

    def ping(self) -> None:
        """``GET /v2/``: choose the scheme, and learn the auth challenge up front."""
        # one ping at a time, and no lock held across it: the others wait (watching
        # the cancel flag) and find the scheme chosen, or ping in turn if it failed
        with self._pinging.hold("ping", self.cancel):
            if self._base_url is not None:
                return
            schemes: tuple[str, ...] = ("https", "http") if self.options.insecure else ("https",)
            remembered = False
            if self._scheme is not None and self._scheme in schemes:
                schemes = (self._scheme,)
            elif self._preferred is not None and self._preferred in schemes[1:]:
                schemes = (self._preferred, *(scheme for scheme in schemes if scheme != self._preferred))
                remembered = True
            last: RegistryError | None = None
            for scheme in schemes:
                url = f"{scheme}://{self.host}/v2/"
                try:
                    response = self._send("GET", url, {}, None)
                except RegistryError as exc:
                    last = exc
                    self._not_tls = self._not_tls or (scheme == "https" and exc.__cause__ is not None and is_tls_error(exc.__cause__))
                    continue
                if response.status_code == 401:
                    self.auth.challenge(response, ())
                elif response.status_code != 200:
                    if remembered and scheme == schemes[0]:
                        # the host no longer speaks what it spoke (a TLS server answers
                        # plain HTTP with a 400): the usual order, https first
                        last = error_from_response(response, "GET")
                        continue
                    self._count_error()
                    raise error_from_response(response, "GET")
                release(response)
                self._base_url = f"{scheme}://{self.host}"
                return
            assert last is not None
            self._count_error()  # the https probe of an insecure host that speaks http is none
            raise last

    def prefer_scheme(self, scheme: str | None) -> None:
        """The ping of this insecure host tries ``scheme`` first, the one it answered
        on in an earlier run (the metadata store remembers it), then the usual order:
        a plain-HTTP registry is then not sent a TLS handshake that must fail (an
        import of ssl, a connection and a round trip) on every cron run. No credential
        goes with a ping; a host that took up TLS since answers the plain request with
        an error, and the ping goes on to https."""
        self._preferred = scheme

    @property
    def learned_scheme(self) -> str | None:
        """The scheme this insecure host's ping should try first next time, when this
        run learned one it was not told (``prefer_scheme``): https when the ping chose
        it; http when it chose http after the https attempt was answered with something
        not TLS (the port speaks plain HTTP: not a timeout, not a reset, which prove
        nothing); else None (nothing new to remember)."""
        base = self._base_url
        scheme = base.partition(":")[0] if base is not None and self.options.insecure else None
        learned = scheme if scheme == "https" or (scheme == "http" and self._not_tls) else None
        return learned if learned != self._preferred else None

    def use_scheme(self, scheme: str) -> None:
        """The ping tries only ``scheme``, the one another client of this run chose
        (a cluster's client tells its workers): no failed TLS attempt per task on a
        plain-HTTP registry. The ping still learns the auth challenge up front."""
        self._scheme = scheme

    def _url(self, repository: str, tail: str) -> str:
        return f"{self.base_url}/v2/{repository}/{tail}"

    def with_retries(self, step: Callable[[], T], what: str) -> T:
        """``step`` under this host's retry policy (one sequence, not nested)."""
        return run_with_retries(step, self.policy, self.gate, what)

    # -- blobs ---------------------------------------------------------------
    def head_blob(self, repository: str, digest: Digest) -> int | None:
        """The blob's size if the repository has it, None if not (404). A 200 whose
        Content-Length is missing or not a non-negative number raises
        MalformedResponseError (temporary): the size goes into manifests, so none is
        invented."""
        url = self._url(repository, f"blobs/{digest}")
        response = self.request("HEAD", url, scopes=(scope_for(repository, "pull,push"),), expected={200, 404})
        release(response)
        if response.status_code == 404:
            return None
        return self._size(response, url)

    @staticmethod
    def _size(response: Response, url: str) -> int:
        """A HEAD 200's Content-Length: what the registry holds is that large."""
        size = parse_decimal(response.headers.get("Content-Length"))
        if size is None:
            raise MalformedResponseError("HEAD", url, response.status_code, (), "the answer carries no valid Content-Length (the content's size)")
        return size

    def _session_from(self, response: Response) -> UploadSession:
        location = response.headers.get("Location")
        if not location:
            raise RegistryError(response.method, response.url, response.status_code, (), "no Location header on an upload response")
        # a minimum that does not parse is ignored: chunks of our own size are sent
        return UploadSession(_resolve(response.url, location, response.method, response.status_code), parse_decimal(response.headers.get("OCI-Chunk-Min-Length")) or 0)

    def mount_blob(self, repository: str, digest: Digest, from_repository: str) -> MountResult:
        """``POST ?mount=&from=``: 201 mounted, 202 an upload session instead."""
        url = self._url(repository, f"blobs/uploads/?mount={quote(str(digest))}&from={quote(from_repository, safe='/')}")
        scopes = (scope_for(repository, "pull,push"), scope_for(from_repository, "pull"))
        response = self.request("POST", url, scopes=scopes, expected={201, 202})
        release(response)
        if response.status_code == 201:
            return MountResult(True, None)
        return MountResult(False, self._session_from(response))

    def start_upload(self, repository: str) -> UploadSession:
        response = self.request("POST", self._url(repository, "blobs/uploads/"), scopes=(scope_for(repository, "pull,push"),), expected={202})
        release(response)
        return self._session_from(response)

    def cancel_upload(self, repository: str, session: UploadSession) -> None:
        """``DELETE`` an abandoned upload session; failures are ignored."""
        with contextlib.suppress(RegistryError, Cancelled):
            release(self.request("DELETE", session.location, scopes=(scope_for(repository, "pull,push"),), expected=set(range(200, 600))))

    def upload_status(self, repository: str, upload: BlobUpload) -> None:
        """``GET`` the upload location: where the registry is (``Range``), with a fresh
        location. Raises UploadGoneError when it no longer knows the session."""
        try:
            response = self.request("GET", upload.session.location, scopes=(scope_for(repository, "pull,push"),), expected={204, 200})
        except RegistryError as exc:
            if exc.status in (400, 404, 410):
                raise UploadGoneError(exc.method, exc.url, exc.status, exc.codes, "the registry dropped the upload session") from exc
            raise
        release(response)
        upload.session = UploadSession(self._session_from(response).location, upload.session.chunk_min_bytes) if response.headers.get("Location") else upload.session
        upload.offset = _range_end(response.headers.get("Range"))
        upload.interrupted = False

    def upload_blob(
        self,
        repository: str,
        upload: BlobUpload,
        blob: FileRange | BlobStream,
        digest: Digest,
        *,
        on_progress: Callable[[int], None] | None = None,
        before_commit: Callable[[], None] | None = None,
    ) -> int:
        """Send the blob through ``upload`` and commit it; returns the bytes sent.

        Monolithic ``PUT ?digest=`` up to the registry's limit; above it, or when the
        registry asks for a minimum chunk, ``PATCH`` chunks with ``Content-Range``
        then a bodiless ``PUT ?digest=``. Called again after a failure, it first asks
        the registry where the upload is and continues from there. A 416 is answered
        the same way once per call; a second one raises UploadRangeError (temporary),
        so the caller's retry policy bounds how often a registry whose answers
        disagree is asked again. UploadGoneError means a new session is needed (the
        registry dropped it, or says it holds more than the blob has). The
        registry's Docker-Content-Digest must match ours. ``before_commit`` (which
        may raise) runs after the data is sent and before the committing PUT: the
        data then goes in PATCH chunks, so nothing is committed until it allows.

        A stream (``BlobStream``: a source registry's blob, ``reads.BlobReader``) is
        read as it is sent, once per attempt and from its first byte: the monolithic
        PUT's body is one read (a 401's resend is a new read), and PATCH chunks are
        cut from one read. A stream cannot continue a session mid-way, so called
        again after a failure: if the registry holds all of the blob's bytes (only
        the commit was left, e.g. ``before_commit`` stopped it), the upload is
        committed; if it holds some, the session is cancelled and a new one started
        in ``upload`` — unless the registry holds the digest already (an earlier
        commit went through before its answer was lost): then nothing is sent. A 416
        to a chunk, a Range past the bytes sent, or a chunk a 401 would have resent
        ends the attempt with UploadGoneError, the session cancelled. What the
        stream raises comes out as it is, whatever the HTTP stack wraps it in: a
        DigestMismatchError (the source's bytes are not the blob) stops the body
        before its Content-Length, so nothing is committed, and the session is
        cancelled here (any SourceError: it can never be completed from that source).
        """
        sent = 0

        def counted(n: int) -> None:
            nonlocal sent
            sent += n
            self._count_bytes(n)
            if on_progress is not None:
                on_progress(upload.offset + sent)

        # one of the host's max_concurrent_uploads blob bodies at a time (a small one
        # only needs a request slot)
        with self._upload_slots.hold(self.cancel) if blob.size >= SMALL_BODY_BYTES else contextlib.nullcontext():
            if isinstance(blob, FileRange):
                self._upload_file(repository, upload, blob, digest, counted, before_commit)
            else:
                self._upload_stream(repository, upload, blob, digest, counted, before_commit)
        return sent

    def _chunking(self, size: int, upload: BlobUpload, before_commit: Callable[[], None] | None) -> tuple[bool, int]:
        """Whether the data goes in PATCH chunks, and their size."""
        chunk = self.chunk_bytes(size, upload.session, staged=before_commit is not None)
        return chunk is not None, chunk or DEFAULT_CHUNK_SIZE_BYTES

    def _upload_file(self, repository: str, upload: BlobUpload, blob: FileRange, digest: Digest, counted: Callable[[int], None], before_commit: Callable[[], None] | None) -> None:
        scopes = (scope_for(repository, "pull,push"),)

        def body(start: int, length: int) -> Callable[[], _Body]:
            piece = FileRange(blob.path, blob.offset + start, length)
            return lambda: _Body(piece, counted, self.cancel)

        if upload.interrupted:
            self.upload_status(repository, upload)
        chunked, chunk = self._chunking(blob.size, upload, before_commit)
        upload.interrupted = True  # until a response says otherwise
        range_refused = False
        while chunked and upload.offset < blob.size:
            length = min(chunk, blob.size - upload.offset)
            headers = {"Content-Type": "application/octet-stream", "Content-Range": f"{upload.offset}-{upload.offset + length - 1}"}
            try:
                response = self.request("PATCH", upload.session.location, scopes=scopes, expected={202}, headers=headers, body=body(upload.offset, length))
            except RegistryError as exc:
                if exc.status != 416:
                    raise
                if range_refused:
                    # Asking again could go on forever (a registry or proxy that answers
                    # every PATCH with 416): this attempt ends, and the retry policy
                    # decides whether another one asks again.
                    raise UploadRangeError(exc.method, exc.url, exc.status, exc.codes, "the registry refused the chunk's range again after saying where the upload is") from exc
                range_refused = True
                self.upload_status(repository, upload)  # the registry says where it is
                upload.interrupted = True
                continue
            release(response)
            upload.session = UploadSession(self._session_from(response).location, upload.session.chunk_min_bytes)
            upload.offset = max(_range_end(response.headers.get("Range")), upload.offset + length) if response.headers.get("Range") else upload.offset + length
        if upload.offset > blob.size:
            # a Range past our blob: the session holds bytes that are not ours
            raise UploadGoneError("PATCH", upload.session.location, None, (), f"the registry reports {upload.offset} bytes received of a {blob.size}-byte blob")
        if before_commit is not None:
            before_commit()
        self._commit(repository, upload, digest, blob.size, body(upload.offset, blob.size - upload.offset))

    def try_upload_slot(self) -> bool:
        """One of the host's ``max_concurrent_uploads`` body slots if one is free now
        (a layer sent while it is compressed takes one for its whole stream, or is not
        sent then); give it back with ``give_upload_slot``."""
        return self._upload_slots.try_take()

    def give_upload_slot(self) -> None:
        self._upload_slots.give_back()

    def send_stream(self, repository: str, upload: BlobUpload, pieces: Iterator[memoryview], limit: int) -> None:
        """One streamed ``PATCH`` (no Content-Range, chunked transfer encoding: docker's
        own way) of the next ``pieces``, sent as they come, until ``limit`` bytes or
        more went (at a piece's end; the iterator is left where it is) or it ends;
        appended at the registry's ``upload.offset``, nothing committed. A blob whose
        bytes are made as they are sent (a layer compressed while it is uploaded)
        goes in PATCHes of about ``limit`` bytes, whatever its size: a break loses
        one of them at most, and a registry whose session survives it (behind a
        buffering proxy) holds the others. ``upload`` moves on (its offset, as the
        registry's Range says, and its session's newest location). A request that
        breaks leaves it ``interrupted``: its bytes are gone with the stream, and
        ``upload_status`` says where the registry is. A 401 that would need the body
        sent again raises UploadGoneError (temporary)."""
        start = upload.offset
        sent = 0
        used = False

        def limited() -> Iterator[memoryview]:
            taken = 0
            for piece in pieces:
                yield piece
                taken += len(piece)
                if taken >= limit:
                    return

        def counted(n: int) -> None:
            nonlocal sent
            sent += n
            self._count_bytes(n)

        def body() -> _UnsizedBody:
            nonlocal used
            if used:
                raise _StreamSpent()
            used = True
            return _UnsizedBody(_cut_each(limited()), counted, self.cancel)

        upload.interrupted = True  # until the answer says otherwise
        try:
            response = self.request("PATCH", upload.session.location, scopes=(scope_for(repository, "pull,push"),), expected={202}, headers={"Content-Type": "application/octet-stream"}, body=body)
        except _StreamSpent:
            raise UploadGoneError("PATCH", upload.session.location, 401, (), "a stream cannot be sent again after a fresh token") from None
        release(response)
        upload.session = UploadSession(self._session_from(response).location, upload.session.chunk_min_bytes)
        received = _range_end(response.headers.get("Range")) if response.headers.get("Range") else start + sent
        if received != start + sent:
            raise UploadGoneError("PATCH", upload.session.location, 202, (), f"the registry reports {received} bytes received, {start + sent} were sent")
        upload.offset = received
        upload.interrupted = False

    def _commit(self, repository: str, upload: BlobUpload, digest: Digest, size: int, body: Callable[[], Any] | None) -> None:
        """The committing ``PUT ?digest=`` (with the rest of the data, if any)."""
        final = _with_query(upload.session.location, "digest", str(digest))
        response = self.request("PUT", final, scopes=(scope_for(repository, "pull,push"),), expected={201}, headers={"Content-Type": "application/octet-stream"}, body=body)
        release(response)
        upload.interrupted = False
        upload.offset = size
        reported = response.headers.get("Docker-Content-Digest")
        if reported and reported != str(digest):
            raise RegistryError("PUT", final, 201, (), f"registry stored blob {reported}, we sent {digest}", permanent=True)

    def _restart_stream(self, repository: str, upload: BlobUpload, digest: Digest, size: int) -> bool:
        """A stream's upload that holds part of the blob cannot go on: its session is
        cancelled and ``upload`` gets a new one. True when the registry holds the
        digest already (nothing to send)."""
        self.cancel_upload(repository, upload.session)
        if self.head_blob(repository, digest) is not None:
            upload.offset, upload.interrupted = size, False
            return True
        upload.session = self.start_upload(repository)
        upload.offset, upload.interrupted = 0, False
        return False

    def _stream_gone(self, repository: str, upload: BlobUpload, method: str, status: int | None, detail: str) -> UploadGoneError:
        """The session cannot take the rest of this read: cancelled, and a new one is needed."""
        self.cancel_upload(repository, upload.session)
        return UploadGoneError(method, upload.session.location, status, (), detail)

    def _upload_stream(self, repository: str, upload: BlobUpload, stream: BlobStream, digest: Digest, counted: Callable[[int], None], before_commit: Callable[[], None] | None) -> None:
        scopes = (scope_for(repository, "pull,push"),)
        size = stream.size
        # a stream made again from its source (a layer compressed again) is read from
        # any offset: a broken upload goes on from where the registry is
        resumable = getattr(stream, "resumable", False)
        if upload.interrupted and (upload.offset >= size or resumable):
            self.upload_status(repository, upload)  # where the registry is (all of it sent: only the commit is left)
        if resumable and upload.offset > size:
            raise self._stream_gone(repository, upload, "GET", None, f"the registry reports {upload.offset} bytes received of a {size}-byte blob")
        if not resumable and (upload.interrupted or upload.offset not in (0, size)) and self._restart_stream(repository, upload, digest, size):
            return
        chunked, chunk = self._chunking(size, upload, before_commit)
        # The stream checks its digest before it yields its last piece: that piece is
        # held back from the data requests and sent with the commit, so a lie is
        # found with no request in flight, and the session's newest location (the
        # one the registry accepts a DELETE for) cancels it. A blob of one piece is
        # checked before anything is sent at all. (Staged data, sent ahead of a commit
        # that waits, goes whole: its commit then sends nothing.)
        tail = size - CHUNK_BYTES * ((size - 1) // CHUNK_BYTES) if size and before_commit is None else 0
        ahead = size - tail  # what goes before the commit
        if not chunked and ahead:
            chunked, chunk = True, ahead
        bodies: list[_StreamBody] = []
        reads: list[_Cutter] = []

        def chunk_body(cutter: _Cutter, length: int) -> Callable[[], _StreamBody]:
            def make() -> _StreamBody:
                if any(b.pieces is pieces for b in bodies):
                    raise _StreamSpent()
                bodies.append(_StreamBody(pieces, length, counted, self.cancel))
                return bodies[-1]

            pieces = cutter.take(length)
            return make

        upload.interrupted = True  # until a response says otherwise
        try:
            if chunked and upload.offset < ahead:
                reads.append(_Cutter(stream, upload.offset))
                while upload.offset < ahead:
                    length = min(chunk, ahead - upload.offset)
                    headers = {"Content-Type": "application/octet-stream", "Content-Range": f"{upload.offset}-{upload.offset + length - 1}"}
                    try:
                        response = self.request("PATCH", upload.session.location, scopes=scopes, expected={202}, headers=headers, body=chunk_body(reads[0], length))
                    except RegistryError as exc:
                        if exc.status == 416:
                            raise self._stream_gone(repository, upload, "PATCH", 416, "the registry refused a chunk's range, and a stream cannot go back to where it is") from exc
                        raise
                    release(response)
                    upload.session = UploadSession(self._session_from(response).location, upload.session.chunk_min_bytes)
                    if response.headers.get("Range") and _range_end(response.headers.get("Range")) > upload.offset + length:
                        raise self._stream_gone(repository, upload, "PATCH", 202, f"the registry reports more bytes received than the {upload.offset + length} sent")
                    upload.offset += length
            last: Callable[[], Any] | None = None
            if upload.offset < size:  # the held-back piece (a one-piece blob whole), checked as it is taken
                if not reads:
                    reads.append(_Cutter(stream, upload.offset))
                rest = b"".join(bytes(part) for part in reads[0].take(size - upload.offset))
                last = lambda: rest  # noqa: E731 - a 401's resend sends the same bytes
            if before_commit is not None:
                before_commit()
            self._commit(repository, upload, digest, size, last)
            if last is not None:
                counted(len(rest))
        except _StreamSpent:
            raise self._stream_gone(repository, upload, "PATCH", 401, "a chunk read from a stream cannot be sent again after a fresh token: the upload starts over") from None
        except BaseException as exc:
            failure = next((b.failure for b in bodies if b.failure is not None), None)
            error = failure if failure is not None else exc
            if isinstance(error, SourceError):
                self.cancel_upload(repository, upload.session)
            if error is exc:
                raise
            raise error from exc
        finally:
            for read in reads:
                read.close()

    # -- manifests -----------------------------------------------------------
    def put_manifest(self, repository: str, reference: str, media_type: str, data: bytes) -> Digest:
        """``PUT`` a manifest by tag or digest; returns its digest, checked against the registry's."""
        digest = Digest.sha256_of(data)
        url = self._url(repository, f"manifests/{reference}")
        response = self.request("PUT", url, scopes=(scope_for(repository, "pull,push"),), expected={201}, headers={"Content-Type": media_type}, body=lambda: data)
        release(response)
        self._count_bytes(len(data))
        reported = response.headers.get("Docker-Content-Digest")
        if reported and reported != str(digest):
            raise ManifestDigestError("PUT", url, 201, (), f"registry reports {reported}, we computed {digest}")
        return digest

    def chunk_bytes(self, size: int, session: UploadSession, *, staged: bool = False) -> int | None:
        """The PATCH size an upload of ``size`` bytes goes in, None for one PUT: chunks
        above the monolithic limit, when the registry asks for a minimum chunk, or
        when the data goes ahead of a commit that must wait (``staged``)."""
        if size <= self.options.monolithic_limit_bytes and not session.chunk_min_bytes and not staged:
            return None
        return self.patch_bytes(session)

    def patch_bytes(self, session: UploadSession) -> int:
        """The size of a PATCH: ``--chunk-size``, and at least the registry's minimum
        chunk (``OCI-Chunk-Min-Length``; only the last may be smaller)."""
        # a chunk size of 0 (``--chunk-size 0``) would send empty PATCHes for ever:
        # the registry accepts each and the offset never moves
        return max(self.options.chunk_size_bytes if self.options.chunk_size_bytes > 0 else DEFAULT_CHUNK_SIZE_BYTES, session.chunk_min_bytes)

    def delete_manifest(self, repository: str, digest: Digest) -> None:
        """``DELETE`` a manifest by digest (every tag naming it goes with it). A
        registry that does not allow deletes answers 405 (a RegistryError)."""
        url = self._url(repository, f"manifests/{digest}")
        release(self.request("DELETE", url, scopes=(scope_for(repository, "pull,push,delete"),), expected={202}))

    def head_manifest(self, repository: str, reference: str, accept: str) -> tuple[Digest, int] | None:
        """The digest and size a tag resolves to; None if unknown (404) or if the
        registry does not say its digest. A digest or a Content-Length that does
        not parse raises MalformedResponseError (temporary)."""
        url = self._url(repository, f"manifests/{reference}")
        response = self.request("HEAD", url, scopes=(scope_for(repository, "pull,push"),), expected={200, 404}, headers={"Accept": accept})
        release(response)
        self.rate_limit = rate_limit_of(response.headers) or self.rate_limit  # an answer that states none changes nothing
        if response.status_code == 404 or "Docker-Content-Digest" not in response.headers:
            return None
        value = response.headers["Docker-Content-Digest"]
        try:
            digest = Digest.parse(value)
        except InvalidDigestError as exc:
            # quoted short: it is the registry's text, and it goes into the report
            raise MalformedResponseError("HEAD", url, response.status_code, (), f"its Docker-Content-Digest {value[:100]!r} does not parse") from exc
        return digest, self._size(response, url)

    # -- reads (a mirror's source) -------------------------------------------
    def get_manifest(self, repository: str, reference: str, accept: str = mt.MANIFEST_ACCEPT, *, size: int | None = None) -> FetchedManifest:
        """``GET`` a manifest by tag or digest: its exact bytes, media type and digest.

        At most MAX_MANIFEST_BYTES are read: a larger Content-Length or body raises a
        permanent RegistryError naming the manifest. ``size`` is the length its parent
        index or a HEAD declared: a Content-Length that states another, or a body of
        another length, raises DigestMismatchError, at most ``size`` + 1 bytes read.
        The bytes must hash to ``reference`` when it is a digest, and to the registry's
        Docker-Content-Digest when it sends one (in that digest's algorithm): else
        DigestMismatchError (``what`` "manifest"). A Docker-Content-Digest that does
        not parse raises MalformedResponseError (temporary). The pull quota the
        answer states is kept in ``rate_limit``. ``reference`` that is neither a
        tag nor a digest raises ReferenceError_ before any request."""
        pinned = self._manifest_reference(reference)
        where = f"{repository}@{reference}" if pinned else f"{repository}:{reference}"
        path = f"docker://{self.host}/{where}"
        url = self._url(repository, f"manifests/{reference}")
        # identity: the digest is of the bytes as stored
        response = self.request("GET", url, scopes=(scope_for(repository, "pull"),), expected={200}, headers={"Accept": accept, "Accept-Encoding": "identity"})
        self.rate_limit = rate_limit_of(response.headers) or self.rate_limit  # an answer that states none changes nothing
        too_large = f"the manifest {where} is larger than {MAX_MANIFEST_BYTES} bytes (containerd's limit): refused"
        length = parse_decimal(response.headers.get("Content-Length"))
        if length is not None and length > MAX_MANIFEST_BYTES:
            response.close()  # not drained: its rest could be anything
            raise RegistryError("GET", url, response.status_code, (), too_large, permanent=True)
        if size is not None and length is not None and length != size:
            response.close()
            raise DigestMismatchError(path, "manifest", f"{size} bytes", f"{length} bytes (its Content-Length)")
        raw = read_limited(response, (MAX_MANIFEST_BYTES if size is None else min(size, MAX_MANIFEST_BYTES)) + 1)
        if len(raw) > MAX_MANIFEST_BYTES:
            raise RegistryError("GET", url, response.status_code, (), too_large, permanent=True)
        if size is not None and len(raw) != size:
            raise DigestMismatchError(path, "manifest", f"{size} bytes", f"{len(raw)} bytes" if len(raw) <= size else f"more than {size} bytes")
        digest = Digest.sha256_of(raw)
        if pinned is not None:
            actual = digest if pinned.algorithm == "sha256" else Digest.of(pinned.algorithm, raw)
            if actual != pinned:
                raise DigestMismatchError(path, "manifest", str(pinned), str(actual))
        stated = response.headers.get("Docker-Content-Digest")
        if stated is not None:
            try:
                claimed = Digest.parse(stated.strip())
            except InvalidDigestError as exc:
                raise MalformedResponseError("GET", url, response.status_code, (), f"its Docker-Content-Digest {stated[:100]!r} does not parse") from exc
            actual = digest if claimed.algorithm == "sha256" else Digest.of(claimed.algorithm, raw)
            if actual != claimed:
                raise DigestMismatchError(path, "manifest (the registry's Docker-Content-Digest)", str(claimed), str(actual))
        return FetchedManifest(raw, media_type_of(response.headers.get("Content-Type")), digest)

    @staticmethod
    def _manifest_reference(reference: str) -> Digest | None:
        """The digest ``reference`` names, or None for a tag; anything else is refused
        (it would go into a URL)."""
        if ":" in reference:
            try:
                return Digest.parse(reference)
            except InvalidDigestError as exc:
                raise ReferenceError_(reference, exc.message) from None
        if not valid_tag(reference):
            raise ReferenceError_(reference, "not a valid tag")
        return None

    def list_tags(self, repository: str, *, page_size: int = TAG_PAGE_SIZE, max_pages: int | None = None, max_tags: int | None = None) -> list[str]:
        """Every tag of ``repository`` (``GET /v2/<name>/tags/list?n=``), in the
        registry's order, each once; paged as ``_list_pages`` says. A name that is
        not a valid tag is skipped with a warning. The limits default to this host's
        ``max_tag_pages`` and ``max_tags``."""
        limits = PageLimits(self.options.max_tag_pages if max_pages is None else max_pages, "max_tag_pages", self.options.max_tags if max_tags is None else max_tags, "max_tags")
        return self._list_pages(f"/v2/{repository}/tags/list", "tags", f"the tag list of {repository}", scope_for(repository, "pull"), (valid_tag, "tag"), page_size, limits)

    def list_catalog(self, *, page_size: int = CATALOG_PAGE_SIZE, max_pages: int | None = None, max_repositories: int | None = None) -> list[str]:
        """Every repository the registry lists (``GET /v2/_catalog?n=``), in its
        order, each once; paged as ``_list_pages`` says. A name that is not a
        repository path is skipped with a warning. A registry that does not serve
        the catalog (Docker Hub, GHCR, ECR answer 401, 403 or 404) raises the
        RegistryError of that answer. The limits default to this host's
        ``max_catalog_pages`` and ``max_repositories``."""
        limits = PageLimits(
            self.options.max_catalog_pages if max_pages is None else max_pages,
            "max_catalog_pages",
            self.options.max_repositories if max_repositories is None else max_repositories,
            "max_repositories",
        )
        return self._list_pages("/v2/_catalog", "repositories", "the catalog", CATALOG_SCOPE, (valid_repository, "repository"), page_size, limits)

    def _list_pages(self, path: str, key: str, what: str, scope: str, valid: tuple[Callable[[object], bool], str], page_size: int, limits: PageLimits) -> list[str]:
        """The names of a paged list (``key`` of each page's JSON), each once.

        ``Link: <...>; rel="next"`` is followed to the end, resolved against the page
        that named it. A link to another origin or another path, to a page already
        read, a list longer than ``limits`` (pages or names): a permanent
        RegistryError (nothing is returned). A name ``valid`` (a check, and the
        noun for the warning) refuses is skipped (it never reaches a URL). A page that is not a JSON list raises
        MalformedResponseError (temporary). One request failing fails the listing:
        the caller's retry policy runs it again from the first page."""
        url = f"{self.base_url}{path}?n={max(1, page_size)}"
        seen_pages: set[str] = set()
        names: dict[str, None] = {}  # ordered, each once
        received = skipped = 0
        check, noun = valid
        while True:
            if len(seen_pages) >= limits.pages:
                raise RegistryError("GET", url, None, (), f"{what} runs past {limits.pages} pages ({limits.pages_setting}): refused", permanent=True)
            seen_pages.add(url)
            response = self.request("GET", url, scopes=(scope,), expected={200}, headers={"Accept": "application/json"})
            page = self._list_page(response, url, key, what)
            received += len(page)
            if received > limits.names:
                raise RegistryError("GET", url, 200, (), f"{what} holds more than {limits.names} {key} ({limits.names_setting}): refused", permanent=True)
            for name in page:
                if check(name):
                    names[name] = None  # type: ignore[index]
                    continue
                skipped += 1
                if skipped <= MAX_QUOTED_TAGS:
                    log.warning("%s: skipping a %s that is not a valid %s name: %.140r", what, noun, noun, name)
            link = next_link(response.headers.get("Link"))
            if link is None:
                break
            url = next_page(response.url, link, origin=self.base_url, path=path)
            if url in seen_pages:
                raise RegistryError("GET", url, 200, (), f"{what} links back to a page already read: refused", permanent=True)
        if skipped > MAX_QUOTED_TAGS:
            log.warning("%s: %d names that are not valid %s names skipped in all", what, skipped, noun)
        return list(names)

    @staticmethod
    def _list_page(response: Response, url: str, key: str, what: str) -> list[object]:
        """The ``key`` list of one page (``null``: none)."""
        body = read_limited(response, MAX_TAG_PAGE_BYTES + 1)
        if len(body) > MAX_TAG_PAGE_BYTES:
            raise RegistryError("GET", url, 200, (), f"a page of {what} is larger than {MAX_TAG_PAGE_BYTES} bytes: refused", permanent=True)
        try:
            document = json.loads(body)
        except (ValueError, RecursionError):
            raise MalformedResponseError("GET", url, 200, (), f"{what} is not JSON") from None
        names = document.get(key) if isinstance(document, dict) else []
        if names is None:
            return []
        if not isinstance(names, list):
            raise MalformedResponseError("GET", url, 200, (), f"the {key} of {what} are not a list")
        return names

    def blob_reader(self, blob: RegistryBlob) -> BlobReader:
        """A stream of ``blob`` from this registry (see ``reads.BlobReader``): nothing
        is requested until its ``views()`` are read."""
        if blob.host != self.host:
            raise ValueError(f"blob of {blob.host} asked of the client of {self.host}")
        return BlobReader(self, blob)

    def referrers(self, repository: str, digest: Digest) -> list[dict[str, Any]] | None:
        """The manifests that name ``digest`` as their subject (OCI 1.1,
        ``GET /v2/<name>/referrers/<digest>``): the descriptors of its index, every
        page (``Link`` followed as for tags, at most MAX_REFERRER_PAGES), each once.

        None when this registry does not serve the API (REFERRERS_NOT_SERVED): the
        first such answer is remembered for the run and no later call sends anything; the caller relies on the fallback tag. An
        answer that is not an index of well-formed descriptors raises
        MalformedResponseError (temporary)."""
        if self.serves_referrers is None:  # the first asks; the others wait for its answer
            with self._referrers_probe.hold("referrers", self.cancel):
                if self.serves_referrers is None:
                    return self._referrers(repository, digest)
        return self._referrers(repository, digest) if self.serves_referrers else None

    def _referrers(self, repository: str, digest: Digest) -> list[dict[str, Any]] | None:
        path = f"/v2/{repository}/referrers/{digest}"
        url = f"{self.base_url}{path}"
        seen: set[str] = set()
        found: dict[str, dict[str, Any]] = {}
        while True:
            if len(seen) >= MAX_REFERRER_PAGES:
                raise RegistryError("GET", url, None, (), f"the referrers of {repository}@{digest} run past {MAX_REFERRER_PAGES} pages: refused", permanent=True)
            seen.add(url)
            response = self.request("GET", url, scopes=(scope_for(repository, "pull"),), expected={200, *REFERRERS_NOT_SERVED}, headers={"Accept": mt.OCI_INDEX})
            if response.status_code in REFERRERS_NOT_SERVED:
                release(response)
                self.serves_referrers = False
                return None
            self.serves_referrers = True
            body = read_limited(response, MAX_MANIFEST_BYTES + 1)
            if len(body) > MAX_MANIFEST_BYTES:
                raise RegistryError("GET", url, 200, (), f"a page of the referrers of {repository}@{digest} is larger than {MAX_MANIFEST_BYTES} bytes: refused", permanent=True)
            for descriptor in _referrer_page(body, url):
                found.setdefault(descriptor["digest"], descriptor)
            link = next_link(response.headers.get("Link"))
            if link is None:
                return list(found.values())
            url = next_page(response.url, link, origin=self.base_url, path=path)
            if url in seen:
                raise RegistryError("GET", url, 200, (), f"the referrers of {repository}@{digest} link back to a page already read: refused", permanent=True)

    def close(self) -> None:
        self.session.close()
        if self._bundle:
            with contextlib.suppress(OSError):
                os.unlink(self._bundle)
