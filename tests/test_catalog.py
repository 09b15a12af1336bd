"""Catalog sources, prefix targets, repository filters and renames (catalog.py), and
the plan's checks of them: the planning logic, without a registry (test_migrate.py
runs it against real ones)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from batchpush.catalog import Rename, RepositoryMap, check_targets, parse_catalog_source, repository_jobs
from batchpush.engine import PushJob
from batchpush.errors import BatchPushError, PlanError, SourceError, UsageError
from batchpush.plan import load_plan
from batchpush.reference import RepositoryPrefix, parse_prefix

CATALOG = ["legacy/old", "scratch", "team0/svc0", "team1/svc2", "team1/svc3", "team10/x"]


@pytest.mark.parametrize(
    ("text", "registry", "prefix"),
    [("new.example/", "new.example", ""), ("new.example/migrated/", "new.example", "migrated/"), ("localhost:5000/a/b/", "localhost:5000", "a/b/"), ("myorg/", "docker.io", "myorg/")],
)
def test_prefixes(text, registry, prefix):
    assert parse_prefix(text) == RepositoryPrefix(registry, prefix)


@pytest.mark.parametrize("text", ["new.example", "new.example//", "new.example/Upper/", "/x/"])
def test_bad_prefixes(text):
    with pytest.raises(BatchPushError):
        parse_prefix(text)


def test_below_a_prefix_is_a_path_boundary():
    source = parse_catalog_source("docker://old.example/team1/")
    assert [source.below(name) for name in CATALOG] == [None, None, None, "svc2", "svc3", None]


def jobs(job: PushJob) -> list[PushJob]:
    return list(repository_jobs(job, lambda source, spec: [n for n in CATALOG if source.below(n) is not None]))


def test_a_catalog_becomes_one_job_per_repository():
    """Filters match the whole source path; renames rewrite the path below the prefix."""
    rename = (Rename.parse(r"^svc(\d)$", r"service-\1"),)
    job = PushJob("docker://old.example/", ("new.example/migrated/",), repositories=RepositoryMap(exclude=re.compile("^legacy/|scratch")))
    assert [(j.source, j.targets) for j in jobs(job)] == [
        ("docker://old.example/team0/svc0", ("new.example/migrated/team0/svc0",)),
        ("docker://old.example/team1/svc2", ("new.example/migrated/team1/svc2",)),
        ("docker://old.example/team1/svc3", ("new.example/migrated/team1/svc3",)),
        ("docker://old.example/team10/x", ("new.example/migrated/team10/x",)),
    ]
    job = PushJob("docker://old.example/team1/", ("new.example/t1/",), repositories=RepositoryMap(include=re.compile("^team1/svc2"), rename=rename))
    assert [(j.source, j.targets) for j in jobs(job)] == [("docker://old.example/team1/svc2", ("new.example/t1/service-2",))]


def test_one_repository_to_a_prefix_keeps_its_tag():
    (job,) = jobs(PushJob("docker://old.example/team0/svc0:1.0", ("new.example/m/",)))
    assert (job.source, job.targets, job.error) == ("docker://old.example/team0/svc0:1.0", ("new.example/m/team0/svc0",), None)


def test_what_cannot_be_planned_is_the_jobs_error():
    (job,) = jobs(PushJob("docker://old.example/", ("new.example/all:1.0",)))
    assert isinstance(job.error, UsageError) and "holds many repositories" in job.error.message
    (job,) = jobs(PushJob("docker://old.example/nothing/", ("new.example/n/",)))
    assert isinstance(job.error, SourceError) and "no repository" in job.error.message
    collide = RepositoryMap(rename=(Rename.parse("[0-9]$", ""),))
    (job,) = jobs(PushJob("docker://old.example/team1/", ("new.example/t1/",), repositories=collide))
    assert isinstance(job.error, UsageError) and "old.example/team1/svc2 and old.example/team1/svc3 would both be copied to new.example/t1/svc" in job.error.message
    bad = RepositoryMap(rename=(Rename.parse("^svc2$", "UPPER"),))
    good, renamed = jobs(PushJob("docker://old.example/team1/", ("new.example/t1/",), repositories=bad))[::-1][0], jobs(PushJob("docker://old.example/team1/", ("new.example/t1/",), repositories=bad))[0]
    assert good.error is None and isinstance(renamed.error, SourceError) and "UPPER" in renamed.error.message


def test_check_targets():
    check_targets("docker://old.example/", ["new.example/x/"])
    check_targets("docker://old.example/a", ["new.example/x/", "new.example/b:1"])
    for source, target in [("docker://old.example/", "new.example/x"), ("oci:/tmp/layout:1.0", "new.example/x/"), ("docker-archive:/tmp/a.tar", "oci:/tmp/mirror")]:
        with pytest.raises(UsageError):
            check_targets(source, [target])


def test_rename_rules():
    assert Rename.parse(r"^svc(\d)$", r"service-\1").apply("svc2") == "service-2"
    assert Rename.parse("a", "b").apply("banana") == "bbnana"  # re.sub once
    assert Rename.parse("x", "y").apply("svc") is None
    with pytest.raises(UsageError, match="invalid group reference"):
        Rename.parse("^svc$", r"\2")
    with pytest.raises(UsageError, match="invalid regular expression"):
        Rename.parse("(", "x")
    assert RepositoryMap(rename=(Rename.parse("^a$", "x"), Rename.parse("^b$", "x"))).fixed_collision() == (0, 1)
    assert RepositoryMap(rename=(Rename.parse("^a(1)$", r"x\1"), Rename.parse("^b(1)$", r"x\1"))).fixed_collision() is None


def write(tmp_path: Path, entry: dict) -> str:  # type: ignore[type-arg]
    path = tmp_path / "plan.yaml"
    path.write_text(yaml.safe_dump({"version": 1, "images": [entry]}))
    return str(path)


BASE = {"source": "docker://old.example/team1/", "targets": ["new.example/t1/"]}


@pytest.mark.parametrize(
    ("extra", "problem"),
    [
        ({"targets": ["new.example/t1:1.0"]}, "images[0].targets[0]: new.example/t1:1.0: docker://old.example/team1/ holds many repositories"),
        ({"semver": "not a range"}, "images[0].semver: bad semver constraint"),
        ({"semver": 12}, "images[0].semver: must be a version constraint string"),
        ({"latest": 0}, "images[0].latest: must be a positive integer"),
        ({"latest": True}, "images[0].latest: must be a positive integer"),
        ({"exclude_tags": "("}, "images[0].exclude_tags: invalid regular expression"),
        ({"repositories": "["}, "images[0].repositories: invalid regular expression"),
        ({"source": "docker://old.example/a", "targets": ["new.example/b"], "repositories": "x"}, "images[0].repositories: needs a catalog source"),
        ({"source": "docker://old.example/a", "targets": ["new.example/b"], "rename": [{"from": "a", "to": "b"}]}, "images[0].rename: needs a target ending in /"),
        ({"rename": [{"from": "a"}]}, "images[0].rename: must be a list of {from: REGEX, to: REPLACEMENT}"),
        ({"rename": [{"from": "^a$", "to": "x"}, {"from": "^b$", "to": "x"}]}, "images[0].rename[0] and rename[1]: both rename to 'x'"),
        ({"source": "oci:./layout:1.0", "targets": ["new.example/t/"]}, "images[0].targets[0]: new.example/t/: a target ending in / is a repository prefix; it needs a docker:// source"),
        ({"source": "docker://old.example/Bad/"}, "images[0].source: bad source"),
    ],
)
def test_the_plan_refuses(tmp_path, extra, problem):
    with pytest.raises(PlanError) as raised:
        load_plan(write(tmp_path, {**BASE, **extra}))
    assert problem in raised.value.message, raised.value.message


def test_the_plan_reads_a_migration(tmp_path):
    entry = {**BASE, "rename": [{"from": "^svc(\\d)$", "to": "service-\\1"}], "repositories": "svc", "exclude_repositories": "old", "semver": ">=1.2, <2", "latest": 5, "exclude_tags": "-rc", "tags": "^v", "prune": True}
    (job,) = load_plan(write(tmp_path, entry)).jobs()
    assert (job.latest, str(job.semver), job.exclude_tags.pattern, job.tags.pattern, job.prune) == (5, ">=1.2, <2", "-rc", "^v", True)  # type: ignore[union-attr]
    assert job.repositories.selects("team1/svc2") and not job.repositories.selects("team1/old-svc") and job.repositories.renamed("svc2") == "service-2"
