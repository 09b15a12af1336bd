"""The one retry policy: per-host backoff with jitter, Retry-After honoured per host.

It wraps a whole protocol step sequence (a layer's path, a manifest PUT), never a
single request inside another retried sequence. Retried: RegistryError.temporary
(transport failures and resets, timeouts, 408, 429, 500, 502, 503, 504, OCI
TOOMANYREQUESTS/UNAVAILABLE). Never retried: everything else — 400, 401 after a
fresh token, 403, 404, 413, digest mismatches, source errors.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from ..errors import Cancelled
from .errors import RegistryError

log = logging.getLogger(__name__)
T = TypeVar("T")

#: attempts of one step sequence, the first included
DEFAULT_MAX_ATTEMPTS = 5
#: first backoff; doubled per attempt, jittered down to half
BASE_DELAY_S = 0.2
#: the longest backoff between attempts
MAX_DELAY_S = 10.0
#: the longest pause a Retry-After may impose
DEFAULT_RETRY_AFTER_CAP_S = 60.0


@dataclass(frozen=True, slots=True, kw_only=True)
class RetryPolicy:
    max_attempts: int = DEFAULT_MAX_ATTEMPTS
    base_delay_s: float = BASE_DELAY_S
    max_delay_s: float = MAX_DELAY_S
    retry_after_cap_s: float = DEFAULT_RETRY_AFTER_CAP_S

    def backoff_s(self, attempt: int) -> float:
        ceiling = min(self.max_delay_s, self.base_delay_s * (2 ** (attempt - 1)))
        return ceiling * random.uniform(0.5, 1.0)


class HostGate:
    """A host's pause: a 429's Retry-After holds every request to that host (and
    only that host) until it has passed. ``cancel`` wakes every sleeper."""

    def __init__(self, cancel: threading.Event | None = None) -> None:
        self._lock = threading.Lock()
        self._open_at = 0.0
        self.cancel = cancel or threading.Event()

    def pause(self, seconds: float) -> None:
        with self._lock:
            self._open_at = max(self._open_at, time.monotonic() + seconds)

    @property
    def closed(self) -> bool:
        """A pause is under way."""
        with self._lock:
            return self._open_at > time.monotonic()

    def wait(self) -> None:
        while True:
            with self._lock:
                left = self._open_at - time.monotonic()
            if left <= 0:
                return
            if self.cancel.wait(left):
                raise Cancelled()

    def sleep(self, seconds: float) -> None:
        if self.cancel.wait(seconds):
            raise Cancelled()


def retry_fields(what: str, attempt: int, reason: str) -> dict[str, object]:
    """A retry's log record ``extra``: its ``event`` and fields in a JSON log."""
    return {"event": "retry", "fields": {"what": what, "attempt": attempt, "reason": reason}}


def run_with_retries(step: Callable[[], T], policy: RetryPolicy, gate: HostGate, what: str) -> T:
    """Run ``step`` until it succeeds, fails for good, or attempts run out."""
    attempt = 1
    while True:
        if gate.cancel.is_set():
            raise Cancelled()
        try:
            return step()
        except RegistryError as exc:
            if not exc.temporary or attempt >= policy.max_attempts:
                raise
            # a Retry-After already paused the host (in the request); the backoff
            # comes on top only when the registry named no time
            delay = 0.0 if exc.retry_after_s is not None else policy.backoff_s(attempt)
            log.info("%s: %s; attempt %d of %d in %.1f s", what, exc, attempt + 1, policy.max_attempts, delay, extra=retry_fields(what, attempt + 1, str(exc)))
            gate.sleep(delay)
            attempt += 1
