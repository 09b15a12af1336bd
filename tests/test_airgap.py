"""Air-gapped migrations against real registries: a registry exported into one OCI
layout (``oci:DIR`` target), that layout imported into another registry under a
prefix (``oci:DIR`` source), incremental exports (``--incremental-from``).

The source registry is filled by skopeo from layouts our test code writes; what a
layout holds is read out by skopeo (``oci:DIR:REPOSITORY:TAG``), and what arrives
at a registry is read back by skopeo and compared, digest for digest, with the
source. An interruption is a real SIGINT to the CLI in a subprocess while our proxy
holds one blob read of the source silent.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import pull_and_verify, remote_digest, skopeo
from fault_proxy import Rule
from images import LayoutWriter, layer_tar, sha256, simple_layout
from registry import Registry, start_registry
from test_migrate import tags_of
from test_mirror import attach_signature

#: how long a subprocess may take to do what a test waits for (a bound, never a timing assertion)
BOUND_S = 90.0
REF_NAME = "org.opencontainers.image.ref.name"
#: the layer every image of the source shares (stored once in a layout)
BASE_SEED = 1000


@pytest.fixture
def source(tmp_path):
    started = start_registry(str(tmp_path / "source"))
    yield started
    started.stop()


def put_image(registry: Registry, layout: Path, repository: str, tag: str, seed: int) -> str:
    """An image of two layers (the shared base, one of its own from ``seed``) copied
    into ``registry`` by skopeo; its digest there."""
    writer = LayoutWriter(str(layout / f"{seed}"))
    descriptor, _ = writer.image([layer_tar(BASE_SEED, files=2, file_size=2048), layer_tar(seed, files=1, file_size=1024)])
    writer.tag(descriptor, "x")
    done = skopeo("copy", "--dest-tls-verify=false", f"oci:{layout / str(seed)}:x", f"docker://{registry.host}/{repository}:{tag}")
    assert done.returncode == 0, done.stderr
    return remote_digest(registry, f"{repository}:{tag}")


def fill_team0(registry: Registry, tmp_path: Path) -> dict[str, str]:
    """team0/svc0:v1, team0/svc1:v1 and :v2, and other/x:v1 (outside the namespace);
    their digests by ``repository:tag`` below team0/."""
    layouts = tmp_path / "fill"
    digests = {
        "svc0:v1": put_image(registry, layouts, "team0/svc0", "v1", 1),
        "svc1:v1": put_image(registry, layouts, "team0/svc1", "v1", 2),
        "svc1:v2": put_image(registry, layouts, "team0/svc1", "v2", 3),
    }
    put_image(registry, layouts, "other/x", "v1", 4)
    return digests


def index_of(layout: Path) -> dict:
    return json.loads((layout / "index.json").read_text())


def ref_names(layout: Path) -> dict[str, str]:
    """The layout's ``REPOSITORY:TAG`` ref names and the digests they name."""
    return {entry["annotations"][REF_NAME]: entry["digest"] for entry in index_of(layout)["manifests"] if REF_NAME in entry.get("annotations", {})}


def blob_files(layout: Path) -> dict[str, tuple[int, int]]:
    """Every blob file of the layout, checked against its name: digest -> (inode, mtime_ns)."""
    files = {}
    for path in (layout / "blobs" / "sha256").iterdir():
        assert hashlib.sha256(path.read_bytes()).hexdigest() == path.name, f"{path} does not hash to its name"
        stat = path.stat()
        files[f"sha256:{path.name}"] = (stat.st_ino, stat.st_mtime_ns)
    return files


def layout_digest(layout: Path, ref: str) -> str:
    """The manifest digest of ``oci:LAYOUT:REF`` as skopeo reads it out of the layout."""
    done = skopeo("inspect", "--raw", f"oci:{layout}:{ref}")
    assert done.returncode == 0, done.stderr
    return sha256(done.stdout.encode())


def layers_of(layout: Path, digest: str) -> list[str]:
    manifest = json.loads((layout / "blobs" / "sha256" / digest.split(":")[1]).read_bytes())
    return [layer["digest"] for layer in manifest["layers"]]


def report_images(path: Path) -> dict[str, dict]:
    return {image["target"]: image for image in json.loads(path.read_text())["images"]}


