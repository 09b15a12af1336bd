"""Bulk migrations, registry to registry, both real registries: catalog sources
(``docker://HOST/``, ``docker://HOST/PREFIX/``), prefix targets, repository filters,
renames and version-aware tag selection.

The source registry is filled by skopeo from OCI layouts our test code writes;
what arrives is read back by skopeo (its tag lists and manifests) and compared,
digest for digest, with the source. Faults (a catalog refused, a ``Link`` that
loops) are injected by our proxy in front of the real source registry.
"""

from __future__ import annotations

import hashlib
import json
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import pull_and_verify, remote_digest, skopeo
from fault_proxy import Rule
from images import LayoutWriter, layer_tar
from registry import Registry, start_registry

import batchpush
from batchpush.registry.auth import Credentials

#: the source registry's repositories and their tags; each tag a distinct image
REPOSITORIES = {
    "team0/svc0": ["1.0"],
    "team0/svc1": ["1.0"],
    "team1/svc2": ["1.0", "2.0"],
    "team1/svc3": ["1.0"],
    "legacy/old": ["1.0"],
    "scratch": ["1.0"],
}
#: the tags of the semantic-version tests
VERSION_TAGS = ["v1.2.0", "v1.10.0", "1.9.3", "latest", "v1.2.0-rc.1", "nightly", "2.0.0"]


@pytest.fixture
def source(tmp_path):
    started = start_registry(str(tmp_path / "source"))
    yield started
    started.stop()


def fill(registry: Registry, layout: Path, repositories: dict[str, list[str]], first_seed: int = 0, creds: tuple[str, ...] = ()) -> None:
    """One small image per (repository, tag), written to a layout by our code and
    copied into the registry by skopeo; each image's layer from its own seed."""
    writer = LayoutWriter(str(layout))
    seed = first_seed
    for repository, tags in repositories.items():
        for tag in tags:
            seed += 1
            descriptor, _ = writer.image([layer_tar(seed, files=1, file_size=512)])
            name = f"{repository.replace('/', '-')}-{tag}"
            writer.tag(descriptor, name)
            done = skopeo("copy", "--dest-tls-verify=false", *creds, f"oci:{layout}:{name}", f"docker://{registry.host}/{repository}:{tag}")
            assert done.returncode == 0, done.stderr


def tags_of(registry: Registry, repository: str) -> list[str]:
    """The repository's tags as skopeo lists them; [] if it does not exist."""
    done = skopeo("list-tags", "--tls-verify=false", f"docker://{registry.host}/{repository}")
    if done.returncode != 0:
        assert "unknown" in done.stderr.lower() or "not found" in done.stderr.lower() or "name_unknown" in done.stderr.lower(), done.stderr
        return []
    return sorted(json.loads(done.stdout)["Tags"] or [])


def catalog_of(registry: Registry) -> list[str]:
    """The repositories the registry holds, as its own catalog lists them, read with
    urllib (not batchpush, whose catalog reading is what these tests test)."""
    with urllib.request.urlopen(f"http://{registry.host}/v2/_catalog?n=1000", timeout=30) as answer:
        return sorted(json.load(answer)["repositories"])


def write_plan(tmp_path: Path, images: list[dict[str, Any]], **registries: dict[str, Any]) -> str:
    path = tmp_path / "plan.yaml"
    path.write_text(yaml.safe_dump({"version": 1, "registries": {host: {"insecure": True, **settings} for host, settings in registries.items()}, "images": images}))
    return str(path)


def run_plan(batchpush, tmp_path: Path, plan: str, *args: str) -> tuple[Any, dict[str, Any]]:  # type: ignore[no-untyped-def]
    report = tmp_path / "report.json"
    run = batchpush("run", plan, "--metadata-dir", str(tmp_path / "md"), "--report", str(report), *args)
    return run, json.loads(report.read_text()) if report.exists() else {}


def assert_copied(source: Registry, registry: Registry, pairs: dict[str, str]) -> None:
    """Each source ``repository:tag`` arrived at its target, digest for digest."""
    for src, dst in pairs.items():
        assert remote_digest(registry, dst) == remote_digest(source, src), (src, dst)


