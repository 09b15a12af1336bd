"""The results of a run and their JSON report (schema ``version: 1``, see README)."""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .outcome import LayerOutcome, LayerResult

if TYPE_CHECKING:
    from .prune import Pruned

REPORT_VERSION = 1


@dataclass(slots=True)
class ImageResult:
    """One (image, target): ``status`` is ``pushed``, ``up-to-date`` (the tag already
    had this image: nothing sent), ``dry-run`` or ``failed``."""

    source: str
    target: str
    status: str
    digest: str | None = None
    size: int | None = None
    error: str | None = None
    error_kind: str | None = None
    seconds: float = 0.0
    layers: tuple[LayerResult, ...] = ()
    #: a registry source's digest for the image (differs from ``digest`` when a
    #: platform subset of an index was copied)
    source_digest: str | None = None
    #: a registry source's attachment tags copied with the image (signatures, ...)
    attachments: tuple[str, ...] = ()
    #: the Dask worker (address) that pushed it, in a cluster run (``--scheduler``)
    worker: str | None = None

    @property
    def ok(self) -> bool:
        return self.status != "failed"

    def to_json(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "target": self.target,
            "status": self.status,
            "digest": self.digest,
            "source_digest": self.source_digest,
            "attachments": list(self.attachments),
            "size": self.size,
            "error": self.error,
            "error_kind": self.error_kind,
            "seconds": round(self.seconds, 3),
            "worker": self.worker,
            "layers": [
                {
                    "diff_id": str(layer.diff_id) if layer.diff_id else None,
                    "digest": str(layer.digest),
                    "size": layer.size,
                    "media_type": layer.media_type,
                    "outcome": layer.outcome.value,
                    "bytes_sent": layer.bytes_sent,
                    "mounted_from": layer.mounted_from,
                }
                for layer in self.layers
            ],
        }


@dataclass(slots=True)
class BatchResult:
    images: list[ImageResult] = field(default_factory=list)
    bytes_read: int = 0
    bytes_compressed: int = 0
    #: every body byte sent to registries (layers, configs, manifests, retries)
    bytes_uploaded: int = 0
    requests_by_method: Counter[str] = field(default_factory=Counter)
    #: requests, and those that failed (no answer, or a status not expected), per registry host
    requests_by_registry: Counter[str] = field(default_factory=Counter)
    errors_by_registry: Counter[str] = field(default_factory=Counter)
    #: target tags a pruning plan entry found gone from its source (deleted or kept)
    pruned: list[Pruned] = field(default_factory=list)
    #: the most bytes the spool held at once, and its limit; layers it could not keep
    #: (compressed again when read again)
    spool_peak_bytes: int = 0
    spool_limit_bytes: int = 0
    layers_not_kept: int = 0
    #: bytes written to each OCI layout target, by its path (a dry run: that it
    #: would need); not in ``bytes_uploaded``
    layout_bytes: Counter[str] = field(default_factory=Counter)

    @property
    def ok(self) -> bool:
        return all(image.ok for image in self.images)

    @property
    def exit_code(self) -> int:
        return 0 if self.ok and self.images else 1

    @property
    def blobs_mounted(self) -> int:
        return sum(layer.outcome is LayerOutcome.MOUNTED for image in self.images for layer in image.layers)

    def to_json(self) -> dict[str, Any]:
        return {
            "version": REPORT_VERSION,
            "images": [image.to_json() for image in self.images],
            "totals": {
                "images": len(self.images),
                "failed": sum(not image.ok for image in self.images),
                "bytes_read": self.bytes_read,
                "bytes_compressed": self.bytes_compressed,
                "bytes_uploaded": self.bytes_uploaded,
                "blobs_mounted": self.blobs_mounted,
                "requests": dict(sorted(self.requests_by_method.items())),
                "spool_peak_bytes": self.spool_peak_bytes,
                "spool_limit_bytes": self.spool_limit_bytes,
                "layers_not_kept": self.layers_not_kept,
                "layout_bytes": dict(sorted(self.layout_bytes.items())),
            },
            "pruned": [{"target": p.target, "digest": str(p.digest) if p.digest else None, "deleted": p.deleted, "reason": p.reason or None} for p in self.pruned],
        }

    def write(self, path: str) -> None:
        tmp = f"{path}.tmp"
        with open(tmp, "w", encoding="utf-8") as out:
            json.dump(self.to_json(), out, indent=2)
            out.write("\n")
        os.replace(tmp, path)