def test_a_namespace_goes_to_one_layout_and_from_it_to_another_registry(source, registry, tmp_path, batchpush):
    digests = fill_team0(source, tmp_path)
    sig_tag, fallback_tag = attach_signature(source, "team0/svc0", digests["svc0:v1"], tmp_path)
    mirror = tmp_path / "usb" / "mirror"
    run = batchpush("push", f"docker://{source.host}/team0/", f"oci:{mirror}", "--insecure", source.host, "--report", str(tmp_path / "export.json"))
    assert run.code == 0, run.out + run.err
    names = ref_names(mirror)
    # one ref name per REPOSITORY:TAG below the prefix, signatures with their image, byte for byte
    assert set(names) == {*digests, f"svc0:{sig_tag}", f"svc0:{fallback_tag}"}
    for name, digest in digests.items():
        assert names[name] == digest
        assert layout_digest(mirror, name) == digest  # skopeo reads it out, digest unchanged
    assert names[f"svc0:{sig_tag}"] == remote_digest(source, f"team0/svc0:{sig_tag}")
    # one blob store: the layer all three images share is one file; nothing else is there
    files = blob_files(mirror)
    shared = set(layers_of(mirror, digests["svc0:v1"])) & set(layers_of(mirror, digests["svc1:v2"]))
    assert len(shared) == 1 and shared <= set(files)
    assert sorted(os.listdir(mirror)) == ["blobs", "index.json", "oci-layout"]
    # the report lists what each image wrote
    exported = report_images(tmp_path / "export.json")
    assert {layer["outcome"] for layer in exported[f"oci:{mirror}:svc0:v1"]["layers"]} <= {"uploaded", "exists", "known"}
    # skopeo copies an image out of the layout whole
    out = tmp_path / "out"
    done = skopeo("copy", f"oci:{mirror}:svc1:v2", f"oci:{out}:copied")
    assert done.returncode == 0, done.stderr

    # the disconnected side: everything on the disk under a prefix, digests unchanged
    run = batchpush("push", f"oci:{mirror}", f"{registry.host}/imported/", "--insecure", registry.host)
    assert run.code == 0, run.out + run.err
    assert tags_of(registry, "imported/svc1") == ["v1", "v2"]
    for name, digest in digests.items():
        repository, tag = name.split(":")
        assert remote_digest(registry, f"imported/{repository}:{tag}") == digest
    assert remote_digest(registry, f"imported/svc0:{sig_tag}") == names[f"svc0:{sig_tag}"]
    pull_and_verify(registry, "imported/svc1:v2", str(tmp_path / "pulled"))


def test_a_signature_and_its_fallback_index_never_put_their_manifest_at_once(source, registry, tmp_path, batchpush):
    """A layout holds svc0's signature twice over: its ``.sig`` tag and the referrers
    fallback tag, an index naming that same manifest; imported, they are two images
    of one repository. The registry writes a manifest's link in place: an index PUT
    that checks its child while the other image PUTs that child again can read it
    empty, and is refused (400 DIGEST_INVALID, MANIFEST_BLOB_UNKNOWN; seen once in a
    full run). Our proxy holds each of the two PUTs until the other arrives: they
    must never be in flight together (one hold times out), and both land."""
    from fault_proxy import FaultProxy

    digest = put_image(source, tmp_path / "fill", "team0/svc0", "v1", 1)
    sig_tag, fallback_tag = attach_signature(source, "team0/svc0", digest, tmp_path)
    mirror = tmp_path / "mirror"
    assert batchpush("push", f"docker://{source.host}/team0/", f"oci:{mirror}", "--insecure", source.host).code == 0
    proxy = FaultProxy(registry.host)
    try:
        sig_put, index_put = rf"/manifests/{sig_tag}$", rf"/manifests/{fallback_tag}$"
        proxy.add(Rule("PUT", sig_put, "hold", until_method="PUT", until_path=index_put, stall_s=3.0))
        proxy.add(Rule("PUT", index_put, "hold", until_method="PUT", until_path=sig_put, stall_s=3.0))
        run = batchpush("push", f"oci:{mirror}", f"{proxy.host}/imported/", "--insecure", proxy.host)
        [sig] = [seen for seen in proxy.requests("PUT") if seen.target.endswith(f"/manifests/{sig_tag}")]
        [index] = [seen for seen in proxy.requests("PUT") if seen.target.endswith(f"/manifests/{fallback_tag}")]
    finally:
        proxy.stop()
    assert run.code == 0, run.out + run.err
    assert f"PUT {sig.target}" not in index.concurrent and f"PUT {index.target}" not in sig.concurrent, (sig, index)
    assert sorted([sig.held, index.held]) == ["met", "timed out"]
    for tag in (sig_tag, fallback_tag):
        assert remote_digest(registry, f"imported/svc0:{tag}") == remote_digest(source, f"team0/svc0:{tag}")


