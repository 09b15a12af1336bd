"""Progress events and their renderers; no decisions are made here.

``PlainProgress`` writes lines for logs and pipes, each naming its target, through
one writer thread (``LineWriter``); ``RichProgress`` a live display on a terminal,
``JsonProgress`` one JSON log record per event, ``NoProgress`` nothing; ``Fanout``
gives the events to several. All are thread-safe.
"""

from __future__ import annotations

import collections
import logging
import queue
import sys
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol, TextIO

from .outcome import LayerOutcome, LayerResult
from .waits import POLL_S

#: lines waiting for the writer thread; a line that finds the queue full is dropped
QUEUE_LINES = 10_000
#: at close, how long the writer may go without writing a line before it is left behind
CLOSE_STALL_S = 5.0

if TYPE_CHECKING:
    from .report import ImageResult


class Progress(Protocol):
    def image_started(self, target: str, repository: str) -> None: ...
    def layer_bytes(self, target: str, digest: str, sent_bytes: int, size_bytes: int) -> None: ...
    def layer_done(self, target: str, layer: LayerResult) -> None: ...
    def pushed(self, target: str, tag: str, digest: str, size: int, *, up_to_date: bool = False) -> None: ...
    def failed(self, target: str, message: str) -> None: ...
    #: every (image, target) once, with its final result (after its ``pushed`` or ``failed``, if any)
    def image_done(self, result: ImageResult) -> None: ...
    def note(self, text: str) -> None: ...
    def close(self) -> None: ...


def describe(layer: LayerResult) -> str:
    """docker's words for a layer's outcome."""
    if layer.outcome is LayerOutcome.MOUNTED:
        return f"Mounted from {layer.mounted_from}"
    if layer.outcome is LayerOutcome.UPLOADED:
        return "Pushed"
    if layer.outcome is LayerOutcome.SKIPPED_FOREIGN:
        return "Skipped foreign layer"
    return "Layer already exists"


def one_line(text: str) -> str:
    """A reason as one log line (a registry's message may span several)."""
    return " ".join(text.split())


class NoProgress:
    def image_started(self, target: str, repository: str) -> None:
        pass

    def layer_bytes(self, target: str, digest: str, sent_bytes: int, size_bytes: int) -> None:
        pass

    def layer_done(self, target: str, layer: LayerResult) -> None:
        pass

    def pushed(self, target: str, tag: str, digest: str, size: int, *, up_to_date: bool = False) -> None:
        pass

    def failed(self, target: str, message: str) -> None:
        pass

    def image_done(self, result: ImageResult) -> None:
        pass

    def note(self, text: str) -> None:
        pass

    def close(self) -> None:
        pass


