"""The progress relay: a task's events kept in its worker's memory until the client takes them, then shown by the client's renderer."""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Iterable
from typing import Any

from ..digest import Digest
from ..outcome import LayerOutcome, LayerResult
from ..progress import NoProgress, Progress
from .common import OUTBOX_EVENTS, RELAY_INTERVAL_S

log = logging.getLogger(__name__)


#: what a worker's engine shows that the client does not print from the results
_RELAYED = frozenset({"image_started", "layer_bytes", "layer_done", "note"})


class _Outbox:
    """A task's progress events not yet taken by the client: kept in its worker's
    memory, at most OUTBOX_EVENTS (the oldest go first, as a display lags)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()  # guards _events only
        self._events: collections.deque[list[Any]] = collections.deque(maxlen=OUTBOX_EVENTS)

    def put(self, event: list[Any]) -> None:
        with self._lock:
            self._events.append(event)

    def take(self) -> list[list[Any]]:
        """Every event not taken yet, once."""
        with self._lock:
            taken = list(self._events)
            self._events.clear()
        return taken


class _Relay(NoProgress):
    """A worker's progress for the client's display, plain values only (msgpack):
    put in the task's outbox, where the client's next poll takes it (``_poll``,
    every RELAY_INTERVAL_S); what is left when the task ends goes back with its
    result. Nothing passes through the scheduler and nothing is kept once the
    client has it: the scheduler's event log, used before, keeps every topic it is
    given (a thousand events each) for as long as it runs, a topic per run."""

    def __init__(self, outbox: _Outbox) -> None:
        self._outbox = outbox
        self._lock = threading.Lock()  # guards _sent only
        self._sent: dict[tuple[str, str], float] = {}

    def image_started(self, target: str, repository: str) -> None:
        self._outbox.put(["image_started", target, repository])

    def layer_bytes(self, target: str, digest: str, sent_bytes: int, size_bytes: int) -> None:
        now = time.monotonic()
        with self._lock:  # a layer's byte count is shown a few times a second at most
            due = sent_bytes >= size_bytes or now - self._sent.get((target, digest), 0.0) >= RELAY_INTERVAL_S
            if due:
                self._sent[(target, digest)] = now
        if due:
            self._outbox.put(["layer_bytes", target, digest, sent_bytes, size_bytes])

    def layer_done(self, target: str, layer: LayerResult) -> None:
        fields = [str(layer.diff_id) if layer.diff_id else None, str(layer.digest), layer.size, layer.media_type, layer.outcome.value, layer.bytes_sent, layer.mounted_from]
        with self._lock:
            self._sent.pop((target, str(layer.digest)), None)
        self._outbox.put(["layer_done", target, fields])

    def note(self, text: str) -> None:
        self._outbox.put(["note", text])


def _layer_result(fields: list[Any]) -> LayerResult:
    diff_id, digest, size, media_type, outcome, sent, mounted_from = fields
    return LayerResult(Digest.parse(diff_id) if diff_id else None, Digest.parse(digest), size, media_type, LayerOutcome(outcome), sent, mounted_from)


def _show_events(progress: Progress, events: Iterable[Any]) -> None:
    """The workers' events, handed to the client's renderer (foreign code: the
    caller holds no lock; a renderer's fault does not stop the run)."""
    for event in events:
        if not (isinstance(event, list | tuple) and event and event[0] in _RELAYED):
            continue
        name, *args = event
        try:
            if name == "layer_done":
                args[1] = _layer_result(args[1])
            getattr(progress, name)(*args)
        except Exception:
            log.exception("progress renderer failed")