def test_a_second_export_writes_only_the_blobs_the_layout_lacks(source, tmp_path, batchpush):
    digests = fill_team0(source, tmp_path)
    mirror = tmp_path / "mirror"
    assert batchpush("push", f"docker://{source.host}/team0/", f"oci:{mirror}", "--insecure", source.host).code == 0
    before = blob_files(mirror)
    new = put_image(source, tmp_path / "fill", "team0/svc1", "v3", 5)
    run = batchpush("push", f"docker://{source.host}/team0/", f"oci:{mirror}", "--insecure", source.host, "--report", str(tmp_path / "again.json"))
    assert run.code == 0, run.out + run.err
    after = blob_files(mirror)
    # existing files are not written again (inode and mtime unchanged); the new image's are added
    assert {digest: after[digest] for digest in before} == before
    added = set(after) - set(before)
    assert new.split(":")[1] in {d.split(":")[1] for d in added}
    assert len(added) == 3  # its manifest, config and own layer; the shared base layer was there
    assert ref_names(mirror) == {**digests, "svc1:v3": new}
    statuses = {target.rsplit(":", 2)[-2] + ":" + target.rsplit(":", 1)[-1]: image["status"] for target, image in report_images(tmp_path / "again.json").items()}
    assert statuses == {"svc0:v1": "up-to-date", "svc1:v1": "up-to-date", "svc1:v2": "up-to-date", "svc1:v3": "pushed"}


def test_an_incremental_export_carries_only_what_the_last_disk_lacked(source, registry, tmp_path, batchpush):
    digests = fill_team0(source, tmp_path)
    full, delta = tmp_path / "full", tmp_path / "delta"
    assert batchpush("push", f"docker://{source.host}/team0/", f"oci:{full}", "--insecure", source.host).code == 0
    assert batchpush("push", f"oci:{full}", f"{registry.host}/imported/", "--insecure", registry.host).code == 0
    new = put_image(source, tmp_path / "fill", "team0/svc2", "v1", 6)

    # the disk needed, said before anything is written
    run = batchpush("push", "--incremental-from", str(full), f"docker://{source.host}/team0/", f"oci:{delta}", "--insecure", source.host, "--dry-run")
    assert run.code == 0, run.out + run.err
    assert not delta.exists()
    raw = skopeo("inspect", "--raw", "--tls-verify=false", f"docker://{source.host}/team0/svc2:v1").stdout.encode()
    manifest = json.loads(raw)
    own_layer = manifest["layers"][1]
    line = next(line for line in run.out.splitlines() if line.startswith(f"oci:{delta} needs"))
    assert int(line.split()[2]) == len(raw) + manifest["config"]["size"] + own_layer["size"]  # the shared layer is on the last disk

    run = batchpush("push", "--incremental-from", str(full), f"docker://{source.host}/team0/", f"oci:{delta}", "--insecure", source.host)
    assert run.code == 0, run.out + run.err
    # only the new image is listed, and only its new blobs are on the disk
    assert ref_names(delta) == {"svc2:v1": new}
    assert set(blob_files(delta)) == {new, manifest["config"]["digest"], own_layer["digest"]}
    full_index = sha256((full / "index.json").read_bytes())
    assert index_of(delta)["annotations"]["io.batchpush.incremental-from"] == full_index

    # into an empty registry it fails clearly: the base layer is on neither side
    empty = start_registry(str(tmp_path / "empty"))
    try:
        run = batchpush("push", f"oci:{delta}", f"{empty.host}/imported/", "--insecure", empty.host)
        assert run.code == 1
        shared = manifest["layers"][0]["digest"]
        assert shared in run.err and "incremental layout" in run.err
        assert empty.count("PUT", "/manifests/") == 0
    finally:
        empty.stop()
    # into the registry the last disk filled, it arrives whole, digest unchanged
    run = batchpush("push", f"oci:{delta}", f"{registry.host}/imported/", "--insecure", registry.host)
    assert run.code == 0, run.out + run.err
    assert remote_digest(registry, "imported/svc2:v1") == new
    pull_and_verify(registry, "imported/svc2:v1", str(tmp_path / "pulled"))
    assert remote_digest(registry, "imported/svc0:v1") == digests["svc0:v1"]