def test_a_whole_registry_with_exclusions(source, registry, tmp_path, batchpush):
    """``docker://SOURCE/`` to ``TARGET/migrated/``: every repository the catalog
    lists, but those ``exclude_repositories`` finds, under its whole path."""
    fill(source, tmp_path / "layout", REPOSITORIES)
    plan = write_plan(tmp_path, [{"source": f"docker://{source.host}/", "targets": [f"{registry.host}/migrated/"], "exclude_repositories": "^legacy/|scratch"}], **{source.host: {}, registry.host: {}})
    run, report = run_plan(batchpush, tmp_path, plan)

    assert run.code == 0, run.err
    kept = {r: t for r, t in REPOSITORIES.items() if not r.startswith("legacy/") and r != "scratch"}
    assert catalog_of(registry) == sorted(f"migrated/{r}" for r in kept)
    for repository, tags in kept.items():
        assert tags_of(registry, f"migrated/{repository}") == sorted(tags)
    assert_copied(source, registry, {f"{r}:{t}": f"migrated/{r}:{t}" for r, tags in kept.items() for t in tags})
    assert {i["source"] for i in report["images"]} == {f"docker://{source.host}/{r}:{t}" for r, tags in kept.items() for t in tags}
    pull_and_verify(registry, "migrated/team1/svc2:2.0", str(tmp_path / "pulled"))


def test_a_namespace_with_renames_from_the_command_line(source, registry, tmp_path, batchpush):
    """``docker://SOURCE/team1/`` to ``TARGET/t1/`` with a rename: team1/svc2 arrives
    as t1/service-2 (the rule rewrote ``svc2``, the path below the source prefix);
    nothing outside team1/ is read. The CLI's ``push docker://SOURCE/ TARGET/all/``
    copies the whole registry."""
    fill(source, tmp_path / "layout", REPOSITORIES)
    mark = len(source.access_log())
    rename = [{"from": "^svc(\\d)$", "to": "service-\\1"}]
    plan = write_plan(tmp_path, [{"source": f"docker://{source.host}/team1/", "targets": [f"{registry.host}/t1/"], "rename": rename, "repositories": "svc[23]$"}], **{source.host: {}, registry.host: {}})
    run, _ = run_plan(batchpush, tmp_path, plan)

    assert run.code == 0, run.err
    assert catalog_of(registry) == ["t1/service-2", "t1/service-3"]
    assert_copied(source, registry, {"team1/svc2:1.0": "t1/service-2:1.0", "team1/svc2:2.0": "t1/service-2:2.0", "team1/svc3:1.0": "t1/service-3:1.0"})
    assert not [line for line in source.access_log()[mark:] if "/v2/team0/" in line or "/v2/legacy/" in line]

    run = batchpush("push", f"docker://{source.host}/", f"{registry.host}/all/", "--insecure", source.host, "--insecure", registry.host)
    assert run.code == 0, run.err
    assert [r for r in catalog_of(registry) if r.startswith("all/")] == sorted(f"all/{r}" for r in REPOSITORIES)
    assert_copied(source, registry, {f"{r}:{t}": f"all/{r}:{t}" for r, tags in REPOSITORIES.items() for t in tags})


@pytest.mark.parametrize(
    ("selection", "expected"),
    [
        ({"semver": ">=1.2.0, <2.0.0"}, ["1.9.3", "v1.10.0", "v1.2.0"]),
        ({"semver": ">=1.2, <2", "latest": 2}, ["1.9.3", "v1.10.0"]),
        ({"latest": 2}, ["2.0.0", "v1.10.0"]),
        ({"semver": "^1.2.0-rc.0"}, ["1.9.3", "v1.10.0", "v1.2.0", "v1.2.0-rc.1"]),
        ({"exclude_tags": "-rc|nightly", "tags": "^(v|latest|nightly)"}, ["latest", "v1.10.0", "v1.2.0"]),
    ],
    ids=["range", "range-latest", "latest", "prerelease-named", "tags-exclude"],
)
def test_version_selection(source, registry, tmp_path, batchpush, selection, expected):
    """Tags compared as versions (v1.10.0 > 1.9.3 > v1.2.0), pre-releases only when
    the constraint names one, ``latest`` the highest versions of what is selected,
    tags that are not versions never among them; the target holds exactly those."""
    fill(source, tmp_path / "layout", {"team0/app": VERSION_TAGS})
    plan = write_plan(tmp_path, [{"source": f"docker://{source.host}/team0/", "targets": [f"{registry.host}/new/"], **selection}], **{source.host: {}, registry.host: {}})
    run, _ = run_plan(batchpush, tmp_path, plan)

    assert run.code == 0, run.err
    assert tags_of(registry, "new/app") == sorted(expected)
    assert_copied(source, registry, {f"team0/app:{t}": f"new/app:{t}" for t in expected})


