"""Many repositories in one plan entry: catalog sources, prefix targets, filters, renames.

``docker://HOST/`` (every repository) and ``docker://HOST/PREFIX/`` (those below
``PREFIX/``) are catalog sources: the registry's ``GET /v2/_catalog`` says which
repositories there are. A target ending in ``/`` is a prefix: each source
repository's path below the source prefix (the whole path for ``docker://HOST/``
or a single ``docker://HOST/REPOSITORY``) is appended to it, after ``rename``
rewrote it (the first rule that matches, ``re.sub`` once). ``repositories`` and
``exclude_repositories`` match the whole source repository path.

A catalog entry becomes one entry per repository (``repository_jobs``) before
anything else happens to it, so each repository's tags are listed, selected and
copied as those of a plan entry naming it; the catalog's names are held (for the
collision check), the repositories' tags never all at once. What can be refused
without a request is refused by ``check_targets`` and ``RepositoryMap.fixed_collision``
(the plan calls them at validation); two repositories that the listed catalog maps
to one target repository fail the entry before anything of it is copied.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from .errors import BatchPushError, ReferenceError_, SourceError, UsageError
from .patterns import LazyPattern
from .reference import LAYOUT_TRANSPORT, RepositoryPrefix, is_layout_prefix, is_prefix, parse_prefix, parse_target
from .registry.errors import RegistryError
from .sources.oci_layout import ALL_TAGS, OCILayout
from .sources.registry import TRANSPORT as REGISTRY_TRANSPORT
from .sources.registry import parse_registry_source

if TYPE_CHECKING:
    from .engine import PushJob
    from .prune import Pruned
    from .registry.client import RegistryClient

#: statuses of ``GET /v2/_catalog`` that mean "no catalog here": Docker Hub and GHCR
#: answer 401 whatever the credentials, ECR 403 or 404 (its API lists instead)
CATALOG_REFUSED = frozenset({401, 403, 404, 405})
#: a replacement's group reference (``\1``, ``\g<name>``): its result depends on the path
_GROUP_REFERENCE = LazyPattern(r"\\(?:[0-9]|g<)")


def is_catalog_source(spec: str) -> bool:
    """``docker://HOST/`` or ``docker://HOST/PREFIX/``."""
    return spec.startswith(REGISTRY_TRANSPORT) and is_prefix(spec)


def parse_catalog_source(spec: str) -> RepositoryPrefix:
    """The registry and prefix a catalog source names; raises UsageError."""
    try:
        return parse_prefix(spec[len(REGISTRY_TRANSPORT) :])
    except BatchPushError as exc:
        raise UsageError(f"bad source {spec!r}: {exc.message}") from exc


@dataclass(frozen=True, slots=True)
class Rename:
    """``{from: REGEX, to: REPLACEMENT}``: rewrites a repository path below the
    source prefix, with ``re.sub`` once (``\\1`` names a group)."""

    pattern: re.Pattern[str]
    replacement: str

    @classmethod
    def parse(cls, pattern: str, replacement: str) -> Rename:
        """Raises UsageError for a regex that does not compile or a replacement that
        names a group the regex lacks."""
        try:
            compiled = re.compile(pattern)
        except re.error as exc:
            raise UsageError(f"rename from {pattern!r}: invalid regular expression: {exc}") from None
        try:  # re checks the template even when nothing matches: here, not at the first path
            compiled.sub(replacement, "")
        except (re.error, IndexError) as exc:
            raise UsageError(f"rename to {replacement!r}: {exc}") from None
        return cls(compiled, replacement)

    def apply(self, path: str) -> str | None:
        """The path rewritten; None if the rule does not match it."""
        rewritten, count = self.pattern.subn(self.replacement, path, count=1)
        return rewritten if count else None

    @property
    def fixed_result(self) -> str | None:
        """The one path this rule writes whatever it matched, if it has one: an
        anchored ``^...$`` pattern and a replacement naming no group."""
        anchored = self.pattern.pattern.startswith("^") and self.pattern.pattern.endswith("$")
        return self.replacement if anchored and not _GROUP_REFERENCE.search(self.replacement) else None