def test_an_interrupted_export_leaves_a_valid_layout_that_a_rerun_completes(source, front, tmp_path):
    digests = fill_team0(source, tmp_path)
    mirror = tmp_path / "mirror"
    # the own layer of svc1:v2 is held silent: that image cannot finish
    manifest = json.loads(skopeo("inspect", "--raw", "--tls-verify=false", f"docker://{source.host}/team0/svc1:v2").stdout)
    held = manifest["layers"][1]["digest"]
    front.add(Rule("GET", f"/blobs/{held}", "stall", stall_s=BOUND_S))
    command = [sys.executable, "-m", "batchpush", "push", f"docker://{front.host}/team0/", f"oci:{mirror}", "--insecure", front.host, "--metadata-dir", str(tmp_path / "md")]
    run = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + BOUND_S
        finished = [digests["svc0:v1"], digests["svc1:v1"]]
        # the other images are written (their manifests are in the store) and the held read has begun
        while not (all((mirror / "blobs" / "sha256" / d.split(":")[1]).exists() for d in finished) and front.requests("GET", f"/blobs/{held}")):
            assert run.poll() is None and time.monotonic() < deadline, "the export never got that far"
            time.sleep(0.05)
        run.send_signal(signal.SIGINT)
        _, err = run.communicate(timeout=BOUND_S)
    finally:
        if run.poll() is None:
            run.kill()
    assert run.returncode == 130, err
    # a valid layout of what finished: skopeo reads those images out of it
    assert ref_names(mirror) == {"svc0:v1": digests["svc0:v1"], "svc1:v1": digests["svc1:v1"]}
    for name in ("svc0:v1", "svc1:v1"):
        assert layout_digest(mirror, name) == digests[name]
    blob_files(mirror)  # every file there hashes to its name: no partial blob under a digest
    assert not (mirror / ".partial").exists() or not os.listdir(mirror / ".partial")
    before = blob_files(mirror)

    rerun = subprocess.run([*command[:4], f"docker://{source.host}/team0/", f"oci:{mirror}", "--insecure", source.host, *command[8:]], capture_output=True, text=True, timeout=BOUND_S)
    assert rerun.returncode == 0, rerun.stderr
    assert ref_names(mirror) == digests
    assert layout_digest(mirror, "svc1:v2") == digests["svc1:v2"]
    after = blob_files(mirror)
    assert {digest: after[digest] for digest in before} == before


def test_a_corrupted_blob_on_the_medium_fails_the_images_that_use_it(source, registry, tmp_path, batchpush):
    digests = fill_team0(source, tmp_path)
    mirror = tmp_path / "mirror"
    assert batchpush("push", f"docker://{source.host}/team0/", f"oci:{mirror}", "--insecure", source.host).code == 0
    own = layers_of(mirror, digests["svc1:v1"])[1]
    path = mirror / "blobs" / "sha256" / own.split(":")[1]
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, other bytes
    path.write_bytes(bytes(data))
    run = batchpush("push", f"oci:{mirror}", f"{registry.host}/imported/", "--insecure", registry.host)
    assert run.code == 1
    assert own in run.err and str(path) in run.err  # found as it was read, the file named
    assert tags_of(registry, "imported/svc1") == ["v2"]  # no manifest for the image whose blob lies
    assert remote_digest(registry, "imported/svc0:v1") == digests["svc0:v1"]


def test_a_local_source_is_compressed_once_into_the_layout(tmp_path, batchpush):
    """An OCI layout with uncompressed layers (what ``docker save`` style tools write)
    goes into an export under a repository name: its layers gzip-compressed once."""
    local = tmp_path / "local"
    writer = LayoutWriter(str(local))
    descriptor, built = writer.image([layer_tar(BASE_SEED, files=2, file_size=2048), layer_tar(7)])
    writer.tag(descriptor, "1.0")
    mirror = tmp_path / "mirror"
    run = batchpush("push", f"oci:{local}:1.0", f"oci:{mirror}:apps/web")
    assert run.code == 0, run.out + run.err
    names = ref_names(mirror)
    assert list(names) == ["apps/web:1.0"]
    manifest = json.loads((mirror / "blobs" / "sha256" / names["apps/web:1.0"].split(":")[1]).read_bytes())
    assert all(layer["mediaType"].endswith("+gzip") for layer in manifest["layers"])
    out = tmp_path / "out"
    done = skopeo("copy", f"oci:{mirror}:apps/web:1.0", f"oci:{out}:copied")
    assert done.returncode == 0, done.stderr
    config = json.loads((mirror / "blobs" / "sha256" / manifest["config"]["digest"].split(":")[1]).read_bytes())
    assert config["rootfs"]["diff_ids"] == built.diff_ids
    # a layout target naming no repository needs a source that has repository paths
    run = batchpush("push", f"oci:{local}:1.0", f"oci:{mirror}")
    assert run.code != 0 and f"oci:{mirror}:REPOSITORY" in run.err