class LineWriter:
    """One thread writes every line, so no engine thread ever waits on a terminal or
    a pipe: a thread blocked in ``write`` holds the stream's lock, and every other
    thread that prints would queue behind it, for ever if nobody reads the pipe.

    ``write`` never waits: a line that finds the queue full (``QUEUE_LINES``
    behind) is dropped and counted, and the next line written says how many were
    lost. Dropping, not a bounded wait, because a bounded wait per line would slow
    every image by that bound for as long as the reader is stuck, while the lines
    are only a view: the results are in the report and the summary. Two kinds of
    line are never dropped: ``keep`` (a failure: at most one per image) goes to a
    side list the writer empties first, without waiting either; ``write_waiting``
    (the summary, from the main thread once the engine is closed) waits for room
    while the writer makes progress. ``close`` waits while the writer makes
    progress too; both give up after ``CLOSE_STALL_S`` without any, leaving the
    (daemon) thread behind, so a run whose output nobody reads still ends."""

    def __init__(self, queue_lines: int = QUEUE_LINES, *, dropped_line: Callable[[str], str] | None = None) -> None:
        self._queue: queue.Queue[tuple[TextIO, str]] = queue.Queue(queue_lines)
        #: how the notice of dropped lines is written (a JSON log makes it a JSON object)
        self._dropped_line = dropped_line or (lambda text: text)
        self._lock = threading.Lock()
        self._dropped = 0
        #: lines never dropped, written before the queue's (deque: appends are atomic)
        self._kept: collections.deque[tuple[TextIO, str]] = collections.deque()
        #: lines written so far (only the writer thread counts): close watches it move
        self.written = 0
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._run, name="progress-writer", daemon=True)
        self._thread.start()

    def write(self, stream: TextIO, text: str) -> None:
        try:
            self._queue.put_nowait((stream, text))
        except queue.Full:
            with self._lock:
                self._dropped += 1

    def keep(self, stream: TextIO, text: str) -> None:
        """A line that is never dropped, and never waited for."""
        self._kept.append((stream, text))

    def write_waiting(self, stream: TextIO, text: str) -> bool:
        """A line that waits for room while the writer makes progress; False if it
        made none for ``CLOSE_STALL_S`` (the line is dropped and counted)."""
        written, since = self.written, time.monotonic()
        while True:
            try:
                self._queue.put((stream, text), timeout=POLL_S)
                return True
            except queue.Full:
                if self.written != written:
                    written, since = self.written, time.monotonic()
                elif time.monotonic() - since > CLOSE_STALL_S:
                    with self._lock:
                        self._dropped += 1
                    return False

    def _emit(self, stream: TextIO, text: str) -> None:
        try:
            # one write per line (print writes the newline separately)
            stream.write(text + "\n")
            stream.flush()
        except (OSError, ValueError):  # a closed pipe or stream: the lines are lost, the run is not
            pass
        self.written += 1

    def _emit_dropped(self, stream: TextIO) -> None:
        with self._lock:
            dropped, self._dropped = self._dropped, 0
        if dropped:
            self._emit(stream, self._dropped_line(f"({dropped} output line(s) dropped: the output was not read fast enough; the report has every result)"))

    def _run(self) -> None:
        stream: TextIO | None = None
        while True:
            while self._kept:
                kept_stream, text = self._kept.popleft()
                self._emit(kept_stream, text)
            try:
                stream, text = self._queue.get(timeout=0 if self._closed.is_set() else POLL_S)
            except queue.Empty:
                if self._closed.is_set() and not self._kept:
                    break
                continue
            self._emit_dropped(stream)
            self._emit(stream, text)
        if stream is not None:
            self._emit_dropped(stream)

    def close(self) -> bool:
        """Write what is queued; True once it is written, False if the writer made
        no progress for ``CLOSE_STALL_S`` (the stream is not being read)."""
        self._closed.set()
        written, since = self.written, time.monotonic()
        while self._thread.is_alive():
            self._thread.join(POLL_S)
            if self.written != written:
                written, since = self.written, time.monotonic()
            elif time.monotonic() - since > CLOSE_STALL_S:
                return False
        return True


class WriterHandler(logging.Handler):
    """Log records through a LineWriter: a thread that logs never waits on stderr
    (a StreamHandler writes under its lock, so one blocked write would stop every
    thread that logs). An error or worse is kept, never dropped."""

    def __init__(self, writer: LineWriter, stream: TextIO) -> None:
        super().__init__()
        self.writer = writer
        self.stream = stream

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record)
        except Exception:
            self.handleError(record)
            return
        if record.levelno >= logging.ERROR:
            self.writer.keep(self.stream, line)
        else:
            self.writer.write(self.stream, line)


