"""Hostile sources are refused with one clear line naming the file; nothing of
that image is pushed, the rest of the batch goes on. No input crashes."""

from __future__ import annotations

import gzip
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

from batchpush.digest import Digest
from batchpush.errors import BatchPushError
from batchpush.metadata import MetadataStore
from batchpush.prepare import PreparedIndex, PreparedLayer, PreparedNode, Preparer
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


def _reads_or_refuses(spec: str, path: str, tmp_path) -> None:
    """Read and prepare every image of ``spec``: a refusal must be a BatchPushError
    naming ``path`` (the file or layout); what is accepted must be well-formed (each
    blob hashes to its digest and size, each layer decompresses to its DiffID, the
    config's DiffIDs are the layers'). Any other exception is a crash."""
    spool = tmp_path / "spool"
    spool.mkdir(exist_ok=True)
    store = MetadataStore(str(spool / "md"))
    try:
        preparer = Preparer(str(spool), store)
        for image in open_source(spec).images():
            _assert_well_formed(preparer, preparer.prepare(image.node))
    except BatchPushError as exc:
        assert path in str(exc), f"the refusal does not name {path}: {exc}"
    finally:
        store.close()


def _blob_bytes(preparer: Preparer, layer: PreparedLayer) -> bytes:
    """The bytes that would be sent (a layer prepared from its fingerprint is
    compressed now), checked against the layer's digest and size."""
    with preparer.materialize(layer).open() as f:
        data = f.read()
    assert len(data) == layer.size and str(Digest.sha256_of(data)) == str(layer.digest), layer
    return data


def _assert_well_formed(preparer: Preparer, node: PreparedNode) -> None:
    if isinstance(node, PreparedIndex):
        for child in node.children:
            _assert_well_formed(preparer, child)
        return
    config = json.loads(_blob_bytes(preparer, node.config))
    for layer in node.layers:
        data = _blob_bytes(preparer, layer)
        uncompressed = gzip.decompress(data) if data[:2] == b"\x1f\x8b" else data
        assert str(Digest.sha256_of(uncompressed)) == str(layer.diff_id), layer
    assert config["rootfs"]["diff_ids"] == [str(layer.diff_id) for layer in node.layers]


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
    _reads_or_refuses(f"docker-archive:{path}", str(path), tmp_path)


_JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=80), lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.sampled_from(["manifests", "mediaType", "digest", "size", "annotations", "org.opencontainers.image.ref.name", "urls", "layers", "config"]), inner, max_size=5), max_leaves=20)
_DROP = object()
#: edits of the layout's own index entry: a key dropped or given another value (often
#: a near miss of a real one), so that some mutated indexes are still valid
_EDITS = st.lists(st.tuples(st.sampled_from(["mediaType", "digest", "size", "annotations", "platform", "urls", "artifactType"]), st.just(_DROP) | _JSON | st.sampled_from(["application/vnd.oci.image.manifest.v1+json", "application/vnd.oci.image.index.v1+json", {"org.opencontainers.image.ref.name": "2"}, {"architecture": "arm64", "os": "linux"}, []])), max_size=3)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.one_of(_JSON.map(lambda document: ("document", document)), _EDITS.map(lambda edits: ("edits", edits))))
def test_mutated_layout_indexes_never_crash(tmp_path, mutation):
    layout = tmp_path / "layout"
    if not layout.exists():
        simple_layout(str(layout), {"1": [5]})
        (tmp_path / "index.json").write_bytes((layout / "index.json").read_bytes())
    kind, value = mutation
    if kind == "edits":
        document = json.loads((tmp_path / "index.json").read_text())
        for key, new in value:
            if new is _DROP:
                document["manifests"][0].pop(key, None)
            else:
                document["manifests"][0][key] = new
    else:
        document = value
    (layout / "index.json").write_text(json.dumps(document))
    _reads_or_refuses(f"oci:{layout}", str(layout), tmp_path)


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
