"""A plan whose entries write one target tag twice is refused before any request."""

from __future__ import annotations

import pytest
import yaml
from conftest import pull_and_verify
from fault_proxy import FaultProxy
from images import docker25_archive, layer_tar, simple_layout

from batchpush.errors import PlanError
from batchpush.plan import load_plan, validate_plan

PATH = "/plans/nightly.yaml"


def plan(*images: dict) -> dict:
    return {"version": 1, "images": list(images)}


def test_two_entries_naming_one_target_tag_are_refused_naming_both():
    with pytest.raises(PlanError) as caught:
        validate_plan(PATH, plan(
            {"source": "oci:a", "targets": ["h:1/team0/svc1:v0"]},
            {"source": "oci:b", "targets": ["h:1/other:v1", "h:1/team0/svc2:v0"]},
            {"source": "oci:c", "targets": ["h:1/team0/svc2:v0"]},
        ))
    assert str(caught.value) == f"{PATH}: images[1] (oci:b) and images[2] (oci:c): both write h:1/team0/svc2:v0; one tag must have one source"


def test_the_tag_a_registry_source_names_counts_for_a_target_without_one():
    with pytest.raises(PlanError, match=r"images\[0\] \(docker://h:2/src/app:v0\) and images\[1\] \(oci:b\): both write h:1/team0/app:v0"):
        validate_plan(PATH, plan(
            {"source": "docker://h:2/src/app:v0", "targets": ["h:1/team0/app"]},
            {"source": "oci:b", "targets": ["h:1/team0/app:v0"]},
        ))


@pytest.mark.parametrize("second", [
    {"source": "oci:b", "targets": ["h:1/team0/svc2:v1"]},  # another tag
    {"source": "oci:b", "targets": ["h:1/team1/svc2:v0"]},  # another repository
    {"source": "oci:b", "targets": ["h:9/team0/svc2:v0"]},  # another registry
    {"source": "docker://h:2/src/app:v0", "targets": ["h:1/team0/svc2"], "tags": "^v1$"},  # its tag filtered out
    {"source": "docker://h:2/src/app", "targets": ["h:1/team0/svc2"]},  # tags only a request would tell
])
def test_entries_writing_different_tags_are_accepted(second):
    validate_plan(PATH, plan({"source": "oci:a", "targets": ["h:1/team0/svc2:v0", "h:1/team0/svc2:v0"]}, second))


@pytest.fixture
def proxy(registry):
    started = FaultProxy(registry.host)
    yield started
    started.stop()


def write_plan(tmp_path, proxy: FaultProxy, images: list[dict]) -> str:
    path = tmp_path / "plan.yaml"
    path.write_text(yaml.safe_dump({"version": 1, "registries": {proxy.host: {"insecure": True}}, "images": images}))
    return str(path)


def test_layouts_whose_tags_collide_are_refused_before_any_request(tmp_path, proxy, batchpush):
    # two layouts both hold v0: which one the tag gets is known only once they are
    # opened, and is refused then, before the first request to any registry
    simple_layout(str(tmp_path / "layouts" / "a"), {"v0": [1, 2], "v1": [1, 3]})
    simple_layout(str(tmp_path / "layouts" / "b"), {"v2": [1, 4], "v0": [1, 5]})
    target = f"{proxy.host}/team0/svc2"
    path = write_plan(tmp_path, proxy, [
        {"source": "oci:layouts/a", "targets": [target]},
        {"source": "oci:layouts/b", "targets": [target]},
    ])
    load_plan(path)  # valid as a document: the layouts' tags are not read there
    with pytest.raises(PlanError):
        load_plan(path).jobs()
    run = batchpush("run", path, "--metadata-dir", str(tmp_path / "md"))
    assert run.code == 2, run.err
    assert run.err.splitlines() == [f"error: {path}: images[0] (oci:layouts/a) and images[1] (oci:layouts/b): both write {target}:v0; one tag must have one source"]
    assert proxy.requests() == []


def test_an_archive_and_a_layout_writing_one_tag_are_refused_before_any_request(tmp_path, proxy, batchpush):
    docker25_archive(str(tmp_path / "app.tar"), "team/app:1.0", [layer_tar(1), layer_tar(2)])
    simple_layout(str(tmp_path / "layout"), {"1.0": [1, 3]})
    path = write_plan(tmp_path, proxy, [
        {"source": "oci:layout", "targets": [f"{proxy.host}/team0/app:1.0"]},
        {"source": "docker-archive:app.tar", "targets": [f"{proxy.host}/team0/app"]},
    ])
    run = batchpush("run", path, "--metadata-dir", str(tmp_path / "md"))
    assert run.code == 2, run.err
    assert f"images[0] (oci:layout) and images[1] (docker-archive:app.tar): both write {proxy.host}/team0/app:1.0" in run.err
    assert proxy.requests() == []


def test_tag_filters_that_keep_the_layouts_apart_are_accepted_and_pushed(tmp_path, registry, proxy, batchpush):
    a = simple_layout(str(tmp_path / "layouts" / "a"), {"v0": [1, 2], "v1": [1, 3]})
    b = simple_layout(str(tmp_path / "layouts" / "b"), {"v2": [1, 4], "v0": [1, 5]})
    target = f"{proxy.host}/team0/svc2"
    path = write_plan(tmp_path, proxy, [
        {"source": "oci:layouts/a", "targets": [target], "tags": "^v1$"},
        {"source": "oci:layouts/b", "targets": [target], "tags": "^v[02]$"},
        {"source": "oci:layouts/missing", "targets": [target]},  # does not open: its own failure, not a refusal
    ])
    run = batchpush("run", path, "--metadata-dir", str(tmp_path / "md"))
    assert run.code == 1, run.err
    assert run.err.count("error: ") == 1 and "layouts/missing" in run.err
    # each tag holds the image its filter let through: v0 is b's (a's v0 was filtered out)
    for tag, image in (("v0", b["v0"]), ("v1", a["v1"]), ("v2", b["v2"])):
        assert pull_and_verify(registry, f"team0/svc2:{tag}", str(tmp_path / f"pulled-{tag}"))[0].diff_ids == image.diff_ids, tag