class PlainProgress(NoProgress):
    """Lines for logs and pipes, each naming its target, as images pushed at once
    interleave: ``TARGET: 1a2b3c4d5e6f: Pushed`` (or ``Mounted from REPO``, ``Layer
    already exists``) and ``TARGET: digest: sha256:... size: N`` on ``out``; a
    failure as one line ``error: TARGET: REASON`` on ``err``. ``quiet`` keeps only
    the failures. Every line goes through one LineWriter: never written by the
    thread that reports it."""

    def __init__(self, out: TextIO | None = None, err: TextIO | None = None, *, quiet: bool = False, writer: LineWriter | None = None) -> None:
        self.out = out or sys.stdout
        self.err = err or sys.stderr
        self.quiet = quiet
        #: a writer given is closed by whoever gave it
        self.writer = writer or LineWriter()
        self._owns_writer = writer is None

    def _print(self, text: str, stream: TextIO) -> None:
        self.writer.write(stream, text)

    def layer_done(self, target: str, layer: LayerResult) -> None:
        if not self.quiet:
            self._print(f"{target}: {layer.digest.hex[:12]}: {describe(layer)}", self.out)

    def pushed(self, target: str, tag: str, digest: str, size: int, *, up_to_date: bool = False) -> None:
        if not self.quiet:
            suffix = " (up to date)" if up_to_date else ""
            self._print(f"{target}: digest: {digest} size: {size}{suffix}", self.out)

    def failed(self, target: str, message: str) -> None:
        self.writer.keep(self.err, f"error: {target}: {one_line(message)}")

    def note(self, text: str) -> None:
        """A closing line (the summary): from the main thread, never dropped while the output is read."""
        if not self.quiet:
            self.writer.write_waiting(self.out, text)

    def close(self) -> None:
        if self._owns_writer:
            self.writer.close()


class RichProgress(NoProgress):
    """A live display: overall bytes and rate, images done, and one line per layer
    that is moving (docker's "Pushing", "Mounted from X", "Layer already exists")."""

    #: finished layer lines kept on screen
    RECENT_LINES = 6

    def __init__(self, *, quiet: bool = False) -> None:
        from rich.console import Console
        from rich.live import Live

        self.console = Console(stderr=False)
        self.quiet = quiet
        self._lock = threading.Lock()
        self._started = time.monotonic()
        self._sent = 0
        self._images_done = 0
        self._images_failed = 0
        self._images_started = 0
        self._moving: dict[tuple[str, str], tuple[int, int]] = {}
        self._recent: list[str] = []
        self._live = Live(self._render(), console=self.console, refresh_per_second=8, transient=True, get_renderable=self._render)
        self._live.start()

    def _render(self):  # type: ignore[no-untyped-def]
        from rich.table import Table
        from rich.text import Text

        with self._lock:
            elapsed = max(time.monotonic() - self._started, 1e-6)
            table = Table.grid(padding=(0, 1))
            # Text, not markup strings: a print with markup=False re-renders this too
            table.add_row(
                Text.assemble(
                    ("images", "bold"),
                    f" {self._images_done}/{self._images_started} done",
                    (f", {self._images_failed} failed" if self._images_failed else "", "red"),
                    ("   sent", "bold"),
                    f" {self._sent / 1e6:,.1f} MB at {self._sent / elapsed / 1e6:,.1f} MB/s",
                )
            )
            for line in self._recent[-self.RECENT_LINES :]:
                table.add_row(Text(line))
            for (target, digest), (sent, size) in list(self._moving.items())[:10]:
                share = sent / size if size else 1.0
                bar = "=" * int(share * 30)
                table.add_row(Text(f"{digest[7:19]}: Pushing [{bar:<30}] {sent / 1e6:,.1f}/{size / 1e6:,.1f} MB  {target}"))
            return table

    def image_started(self, target: str, repository: str) -> None:
        with self._lock:
            self._images_started += 1

    def layer_bytes(self, target: str, digest: str, sent_bytes: int, size_bytes: int) -> None:
        with self._lock:
            previous = self._moving.get((target, digest), (0, size_bytes))[0]
            self._sent += sent_bytes - previous
            self._moving[(target, digest)] = (sent_bytes, size_bytes)

    def layer_done(self, target: str, layer: LayerResult) -> None:
        with self._lock:
            self._moving.pop((target, str(layer.digest)), None)
            self._recent.append(f"{layer.digest.hex[:12]}: {describe(layer)}  {target}")
            del self._recent[: -self.RECENT_LINES]

    def pushed(self, target: str, tag: str, digest: str, size: int, *, up_to_date: bool = False) -> None:
        with self._lock:
            self._images_done += 1
            for key in [k for k in self._moving if k[0] == target]:
                del self._moving[key]  # the config's upload has no layer line
        if not self.quiet:
            self._live.console.print(f"{target}: digest: {digest} size: {size}" + (" (up to date)" if up_to_date else ""), markup=False, highlight=False, soft_wrap=True)

    def failed(self, target: str, message: str) -> None:
        with self._lock:
            self._images_done += 1
            self._images_failed += 1
        from rich.text import Text

        self._live.console.print(Text.assemble(("error: ", "red"), f"{target}: {one_line(message)}"), soft_wrap=True)

    def note(self, text: str) -> None:
        if not self.quiet:
            self._live.console.print(text, markup=False, highlight=False, soft_wrap=True)

    def close(self) -> None:
        self._live.stop()