def test_two_runs_writing_one_layout_at_once_lose_nothing(source, tmp_path):
    """Two exports into one layout at the same time (two processes, one shared base
    layer): every image of both is listed, every blob file hashes to its name."""
    digests = fill_team0(source, tmp_path)
    other = remote_digest(source, "other/x:v1")
    mirror = tmp_path / "mirror"
    commands = [
        [sys.executable, "-m", "batchpush", "push", f"docker://{source.host}/{namespace}/", f"oci:{mirror}", "--insecure", source.host, "--metadata-dir", str(tmp_path / f"md-{namespace}")]
        for namespace in ("team0", "other")
    ]
    runs = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for command in commands]
    try:
        outputs = [run.communicate(timeout=BOUND_S) for run in runs]
    finally:
        for run in runs:
            if run.poll() is None:
                run.kill()
    assert [run.returncode for run in runs] == [0, 0], outputs
    assert ref_names(mirror) == {**digests, "x:v1": other}
    blob_files(mirror)
    for name in [*digests, "x:v1"]:
        assert layout_digest(mirror, name) == ref_names(mirror)[name]


def test_each_flush_merges_with_the_index_as_it_is_then(tmp_path):
    """Two writers of one layout, the second opened before the first wrote its index:
    the second's index keeps the first's entries (re-read under the lock), and its
    own entry of the same name replaces the older one."""
    from batchpush.layout import LayoutWriter as Writer

    first, second = Writer(str(tmp_path / "l")), Writer(str(tmp_path / "l"))
    a = first.put_manifest("svc0", "v1", "application/vnd.oci.image.manifest.v1+json", b'{"a":1}')
    d = first.put_manifest("svc2", "v1", "application/vnd.oci.image.manifest.v1+json", b'{"d":1}')
    b = second.put_manifest("svc1", "v1", "application/vnd.oci.image.manifest.v1+json", b'{"b":1}')
    c = second.put_manifest("svc0", "v1", "application/vnd.oci.image.manifest.v1+json", b'{"c":1}')
    first.close()
    assert ref_names(tmp_path / "l") == {"svc0:v1": str(a), "svc2:v1": str(d)}
    second.close()
    assert ref_names(tmp_path / "l") == {"svc0:v1": str(c), "svc1:v1": str(b), "svc2:v1": str(d)}
    assert sorted(os.listdir(tmp_path / "l")) == ["blobs", "index.json", "oci-layout"]


def test_a_plan_exports_incrementally_and_imports_with_renames_and_tag_selection(source, registry, tmp_path, batchpush):
    """The plan's ``incremental_from`` (a path relative to the plan), and an import
    entry whose ``repositories``, ``rename`` and ``tags`` apply to the layout's
    repositories as to a catalog's."""
    import yaml

    digests = fill_team0(source, tmp_path)
    full = tmp_path / "full"
    assert batchpush("push", f"docker://{source.host}/team0/", f"oci:{full}", "--insecure", source.host).code == 0
    new = put_image(source, tmp_path / "fill", "team0/svc1", "v3", 8)
    plan = tmp_path / "export.yaml"
    plan.write_text(yaml.safe_dump({"version": 1, "incremental_from": "full", "registries": {source.host: {"insecure": True}}, "images": [{"source": f"docker://{source.host}/team0/", "targets": ["oci:delta"]}]}))
    cwd = os.getcwd()
    os.chdir(tmp_path)  # the target's relative DIR is the working directory's; incremental_from the plan's
    try:
        run = batchpush("run", str(plan))
    finally:
        os.chdir(cwd)
    assert run.code == 0, run.out + run.err
    assert ref_names(tmp_path / "delta") == {"svc1:v3": new}

    plan = tmp_path / "import.yaml"
    entry = {"source": f"oci:{full}", "targets": [f"{registry.host}/imported/"], "repositories": "^svc1$", "rename": [{"from": "^svc(\\d)$", "to": "service-\\1"}], "tags": "^v2$"}
    plan.write_text(yaml.safe_dump({"version": 1, "registries": {registry.host: {"insecure": True}}, "images": [entry]}))
    run = batchpush("run", str(plan))
    assert run.code == 0, run.out + run.err
    assert tags_of(registry, "imported/service-1") == ["v2"]
    assert remote_digest(registry, "imported/service-1:v2") == digests["svc1:v2"]
    assert tags_of(registry, "imported/svc0") == []


