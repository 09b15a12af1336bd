"""batchpush: push container images to OCI distribution registries in bulk."""

from __future__ import annotations

__version__ = "0.1.0"

from .engine import Engine, PushJob, PushOptions, push  # noqa: E402
from .errors import BatchPushError, DigestMismatchError, PlanError, SourceError, UsageError  # noqa: E402
from .layer_push import LayerOutcome, LayerResult  # noqa: E402
from .registry import Credentials, RegistryError, RegistryOptions  # noqa: E402
from .report import BatchResult, ImageResult  # noqa: E402

__all__ = [
    "BatchPushError",
    "BatchResult",
    "Credentials",
    "DigestMismatchError",
    "Engine",
    "ImageResult",
    "LayerOutcome",
    "LayerResult",
    "PlanError",
    "PushJob",
    "PushOptions",
    "RegistryError",
    "RegistryOptions",
    "SourceError",
    "UsageError",
    "__version__",
    "push",
]
