"""Progress events and their renderers; no decisions are made here."""

from __future__ import annotations

import sys
import threading
from typing import Protocol, TextIO

from .layer_push import LayerOutcome, LayerResult


class Progress(Protocol):
    def repository(self, target: str) -> None: ...
    def layer(self, target: str, layer: LayerResult) -> None: ...
    def pushed(self, target: str, tag: str, digest: str, size: int) -> None: ...
    def failed(self, target: str, message: str) -> None: ...


_OUTCOME_TEXT = {
    LayerOutcome.KNOWN: "Layer already exists",
    LayerOutcome.EXISTS: "Layer already exists",
    LayerOutcome.UPLOADED: "Pushed",
    LayerOutcome.SKIPPED_FOREIGN: "Skipped foreign layer",
}


class PlainProgress:
    """docker-like lines: layers and digests on ``out``, errors on ``err``.
    ``quiet`` keeps only the errors."""

    def __init__(self, out: TextIO | None = None, err: TextIO | None = None, *, quiet: bool = False) -> None:
        self.out = out or sys.stdout
        self.err = err or sys.stderr
        self.quiet = quiet
        self._lock = threading.Lock()

    def _print(self, text: str, stream: TextIO) -> None:
        with self._lock:
            print(text, file=stream, flush=True)

    def repository(self, target: str) -> None:
        if not self.quiet:
            self._print(f"The push refers to repository [{target}]", self.out)

    def layer(self, target: str, layer: LayerResult) -> None:
        if self.quiet:
            return
        text = f"Mounted from {layer.mounted_from}" if layer.outcome is LayerOutcome.MOUNTED else _OUTCOME_TEXT[layer.outcome]
        self._print(f"{layer.digest.hex[:12]}: {text}", self.out)

    def pushed(self, target: str, tag: str, digest: str, size: int) -> None:
        if not self.quiet:
            self._print(f"{tag}: digest: {digest} size: {size}", self.out)

    def failed(self, target: str, message: str) -> None:
        self._print(f"error: {target}: {message}", self.err)


class NoProgress:
    def repository(self, target: str) -> None:
        pass

    def layer(self, target: str, layer: LayerResult) -> None:
        pass

    def pushed(self, target: str, tag: str, digest: str, size: int) -> None:
        pass

    def failed(self, target: str, message: str) -> None:
        pass