@dataclass(frozen=True, slots=True)
class RepositoryMap:
    """Which repositories of a catalog an entry copies, and under which path."""

    #: copy only the repositories whose whole path this finds (``re.search``)
    include: re.Pattern[str] | None = None
    #: never copy those whose whole path this finds
    exclude: re.Pattern[str] | None = None
    #: rewrite the path below the source prefix: the first rule that matches
    rename: tuple[Rename, ...] = ()

    def selects(self, repository: str) -> bool:
        if self.include is not None and not self.include.search(repository):
            return False
        return self.exclude is None or not self.exclude.search(repository)

    def renamed(self, path: str) -> str:
        for rule in self.rename:
            rewritten = rule.apply(path)
            if rewritten is not None:
                return rewritten
        return path

    def fixed_collision(self) -> tuple[int, int] | None:
        """Two rules that write one fixed path (an anchored pattern, a replacement
        without a group): each repository they match lands in one target
        repository. Their indexes; None if there are none."""
        seen: dict[str, int] = {}
        for i, rule in enumerate(self.rename):
            fixed = rule.fixed_result
            if fixed is not None and seen.setdefault(fixed, i) != i:
                return seen[fixed], i
        return None


def is_layout_source(spec: str) -> bool:
    """``oci:DIR`` with no tag: a layout holding many repositories (``REPOSITORY:TAG``
    ref names, as an export writes them)."""
    return is_layout_prefix(spec)


def check_targets(source: str, targets: Sequence[str]) -> None:
    """What a source and its targets must be, known without a request; raises
    UsageError. A catalog source needs prefix targets (a tag, or one repository,
    cannot take many repositories); a prefix target (or a layout target naming no
    repository) needs a ``docker://`` source or an ``oci:DIR`` with no tag (only
    a registry's or an export's repositories have paths to append)."""
    catalog = is_catalog_source(source)
    if catalog:
        parse_catalog_source(source)
    for target in targets:
        if is_prefix(target):
            if not source.startswith(REGISTRY_TRANSPORT) and not is_layout_source(source):
                if is_layout_prefix(target):
                    raise UsageError(f"{target}: name the repository the image goes to in the layout: {target}:REPOSITORY[:TAG] (only a docker:// source, or an oci:DIR holding REPOSITORY:TAG names, has repository paths to append)")
                raise UsageError(f"{target}: a target ending in / is a repository prefix; it needs a docker:// source, or an oci:DIR with no tag, whose repository paths are appended to it")
            parse_prefix(target)
        elif catalog:
            kind = "with a tag" if parse_target(target).tag else "of one repository"
            raise UsageError(f"{target}: {source} holds many repositories; a target {kind} cannot take them all: give a prefix ending in / (e.g. {target.split(':')[0].rstrip('/')}/)")


def list_repositories(client: RegistryClient, source: RepositoryPrefix, spec: str) -> list[str]:
    """The repositories the registry's catalog lists below ``source``'s prefix.
    A registry that does not serve the catalog raises SourceError saying so (and
    what to do instead); other failures are raised as they are."""
    try:
        listed = client.with_retries(client.list_catalog, f"catalog of {source.registry}")
    except RegistryError as exc:
        if exc.status not in CATALOG_REFUSED:
            raise
        raise SourceError(
            spec,
            f"the registry does not list its repositories (GET /v2/_catalog answered HTTP {exc.status}; Docker Hub, GHCR and ECR serve no catalog): list them in the plan instead, one entry per docker://{source.registry}/REPOSITORY",
        ) from exc
    return [name for name in listed if source.below(name) is not None]


#: the repositories a catalog source lists below its prefix (``list_repositories``
#: with the engine's client for its host)
Lister = Callable[[RepositoryPrefix, str], list[str]]


def repository_jobs(job: PushJob, list_catalog: Lister) -> Iterator[PushJob]:
    """``job`` as one job per repository, its prefix targets resolved: a catalog
    source as the repositories its catalog lists and ``job.repositories`` keeps;
    a single ``docker://`` repository with a prefix target as itself. A job with
    neither is yielded as it is. A job that cannot be planned (a refused target,
    a catalog not served, two repositories mapped to one target) is yielded once
    with its ``error``; a repository whose renamed path is not a repository name,
    likewise, alone."""
    if not is_catalog_source(job.source) and not any(is_prefix(t) for t in job.targets):
        yield job
        return
    try:
        check_targets(job.source, job.targets)
        if is_layout_source(job.source):
            planned = _layout_jobs(job)
        elif is_catalog_source(job.source):
            source = parse_catalog_source(job.source)
            listed = [name for name in list_catalog(source, job.source) if job.repositories.selects(name)]
            if not listed:
                raise SourceError(job.source, "the catalog lists no repository that the entry selects")
            planned = _planned(job, source.registry, [(name, source.below(name) or name) for name in listed])
        else:
            reference = parse_registry_source(job.source)
            planned = _planned(job, reference.registry, [(reference.repository, reference.repository)], keep=job.source)
    except BatchPushError as exc:
        yield replace(job, error=exc)
        return
    yield from planned


