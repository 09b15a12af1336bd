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


def summary_lines(result: BatchResult, seconds: float) -> list[str]:
    """The summary line, then one ``failed: TARGET: REASON`` line per failed image."""
    statuses = Counter(image.status for image in result.images)
    counts = [f"{statuses['pushed']} pushed", f"{statuses['up-to-date']} up to date"]
    if statuses["dry-run"]:
        counts.append(f"{statuses['dry-run']} dry-run")
    counts.append(f"{statuses['failed']} failed")
    line = (
        f"summary: {len(result.images)} images: {', '.join(counts)}; "
        f"read {human_bytes(result.bytes_read)}, compressed {human_bytes(result.bytes_compressed)}, sent {human_bytes(result.bytes_uploaded)}"
        + (f", written to layouts {human_bytes(sum(result.layout_bytes.values()))}" if result.layout_bytes else "")
        + "; "
        f"{result.blobs_mounted} blobs mounted; {sum(result.requests_by_method.values())} requests; {seconds:.1f} s"
    )
    return [line, *(f"failed: {image.target}: {one_line(image.error or image.status)}" for image in result.images if not image.ok)]