@pytest.mark.parametrize("status", [401, 404])
def test_a_catalog_refused_fails_its_entry_only(source, front, registry, tmp_path, batchpush, status):
    """A registry that serves no catalog (the proxy answers 401 or 404, as Docker Hub
    and ECR do): that entry fails with one line that says so and what to do
    instead; the other entry of the plan arrives; exit 1."""
    fill(source, tmp_path / "layout", {"team0/svc0": ["1.0"]})
    front.add(Rule("GET", "^/v2/_catalog", "status", status=status, times=-1))
    plan = write_plan(
        tmp_path,
        [{"source": f"docker://{front.host}/", "targets": [f"{registry.host}/all/"]}, {"source": f"docker://{front.host}/team0/svc0:1.0", "targets": [f"{registry.host}/one/svc0:1.0"]}],
        **{front.host: {}, registry.host: {}},
    )
    run, report = run_plan(batchpush, tmp_path, plan)

    assert run.code == 1, run.err
    (failed,) = [i for i in report["images"] if i["status"] == "failed"]
    assert failed["source"] == f"docker://{front.host}/" and f"HTTP {status}" in failed["error"] and "does not list its repositories" in failed["error"] and "one entry per" in failed["error"]
    assert len(front.requests("GET", "/v2/_catalog")) == 1  # a refusal is not retried
    assert_copied(source, registry, {"team0/svc0:1.0": "one/svc0:1.0"})
    assert catalog_of(registry) == ["one/svc0"]


@pytest.mark.parametrize("chain", ["endless", "loop"])
def test_a_catalog_whose_link_never_ends(source, front, registry, tmp_path, batchpush, chain):
    """Every page of the catalog links to a next one: a new page each time (cut at
    the host's ``max_catalog_pages``, 3 here) or the first page again (cut at once).
    The entry fails with one line, nothing is written."""
    fill(source, tmp_path / "layout", {"team0/svc0": ["1.0"]})
    link = "/v2/_catalog?last=r{n}&n=1000" if chain == "endless" else "/v2/_catalog?n=1000"
    front.add(Rule("GET", "^/v2/_catalog", "headers", headers={"Link": f'<{link}>; rel="next"'}, times=-1))
    plan = write_plan(tmp_path, [{"source": f"docker://{front.host}/", "targets": [f"{registry.host}/all/"]}], **{front.host: {"max_catalog_pages": 3}, registry.host: {}})
    run, report = run_plan(batchpush, tmp_path, plan)

    assert run.code == 1, run.err
    (failed,) = report["images"]
    assert ("runs past 3 pages (max_catalog_pages)" if chain == "endless" else "links back to a page already read") in failed["error"], failed
    assert len(front.requests("GET", "/v2/_catalog")) == (3 if chain == "endless" else 1)
    assert catalog_of(registry) == []


def test_catalog_pages_of_the_real_registry(source, tmp_path):
    """distribution pages its catalog (``n``, ``Link``); every page is followed, each
    name once; ``max_repositories`` refuses a longer catalog."""
    from batchpush.errors import BatchPushError
    from batchpush.registry.client import RegistryClient, RegistryOptions

    fill(source, tmp_path / "layout", REPOSITORIES)
    client = RegistryClient(source.host, RegistryOptions(insecure=True), None)
    try:
        assert client.list_catalog(page_size=2) == sorted(REPOSITORIES)
        assert len([line for line in source.access_log() if "GET /v2/_catalog" in line]) == 3
        with pytest.raises(BatchPushError, match="more than 5 repositories"):
            client.list_catalog(page_size=2, max_repositories=5)
    finally:
        client.close()


def test_renames_that_collide_are_refused_before_any_request(source, registry, tmp_path, batchpush):
    """Two rules that rename to one fixed path are refused when the plan is read
    (exit 2, no request); two repositories that rules map to one target once the
    catalog is listed fail the entry before anything of it is written (exit 2)."""
    fill(source, tmp_path / "layout", {"team1/svc2": ["1.0"], "team1/svc3": ["1.0"]})
    mark, target_mark = len(source.access_log()), len(registry.access_log())
    fixed = [{"from": "^svc2$", "to": "svc"}, {"from": "^svc3$", "to": "svc"}]
    plan = write_plan(tmp_path, [{"source": f"docker://{source.host}/team1/", "targets": [f"{registry.host}/t1/"], "rename": fixed}], **{source.host: {}, registry.host: {}})
    run, _ = run_plan(batchpush, tmp_path, plan)
    assert run.code == 2, run.err
    assert "rename[0] and rename[1]" in run.err and "one target repository" in run.err, run.err
    assert len(source.access_log()) == mark and len(registry.access_log()) == target_mark

    by_group = [{"from": "svc[0-9]$", "to": "svc"}]
    plan = write_plan(tmp_path, [{"source": f"docker://{source.host}/team1/", "targets": [f"{registry.host}/t1/"], "rename": by_group}], **{source.host: {}, registry.host: {}})
    run, report = run_plan(batchpush, tmp_path, plan)
    assert run.code == 2, run.err
    (failed,) = report["images"]
    assert f"{source.host}/team1/svc2 and {source.host}/team1/svc3 would both be copied to {registry.host}/t1/svc" in failed["error"], failed
    assert not [line for line in source.access_log()[mark:] if "/tags/list" in line or "/manifests/" in line]
    assert catalog_of(registry) == []


