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
A source may be a registry (``docker://REGISTRY/REPOSITORY[:TAG|@DIGEST]``:
mirroring); ``platforms: [linux/amd64, ...]`` then copies that subset of an index.

A migration names many repositories at once (catalog.py):

```yaml
  - source: docker://old.example/team1/      # the catalog's repositories below team1/
    targets: [new.example/t1/]               # a prefix: team1/svc2 -> new.example/t1/svc2
    repositories: "^team1/svc"               # regexes over the source repository path
    exclude_repositories: "legacy"
    rename: [{from: "^svc(\\d)$", to: "service-\\1"}]   # the path below the source prefix
    exclude_tags: "-rc|nightly"              # tag selection (selection.py): tags,
    semver: ">=1.2, <2"                      # exclude_tags, semver, latest, in that order
    latest: 5
```
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, fields
from typing import Any, get_type_hints

from .catalog import Rename, RepositoryMap, check_targets, is_catalog_source, is_layout_source
from .engine import PushJob, select_tags
from .errors import BatchPushError, PlanError
from .reference import is_prefix, parse_target
from .registry.client import RegistryOptions
from .selection import VersionRange
from .sources import open_source
from .sources.registry import TRANSPORT as REGISTRY_TRANSPORT
from .sources.registry import Platform, parse_registry_source

PLAN_VERSION = 1
#: the largest plan file read
MAX_PLAN_BYTES = 64 << 20

_REGISTRY_FIELDS = {f.name: f for f in fields(RegistryOptions)}


@dataclass(frozen=True, slots=True)
class _FieldRule:
    """How a plan value for one RegistryOptions type is checked and stored."""

    #: what the value must be, as the error message says it
    expected: str
    #: the value as stored; raises ValueError if it is refused
    convert: Callable[[Any], Any]


