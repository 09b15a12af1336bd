"""Tag selection (selection.py): which tags are versions, ranges, ``latest``, and the order the filters combine in."""

from __future__ import annotations

import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from batchpush.errors import UsageError
from batchpush.selection import TagSelection, VersionRange, version_of

TAGS = ["v1.2.0", "v1.10.0", "1.9.3", "latest", "v1.2.0-rc.1", "nightly", "2.0.0", "1.9"]


@pytest.mark.parametrize(
    ("tag", "version"),
    [("v1.2.0", "1.2.0"), ("1.9", "1.9.0"), ("V2", "2.0.0"), ("v1.2.0-rc.1", "1.2.0-rc.1"), ("latest", None), ("nightly", None), ("1.2.3.4", None), ("01.2.3", None), ("1.2.0-", None), ("v", None)],
)
def test_which_tags_are_versions(tag, version):
    found = version_of(tag)
    assert (str(found) if found else None) == version


def test_versions_compare_as_versions_not_text():
    assert version_of("v1.10.0") > version_of("1.9.3") > version_of("v1.2.0") > version_of("v1.2.0-rc.1")  # type: ignore[operator]


@pytest.mark.parametrize(
    ("constraint", "expected"),
    [
        (">=1.2.0, <2.0.0", ["v1.2.0", "v1.10.0", "1.9.3", "1.9"]),
        (">=1.2,<2", ["v1.2.0", "v1.10.0", "1.9.3", "1.9"]),
        ("^1.4", ["v1.10.0", "1.9.3", "1.9"]),
        ("~1.9.0", ["1.9.3", "1.9"]),
        (">=1.2.0 <1.9.0", ["v1.2.0"]),  # npm's syntax, spaces for "and"
        ("<1.2.0 || >=2.0.0", ["2.0.0"]),
        (">=1.2.0-rc.0, <1.3", ["v1.2.0", "v1.2.0-rc.1"]),  # a pre-release only when the constraint names one
    ],
)
def test_ranges(constraint, expected):
    assert TagSelection(semver=VersionRange.parse(constraint)).select(TAGS) == expected


def test_a_constraint_that_does_not_parse_is_named():
    with pytest.raises(UsageError, match="bad semver constraint 'one point two'"):
        VersionRange.parse("one point two")


def test_latest_keeps_the_highest_versions_of_what_is_selected():
    """``latest`` ranks versions only (``latest`` and ``nightly`` never are), releases
    only unless the constraint admitted pre-releases; the result keeps the source's order."""
    assert TagSelection(latest=3).select(TAGS) == ["v1.10.0", "1.9.3", "2.0.0"]
    assert TagSelection(semver=VersionRange.parse("<2"), latest=2).select(TAGS) == ["v1.10.0", "1.9.3"]
    assert TagSelection(semver=VersionRange.parse(">=1.2.0-rc.0, <1.3"), latest=1).select(TAGS) == ["v1.2.0"]
    assert TagSelection(tags=re.compile("night|latest"), latest=5).select(TAGS) == []


def test_filters_combine_in_order():
    """tags, then exclude_tags, then semver, then latest."""
    selection = TagSelection(tags=re.compile("^v"), exclude_tags=re.compile("10"), semver=VersionRange.parse(">=1"), latest=1)
    assert selection.select(TAGS) == ["v1.2.0"]
    assert selection.may_select("v1.2.0-rc.1") is False and selection.may_select("v1.10.0") is False and selection.may_select("v1.2.0") is True


tag_text = st.from_regex(r"\A(v?[0-9]{1,2}(\.[0-9]{1,2}){0,2}(-rc\.[0-9])?|latest|nightly|[a-z]{1,6})\Z")


@given(st.lists(tag_text, unique=True, max_size=20), st.integers(min_value=1, max_value=6))
def test_latest_is_the_top_of_the_versions_in_range(tags, n):
    """Property: ``latest: N`` keeps at most N tags, every one a release version the
    range admits, and no version it dropped is higher than one it kept."""
    semver = VersionRange.parse(">=1")
    kept = TagSelection(semver=semver, latest=n).select(tags)
    in_range = TagSelection(semver=semver).select(tags)
    assert len(kept) == min(n, len(in_range)) and set(kept) <= set(in_range)
    dropped = set(in_range) - set(kept)
    if kept and dropped:
        assert min(version_of(t) for t in kept) >= max(version_of(t) for t in dropped)  # type: ignore[type-var]