def test_a_tagged_target_is_refused_for_a_catalog(source, registry, batchpush):
    """A catalog source to a target with a tag (or without a trailing /): exit 2,
    before any request."""
    for target in (f"{registry.host}/all:1.0", f"{registry.host}/all"):
        run = batchpush("push", f"docker://{source.host}/", target, "--insecure", source.host, "--insecure", registry.host)
        assert run.code == 2, run.err
        assert "holds many repositories" in run.out + run.err and "ending in /" in run.out + run.err
    assert not [line for line in source.access_log() if "/v2/_catalog" in line]


def test_dry_run_lists_what_a_migration_would_copy(source, registry, tmp_path, batchpush):
    """A dry run names each repository and tag, and where it would go; nothing is written."""
    fill(source, tmp_path / "layout", {"team1/svc2": ["1.0", "2.0"], "team0/svc0": ["1.0"]})
    run = batchpush("push", f"docker://{source.host}/team1/", f"{registry.host}/t1/", "--insecure", source.host, "--insecure", registry.host, "--dry-run")
    assert run.code == 0, run.err
    for tag in ("1.0", "2.0"):
        assert f"docker://{source.host}/team1/svc2:{tag} -> {registry.host}/t1/svc2:{tag}:" in run.out, run.out
    assert "svc0" not in run.out
    assert catalog_of(registry) == []


def test_prune_works_per_repository_and_reports_repositories_gone(source, registry, tmp_path, batchpush):
    """``prune: true`` on a catalog entry: each repository is pruned as a single
    repository entry is (a target tag its source lacks is deleted); a target
    repository below the prefix that no source repository is copied to (its source
    left the catalog) is reported, and kept."""
    fill(source, tmp_path / "source-layout", {"team0/svc0": ["1.0"], "team0/svc1": ["1.0"]})
    fill(registry, tmp_path / "target-layout", {"migrated/svc0": ["0.9"], "migrated/gone": ["1.0"]}, first_seed=100)
    gone = remote_digest(registry, "migrated/gone:1.0")
    plan = write_plan(tmp_path, [{"source": f"docker://{source.host}/team0/", "targets": [f"{registry.host}/migrated/"], "prune": True}], **{source.host: {}, registry.host: {}})
    run, report = run_plan(batchpush, tmp_path, plan)

    assert run.code == 0, run.err
    assert tags_of(registry, "migrated/svc0") == ["1.0"] and tags_of(registry, "migrated/svc1") == ["1.0"]
    pruned = {p["target"]: p for p in report["pruned"]}
    assert pruned[f"{registry.host}/migrated/svc0:0.9"]["deleted"] is True
    assert pruned[f"{registry.host}/migrated/gone"]["deleted"] is False and "never deleted" in pruned[f"{registry.host}/migrated/gone"]["reason"]
    assert len(pruned) == 2
    assert f"{registry.host}/migrated/gone: kept: no repository of the source catalog is copied here" in run.out
    assert remote_digest(registry, "migrated/gone:1.0") == gone