def _bool_value(value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(value)
    return value


def _positive_int(value: Any) -> int:
    # bool is an int subclass: ``true`` must not become 1
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(value)
    return value


def _positive_number(value: Any) -> float:
    # an int is welcome (``retry_after_cap_s: 30``) but stored as float, so the field
    # holds the type its annotation says; inf and nan are not settings
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(value)
    try:
        number = float(value)
    except OverflowError:  # an int too large for a float
        raise ValueError(value) from None
    if not math.isfinite(number) or number <= 0:
        raise ValueError(value)
    return number


def _optional_str(value: Any) -> str | None:
    if value is not None and not isinstance(value, str):
        raise ValueError(value)
    return value


#: one rule per type RegistryOptions uses, keyed by the evaluated type (``get_type_hints``),
#: never by the annotation string that ``from __future__ import annotations`` leaves
_RULES: dict[object, _FieldRule] = {
    bool: _FieldRule("true or false", _bool_value),
    int: _FieldRule("a positive integer", _positive_int),
    float: _FieldRule("a positive number", _positive_number),
    str | None: _FieldRule("a string or null", _optional_str),
}


def _field_rules(options_type: type) -> dict[str, _FieldRule]:
    """The rule of every field of the dataclass ``options_type``, found by its type
    hint. A field whose type has no rule raises TypeError (at import, for
    RegistryOptions) rather than being accepted unchecked."""
    hints = get_type_hints(options_type)
    rules = {}
    for f in fields(options_type):
        rule = _RULES.get(hints[f.name])
        if rule is None:
            raise TypeError(f"{options_type.__name__}.{f.name}: no plan rule for type {hints[f.name]!r}; add one to plan._RULES")
        rules[f.name] = rule
    return rules


_FIELD_RULES = _field_rules(RegistryOptions)
_TOP_KEYS = {"version", "defaults", "registries", "images", "spool_dir", "spool_limit", "incremental_from"}
_SIZE_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_size(text: str | int) -> int:
    """A positive size: a number of bytes, or with a unit (``512M``, ``2GiB``, ``64k``);
    ValueError says what is wrong."""
    if isinstance(text, int) and not isinstance(text, bool):
        size = text
    else:
        match = re.fullmatch(r"(\d+)\s*([kmgt]?)(?:i?b)?", str(text).strip().lower(), re.ASCII)
        if not match:
            raise ValueError(f"not a size: {text!r} (e.g. 64M)")
        size = int(match.group(1)) * _SIZE_UNITS[match.group(2)]
    if size <= 0:
        raise ValueError(f"not a positive size: {text!r}")
    return size
_IMAGE_KEYS = {"source", "targets", "tags", "platforms", "signatures", "prune", "exclude_tags", "semver", "latest", "repositories", "exclude_repositories", "rename"}
#: the entry keys that are regular expressions
_REGEX_KEYS = ("tags", "exclude_tags", "repositories", "exclude_repositories")


@dataclass(frozen=True, slots=True)
class Plan:
    path: str
    defaults: RegistryOptions
    registries: Mapping[str, RegistryOptions]
    #: the raw image entries, validated; expanded into jobs lazily by ``jobs()``
    entries: tuple[Mapping[str, Any], ...] = field(repr=False)
    #: where compressed layers are kept, and at most how many bytes (spool.py)
    spool_dir: str | None = None
    spool_limit: int | None = None
    #: earlier exports whose layers the run's ``oci:DIR`` targets leave out (layout.py)
    incremental_from: tuple[str, ...] = ()

    def jobs(self) -> Iterator[PushJob]:
        """The entries as push jobs. First, each layout and archive without a tag in
        its targets is opened (read here, before any request) to learn the tags it
        writes: PlanError if two entries write the same one."""
        jobs = [self._job(entry) for entry in self.entries]
        _refuse_shared_tags(self, jobs, open_sources=True)
        return iter(jobs)

    def _job(self, entry: Mapping[str, Any]) -> PushJob:
        source = entry["source"]
        transport, _, rest = source.partition(":")
        if not source.startswith(REGISTRY_TRANSPORT) and not os.path.isabs(rest):
            source = f"{transport}:{os.path.join(os.path.dirname(os.path.abspath(self.path)), rest)}"
        platforms = tuple(Platform.parse(p) for p in entry.get("platforms") or ())
        regex = {key: re.compile(entry[key]) if entry.get(key) else None for key in _REGEX_KEYS}
        repositories = RepositoryMap(regex["repositories"], regex["exclude_repositories"], tuple(Rename.parse(r["from"], r["to"]) for r in entry.get("rename") or ()))
        semver = VersionRange.parse(entry["semver"]) if entry.get("semver") is not None else None
        return PushJob(
            source,
            tuple(entry["targets"]),
            regex["tags"],
            platforms,
            signatures=entry.get("signatures", True),
            prune=entry.get("prune", False),
            exclude_tags=regex["exclude_tags"],
            semver=semver,
            latest=entry.get("latest"),
            repositories=repositories,
        )


def _written_tags(job: PushJob, *, open_sources: bool) -> list[str]:
    """The target tags (``registry/repository:tag``) a job writes, as far as they
    are known without a request: a target's own tag; for a target without one, the
    tag a ``docker://`` source names, and with ``open_sources`` the tags of a
    layout or archive. A registry repository's tags (listed by a request), a
    prefix target's repositories (listed by a request too) and a source that does
    not open (the run reports it as its images' failure) add none."""
    targets = [parse_target(t) for t in job.targets if not is_prefix(t)]
    written = [str(t) for t in targets if t.tag]
    untagged = [t for t in targets if not t.tag]
    tags: list[str] = []
    try:
        if untagged and job.source.startswith(REGISTRY_TRANSPORT):
            tag = parse_registry_source(job.source).tag
            tags = job.selection.select([tag]) if tag else []
        elif untagged and open_sources:
            tags = [tag for image in select_tags(open_source(job.source).images(), job.selection) for tag in image.tags]
        return written + [str(t.with_tag(tag)) for t in untagged for tag in tags]
    except BatchPushError:
        return written


def _refuse_shared_tags(plan: Plan, jobs: list[PushJob], *, open_sources: bool) -> None:
    """Two entries that write one target tag would flip it between them on every
    run: refused, naming both and the tag."""
    writers: dict[str, int] = {}
    for i, job in enumerate(jobs):
        for tag in _written_tags(job, open_sources=open_sources):
            first = writers.setdefault(tag, i)
            if first != i:
                sources = plan.entries[first]["source"], plan.entries[i]["source"]
                raise _error(plan.path, f"images[{first}] ({sources[0]}) and images[{i}] ({sources[1]})", f"both write {tag}; one tag must have one source")


def _check_selection(path: str, where: str, entry: Mapping[str, Any], *, catalog: bool, prefixed: bool) -> None:
    """The entry's tag selection, repository filters and rename rules."""
    for key in _REGEX_KEYS:
        value = entry.get(key)
        if value is None:
            continue
        if not isinstance(value, str):
            raise _error(path, f"{where}.{key}", "must be a regular expression string")
        try:
            re.compile(value)
        except re.error as exc:
            raise _error(path, f"{where}.{key}", f"invalid regular expression: {exc}") from exc
    for key in ("repositories", "exclude_repositories"):
        if key in entry and not catalog:
            raise _error(path, f"{where}.{key}", "needs a catalog source (docker://REGISTRY/ or docker://REGISTRY/PREFIX/), or an oci:DIR with no tag")
    if entry.get("semver") is not None:
        if not isinstance(entry["semver"], str):
            raise _error(path, f"{where}.semver", "must be a version constraint string, e.g. '>=1.2, <2'")
        try:
            VersionRange.parse(entry["semver"])
        except BatchPushError as exc:
            raise _error(path, f"{where}.semver", exc.message) from exc
    if "latest" in entry:
        try:
            _positive_int(entry["latest"])
        except ValueError:
            raise _error(path, f"{where}.latest", "must be a positive integer") from None
    rules = entry.get("rename")
    if rules is None:
        return
    if not prefixed:
        raise _error(path, f"{where}.rename", "needs a target ending in / (a prefix, to which the renamed path is appended)")
    if not isinstance(rules, list) or not all(isinstance(r, dict) and set(r) == {"from", "to"} and all(isinstance(v, str) for v in r.values()) for r in rules):
        raise _error(path, f"{where}.rename", "must be a list of {from: REGEX, to: REPLACEMENT}")
    parsed = []
    for k, rule in enumerate(rules):
        try:
            parsed.append(Rename.parse(rule["from"], rule["to"]))
        except BatchPushError as exc:
            raise _error(path, f"{where}.rename[{k}]", exc.message) from exc
    collision = RepositoryMap(rename=tuple(parsed)).fixed_collision()
    if collision is not None:
        first, second = collision
        raise _error(path, f"{where}.rename[{first}] and rename[{second}]", f"both rename to {rules[first]['to']!r}: two repositories would be copied to one target repository")


def _error(path: str, where: str, problem: str) -> PlanError:
    return PlanError(f"{path}: {where}: {problem}")


def _registry_options(path: str, where: str, raw: Any, base: RegistryOptions) -> RegistryOptions:
    if not isinstance(raw, dict):
        raise _error(path, where, "must be a mapping")
    values: dict[str, Any] = {}
    for key, value in raw.items():
        if key not in _REGISTRY_FIELDS:
            raise _error(path, f"{where}.{key}", f"unknown key (known: {', '.join(sorted(_REGISTRY_FIELDS))})")
        rule = _FIELD_RULES[key]
        try:
            values[key] = rule.convert(value)
        except ValueError:
            raise _error(path, f"{where}.{key}", f"must be {rule.expected}") from None
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
    import yaml  # here: a run without a plan never loads PyYAML

    try:
        document = json.loads(text) if path.endswith(".json") else yaml.safe_load(text)
    except (ValueError, yaml.YAMLError) as exc:
        raise PlanError(f"{path}: not valid {'JSON' if path.endswith('.json') else 'YAML'}: {exc}") from exc
    return validate_plan(path, document)


def validate_plan(path: str, document: Any) -> Plan:
    """Validate a parsed plan ``document`` (``path`` is the file errors name); raises
    PlanError naming the file, the entry and the field. Registry settings are checked
    against RegistryOptions' type hints and stored as those types."""
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
            raise _error(path, f"{where}.source", "must be oci:PATH[:TAG], docker-archive:PATH[:REF] or docker://REGISTRY/REPOSITORY[:TAG|@DIGEST]")
        catalog = is_catalog_source(source)
        if source.startswith(REGISTRY_TRANSPORT):
            try:
                check_targets(source, []) if catalog else parse_registry_source(source)
            except BatchPushError as exc:
                raise _error(path, f"{where}.source", exc.message) from exc
        for key in ("signatures", "prune"):
            if key in entry and not isinstance(entry[key], bool):
                raise _error(path, f"{where}.{key}", "must be true or false")
        platforms = entry.get("platforms")
        if platforms is not None:
            if not isinstance(platforms, list) or not platforms or not all(isinstance(p, str) for p in platforms):
                raise _error(path, f"{where}.platforms", "must be a non-empty list of OS/ARCH[/VARIANT]")
            for p in platforms:
                try:
                    Platform.parse(p)
                except BatchPushError as exc:
                    raise _error(path, f"{where}.platforms", exc.message) from exc
        targets = entry.get("targets")
        if isinstance(targets, str):
            targets = [targets]
            entry = {**entry, "targets": targets}
            images[i] = entry
        if not isinstance(targets, list) or not targets or not all(isinstance(t, str) for t in targets):
            raise _error(path, f"{where}.targets", "must be a non-empty list of REGISTRY/REPOSITORY[:TAG]")
        for j, target in enumerate(targets):
            try:
                check_targets(source, [target]) if is_prefix(target) or catalog else parse_target(target)
            except BatchPushError as exc:
                raise _error(path, f"{where}.targets[{j}]", exc.message) from exc
        if entry.get("prune"):
            if not source.startswith(REGISTRY_TRANSPORT) or (not catalog and (parse_registry_source(source).tag or parse_registry_source(source).digest)):
                raise _error(path, f"{where}.prune", "needs a docker://REGISTRY/REPOSITORY source without a tag: the whole repository is mirrored")
            if any(not is_prefix(t) and parse_target(t).tag for t in targets):
                raise _error(path, f"{where}.prune", "needs targets without a tag")
        # an oci:DIR without a tag holds many repositories too (an export's REPOSITORY:TAG names)
        _check_selection(path, where, entry, catalog=catalog or is_layout_source(source), prefixed=any(is_prefix(t) for t in targets))
    spool_dir = document.get("spool_dir")
    if spool_dir is not None and not isinstance(spool_dir, str):
        raise _error(path, "spool_dir", "must be a directory's path")
    if spool_dir is not None and not os.path.isabs(spool_dir):
        spool_dir = os.path.join(os.path.dirname(os.path.abspath(path)), spool_dir)
    spool_limit = None
    if document.get("spool_limit") is not None:
        try:
            spool_limit = parse_size(document["spool_limit"])
        except ValueError as exc:
            raise _error(path, "spool_limit", str(exc)) from None
    incremental = document.get("incremental_from") or []
    if isinstance(incremental, str):
        incremental = [incremental]
    if not isinstance(incremental, list) or not all(isinstance(p, str) and p for p in incremental):
        raise _error(path, "incremental_from", "must be an OCI layout's path, or a list of them")
    base = os.path.dirname(os.path.abspath(path))
    plan = Plan(path, defaults, registries, tuple(images), spool_dir, spool_limit, tuple(os.path.join(base, p) for p in incremental))
    _refuse_shared_tags(plan, [plan._job(entry) for entry in plan.entries], open_sources=False)
    return plan
