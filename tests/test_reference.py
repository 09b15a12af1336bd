"""Image references: ASCII-only names and tags, targets without digests; the exception tree they belong to."""

from __future__ import annotations

import importlib
import pickle
import pkgutil

import pytest
from hypothesis import given
from hypothesis import strategies as st

import batchpush
from batchpush import errors
from batchpush.digest import Digest
from batchpush.errors import BatchPushError, ReferenceError_
from batchpush.reference import Reference, parse_reference, parse_target

DIGEST = "sha256:" + "a" * 64


@pytest.mark.parametrize(
    "text",
    [
        "r.example/app:caf\u00e9",  # é: a letter to Python's Unicode \w
        "r.example/app:v\u0661\u0662",  # Arabic-Indic digits
        "r.example/app:\uff561",  # fullwidth v
        "r.example/app:\u00e9",  # first character of the tag
        "r.example/app:v1\u00b2",  # superscript two
    ],
)
def test_non_ascii_tags_are_refused(text):
    with pytest.raises(ReferenceError_, match="invalid tag"):
        parse_reference(text)


@pytest.mark.parametrize("tag", ["caf\u00e9", "\u0661", "v\u0662"])
def test_with_tag_refuses_non_ascii(tag):
    with pytest.raises(ReferenceError_):
        parse_reference("r.example/app").with_tag(tag)


@pytest.mark.parametrize("tag", ["_x", "v1.2-rc_3", "A" * 128])
def test_ascii_word_tags_are_accepted(tag):
    assert parse_reference(f"r.example/app:{tag}").tag == tag


@given(st.text(min_size=1, max_size=40))
def test_an_accepted_tag_is_ascii(tag):
    try:
        Reference("r.example", "app").with_tag(tag)
    except ReferenceError_:
        return
    assert tag.isascii()


@given(st.text(max_size=80))
def test_an_accepted_reference_is_ascii(text):
    try:
        reference = parse_reference(text)
    except BatchPushError:
        return
    assert str(reference).isascii()


@pytest.mark.parametrize(("text", "tag"), [("r.example:5000/team/app", None), ("r.example:5000/team/app:1.2", "1.2")])
def test_parse_target_accepts_a_tag_or_none(text, tag):
    target = parse_target(text)
    assert (target.registry, target.repository, target.tag, target.digest) == ("r.example:5000", "team/app", tag, None)


@pytest.mark.parametrize("text", [f"r.example/app@{DIGEST}", f"r.example/app:1.2@{DIGEST}"])
def test_parse_target_refuses_a_digest(text):
    assert parse_reference(text).digest == Digest.parse(DIGEST)  # a valid reference...
    with pytest.raises(ReferenceError_) as caught:  # ...but not a valid target
        parse_target(text)
    assert caught.value.reference == text
    assert "a target cannot name a digest" in caught.value.problem


@pytest.mark.parametrize("text", ["", "r.example/Team/app", "r.example/app@sha256:zz", "r.example/app:caf\u00e9"])
def test_parse_target_refuses_what_parse_reference_refuses(text):
    with pytest.raises(ReferenceError_):
        parse_target(text)


# The exception tree (batchpush/errors.py). These would sit best in a tests/test_errors.py;
# they are here because this change owns only its reference and plan test files.


def _drawn_tree() -> dict[str, str | None]:
    """Each class drawn in errors.py's docstring -> the class it is drawn under."""
    parents: dict[str, str | None] = {}
    stack: list[str] = []
    root_column = 0
    for line in (errors.__doc__ or "").splitlines():
        connector = next((line.find(c) for c in ("├── ", "└── ") if c in line), -1)
        if connector < 0:
            if line.strip() == "BatchPushError":
                parents["BatchPushError"], stack, root_column = None, ["BatchPushError"], line.index("B")
            continue
        # each level of the drawing is 4 columns right of its parent's connector
        depth = (connector - root_column) // 4 + 1
        name = line[connector + 4 :].split()[0]
        del stack[depth:]
        parents[name] = stack[-1]
        stack.append(name)
    return parents


def _real_tree() -> dict[str, str | None]:
    """Every BatchPushError subclass defined in batchpush -> its base."""
    for module in pkgutil.walk_packages(batchpush.__path__, "batchpush."):
        if not module.name.endswith("__main__"):  # it would run the command line
            importlib.import_module(module.name)
    tree: dict[str, str | None] = {"BatchPushError": None}
    pending = [errors.BatchPushError]
    while pending:
        cls = pending.pop()
        for sub in cls.__subclasses__():
            if sub.__module__.startswith("batchpush."):
                tree[sub.__name__] = cls.__name__
                pending.append(sub)
    return tree


def test_the_drawn_error_tree_is_the_real_one():
    assert _drawn_tree() == _real_tree()


def test_cancelled_is_a_batchpush_error():
    error = errors.Cancelled()
    assert isinstance(error, errors.BatchPushError) and error.kind == "cancelled"
    assert str(error) == "the run was interrupted"
    copy = pickle.loads(pickle.dumps(errors.Cancelled("stopped by SIGTERM")))  # noqa: S301 - our own bytes
    assert type(copy) is errors.Cancelled and str(copy) == "stopped by SIGTERM"
