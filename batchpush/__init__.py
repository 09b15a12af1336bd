"""batchpush: push container images to OCI distribution registries in bulk."""

from __future__ import annotations

__version__ = "0.1.0"

from .engine import Engine, PushJob, PushOptions, push
from .errors import BatchPushError, DigestMismatchError, PlanError, SourceError, UsageError
from .layer_push import LayerOutcome, LayerResult
from .registry import Credentials, RegistryError, RegistryOptions
from .report import BatchResult, ImageResult

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
