"""Hostile sources are refused with one clear line naming the file; nothing of
that image is pushed, the rest of the batch goes on. No input crashes."""

from __future__ import annotations

import io
import json
import os
import tarfile

import pytest
import yaml
from conftest import pull_and_verify
from hostile import CASES
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from images import docker25_archive, layer_tar, simple_layout

from batchpush.errors import BatchPushError
from batchpush.metadata import MetadataStore
from batchpush.prepare import Preparer
from batchpush.sources import open_source


@pytest.mark.parametrize("case", sorted(CASES))
def test_each_lie_is_refused_naming_the_file(case, tmp_path, registry, batchpush):
    build, word = CASES[case]
    os.makedirs(tmp_path / "src")
    source = build(str(tmp_path / "src"))
    run = batchpush("push", source, f"{registry.host}/hostile/{case}:1", "--insecure", registry.host)
    assert run.code == 1
    lines = [line for line in run.err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, run.err
    assert str(tmp_path / "src") in lines[0]
    assert word in lines[0], lines[0]
    assert "Traceback" not in run.err
    assert registry.count("PUT") == 0 and registry.count("POST") == 0 and registry.count("PATCH") == 0


def test_hostile_sources_in_a_batch_leave_the_good_ones(tmp_path, registry, batchpush):
    images = []
    for case in ("archive-symlink-escape", "layout-corrupt-blob", "archive-truncated"):
        os.makedirs(tmp_path / case)
        images.append({"source": CASES[case][0](str(tmp_path / case)), "targets": [f"{registry.host}/hostile/{case}:1"]})
    simple_layout(str(tmp_path / "good"), {"1": [42]})
    images.insert(1, {"source": f"oci:{tmp_path}/good", "targets": [f"{registry.host}/good/app"]})
    plan = tmp_path / "plan.yaml"
    plan.write_text(yaml.safe_dump({"version": 1, "registries": {registry.host: {"insecure": True}}, "images": images}))
    run = batchpush("run", str(plan))
    assert run.code == 1
    assert run.err.count("error:") == 3
    assert registry.count("PUT", "/v2/hostile/") == 0
    pull_and_verify(registry, "good/app:1", str(tmp_path / "pulled"))


def _reads_or_refuses(spec: str, tmp_path) -> None:
    """Read and prepare every image of ``spec``: a BatchPushError (a clear refusal)
    is fine, any other exception is a crash and fails the test."""
    spool = tmp_path / "spool"
    spool.mkdir(exist_ok=True)
    store = MetadataStore(str(spool / "md"))
    try:
        preparer = Preparer(str(spool), store)
        for image in open_source(spec).images():
            preparer.prepare(image.node)
    except BatchPushError:
        pass
    finally:
        store.close()


@pytest.fixture(scope="module")
def archive_bytes(tmp_path_factory) -> bytes:
    path = str(tmp_path_factory.mktemp("fuzz") / "d25.tar")
    docker25_archive(path, "fuzz/app:1", [layer_tar(1, files=1, file_size=3000), layer_tar(2, files=1, file_size=3000)])
    return open(path, "rb").read()


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(st.integers(min_value=0), st.integers(min_value=0, max_value=255)), min_size=1, max_size=8), st.integers(min_value=0))
def test_mutated_archives_never_crash(archive_bytes, tmp_path, flips, cut):
    data = bytearray(archive_bytes)
    for position, value in flips:
        data[position % len(data)] = value
    if cut % 3 == 0:
        data = data[: cut % len(data)]
    path = tmp_path / "mutated.tar"
    path.write_bytes(bytes(data))
    _reads_or_refuses(f"docker-archive:{path}", tmp_path)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=80), lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.sampled_from(["manifests", "mediaType", "digest", "size", "annotations", "org.opencontainers.image.ref.name", "urls", "layers", "config"]), inner, max_size=5), max_leaves=20))
def test_mutated_layout_indexes_never_crash(tmp_path, document):
    layout = tmp_path / "layout"
    if not layout.exists():
        simple_layout(str(layout), {"1": [5]})
    (layout / "index.json").write_text(json.dumps(document))
    _reads_or_refuses(f"oci:{layout}", tmp_path)


def test_tar_of_unsupported_member_types_is_refused(tmp_path):
    path = tmp_path / "fifo.tar"
    with tarfile.open(path, "w") as tar:
        manifest = json.dumps([{"Config": "c", "RepoTags": ["a:1"], "Layers": ["fifo"]}]).encode()
        info = tarfile.TarInfo("manifest.json")
        info.size = len(manifest)
        tar.addfile(info, io.BytesIO(manifest))
        config = json.dumps({"rootfs": {"diff_ids": ["sha256:" + "0" * 64]}}).encode()
        info = tarfile.TarInfo("c")
        info.size = len(config)
        tar.addfile(info, io.BytesIO(config))
        fifo = tarfile.TarInfo("fifo")
        fifo.type = tarfile.FIFOTYPE
        tar.addfile(fifo)
    with pytest.raises(BatchPushError, match="not a regular file"):
        open_source(f"docker-archive:{path}").images()