def test_a_killed_export_leaves_the_index_it_found_and_the_next_run_cleans_up(source, front, tmp_path):
    """SIGKILL mid-export: index.json is the one the run found (nothing it names is
    missing), the killed run's temporary files stay until the next run, which
    removes them and completes the layout."""
    digests = fill_team0(source, tmp_path)
    mirror = tmp_path / "mirror"
    manifest = json.loads(skopeo("inspect", "--raw", "--tls-verify=false", f"docker://{source.host}/team0/svc1:v2").stdout)
    held = manifest["layers"][1]["digest"]
    front.add(Rule("GET", f"/blobs/{held}", "stall", stall_s=BOUND_S))
    md = str(tmp_path / "md")
    command = [sys.executable, "-m", "batchpush", "push", f"docker://{front.host}/team0/", f"oci:{mirror}", "--insecure", front.host, "--metadata-dir", md]
    run = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + BOUND_S
        # the held blob's temporary file is open, waiting for its bytes
        while not any(name.startswith(held.split(":")[1][:16]) for _, _, files in os.walk(mirror / ".partial") for name in files):
            assert run.poll() is None and time.monotonic() < deadline, "the export never got that far"
            time.sleep(0.05)
        run.kill()
        run.communicate(timeout=BOUND_S)
    finally:
        if run.poll() is None:
            run.kill()
    assert ref_names(mirror) == {}  # the index it found: a new layout's, empty
    assert os.listdir(mirror / ".partial")
    blob_files(mirror)
    rerun = subprocess.run([sys.executable, "-m", "batchpush", "push", f"docker://{source.host}/team0/", f"oci:{mirror}", "--insecure", source.host, "--metadata-dir", md], capture_output=True, text=True, timeout=BOUND_S)
    assert rerun.returncode == 0, rerun.stderr
    assert ref_names(mirror) == digests
    assert sorted(os.listdir(mirror)) == ["blobs", "index.json", "oci-layout"]


def test_layout_targets_parse_as_skopeo_names_them(tmp_path):
    from batchpush.errors import ReferenceError_
    from batchpush.reference import is_prefix, parse_prefix, parse_target

    target = parse_target(f"oci:{tmp_path}/m:team0/svc0:v1")
    assert (target.registry, target.repository, target.tag) == (f"oci:{tmp_path}/m", "team0/svc0", "v1")
    assert str(target) == f"oci:{tmp_path}/m:team0/svc0:v1"  # what skopeo copy reads
    assert parse_target("oci:rel:svc0").registry == f"oci:{os.path.abspath('rel')}"
    assert is_prefix(f"oci:{tmp_path}/m") and not is_prefix(f"oci:{tmp_path}/m:svc0")
    assert str(parse_prefix(f"oci:{tmp_path}/m/").join("team0/svc0").with_tag("v1")) == f"oci:{tmp_path}/m:team0/svc0:v1"
    for bad in ("oci::svc0", f"oci:{tmp_path}:Svc0", f"oci:{tmp_path}:svc0:-v1"):
        with pytest.raises(ReferenceError_):
            parse_target(bad)


def test_writers_made_at_once_keep_their_directories(tmp_path):
    """Writers of one layout made by racing threads (the engine's first images ask
    for it at once): none removes another's temporary directory as left behind by a
    killed run, each can write; one left by a dead run (unlocked) is removed."""
    import threading

    from batchpush.layout import LayoutWriter as Writer

    layout = tmp_path / "l"
    (layout / ".partial" / "run-dead").mkdir(parents=True)
    (layout / ".partial" / "run-dead" / "half-a-blob").write_bytes(b"x")
    writers: list[Writer] = []
    errors: list[BaseException] = []

    def make() -> None:
        try:
            writers.append(Writer(str(layout)))
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=make) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(BOUND_S)
    assert errors == [] and len(writers) == 8
    assert not (layout / ".partial" / "run-dead").exists()
    for i, writer in enumerate(writers):
        writer.put_manifest(f"svc{i}", "v1", "application/vnd.oci.image.manifest.v1+json", b'{"n":%d}' % i)
        writer.close()
    assert len(ref_names(layout)) == 8
    assert sorted(os.listdir(layout)) == ["blobs", "index.json", "oci-layout"]


