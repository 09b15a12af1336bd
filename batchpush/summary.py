"""The end-of-run summary: the lines a nightly run's log ends with.

```
summary: 40 images: 31 pushed, 8 up to date, 1 failed; read 41.9 MB, compressed 14.0 MB, sent 14.1 MB; 27 blobs mounted; 212 requests; 6.3 s
failed: 127.0.0.1:5000/team0/svc2:v2: HTTP 500 ...
```

The figures are the report's totals (``--report``), the wall time the run's.
"""

from __future__ import annotations

from collections import Counter

from .progress import one_line
from .report import BatchResult


def human_bytes(size: int) -> str:
    """``812 B``, ``41.9 MB``: decimal units, as the live display shows them."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if size >= scale:
            return f"{size / scale:.1f} {unit}"
    return f"{size} B"


def summary_figures(result: BatchResult, seconds: float) -> dict[str, int | float]:
    """The summary's figures, as the ``summary`` event of ``--log-format json`` carries them."""
    statuses = Counter(image.status for image in result.images)
    return {
        "images": len(result.images),
        "pushed": statuses["pushed"],
        "up_to_date": statuses["up-to-date"],
        "dry_run": statuses["dry-run"],
        "failed": statuses["failed"],
        "bytes_read": result.bytes_read,
        "bytes_compressed": result.bytes_compressed,
        "bytes_sent": result.bytes_uploaded,
        "blobs_mounted": result.blobs_mounted,
        "requests": sum(result.requests_by_method.values()),
        "seconds": round(seconds, 3),
    }


def summary_line(figures: dict[str, int | float], layout_bytes: dict[str, int] | None = None) -> str:
    """The summary line of ``summary_figures`` (and the bytes written to layouts)."""
    counts = [f"{figures['pushed']} pushed", f"{figures['up_to_date']} up to date"]
    if figures["dry_run"]:
        counts.append(f"{figures['dry_run']} dry-run")
    counts.append(f"{figures['failed']} failed")
    return (
        f"summary: {figures['images']} images: {', '.join(counts)}; "
        f"read {human_bytes(int(figures['bytes_read']))}, compressed {human_bytes(int(figures['bytes_compressed']))}, sent {human_bytes(int(figures['bytes_sent']))}"
        + (f", written to layouts {human_bytes(sum(layout_bytes.values()))}" if layout_bytes else "")
        + "; "
        f"{figures['blobs_mounted']} blobs mounted; {figures['requests']} requests; {figures['seconds']:.1f} s"
    )


def summary_lines(result: BatchResult, seconds: float) -> list[str]:
    """The summary line, then one ``failed: TARGET: REASON`` line per failed image."""
    line = summary_line(summary_figures(result, seconds), result.layout_bytes)
    return [line, *(f"failed: {image.target}: {one_line(image.error or image.status)}" for image in result.images if not image.ok)]
