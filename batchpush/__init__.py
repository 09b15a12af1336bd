"""batchpush: push container images to OCI distribution registries in bulk.

The public names are loaded on first use, so that a compression worker, which
imports only ``batchpush.compress``, does not pay for the whole package.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "Engine": "engine",
    "PushJob": "engine",
    "PushOptions": "engine",
    "push": "engine",
    "BatchPushError": "errors",
    "DigestMismatchError": "errors",
    "PlanError": "errors",
    "SourceError": "errors",
    "UsageError": "errors",
    "LayerOutcome": "outcome",
    "LayerResult": "outcome",
    "Credentials": "registry",
    "RegistryError": "registry",
    "RegistryOptions": "registry",
    "BatchResult": "report",
    "ImageResult": "report",
}

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

if TYPE_CHECKING:
    from .engine import Engine, PushJob, PushOptions, push
    from .errors import BatchPushError, DigestMismatchError, PlanError, SourceError, UsageError
    from .outcome import LayerOutcome, LayerResult
    from .registry import Credentials, RegistryError, RegistryOptions
    from .report import BatchResult, ImageResult


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'batchpush' has no attribute {name!r}")
    return getattr(importlib.import_module(f".{module}", __name__), name)