class JsonProgress(NoProgress):
    """Each event as a log record of ``batchpush.events`` for ``logs.JsonFormatter``:
    ``image-started``, ``layer`` (its outcome), ``failure``, ``image-finished``,
    ``note`` (a closing line: a dry run's plan, a pruned tag) and ``summary`` (the
    run's figures). Through logging, so that these and every other log line (the
    retries among them) share one stream, one lock and one redaction."""

    log = logging.getLogger("batchpush.events")

    def _emit(self, event: str, message: str, level: int = logging.INFO, **fields: object) -> None:
        self.log.log(level, message, extra={"event": event, "fields": fields})

    def image_started(self, target: str, repository: str) -> None:
        self._emit("image-started", f"{target}: started", target=target, repository=repository)

    def layer_done(self, target: str, layer: LayerResult) -> None:
        self._emit(
            "layer",
            f"{target}: {layer.digest}: {layer.outcome.value}",
            target=target,
            digest=str(layer.digest),
            size=layer.size,
            outcome=layer.outcome.value,
            bytes_sent=layer.bytes_sent,
            mounted_from=layer.mounted_from,
        )

    def note(self, text: str) -> None:
        self._emit("note", text)

    def summary(self, figures: dict[str, int | float], line: str) -> None:
        """The run's summary: its ``line`` and its figures (summary.summary_figures)."""
        self.log.info(line, extra={"event": "summary", "fields": figures})

    def image_done(self, result: ImageResult) -> None:
        if not result.ok:
            self._emit("failure", f"{result.target}: {result.error}", logging.ERROR, target=result.target, source=result.source, kind=result.error_kind, reason=result.error)
        self._emit(
            "image-finished",
            f"{result.target}: {result.status}",
            target=result.target,
            source=result.source,
            status=result.status,
            digest=result.digest,
            size=result.size,
            bytes_sent=sum(layer.bytes_sent for layer in result.layers),
            seconds=round(result.seconds, 3),
        )


class Fanout(NoProgress):
    """Every event to each of ``sinks``, in order."""

    def __init__(self, *sinks: Progress) -> None:
        self.sinks = sinks

    def _each(self, method: str, *args: Any, **kwargs: Any) -> None:
        for sink in self.sinks:
            getattr(sink, method)(*args, **kwargs)

    def image_started(self, target: str, repository: str) -> None:
        self._each("image_started", target, repository)

    def layer_bytes(self, target: str, digest: str, sent_bytes: int, size_bytes: int) -> None:
        self._each("layer_bytes", target, digest, sent_bytes, size_bytes)

    def layer_done(self, target: str, layer: LayerResult) -> None:
        self._each("layer_done", target, layer)

    def pushed(self, target: str, tag: str, digest: str, size: int, *, up_to_date: bool = False) -> None:
        self._each("pushed", target, tag, digest, size, up_to_date=up_to_date)

    def failed(self, target: str, message: str) -> None:
        self._each("failed", target, message)

    def image_done(self, result: ImageResult) -> None:
        self._each("image_done", result)

    def note(self, text: str) -> None:
        self._each("note", text)

    def close(self) -> None:
        self._each("close")
