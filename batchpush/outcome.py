"""A layer's outcome in a target repository: the values layer_push reports."""

from __future__ import annotations

import enum
from dataclasses import dataclass

from .digest import Digest


class LayerOutcome(enum.Enum):
    KNOWN = "known"
    EXISTS = "exists"
    MOUNTED = "mounted"
    UPLOADED = "uploaded"
    SKIPPED_FOREIGN = "skipped-foreign"


@dataclass(frozen=True, slots=True)
class LayerResult:
    """A layer as it is in the target repository, and how it got there."""

    diff_id: Digest | None
    digest: Digest
    size: int
    media_type: str
    outcome: LayerOutcome
    bytes_sent: int = 0
    #: the repository it was mounted from
    mounted_from: str | None = None
