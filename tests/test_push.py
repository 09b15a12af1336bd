"""Core push, end to end against the real registry, read back by skopeo."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import pull_and_verify, remote_digest, skopeo
from images import LayoutWriter, docker25_archive, layer_tar, simple_layout

import batchpush
from batchpush.engine import PushOptions


def report_of(path) -> dict:
    with open(path) as f:
        return json.load(f)


def test_oci_layout_every_tag(registry, batchpush, tmp_path):
    built = simple_layout(str(tmp_path / "layout"), {"1.0": [1, 2], "2.0": [1, 3]}, file_size=50_000)
    report = tmp_path / "report.json"
    run = batchpush("push", f"oci:{tmp_path}/layout", f"{registry.host}/team/app", "--insecure", registry.host, "--report", str(report))
    assert run.code == 0, run.err
    document = report_of(report)
    assert document["version"] == 1
    assert {image["target"] for image in document["images"]} == {f"{registry.host}/team/app:1.0", f"{registry.host}/team/app:2.0"}
    for tag, image in built.items():
        pulled = pull_and_verify(registry, f"team/app:{tag}", str(tmp_path / f"pulled-{tag}"))
        assert [p.config_digest for p in pulled] == [image.config_digest]
        assert pulled[0].diff_ids == image.diff_ids
        assert pulled[0].layer_media_types == ["application/vnd.oci.image.layer.v1.tar+gzip"] * 2
        entry = next(i for i in document["images"] if i["target"].endswith(f":{tag}"))
        assert entry["status"] == "pushed"
        assert entry["digest"] == remote_digest(registry, f"team/app:{tag}") == pulled[0].manifest_digest
        assert f"{tag}: digest: {entry['digest']} size: {entry['size']}" in run.out
    # the shared base layer went up once; the push state knew it for the second tag
    outcomes = [layer["outcome"] for image in document["images"] for layer in image["layers"]]
    assert sorted(outcomes) == ["known", "uploaded", "uploaded", "uploaded"]


def test_one_tag_to_a_named_tag(registry, batchpush, tmp_path):
    simple_layout(str(tmp_path / "layout"), {"1.0": [1], "2.0": [2]})
    run = batchpush("push", f"oci:{tmp_path}/layout:2.0", f"{registry.host}/team/app:stable", "--insecure", registry.host)
    assert run.code == 0, run.err
    assert "stable: digest: sha256:" in run.out
    pull_and_verify(registry, "team/app:stable", str(tmp_path / "pulled"))
    assert skopeo("inspect", "--raw", "--tls-verify=false", f"docker://{registry.host}/team/app:1.0").returncode != 0


def test_docker_archive_written_by_skopeo(registry, batchpush, tmp_path):
    built = simple_layout(str(tmp_path / "layout"), {"1.0": [4, 5, 6]}, file_size=30_000)
    archive = tmp_path / "app.tar"
    done = skopeo("copy", f"oci:{tmp_path}/layout:1.0", f"docker-archive:{archive}:team/app:1.0")
    assert done.returncode == 0, done.stderr
    run = batchpush("push", f"docker-archive:{archive}", f"{registry.host}/team/app", "--insecure", registry.host)
    assert run.code == 0, run.err
    assert "1.0: digest: sha256:" in run.out  # the tag came from RepoTags
    raw = skopeo("inspect", "--raw", "--tls-verify=false", f"docker://{registry.host}/team/app:1.0")
    assert json.loads(raw.stdout)["mediaType"] == "application/vnd.docker.distribution.manifest.v2+json"
    pulled = pull_and_verify(registry, "team/app:1.0", str(tmp_path / "pulled"))
    assert pulled[0].diff_ids == built["1.0"].diff_ids
    assert pulled[0].layer_media_types == ["application/vnd.docker.image.rootfs.diff.tar.gzip"] * 3


def test_docker25_archive_with_oci_layout_inside(registry, batchpush, tmp_path):
    archive = str(tmp_path / "d25.tar")
    built = docker25_archive(archive, "team/svc:3.1", [layer_tar(7), layer_tar(8)])
    run = batchpush("push", f"docker-archive:{archive}:team/svc:3.1", f"{registry.host}/mirror/svc:3.1", "--insecure", registry.host)
    assert run.code == 0, run.err
    pulled = pull_and_verify(registry, "mirror/svc:3.1", str(tmp_path / "pulled"))
    assert pulled[0].config_digest == built.config_digest
    assert pulled[0].diff_ids == built.diff_ids


def test_umoci_layout_with_gzip_layers_keeps_its_digest(registry, batchpush, tmp_path):
    layout = str(tmp_path / "umoci")
    bundle = str(tmp_path / "bundle")
    for argv in (["init", "--layout", layout], ["new", "--image", f"{layout}:1.0"], ["unpack", "--rootless", "--image", f"{layout}:1.0", bundle]):
        subprocess.run(["umoci", *argv], check=True, capture_output=True)
    os.makedirs(f"{bundle}/rootfs/app")
    with open(f"{bundle}/rootfs/app/hello.txt", "w") as f:
        f.write("hello from umoci\n" * 1000)
    subprocess.run(["umoci", "repack", "--image", f"{layout}:1.0", bundle], check=True, capture_output=True)
    with open(f"{layout}/index.json") as f:
        layout_digest = json.load(f)["manifests"][0]["digest"]
    run = batchpush("push", f"oci:{layout}:1.0", f"{registry.host}/tools/umoci:1.0", "--insecure", registry.host)
    assert run.code == 0, run.err
    assert remote_digest(registry, "tools/umoci:1.0") == layout_digest  # gzip layers pushed as they are
    pulled = pull_and_verify(registry, "tools/umoci:1.0", str(tmp_path / "pulled"))
    assert pulled[0].manifest_digest == layout_digest


def test_multi_arch_index(registry, batchpush, tmp_path):
    writer = LayoutWriter(str(tmp_path / "multi"))
    amd64, amd64_image = writer.image([layer_tar(10), layer_tar(11)], arch="amd64")
    arm64, arm64_image = writer.image([layer_tar(10), layer_tar(12)], arch="arm64")
    writer.tag(writer.index([amd64, arm64]), "multi")
    report = tmp_path / "report.json"
    run = batchpush("push", f"oci:{tmp_path}/multi", f"{registry.host}/team/multi", "--insecure", registry.host, "--report", str(report))
    assert run.code == 0, run.err
    pulled = pull_and_verify(registry, "team/multi:multi", str(tmp_path / "pulled"))
    assert [p.config_digest for p in pulled] == [amd64_image.config_digest, arm64_image.config_digest]
    assert [p.diff_ids for p in pulled] == [amd64_image.diff_ids, arm64_image.diff_ids]
    raw = json.loads(skopeo("inspect", "--raw", "--tls-verify=false", f"docker://{registry.host}/team/multi:multi").stdout)
    assert raw["mediaType"] == "application/vnd.oci.image.index.v1+json"
    assert [m["platform"]["architecture"] for m in raw["manifests"]] == ["amd64", "arm64"]
    assert report_of(report)["images"][0]["digest"] == remote_digest(registry, "team/multi:multi")


def test_diff_id_mismatch_pushes_nothing_for_that_image(registry, batchpush, tmp_path):
    writer = LayoutWriter(str(tmp_path / "layout"))
    good, _ = writer.image([layer_tar(20)])
    writer.tag(good, "good")
    # a config that lies about the second image's layer
    bad_layer = layer_tar(21)
    descriptor, _ = writer.image([bad_layer])
    manifest = json.loads(open(f"{tmp_path}/layout/blobs/sha256/{descriptor['digest'][7:]}").read())
    config = json.loads(open(f"{tmp_path}/layout/blobs/sha256/{manifest['config']['digest'][7:]}").read())
    config["rootfs"]["diff_ids"] = ["sha256:" + "0" * 64]
    config_bytes = json.dumps(config).encode()
    manifest["config"] = {"mediaType": manifest["config"]["mediaType"], "digest": writer.blob(config_bytes), "size": len(config_bytes)}
    manifest_bytes = json.dumps(manifest).encode()
    writer.tag({"mediaType": descriptor["mediaType"], "digest": writer.blob(manifest_bytes), "size": len(manifest_bytes)}, "bad")
    run = batchpush("push", f"oci:{tmp_path}/layout", f"{registry.host}/team/app", "--insecure", registry.host)
    assert run.code == 1
    assert "DiffID" in run.err and "blobs/sha256/" in run.err
    assert registry.count("PUT", "/manifests/bad") == 0
    assert registry.count("PUT", "/manifests/good") == 1  # the rest of the batch went on
    pull_and_verify(registry, "team/app:good", str(tmp_path / "pulled"))
    blob_puts = registry.count("PUT", "/blobs/uploads/")
    assert blob_puts == 2  # the good image's layer and config; nothing of the bad one


def test_chunked_upload(registry, batchpush, tmp_path):
    built = simple_layout(str(tmp_path / "layout"), {"big": [30, 31]}, file_size=400_000)
    run = batchpush("push", f"oci:{tmp_path}/layout", f"{registry.host}/team/big", "--insecure", registry.host, "--monolithic-limit", "64k", "--chunk-size", "64k")
    assert run.code == 0, run.err
    assert registry.count("PATCH", "/blobs/uploads/") >= 4
    pulled = pull_and_verify(registry, "team/big:big", str(tmp_path / "pulled"))
    assert pulled[0].diff_ids == built["big"].diff_ids


def test_compression_is_deterministic_across_runs(tmp_path, registry, batchpush):
    simple_layout(str(tmp_path / "layout"), {"1": [40]}, file_size=100_000)
    digests = []
    for i in range(2):
        report = tmp_path / f"r{i}.json"
        run = batchpush("push", f"oci:{tmp_path}/layout", f"{registry.host}/det/run{i}", "--insecure", registry.host, "--report", str(report), "--metadata-dir", str(tmp_path / f"md{i}"))
        assert run.code == 0, run.err
        digests.append(report_of(report)["images"][0]["digest"])
    assert digests[0] == digests[1]


def test_python_api_and_two_targets(registry, tmp_path, metadata_dir):
    built = simple_layout(str(tmp_path / "layout"), {"1.0": [50, 51]}, file_size=20_000)
    result = batchpush.push(f"oci:{tmp_path}/layout", [f"{registry.host}/a/x", f"{registry.host}/b/y"], PushOptions(insecure_hosts=frozenset({registry.host}), metadata_dir=metadata_dir))
    assert result.ok and result.exit_code == 0
    assert [image.status for image in result.images] == ["pushed", "pushed"]
    # the two repositories are pushed at once: each layer is uploaded to one of them
    # and mounted into the other, never sent twice
    by_digest: dict[str, list[str]] = {}
    for image in result.images:
        for layer in image.layers:
            by_digest.setdefault(str(layer.digest), []).append(layer.outcome.value)
    assert sorted(sorted(v) for v in by_digest.values()) == [["mounted", "uploaded"]] * 2
    assert result.to_json()["totals"]["blobs_mounted"] == 2
    for repo in ("a/x", "b/y"):
        assert pull_and_verify(registry, f"{repo}:1.0", str(tmp_path / repo.replace("/", "-")))[0].diff_ids == built["1.0"].diff_ids


def test_foreign_layer_is_skipped(tmp_path, batchpush):
    from registry import start_registry

    allowed = start_registry(str(tmp_path), {"validation": {"manifests": {"urls": {"allow": ["^https://example\\.invalid/"]}}}})
    try:
        writer = LayoutWriter(str(tmp_path / "layout"))
        foreign = layer_tar(60)
        local = layer_tar(61)
        descriptor, image = writer.image([foreign, local])
        manifest = json.loads(open(f"{tmp_path}/layout/blobs/sha256/{descriptor['digest'][7:]}").read())
        manifest["layers"][0]["mediaType"] = "application/vnd.oci.image.layer.nondistributable.v1.tar"
        manifest["layers"][0]["urls"] = ["https://example.invalid/layer.tar"]
        os.unlink(f"{tmp_path}/layout/blobs/sha256/{manifest['layers'][0]['digest'][7:]}")
        data = json.dumps(manifest).encode()
        writer.tag({"mediaType": descriptor["mediaType"], "digest": writer.blob(data), "size": len(data)}, "f")
        report = tmp_path / "report.json"
        run = batchpush("push", f"oci:{tmp_path}/layout", f"{allowed.host}/team/foreign", "--insecure", allowed.host, "--report", str(report))
        assert run.code == 0, run.err
        assert "Skipped foreign layer" in run.out
        assert [layer["outcome"] for layer in report_of(report)["images"][0]["layers"]] == ["skipped-foreign", "uploaded"]
        raw = json.loads(skopeo("inspect", "--raw", "--tls-verify=false", f"docker://{allowed.host}/team/foreign:f").stdout)
        assert raw["layers"][0]["urls"] == ["https://example.invalid/layer.tar"]
        assert raw["layers"][1]["mediaType"].endswith("tar+gzip")
    finally:
        allowed.stop()


@pytest.mark.parametrize(
    "args",
    [
        ["push", "tarball:/x", "127.0.0.1:5000/a"],
        ["push", "oci:/x"],
        ["frobnicate"],
    ],
)
def test_usage_errors_exit_2(batchpush, args):
    assert batchpush(*args).code == 2


def test_tagged_target_needs_one_image(registry, batchpush, tmp_path):
    simple_layout(str(tmp_path / "layout"), {"1": [70], "2": [71]})
    run = batchpush("push", f"oci:{tmp_path}/layout", f"{registry.host}/team/app:one", "--insecure", registry.host)
    assert run.code == 2
    assert "2 images" in run.err


def test_missing_source_names_the_file(registry, batchpush, tmp_path):
    run = batchpush("push", f"oci:{tmp_path}/nowhere", f"{registry.host}/team/app", "--insecure", registry.host)
    assert run.code == 1
    assert f"{tmp_path}/nowhere" in run.err
    run = batchpush("push", f"docker-archive:{tmp_path}/nothing.tar", f"{registry.host}/team/app", "--insecure", registry.host)
    assert run.code == 1
    assert "nothing.tar" in run.err


def test_console_script_and_module(registry, tmp_path):
    simple_layout(str(tmp_path / "layout"), {"v1": [80]})
    done = subprocess.run([sys.executable, "-m", "batchpush", "push", f"oci:{tmp_path}/layout", f"{registry.host}/mod/app", "--insecure", registry.host, "--metadata-dir", str(tmp_path / "md")], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "v1: digest: sha256:" in done.stdout


def test_a_lying_layer_stops_the_uploads_already_streaming(registry, batchpush, tmp_path):
    """Layers upload as soon as each is checked, but nothing is committed before the
    whole image is: when a large layer turns out to lie, the good layer's data that
    was already sent is discarded (its session cancelled) and no blob of the image
    is committed."""
    from images import random_layer

    writer = LayoutWriter(str(tmp_path / "layout"))
    good = random_layer(1, 3 << 20)
    liar = random_layer(2, 48 << 20)
    descriptor, _ = writer.image([good, liar])
    manifest_path = tmp_path / "layout" / "blobs" / "sha256" / descriptor["digest"][7:]
    manifest = json.loads(manifest_path.read_text())
    config_path = tmp_path / "layout" / "blobs" / "sha256" / manifest["config"]["digest"][7:]
    config = json.loads(config_path.read_text())
    config["rootfs"]["diff_ids"][1] = "sha256:" + "1" * 64
    config_bytes = json.dumps(config).encode()
    manifest["config"] = {**manifest["config"], "digest": writer.blob(config_bytes), "size": len(config_bytes)}
    data = json.dumps(manifest).encode()
    writer.tag({"mediaType": descriptor["mediaType"], "digest": writer.blob(data), "size": len(data)}, "1")
    run = batchpush("push", f"oci:{tmp_path}/layout", f"{registry.host}/stream/liar", "--insecure", registry.host, "--jobs", "2")
    assert run.code == 1
    assert "DiffID" in run.err
    commits = [line for line in registry.access_log() if '"PUT ' in line and "digest=" in line and '" 201 ' in line]
    assert not commits, commits
    assert registry.count("PUT", "/manifests/") == 0
    # every upload session the image opened (the good layer's data goes ahead of the
    # checks) was cancelled: none is left open, none committed
    assert registry.count("POST", "/blobs/uploads/") == registry.count("DELETE", "/blobs/uploads/")


def test_foreign_layer_pushed_where_allowed(tmp_path, batchpush):
    """--allow-nondistributable-artifacts HOST: the foreign layer goes up as it is
    (its urls kept in the manifest), like docker's daemon option."""
    import requests
    from registry import start_registry

    allowed = start_registry(str(tmp_path), {"validation": {"manifests": {"urls": {"allow": ["^https://example\\.invalid/"]}}}})
    try:
        writer = LayoutWriter(str(tmp_path / "layout"))
        descriptor, _ = writer.image([layer_tar(63), layer_tar(64)])
        manifest = json.loads(open(f"{tmp_path}/layout/blobs/sha256/{descriptor['digest'][7:]}").read())
        manifest["layers"][0]["mediaType"] = "application/vnd.oci.image.layer.nondistributable.v1.tar"
        manifest["layers"][0]["urls"] = ["https://example.invalid/layer.tar"]
        data = json.dumps(manifest).encode()
        writer.tag({"mediaType": descriptor["mediaType"], "digest": writer.blob(data), "size": len(data)}, "nd")
        report = tmp_path / "report.json"
        run = batchpush("push", f"oci:{tmp_path}/layout", f"{allowed.host}/team/nd", "--insecure", allowed.host, "--allow-nondistributable-artifacts", allowed.host, "--report", str(report))
        assert run.code == 0, run.err
        layers = report_of(report)["images"][0]["layers"]
        assert [layer["outcome"] for layer in layers] == ["uploaded", "uploaded"]
        foreign = manifest["layers"][0]["digest"]
        assert layers[0]["digest"] == foreign  # pushed as it is, not recompressed
        assert requests.head(f"{allowed.url}/v2/team/nd/blobs/{foreign}", timeout=10).status_code == 200
        raw = json.loads(skopeo("inspect", "--raw", "--tls-verify=false", f"docker://{allowed.host}/team/nd:nd").stdout)
        assert raw["layers"][0]["urls"] == ["https://example.invalid/layer.tar"]
    finally:
        allowed.stop()


def test_small_layers_never_start_the_worker_processes(registry, tmp_path, metadata_dir):
    """The process pool starts with the first large layer: a batch of small layers
    (and a cron re-run, which only fingerprints) runs without it."""
    from batchpush.engine import Engine, PushJob
    from batchpush.registry.client import RegistryOptions

    simple_layout(str(tmp_path / "layout"), {"1.0": [1, 2]})
    options = PushOptions(registries={registry.host: RegistryOptions(insecure=True)}, metadata_dir=metadata_dir)
    with Engine(options) as engine:
        assert engine.run([PushJob(f"oci:{tmp_path / 'layout'}", (f"{registry.host}/small/app",))]).ok
        assert engine._pool is not None and engine._pool._pool is None