def test_a_catalog_behind_token_auth(token_registry, registry, tmp_path):
    """distribution's token auth grants the catalog to the scope
    ``registry:catalog:*``: with credentials the migration lists and copies every
    repository; anonymous, the catalog is refused (401) and the entry says so."""
    source, issuer = token_registry
    fill(source, tmp_path / "layout", {"team0/svc0": ["1.0"], "team1/svc2": ["1.0"]}, creds=("--dest-creds", "alice:alice-secret-pw"))
    plan = batchpush.plan_of([{"source": f"docker://{source.host}/", "targets": [f"{registry.host}/m/"]}], registries={source.host: {"insecure": True}, registry.host: {"insecure": True}})

    def options(who: Credentials | None) -> batchpush.PushOptions:
        return batchpush.PushOptions(metadata_dir=str(tmp_path / "md"), credentials=lambda host: who if host == source.host else None)

    anonymous = batchpush.run(plan, options(None))
    (failed,) = anonymous.images
    assert failed.status == "failed" and "HTTP 401" in (failed.error or "") and "does not list its repositories" in (failed.error or "")

    result = batchpush.run(plan, options(Credentials("alice", "alice-secret-pw")))
    assert result.ok, [i.error for i in result.images]
    assert catalog_of(registry) == ["m/team0/svc0", "m/team1/svc2"]
    assert any("registry:catalog:*" in r["scopes"] for r in issuer.requests if r["subject"] == "alice")
    for repository in ("team0/svc0", "team1/svc2"):
        done = skopeo("inspect", "--raw", "--tls-verify=false", "--creds", "alice:alice-secret-pw", f"docker://{source.host}/{repository}:1.0")
        assert done.returncode == 0, done.stderr
        assert remote_digest(registry, f"m/{repository}:1.0") == "sha256:" + hashlib.sha256(done.stdout.encode()).hexdigest()


#: names a hostile catalog may list that are not repository paths
NOT_REPOSITORIES = ["../etc", "team0/../../x", "UPPER/case", "a//b", "/lead", "trail/", "sp ace", "%2e%2e", "x" * 300, 7]


def test_names_that_are_not_repositories_are_skipped_and_never_sent(source, front, registry, tmp_path, batchpush):
    """The catalog lists, besides its real repositories, names that are not
    repository paths: each is skipped (a warning), no request carries one, the
    real repositories arrive."""
    fill(source, tmp_path / "layout", {"team0/svc0": ["1.0"]})

    def add_names(body: bytes) -> bytes:
        document = json.loads(body)
        return json.dumps({**document, "repositories": [*document["repositories"], *NOT_REPOSITORIES]}).encode()

    front.add(Rule("GET", "^/v2/_catalog", "forward", body_filter=add_names, times=-1))
    plan = write_plan(tmp_path, [{"source": f"docker://{front.host}/", "targets": [f"{registry.host}/m/"]}], **{front.host: {}, registry.host: {}})
    run, report = run_plan(batchpush, tmp_path, plan)

    assert run.code == 0, run.err
    warnings = [line for line in run.err.splitlines() if line.startswith("WARNING ")]
    assert len(warnings) == len(NOT_REPOSITORIES) and all("not a valid repository name" in line for line in warnings), [w for w in warnings if "not a valid repository name" not in w]
    assert [i["target"] for i in report["images"]] == [f"{registry.host}/m/team0/svc0:1.0"]
    sent = [seen.target for seen in front.requests()] + registry.access_log()
    for name in ("..", "UPPER", "a//b", "/lead", "trail/", "sp ace", "%2e", "xxxxxxxxxx"):
        assert not [line for line in sent if name in line], name
    assert_copied(source, registry, {"team0/svc0:1.0": "m/team0/svc0:1.0"})


def test_a_migration_on_the_cluster(source, registry, tmp_path):
    """``--scheduler``: the client lists the catalog and the repositories' tags, the
    workers copy; the same repositories, renamed, selected by version, arrive."""
    from test_cluster import batchpush_cli, start_cluster, stop_cluster

    fill(source, tmp_path / "layout", {"team1/svc2": ["v1.0.0", "v1.1.0", "nightly"], "team1/svc3": ["1.0"], "team0/svc0": ["1.0"]})
    cluster = start_cluster(tmp_path)
    try:
        rename = [{"from": "^svc(\\d)$", "to": "service-\\1"}]
        plan = write_plan(tmp_path, [{"source": f"docker://{source.host}/team1/", "targets": [f"{registry.host}/t1/"], "rename": rename, "semver": ">=1"}], **{source.host: {}, registry.host: {}})
        done = batchpush_cli("run", plan, "--scheduler", cluster.address, "--metadata-dir", str(tmp_path / "md"), "--report", str(tmp_path / "report.json"))
    finally:
        stop_cluster(cluster)
    assert done.returncode == 0, done.stdout + done.stderr
    assert catalog_of(registry) == ["t1/service-2", "t1/service-3"]
    assert_copied(source, registry, {"team1/svc2:v1.0.0": "t1/service-2:v1.0.0", "team1/svc2:v1.1.0": "t1/service-2:v1.1.0", "team1/svc3:1.0": "t1/service-3:1.0"})
    assert tags_of(registry, "t1/service-2") == ["v1.0.0", "v1.1.0"]
    images = json.loads((tmp_path / "report.json").read_text())["images"]
    assert len(images) == 3 and all(image["worker"] for image in images)
