"""Which tags of a source an entry copies: ``tags``, ``exclude_tags``, ``semver``, ``latest``.

The four combine in that order: the ``tags`` regex keeps, ``exclude_tags`` drops,
``semver`` keeps the tags that are versions in its range, and ``latest: N`` keeps
the N highest versions of what is left (a tag that is not a version is never
"latest", so it is dropped).

A tag is a version when, without a leading ``v``, it reads ``MAJOR[.MINOR[.PATCH]]``
with an optional ``-PRERELEASE`` (``1.9`` is 1.9.0; docker tags carry no ``+build``).
Versions compare by semantic-version precedence (1.10 > 1.9, 1.2.0-rc.1 < 1.2.0).
A pre-release is selected only by a constraint that names one (``>=1.2.0-rc.0``):
without such a constraint, ``latest`` ranks releases only.

The parsing and the ranges are the ``semantic_version`` library's: ``SimpleSpec``
(``>=1.2,<2``, ``^1.4``, ``~1.4.2``, ``==1.2.*``; spaces after commas allowed), and
failing that ``NpmSpec`` (``>=1.2.0 <2.0.0``, ``1.2.x``, ``1.2 - 1.4``, ``||``).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .errors import UsageError
from .patterns import LazyPattern

if TYPE_CHECKING:
    import semantic_version  # imported where a version is parsed: a run that selects no versions never loads it

#: a pre-release named in a constraint (``1.2.0-rc.0``; npm's hyphen range ``1 - 2`` has spaces)
_NAMED_PRERELEASE = LazyPattern(r"[0-9]-[0-9A-Za-z]", re.ASCII)
#: a tag that may be a version: ``v`` optional, one to three numbers, a pre-release
_VERSION_TAG = LazyPattern(r"[vV]?([0-9]+)(?:\.([0-9]+))?(?:\.([0-9]+))?(?:-([0-9A-Za-z.-]+))?", re.ASCII)


def version_of(tag: str) -> semantic_version.Version | None:
    """The version a tag names; None if it names none (``latest``, ``nightly``,
    ``1.2.3.4``, a number with a leading zero)."""
    match = _VERSION_TAG.fullmatch(tag)
    if match is None:
        return None
    major, minor, patch, prerelease = match.groups()
    text = f"{major}.{minor or 0}.{patch or 0}" + (f"-{prerelease}" if prerelease else "")
    import semantic_version

    try:
        return semantic_version.Version(text)
    except ValueError:  # a leading zero, an empty pre-release part
        return None


@dataclass(frozen=True, slots=True)
class VersionRange:
    """A semantic-version constraint, as written (``text``) and as parsed."""

    text: str
    spec: semantic_version.SimpleSpec | semantic_version.NpmSpec
    #: the constraint names a pre-release: only then may one match (the library
    #: alone lets ``>=1`` or npm's ``<1.2.0`` admit 1.2.0-rc.1)
    prereleases: bool = False

    @classmethod
    def parse(cls, text: str) -> VersionRange:
        """Raises UsageError naming the constraint if neither syntax reads it."""
        import semantic_version

        compact = re.sub(r"\s*,\s*", ",", text.strip())
        prereleases = _NAMED_PRERELEASE.search(text) is not None
        try:
            return cls(text, semantic_version.SimpleSpec(compact), prereleases)
        except ValueError:
            pass
        try:
            return cls(text, semantic_version.NpmSpec(text.strip()), prereleases)
        except ValueError:
            raise UsageError(f"bad semver constraint {text!r}: expected e.g. '>=1.2, <2', '^1.4' or '~1.4.2'") from None

    def admits(self, version: semantic_version.Version) -> bool:
        return (self.prereleases or not version.prerelease) and self.spec.match(version)

    def __str__(self) -> str:
        return self.text


@dataclass(frozen=True, slots=True)
class TagSelection:
    """The tag filters of one plan entry; the default selects every tag."""

    #: keep the tags this regex finds (``re.search``)
    tags: re.Pattern[str] | None = None
    #: then drop the tags this regex finds
    exclude_tags: re.Pattern[str] | None = None
    #: then keep the tags that are versions in this range
    semver: VersionRange | None = None
    #: then keep the N highest versions
    latest: int | None = None

    @property
    def everything(self) -> bool:
        return self.tags is None and self.exclude_tags is None and self.semver is None and self.latest is None

    def may_select(self, tag: str) -> bool:
        """Whether every filter but ``latest`` keeps ``tag``: the tags this entry
        mirrors at all (a prune never touches the others)."""
        if self.tags is not None and not self.tags.search(tag):
            return False
        if self.exclude_tags is not None and self.exclude_tags.search(tag):
            return False
        if self.semver is not None:
            version = version_of(tag)
            return version is not None and self.semver.admits(version)
        return True

    def select(self, tags: Iterable[str]) -> list[str]:
        """The tags selected, in the order given."""
        kept = [tag for tag in tags if self.may_select(tag)]
        if self.latest is None:
            return kept
        versions = {tag: version for tag in kept if (version := version_of(tag)) is not None and (self.semver is not None or not version.prerelease)}
        highest = set(sorted(versions, key=lambda tag: (versions[tag], tag), reverse=True)[: self.latest])
        return [tag for tag in kept if tag in highest]

    def __str__(self) -> str:
        parts = [f"tags {self.tags.pattern!r}" if self.tags else "", f"exclude_tags {self.exclude_tags.pattern!r}" if self.exclude_tags else ""]
        parts += [f"semver {self.semver.text!r}" if self.semver else "", f"latest {self.latest}" if self.latest is not None else ""]
        return ", ".join(p for p in parts if p) or "every tag"