def _layout_jobs(job: PushJob) -> list[PushJob]:
    """An ``oci:DIR`` source as one job per repository of its ref names, each
    reading ``oci:DIR:REPOSITORY:*`` (every tag of it); raises SourceError when
    the layout names none."""
    path = job.source[len(LAYOUT_TRANSPORT) :]
    listed = [name for name in OCILayout(path).repositories() if job.repositories.selects(name)]
    if not listed:
        raise SourceError(job.source, f"the layout's index names no REPOSITORY:TAG that the entry selects (as an export writes them); name one image instead, {job.source}:TAG")
    return _planned(job, job.source, [(name, name) for name in listed], source_of=lambda name: f"{job.source}:{name}{ALL_TAGS}")


def _planned(job: PushJob, registry: str, repositories: Iterable[tuple[str, str]], *, keep: str | None = None, source_of: Callable[[str], str] | None = None) -> list[PushJob]:
    """One job per (repository, path below the source prefix); ``keep``: the source
    as written (a tag or digest it names); ``source_of``: a repository's source
    (else ``docker://REGISTRY/REPOSITORY``). Raises UsageError when two
    repositories land in one target repository."""
    jobs: list[PushJob] = []
    writers: dict[str, str] = {}
    for repository, path in repositories:
        source = keep or (source_of(repository) if source_of else f"{REGISTRY_TRANSPORT}{registry}/{repository}")
        try:
            targets = tuple(_resolve(target, job.repositories.renamed(path)) for target in job.targets)
        except ReferenceError_ as exc:
            jobs.append(_repository_job(job, source, job.targets, error=SourceError(source, f"renamed to {exc.message}")))
            continue
        for target in targets:
            first = writers.setdefault(target, repository)
            if first != repository:
                raise UsageError(f"{job.source}: {registry}/{first} and {registry}/{repository} would both be copied to {target}; change the rename rules or exclude one")
        jobs.append(_repository_job(job, source, targets))
    return jobs


def _resolve(target: str, path: str) -> str:
    return str(parse_prefix(target).join(path)) if is_prefix(target) else target


def _repository_job(job: PushJob, source: str, targets: tuple[str, ...], error: BatchPushError | None = None) -> PushJob:
    return replace(job, source=source, targets=targets, repositories=RepositoryMap(), error=error)


#: why a target repository below a pruning catalog entry's prefix is reported
GONE_REASON = "no repository of the source catalog is copied here (gone from the source?): a repository is never deleted"


@dataclass(slots=True)
class GoneRepositories:
    """A pruning catalog entry (``prune: true``): its target prefixes, and the
    target repositories its catalog's repositories were copied to. Once the run
    is done, a repository below a prefix that none of them is (it disappeared
    from the source catalog, or came from elsewhere) is reported, never deleted."""

    job: PushJob
    copied: set[str]
    #: the entry could not be planned (its catalog not listed): nothing is known
    failed: bool = False

    def record(self, job: PushJob) -> None:
        """One of the entry's repository jobs, as ``repository_jobs`` made it."""
        if job.error is not None and job.source == self.job.source:
            self.failed = True
        self.copied.update(parse_target(target).name for target in job.targets if not is_prefix(target))

    def report(self, list_catalog: Lister) -> list[Pruned]:
        """The target repositories below the prefixes that no repository was
        copied to (a ``Pruned`` each, kept); raises as ``list_catalog`` does."""
        from .prune import Pruned  # only a pruning run loads it

        if self.failed:
            return []
        reported = []
        for target in self.job.targets:
            prefix = parse_prefix(target)
            for name in list_catalog(prefix, target):
                if f"{prefix.registry}/{name}" not in self.copied:
                    reported.append(Pruned(f"{prefix.registry}/{name}", None, False, GONE_REASON))
        return reported
