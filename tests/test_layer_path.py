"""The seed's layer path across runs, against the real registry: persistent
metadata, mounts between repositories, stale entries, credentials' HMACs."""

from __future__ import annotations

import json
import re
import subprocess
import sys

from conftest import pull_and_verify
from images import LayoutWriter, layer_tar

import batchpush
from batchpush.digest import Digest
from batchpush.engine import PushOptions
from batchpush.metadata import MetadataStore
from batchpush.registry.auth import Credentials


def three_tier_layout(path: str) -> list[str]:
    """One image with a small (<100 KiB), a middle and a large (>10 MiB) layer."""
    writer = LayoutWriter(path)
    layers = [layer_tar(1, files=2, file_size=20_000), layer_tar(2, files=4, file_size=500_000), layer_tar(3, files=6, file_size=2_000_000)]
    descriptor, image = writer.image(layers)
    writer.tag(descriptor, "1.0")
    return image.diff_ids


def push_in_new_process(source: str, target: str, registry_host: str, metadata_dir: str, report: str) -> dict:
    done = subprocess.run(
        [sys.executable, "-m", "batchpush", "push", source, target, "--insecure", registry_host, "--metadata-dir", metadata_dir, "--report", report],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    with open(report) as f:
        return json.load(f)


def test_second_repository_mounts_every_layer_and_compresses_nothing(registry, tmp_path, metadata_dir):
    diff_ids = three_tier_layout(str(tmp_path / "layout"))
    source = f"oci:{tmp_path}/layout"
    first = push_in_new_process(source, f"{registry.host}/a/x", registry.host, metadata_dir, str(tmp_path / "r1.json"))
    assert [layer["outcome"] for layer in first["images"][0]["layers"]] == ["uploaded"] * 3
    assert first["totals"]["bytes_compressed"] > 0

    second = push_in_new_process(source, f"{registry.host}/b/y", registry.host, metadata_dir, str(tmp_path / "r2.json"))
    layers = second["images"][0]["layers"]
    assert [layer["outcome"] for layer in layers] == ["mounted"] * 3
    assert {layer["mounted_from"] for layer in layers} == {"a/x"}
    assert second["totals"]["bytes_compressed"] == 0  # nothing recompressed: fingerprints
    assert second["images"][0]["digest"] == first["images"][0]["digest"]
    # the registry's own log: no blob data reached b/y, only mounts
    assert registry.count("PATCH", "/v2/b/y/blobs/") == 0
    assert registry.count("PUT", "/v2/b/y/blobs/") == 0
    assert registry.count("POST", "/v2/b/y/blobs/uploads/?mount=") == 4  # three layers and the config
    assert pull_and_verify(registry, "b/y:1.0", str(tmp_path / "pulled"))[0].diff_ids == diff_ids


def test_registry_that_lost_its_storage(registry, tmp_path, metadata_dir):
    diff_ids = three_tier_layout(str(tmp_path / "layout"))
    source = f"oci:{tmp_path}/layout"
    push_in_new_process(source, f"{registry.host}/a/x", registry.host, metadata_dir, str(tmp_path / "r1.json"))
    registry.restart(wipe=True)

    # to a new repository: the mounts from a/x fail, the candidates are removed, layers uploaded
    again = push_in_new_process(source, f"{registry.host}/b/y", registry.host, metadata_dir, str(tmp_path / "r2.json"))
    assert [layer["outcome"] for layer in again["images"][0]["layers"]] == ["uploaded"] * 3
    assert again["totals"]["bytes_compressed"] > 0  # compressed on demand, verified against the fingerprint
    assert pull_and_verify(registry, "b/y:1.0", str(tmp_path / "pulled-b"))[0].diff_ids == diff_ids
    store = MetadataStore(metadata_dir)
    for diff_id in diff_ids:
        repositories = {e.source_repository for e in store.get_metadata(Digest.parse(diff_id))}
        assert repositories == {f"{registry.host}/b/y"}, "stale a/x entries must be gone"

    # to the same repository again after another loss: the existence check says
    # blob-unknown, which removes the target's own entry
    registry.restart(wipe=True)
    third = push_in_new_process(source, f"{registry.host}/b/y", registry.host, metadata_dir, str(tmp_path / "r3.json"))
    assert [layer["outcome"] for layer in third["images"][0]["layers"]] == ["uploaded"] * 3
    assert pull_and_verify(registry, "b/y:1.0", str(tmp_path / "pulled-b2"))[0].diff_ids == diff_ids
    for diff_id in diff_ids:
        assert len(store.get_metadata(Digest.parse(diff_id))) == 1  # only the fresh entry


def mount_sources(registry, repository: str) -> list[str]:
    """The ``from=`` of every mount request into ``repository``, in order, from the registry's log."""
    pattern = re.compile(rf'"POST /v2/{re.escape(repository)}/blobs/uploads/\?mount=[^&]+&from=([^ &"]+)')
    return [match.group(1) for line in registry.access_log() if (match := pattern.search(line))]


def test_candidates_of_the_current_credentials_come_first(token_registry, tmp_path, metadata_dir):
    registry, issuer = token_registry
    writer = LayoutWriter(str(tmp_path / "layout"))
    descriptor, image = writer.image([layer_tar(5), layer_tar(6)])
    writer.tag(descriptor, "1.0")
    source = f"oci:{tmp_path}/layout"
    alice = Credentials("alice", "alice-secret-pw")
    bob = Credentials("bob", "bob-secret-pw")

    def push_as(who: Credentials, repository: str) -> batchpush.BatchResult:
        options = PushOptions(insecure_hosts=frozenset({registry.host}), metadata_dir=metadata_dir, credentials=lambda host: who)
        result = batchpush.push(source, [f"{registry.host}/{repository}"], options)
        assert result.ok, result.images[0].error
        return result

    push_as(alice, "a/x")
    bob_first = push_as(bob, "b/y")  # mounts from a/x; recorded under bob's HMAC, younger
    assert [layer.outcome.value for layer in bob_first.images[0].layers] == ["mounted", "mounted"]

    push_as(alice, "c/z")
    push_as(bob, "d/w")
    # a/x is older than b/y and shares no path with either target: only the HMAC
    # (who pushed it) puts it first for alice, and b/y first for bob
    assert mount_sources(registry, "c/z") == ["a/x"] * 3
    assert mount_sources(registry, "d/w") == ["b/y"] * 3
    for repository in ("c/z", "d/w"):
        assert pull_and_verify(registry, f"{repository}:1.0", str(tmp_path / repository.replace("/", "-")))[0].diff_ids == image.diff_ids
    assert {"alice", "bob"} <= {r["subject"] for r in issuer.requests}  # (skopeo's pulls are anonymous)


def test_two_runs_at_once_share_the_store(registry, tmp_path, metadata_dir):
    three_tier_layout(str(tmp_path / "layout"))
    runs = [
        subprocess.Popen(
            [sys.executable, "-m", "batchpush", "push", f"oci:{tmp_path}/layout", f"{registry.host}/cron/{name}", "--insecure", registry.host, "--metadata-dir", metadata_dir, "-q"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for name in ("one", "two", "three")
    ]
    for run in runs:
        _, err = run.communicate(timeout=300)
        assert run.returncode == 0, err
    store = MetadataStore(metadata_dir)
    assert store._db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    for name in ("one", "two", "three"):
        pull_and_verify(registry, f"cron/{name}:1.0", str(tmp_path / name))


def test_a_rerun_reads_no_layer_and_a_changed_file_is_caught_when_uploaded(registry, tmp_path, metadata_dir):
    """A layer declaring a digest the store learned is prepared without reading it
    (a cron re-run costs the same whatever the layers' size); the bytes are read and
    checked only if they must be uploaded, and a file that no longer matches its
    digest is then refused, naming it, with no manifest written."""
    three_tier_layout(str(tmp_path / "layout"))
    source = f"oci:{tmp_path}/layout"
    push_in_new_process(source, f"{registry.host}/a/x", registry.host, metadata_dir, str(tmp_path / "r1.json"))

    again = push_in_new_process(source, f"{registry.host}/a/x", registry.host, metadata_dir, str(tmp_path / "r2.json"))
    assert again["images"][0]["status"] == "up-to-date"
    assert again["totals"]["bytes_read"] == 0

    # the largest layer's file changes, same size; the registry loses everything
    largest = max((tmp_path / "layout" / "blobs" / "sha256").iterdir(), key=lambda p: p.stat().st_size)
    data = bytearray(largest.read_bytes())
    data[-2000] ^= 0xFF
    largest.write_bytes(bytes(data))
    registry.restart(wipe=True)
    before = len(registry.access_log())
    done = subprocess.run(
        [sys.executable, "-m", "batchpush", "push", source, f"{registry.host}/a/x", "--insecure", registry.host, "--metadata-dir", metadata_dir],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 1
    assert largest.name in done.stderr
    assert not [line for line in registry.access_log()[before:] if '"PUT ' in line and "/manifests/" in line]
