"""The plan file (``batchpush run PLAN.yaml``): parse, validate, expand lazily.

```yaml
version: 1
defaults:                      # copied into every registry entry unless it says otherwise
  max_concurrent_uploads: 8
registries:
  "127.0.0.1:5000":
    insecure: true
images:
  - source: oci:./layouts/svc0          # no tag: every tag in the layout
    targets: [127.0.0.1:5000/team0/svc0]
    tags: "^v[0-9]+$"                    # optional regex over source tags
```

YAML (PyYAML's safe loader) or JSON. Every error names the file, the entry and the
field; unknown keys are errors. Relative source paths are relative to the plan file.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, fields
from typing import Any

import yaml

from .engine import PushJob
from .errors import BatchPushError, PlanError
from .reference import parse_reference
from .registry.client import RegistryOptions

PLAN_VERSION = 1
#: the largest plan file read
MAX_PLAN_BYTES = 64 << 20

_REGISTRY_FIELDS = {f.name: f for f in fields(RegistryOptions)}
_INT_FIELDS = {name for name, f in _REGISTRY_FIELDS.items() if f.type in ("int", int)}
_BOOL_FIELDS = {name for name, f in _REGISTRY_FIELDS.items() if f.type in ("bool", bool)}
_STR_FIELDS = {name for name, f in _REGISTRY_FIELDS.items() if name not in _INT_FIELDS | _BOOL_FIELDS}
_TOP_KEYS = {"version", "defaults", "registries", "images"}
_IMAGE_KEYS = {"source", "targets", "tags"}


@dataclass(frozen=True, slots=True)
class Plan:
    path: str
    defaults: RegistryOptions
    registries: Mapping[str, RegistryOptions]
    #: the raw image entries, validated; expanded into jobs lazily by ``jobs()``
    entries: tuple[Mapping[str, Any], ...] = field(repr=False)

    def jobs(self) -> Iterator[PushJob]:
        base = os.path.dirname(os.path.abspath(self.path))
        for entry in self.entries:
            source = entry["source"]
            transport, _, rest = source.partition(":")
            if not os.path.isabs(rest):
                source = f"{transport}:{os.path.join(base, rest)}"
            tags = entry.get("tags")
            yield PushJob(source, tuple(entry["targets"]), re.compile(tags) if tags else None)


def _error(path: str, where: str, problem: str) -> PlanError:
    return PlanError(f"{path}: {where}: {problem}")


def _registry_options(path: str, where: str, raw: Any, base: RegistryOptions) -> RegistryOptions:
    if not isinstance(raw, dict):
        raise _error(path, where, "must be a mapping")
    values: dict[str, Any] = {}
    for key, value in raw.items():
        if key not in _REGISTRY_FIELDS:
            raise _error(path, f"{where}.{key}", f"unknown key (known: {', '.join(sorted(_REGISTRY_FIELDS))})")
        if key in _BOOL_FIELDS and not isinstance(value, bool):
            raise _error(path, f"{where}.{key}", "must be true or false")
        if key in _INT_FIELDS and (not isinstance(value, int) or isinstance(value, bool) or value <= 0):
            raise _error(path, f"{where}.{key}", "must be a positive integer")
        if key in _STR_FIELDS and value is not None and not isinstance(value, str):
            raise _error(path, f"{where}.{key}", "must be a string")
        values[key] = value
    return RegistryOptions(**{**{f: getattr(base, f) for f in _REGISTRY_FIELDS}, **values})


def load_plan(path: str) -> Plan:
    """Read and validate a plan; raises PlanError naming the file, entry and field."""
    try:
        size = os.path.getsize(path)
        if size > MAX_PLAN_BYTES:
            raise _error(path, "file", f"{size} bytes is over the {MAX_PLAN_BYTES}-byte limit")
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as exc:
        raise PlanError(f"{path}: cannot read: {exc.strerror or exc}") from exc
    except UnicodeDecodeError as exc:
        raise PlanError(f"{path}: not UTF-8 text") from exc
    try:
        document = json.loads(text) if path.endswith(".json") else yaml.safe_load(text)
    except (ValueError, yaml.YAMLError) as exc:
        raise PlanError(f"{path}: not valid {'JSON' if path.endswith('.json') else 'YAML'}: {exc}") from exc
    return validate_plan(path, document)


def validate_plan(path: str, document: Any) -> Plan:
    if not isinstance(document, dict):
        raise _error(path, "top level", "must be a mapping")
    for key in document:
        if key not in _TOP_KEYS:
            raise _error(path, str(key), f"unknown key (known: {', '.join(sorted(_TOP_KEYS))})")
    if document.get("version") != PLAN_VERSION:
        raise _error(path, "version", f"must be {PLAN_VERSION}")
    defaults = _registry_options(path, "defaults", document.get("defaults") or {}, RegistryOptions())
    registries_raw = document.get("registries") or {}
    if not isinstance(registries_raw, dict):
        raise _error(path, "registries", "must be a mapping of host to settings")
    registries = {str(host): _registry_options(path, f"registries[{host!r}]", raw or {}, defaults) for host, raw in registries_raw.items()}
    images = document.get("images")
    if not isinstance(images, list) or not images:
        raise _error(path, "images", "must be a non-empty list")
    for i, entry in enumerate(images):
        where = f"images[{i}]"
        if not isinstance(entry, dict):
            raise _error(path, where, "must be a mapping with source and targets")
        for key in entry:
            if key not in _IMAGE_KEYS:
                raise _error(path, f"{where}.{key}", f"unknown key (known: {', '.join(sorted(_IMAGE_KEYS))})")
        source = entry.get("source")
        if not isinstance(source, str) or ":" not in source:
            raise _error(path, f"{where}.source", "must be oci:PATH[:TAG] or docker-archive:PATH[:REF]")
        targets = entry.get("targets")
        if isinstance(targets, str):
            targets = [targets]
            entry = {**entry, "targets": targets}
            images[i] = entry
        if not isinstance(targets, list) or not targets or not all(isinstance(t, str) for t in targets):
            raise _error(path, f"{where}.targets", "must be a non-empty list of REGISTRY/REPOSITORY[:TAG]")
        for j, target in enumerate(targets):
            try:
                parse_reference(target)
            except BatchPushError as exc:
                raise _error(path, f"{where}.targets[{j}]", exc.message) from exc
        tags = entry.get("tags")
        if tags is not None:
            if not isinstance(tags, str):
                raise _error(path, f"{where}.tags", "must be a regular expression string")
            try:
                re.compile(tags)
            except re.error as exc:
                raise _error(path, f"{where}.tags", f"invalid regular expression: {exc}") from exc
    return Plan(path, defaults, registries, tuple(images))