def test_a_target_layout_whose_index_is_not_json_is_left_as_it_is(source, tmp_path, batchpush):
    fill_team0(source, tmp_path)
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    (mirror / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    (mirror / "index.json").write_text("{not json")
    run = batchpush("push", f"docker://{source.host}/team0/", f"oci:{mirror}", "--insecure", source.host)
    assert run.code == 1
    assert f"{mirror}/index.json" in run.err and "left as it is" in run.err
    assert (mirror / "index.json").read_text() == "{not json"
    assert not list((mirror / "blobs" / "sha256").iterdir())


def test_an_index_that_cannot_be_written_at_the_end_fails_the_images_that_went_there(source, tmp_path, metadata_dir):
    """The index is spoilt by someone else while the export runs: it cannot be
    merged, so it is left as it is and every image written to that layout fails
    (nothing on the disk names it); the run does not end well."""
    import batchpush
    from batchpush.engine import PushJob, PushOptions
    from batchpush.registry.client import RegistryOptions

    fill_team0(source, tmp_path)
    mirror = tmp_path / "mirror"

    def spoil(_result: object) -> None:
        (mirror / "index.json").write_text("{spoilt")

    options = PushOptions(registries={source.host: RegistryOptions(insecure=True)}, metadata_dir=metadata_dir)
    result = batchpush.run([PushJob(f"docker://{source.host}/team0/", (f"oci:{mirror}",))], options, on_image=spoil)
    assert result.exit_code == 1
    assert len(result.images) == 3 and all(image.status == "failed" and "index was not written" in (image.error or "") for image in result.images)
    assert (mirror / "index.json").read_text() == "{spoilt"


def test_a_layout_target_on_a_cluster_is_a_usage_error(tmp_path):
    """Each worker would write a layout on its own disk and none the whole index:
    refused before any connection, naming the target."""
    import subprocess
    import sys

    out = tmp_path / "disk"
    done = subprocess.run([sys.executable, "-m", "batchpush", "push", "docker://127.0.0.1:9/team0/", f"oci:{out}", "--scheduler", "tcp://127.0.0.1:9"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2, done.stderr
    assert f"oci:{out}" in done.stderr and "--scheduler" in done.stderr
    assert not out.exists()


#: another process holding a layout's lock until a line comes on its stdin
LOCK_HOLDER = "import fcntl, os, sys; fd = os.open(sys.argv[1], os.O_RDONLY | os.O_DIRECTORY); fcntl.flock(fd, fcntl.LOCK_EX); print('held', flush=True); sys.stdin.readline()"


def hold_lock(layout: Path) -> subprocess.Popen[str]:
    """A process holding ``layout``'s lock (as a batchpush run stuck, or stopped with SIGSTOP, holds it)."""
    layout.mkdir(parents=True, exist_ok=True)
    holder = subprocess.Popen([sys.executable, "-c", LOCK_HOLDER, str(layout)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert holder.stdout is not None and holder.stdout.readline() == "held\n"
    return holder


def release_lock(holder: subprocess.Popen[str]) -> None:
    if holder.poll() is None:
        holder.communicate("\n", timeout=BOUND_S)


def test_a_layout_whose_lock_another_process_keeps_fails_its_images_with_one_line(tmp_path):
    """Another process holds the layout's lock for good: the export gives up at its
    bound (lowered here) with one line naming the layout and the lock, exit 1,
    and writes nothing into it (no blob, no entry, no temporary file): a blocking
    ``flock`` waited for ever, Ctrl-C or not."""
    local = tmp_path / "local"
    simple_layout(str(local), {"1.0": [BASE_SEED, 7]})
    mirror = tmp_path / "mirror"
    holder = hold_lock(mirror)
    try:
        env = dict(os.environ, BATCHPUSH_LAYOUT_LOCK_WAIT_S="1")
        run = subprocess.run([sys.executable, "-m", "batchpush", "push", f"oci:{local}:1.0", f"oci:{mirror}:apps/web", "--metadata-dir", str(tmp_path / "md")],
                             capture_output=True, text=True, timeout=BOUND_S, env=env)
    finally:
        release_lock(holder)
    assert run.returncode == 1, run.stderr
    assert f"{mirror}: another process holds the layout's lock, waited for 1 s" in run.stderr, run.stderr
    assert ref_names(mirror) == {} and blob_files(mirror) == {}
    assert sorted(os.listdir(mirror)) == ["blobs", "index.json", "oci-layout"]


def test_a_layout_that_could_not_be_opened_fails_the_next_images_at_once(tmp_path):
    """Three images, one at a time, to a layout whose lock another process keeps:
    the first waits its bound and fails; the next fail with the same line at once,
    without waiting for the lock again (one wait, not one per image)."""
    local = tmp_path / "local"
    simple_layout(str(local), {"1.0": [BASE_SEED, 7], "1.1": [BASE_SEED, 8], "1.2": [BASE_SEED, 9]})
    mirror = tmp_path / "mirror"
    holder = hold_lock(mirror)
    try:
        env = dict(os.environ, BATCHPUSH_LAYOUT_LOCK_WAIT_S="2")
        run = subprocess.run([sys.executable, "-m", "batchpush", "push", f"oci:{local}", f"oci:{mirror}:apps/web", "--max-concurrent-images", "1", "--metadata-dir", str(tmp_path / "md")],
                             capture_output=True, text=True, timeout=BOUND_S, env=env)
    finally:
        release_lock(holder)
    assert run.returncode == 1, run.stderr
    assert run.stderr.count("waiting for it up to") == 1, run.stderr
    assert run.stderr.count(f"{mirror}: another process holds the layout's lock, waited for 2 s") == 3, run.stderr
    assert ref_names(mirror) == {} and blob_files(mirror) == {}


def test_a_layout_lock_let_go_within_the_bound_is_waited_for(tmp_path):
    """Another process holds the layout's lock for a while: the export says it waits
    for it, naming the layout, and once the lock is let go writes the image whole."""
    local = tmp_path / "local"
    simple_layout(str(local), {"1.0": [BASE_SEED, 7]})
    mirror = tmp_path / "mirror"
    holder = hold_lock(mirror)
    err = tmp_path / "err"
    try:
        with open(err, "w") as stderr:
            run = subprocess.Popen([sys.executable, "-m", "batchpush", "push", f"oci:{local}:1.0", f"oci:{mirror}:apps/web", "--metadata-dir", str(tmp_path / "md")],
                                   stdout=subprocess.PIPE, stderr=stderr, text=True)
        try:
            deadline = time.monotonic() + BOUND_S
            while f"{mirror}: another process holds the layout's lock; waiting for it" not in err.read_text():
                assert run.poll() is None and time.monotonic() < deadline, f"the export never said it waits: {err.read_text()}"
                time.sleep(0.05)
            release_lock(holder)
            run.communicate(timeout=BOUND_S)
        finally:
            if run.poll() is None:
                run.kill()
    finally:
        release_lock(holder)
    assert run.returncode == 0, err.read_text()
    names = ref_names(mirror)
    assert list(names) == ["apps/web:1.0"]
    assert layout_digest(mirror, "apps/web:1.0") == names["apps/web:1.0"]
    blob_files(mirror)


def test_a_cancelled_run_waits_for_the_layout_lock_only_its_grace(tmp_path, monkeypatch):
    """A writer whose run is cancelled (Ctrl-C) writes its index on the way out; if
    another process keeps the layout's lock, that wait ends after a short grace
    with Cancelled, however long the bound (an hour here), and the index is left
    as it was. A blocking ``flock`` waited for ever, and in the main thread a
    Ctrl-C did not end it (Python tries ``flock`` again after the handler)."""
    import threading

    from batchpush.errors import Cancelled
    from batchpush.layout import LayoutWriter as Writer

    monkeypatch.setenv("BATCHPUSH_LAYOUT_LOCK_WAIT_S", "3600")
    mirror = tmp_path / "mirror"
    writer = Writer(str(mirror))
    writer.put_manifest("svc0", "v1", "application/vnd.oci.image.manifest.v1+json", b'{"a":1}')
    holder = hold_lock(mirror)
    raised: list[BaseException] = []

    def flush() -> None:
        try:
            writer.flush()
        except BaseException as exc:
            raised.append(exc)

    try:
        writer.cancel.set()
        flushing = threading.Thread(target=flush, daemon=True)
        flushing.start()
        flushing.join(BOUND_S)
        assert not flushing.is_alive(), "the wait for the lock did not end after the cancel"
    finally:
        release_lock(holder)
    assert len(raised) == 1 and isinstance(raised[0], Cancelled) and str(mirror) in str(raised[0]), raised
    assert ref_names(mirror) == {}
    writer.discard()
