"""batchpush: push container images to OCI distribution registries in bulk.

The public names are loaded on first use, so that a compression worker, which
imports only ``batchpush.compress``, does not pay for the whole package.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "Callbacks": "api",
    "list_repositories": "api",
    "plan_of": "api",
    "retry_jobs": "api",
    "run": "api",
    "Rename": "catalog",
    "RepositoryMap": "catalog",
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
    "Plan": "plan",
    "load_plan": "plan",
    "BatchResult": "report",
    "ImageResult": "report",
    "TagSelection": "selection",
    "VersionRange": "selection",
}

__all__ = [
    "BatchPushError",
    "BatchResult",
    "Callbacks",
    "Credentials",
    "DigestMismatchError",
    "Engine",
    "ImageResult",
    "LayerOutcome",
    "LayerResult",
    "Plan",
    "PlanError",
    "PushJob",
    "PushOptions",
    "RegistryError",
    "RegistryOptions",
    "Rename",
    "RepositoryMap",
    "SourceError",
    "TagSelection",
    "UsageError",
    "VersionRange",
    "__version__",
    "list_repositories",
    "load_plan",
    "plan_of",
    "push",
    "retry_jobs",
    "run",
]

if TYPE_CHECKING:
    from .api import Callbacks, list_repositories, plan_of, retry_jobs, run
    from .catalog import Rename, RepositoryMap
    from .engine import Engine, PushJob, PushOptions, push
    from .errors import BatchPushError, DigestMismatchError, PlanError, SourceError, UsageError
    from .outcome import LayerOutcome, LayerResult
    from .plan import Plan, load_plan
    from .registry import Credentials, RegistryError, RegistryOptions
    from .report import BatchResult, ImageResult
    from .selection import TagSelection, VersionRange


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'batchpush' has no attribute {name!r}")
    return getattr(importlib.import_module(f".{module}", __name__), name)
