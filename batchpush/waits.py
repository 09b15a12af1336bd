"""Waits that end: every wait in the engine either has a bound or looks at the cancel flag.

A thread that waits on another's work (a compression, a blob's flight, an image's
checks) wakes every ``POLL_S`` to look at the run's cancel flag, so an interrupted
run stops within that time wherever its threads are waiting. No wait here holds a
lock, and a future is only asked for its result once it is done.
"""

from __future__ import annotations

import concurrent.futures as cf
import os
import threading
import time
from collections.abc import Callable, Hashable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

from .errors import Cancelled, UsageError

T = TypeVar("T")

#: how often a waiting thread looks at the cancel flag
POLL_S = 0.1


def bound_s(variable: str, default_s: float) -> float:
    """A bound in seconds: ``default_s``, or the environment's ``variable`` when set
    (a number above 0, else UsageError naming it)."""
    text = os.environ.get(variable, "").strip()
    if not text:
        return default_s
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not value > 0:
        raise UsageError(f"{variable}={text!r}: a number of seconds above 0 is expected")
    return value


def wait_done(futures: Iterable[cf.Future[Any]], cancel: threading.Event) -> None:
    """Until every future is done; raises Cancelled once the run is cancelled."""
    pending = set(futures)
    while True:
        _, pending = cf.wait(pending, timeout=0)  # what is done counts, cancelled or not
        if not pending:
            return
        if cancel.is_set():
            raise Cancelled()
        cf.wait(pending, timeout=POLL_S, return_when=cf.ALL_COMPLETED)


def result(future: cf.Future[T], cancel: threading.Event) -> T:
    """The future's result (or its exception, raised), waiting with the cancel flag in view."""
    wait_done((future,), cancel)
    return future.result()


def as_completed(futures: Iterable[cf.Future[T]], cancel: threading.Event) -> Iterator[cf.Future[T]]:
    """Each future as soon as it is done, in that order; raises Cancelled once cancelled."""
    pending = set(futures)
    while pending:
        if cancel.is_set():
            raise Cancelled()
        done, pending = cf.wait(pending, timeout=POLL_S, return_when=cf.FIRST_COMPLETED)
        yield from done


def event(flag: threading.Event, cancel: threading.Event) -> None:
    """Until ``flag`` is set; raises Cancelled once the run is cancelled."""
    while not flag.wait(POLL_S):
        if cancel.is_set():
            raise Cancelled()


class Flights:
    """Single-flight by key: one holder at a time; the others wait for it to end
    (with the cancel flag in view), then hold the flight in turn. The lock guards
    the dictionary only: nobody waits or does I/O while holding it."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        #: the flight under way per key: set when it ends
        self._running: dict[Hashable, threading.Event] = {}

    @contextmanager
    def hold(self, key: Hashable | Callable[[], Hashable], cancel: threading.Event) -> Iterator[None]:
        """``key`` may be a function: asked again after every wait, so a waiter whose
        key has changed meanwhile joins the flight it now belongs to."""
        while True:
            current = key() if callable(key) else key
            with self._lock:
                running = self._running.get(current)
                if running is None:
                    mine = self._running[current] = threading.Event()
                    break
            event(running, cancel)
        try:
            yield
        finally:
            with self._lock:
                del self._running[current]
            mine.set()


class Slots:
    """At most ``limit`` holders at once (a host's requests in flight, its blob
    bodies). A wait for a slot looks at the cancel flag; with ``after_cancel_s`` it
    goes on that long after a cancel (the DELETEs that cancel upload sessions) and
    then raises Cancelled too. A thread that holds a slot already rides on it: a
    request made while another's body is being sent (a mirror's blob read from the
    same host, streamed into the upload) cannot wait for a slot its own thread holds.
    ``peak`` is the most holders there were at once."""

    def __init__(self, limit: int) -> None:
        self._free = threading.BoundedSemaphore(limit)
        self._lock = threading.Lock()
        self._mine = threading.local()
        self._held = 0
        self.peak = 0

    @contextmanager
    def hold(self, cancel: threading.Event, *, after_cancel_s: float = 0.0) -> Iterator[None]:
        if getattr(self._mine, "holding", False):
            yield
            return
        deadline: float | None = None
        while not self._free.acquire(timeout=POLL_S):
            if cancel.is_set():
                deadline = deadline or time.monotonic() + after_cancel_s
                if time.monotonic() >= deadline:
                    raise Cancelled()
        self._count_taken()
        with self._ridden():
            yield

    @contextmanager
    def try_hold(self) -> Iterator[bool]:
        """``hold`` without waiting: True when this thread holds a slot for the
        block (one it held already, or one free now), False when none was free."""
        if getattr(self._mine, "holding", False):
            yield True
            return
        if not self.try_take():
            yield False
            return
        with self._ridden():
            yield True

    @contextmanager
    def _ridden(self) -> Iterator[None]:
        """A slot this thread took: its requests ride on it until the block ends,
        then it is given back."""
        self._mine.holding = True
        try:
            yield
        finally:
            self._mine.holding = False
            self.give_back()

    def _count_taken(self) -> None:
        with self._lock:
            self._held += 1
            self.peak = max(self.peak, self._held)

    def try_take(self) -> bool:
        """A slot if one is free now, without waiting; give it back with ``give_back``."""
        if not self._free.acquire(blocking=False):
            return False
        self._count_taken()
        return True

    def give_back(self) -> None:
        with self._lock:
            self._held -= 1
        self._free.release()
