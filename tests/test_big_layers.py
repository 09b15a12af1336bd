"""Big layers: sent while they are compressed, a bounded spool, resumed without one.

Layers of a few blocks (the recipe's block is 16 MiB) reach every path a multi-GB
layer takes; bench/ measures the multi-GB ones. Everything goes to the real
registry, faults come from our proxy in front of it, and skopeo reads each image
back to its DiffIDs.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import threading

import pytest
from conftest import pull_and_verify
from fault_proxy import FaultProxy, Rule
from images import LayoutWriter, random_layer
from registry import start_registry

import batchpush
from batchpush.compress import BLOCK_BYTES
from batchpush.engine import Engine, PushJob, PushOptions
from batchpush.errors import SourceError
from batchpush.prepare import Preparer
from batchpush.registry.client import RegistryOptions
from batchpush.report import BatchResult
from batchpush.sources.base import SourceLayer

#: three blocks of the recipe: the smallest layer that streams in several pieces
LAYER_BYTES = 2 * BLOCK_BYTES + (3 << 20)


@pytest.fixture
def proxy(registry):
    started = FaultProxy(registry.host)
    yield started
    started.stop()


def layout(path: str, seeds: list[int], size: int = LAYER_BYTES) -> dict[str, list[str]]:
    """One image per seed, tagged ``v<seed>``, each of one incompressible layer."""
    writer = LayoutWriter(path)
    diff_ids = {}
    for seed in seeds:
        descriptor, image = writer.image([random_layer(seed, size)])
        writer.tag(descriptor, f"v{seed}")
        diff_ids[f"v{seed}"] = image.diff_ids
    return diff_ids


class SpoolWatch:
    """The bytes in a spool directory, measured on disk every few ms while a run goes."""

    def __init__(self, directory: str) -> None:
        self.directory = directory
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def _watch(self) -> None:
        while not self._stop.wait(0.005):
            total = 0
            for root, _, files in os.walk(self.directory):
                for name in files:
                    try:
                        total += os.stat(os.path.join(root, name)).st_size
                    except OSError:
                        pass
            self.peak = max(self.peak, total)

    def __enter__(self) -> SpoolWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)


def options(host: str, metadata_dir: str, spool_dir: str, spool_limit: int, **extra: object) -> PushOptions:
    registries = {h: RegistryOptions(insecure=True) for h in (host if isinstance(host, tuple) else (host,))}
    return PushOptions(registries=registries, metadata_dir=metadata_dir, spool_dir=spool_dir, spool_limit=spool_limit, jobs=2, **extra)  # type: ignore[arg-type]


def run_within(push_options: PushOptions, source: str, target: str, seconds: float) -> BatchResult:
    """The run's result; cancelled (and the test failed) if it has not ended within
    ``seconds``: a run that waits for ever would otherwise hold the suite."""
    results: list[BatchResult] = []
    with Engine(push_options) as engine:
        running = threading.Thread(target=lambda: results.append(engine.run([PushJob(source, (target,))])), daemon=True)
        running.start()
        running.join(seconds)
        if running.is_alive():
            engine.cancel()
            running.join(30)
            pytest.fail(f"the run did not end within {seconds:.0f} s: {[(image.target, image.error) for image in results[0].images] if results else 'no result'}")
    return results[0]


def test_a_new_layer_is_sent_while_it_is_compressed_and_never_compressed_twice(registry, proxy, tmp_path, metadata_dir):
    """A spool far smaller than the layer: it is not kept, yet it is compressed once,
    its bytes going to the registry in PATCH chunks as the blocks come, and the commit
    is a bodiless PUT."""
    diff_ids = layout(str(tmp_path / "layout"), [1])
    spool = tmp_path / "spool"
    spool.mkdir()
    with SpoolWatch(str(spool)) as watch:
        result = batchpush.push(f"oci:{tmp_path}/layout:v1", [f"{proxy.host}/big/one:v1"], options(proxy.host, metadata_dir, str(spool), 1 << 20))
    assert result.ok, result.images[0].error
    layer = result.images[0].layers[0]
    assert result.bytes_compressed == layer.size  # compressed once: no spool, no second compression
    patches = proxy.requests("PATCH", "/v2/big/one/blobs/uploads/")
    assert patches and proxy.body_bytes("PATCH", "/v2/big/one/blobs/uploads/") == layer.size
    assert proxy.body_bytes("PUT", "/v2/big/one/blobs/uploads/") < 4096  # the commit (and the config) only
    assert result.spool_peak_bytes <= 1 << 20 and watch.peak <= 1 << 20
    assert pull_and_verify(registry, "big/one:v1", str(tmp_path / "pulled"))[0].diff_ids == diff_ids["v1"]


def test_a_streamed_layer_goes_in_patches_no_smaller_than_the_registry_minimum(registry, proxy, tmp_path, metadata_dir):
    """A registry that asks for a minimum chunk (``OCI-Chunk-Min-Length``) above
    ``--chunk-size``: every PATCH of the stream but the last is at least that long."""
    diff_ids = layout(str(tmp_path / "layout"), [1])
    minimum = 9 << 20
    proxy.add(Rule("POST", "/blobs/uploads/", "headers", headers={"OCI-Chunk-Min-Length": str(minimum)}, times=-1))
    spool = tmp_path / "spool"
    spool.mkdir()
    push_options = PushOptions(registries={proxy.host: RegistryOptions(insecure=True, chunk_size_bytes=1 << 20)}, metadata_dir=metadata_dir, spool_dir=str(spool), spool_limit=1 << 20, jobs=2)
    result = batchpush.push(f"oci:{tmp_path}/layout:v1", [f"{proxy.host}/big/minimum:v1"], push_options)
    assert result.ok, result.images[0].error
    layer = result.images[0].layers[0]
    # the config goes in a PATCH too (the registry asks for chunks): the layer's are the big ones
    patches = [patch for patch in proxy.requests("PATCH", "/v2/big/minimum/blobs/uploads/") if patch.body_bytes > 4096]
    assert sum(patch.body_bytes for patch in patches) == layer.size and result.bytes_compressed == layer.size  # the stream
    assert len(patches) >= 2 and all(patch.body_bytes >= minimum for patch in patches[:-1]), [patch.body_bytes for patch in patches]
    assert pull_and_verify(registry, "big/minimum:v1", str(tmp_path / "pulled"))[0].diff_ids == diff_ids["v1"]


def test_an_image_failing_while_its_layer_streams_leaves_no_claim_for_the_next(registry, tmp_path, metadata_dir, monkeypatch):
    """Image ``a``: a new layer of five blocks, sent while it is compressed, and a
    small layer whose first look fails at once (as a file that cannot be read, or a
    store that errs): ``a`` fails before it knows its layers, while the big one goes
    on streaming. That stream, done after ``a`` ended, must not keep the blob's
    staging claim (``a`` will never commit it): image ``b``, next, holds the same
    big layer and arrives, instead of waiting on the claim until the run is stopped
    (here: 60 s, then the test fails)."""
    path = tmp_path / "layout"
    writer = LayoutWriter(str(path))
    big, small = random_layer(7, 5 * BLOCK_BYTES), random_layer(8, 64 << 10)
    a, _ = writer.image([big, small])
    writer.tag(a, "a")
    b, built = writer.image([big])
    writer.tag(b, "b")
    unreadable = f"sha256:{hashlib.sha256(small).hexdigest()}"
    declared = Preparer._declared

    def first_look(self: Preparer, layer: SourceLayer) -> object:
        if str(layer.descriptor.digest) == unreadable:
            raise SourceError(layer.blob.path if layer.blob else unreadable, "cannot be read (injected)")
        return declared(self, layer)

    monkeypatch.setattr(Preparer, "_declared", first_look)
    push_options = PushOptions(registries={registry.host: RegistryOptions(insecure=True)}, metadata_dir=metadata_dir, spool_dir=str(tmp_path), spool_limit=1 << 20, jobs=2, max_concurrent_images=1)
    result = run_within(push_options, f"oci:{path}", f"{registry.host}/claims/app", 60)
    statuses = {image.target.rsplit(":", 1)[1]: image.status for image in result.images}
    assert statuses == {"a": "failed", "b": "pushed"}, [(image.target, image.error) for image in result.images]
    assert registry.count("PUT", "/manifests/a") == 0
    assert pull_and_verify(registry, "claims/app:b", str(tmp_path / "pulled"))[0].diff_ids == built.diff_ids


def test_streams_never_wait_for_a_request_slot_another_stream_holds(registry, tmp_path, metadata_dir):
    """One request in flight to the registry, two images of a new seven-block layer
    each, compressed at once: a stream holds its request slot from start to end or
    does not go (that layer goes the usual way, compressed again as it is sent). A
    stream waiting for the slot while the other's body waits on blocks its own
    compression holds would never end."""
    diff_ids = layout(str(tmp_path / "layout"), [11, 12], size=7 * BLOCK_BYTES)
    push_options = PushOptions(registries={registry.host: RegistryOptions(insecure=True, max_requests_in_flight=1)}, metadata_dir=metadata_dir, spool_dir=str(tmp_path), spool_limit=1 << 20, jobs=2)
    result = run_within(push_options, f"oci:{tmp_path}/layout", f"{registry.host}/big/slots", 90)
    assert result.ok, [image.error for image in result.images if not image.ok]
    for seed in (11, 12):
        assert pull_and_verify(registry, f"big/slots:v{seed}", str(tmp_path / f"pulled{seed}"))[0].diff_ids == diff_ids[f"v{seed}"]


def test_a_spool_smaller_than_the_batch_holds_every_image_within_its_limit(registry, tmp_path, metadata_dir):
    """Six images of one incompressible layer each, a spool that holds one: every
    image arrives, and the spool's files never take more than the limit (measured on
    disk while the run goes)."""
    seeds = list(range(1, 7))
    diff_ids = layout(str(tmp_path / "layout"), seeds)
    spool = tmp_path / "spool"
    spool.mkdir()
    limit = LAYER_BYTES + (1 << 20)
    with SpoolWatch(str(spool)) as watch:
        result = batchpush.push(f"oci:{tmp_path}/layout", [f"{registry.host}/big/batch"], options(registry.host, metadata_dir, str(spool), limit))
    assert result.ok, [image.error for image in result.images if not image.ok]
    assert len(result.images) == len(seeds)
    compressed = sum(image.layers[0].size for image in result.images)
    assert compressed > 2 * limit  # the batch's compressed bytes are well over the limit
    assert 0 < result.spool_peak_bytes <= limit and watch.peak <= limit, (result.spool_peak_bytes, watch.peak, limit)
    assert os.listdir(spool) == []  # the run's spool is gone
    for seed in (1, 6):
        assert pull_and_verify(registry, f"big/batch:v{seed}", str(tmp_path / f"pulled{seed}"))[0].diff_ids == diff_ids[f"v{seed}"]


def test_a_layer_larger_than_the_spool_goes_to_two_registries_from_one_compression(registry, tmp_path, metadata_dir):
    second = start_registry(str(tmp_path / "second"))
    try:
        diff_ids = layout(str(tmp_path / "layout"), [3])
        spool = tmp_path / "spool"
        spool.mkdir()
        targets = [f"{registry.host}/big/a:v3", f"{second.host}/big/b:v3", f"{second.host}/big/c:v3"]
        result = batchpush.push(f"oci:{tmp_path}/layout:v3", targets, options((registry.host, second.host), metadata_dir, str(spool), 4 << 20))
        assert result.ok, [image.error for image in result.images if not image.ok]
        layer = result.images[0].layers[0].size
        assert result.bytes_compressed == layer  # one compression, sent to both registries as it went
        outcomes = sorted(image.layers[0].outcome.value for image in result.images)
        assert outcomes.count("mounted") == 1 and outcomes.count("uploaded") == 2, outcomes  # big/c mounts from big/b
        assert second.count("PATCH") >= 1 and registry.count("PATCH") >= 1
        assert pull_and_verify(registry, "big/a:v3", str(tmp_path / "pa"))[0].diff_ids == diff_ids["v3"]
        assert pull_and_verify(second, "big/b:v3", str(tmp_path / "pb"))[0].diff_ids == diff_ids["v3"]
        assert pull_and_verify(second, "big/c:v3", str(tmp_path / "pc"))[0].diff_ids == diff_ids["v3"]
    finally:
        second.stop()


def test_a_stream_broken_mid_layer_resumes_from_the_registry_offset(registry, proxy, tmp_path, metadata_dir):
    """The layer streams in PATCHes of --chunk-size (a block here); the second breaks
    half-way behind a buffering proxy (nginx's default), so the registry keeps the
    session and the first PATCH. Nothing of the stream is held: the layer push asks
    the registry where it is and goes on from that offset in the same session, the
    bytes made again from the source by compressing from the block that holds it,
    not from the start."""
    diff_ids = layout(str(tmp_path / "layout"), [4])
    spool = tmp_path / "spool"
    spool.mkdir()
    proxy.add(Rule("PATCH", "/v2/big/resumed/blobs/uploads/", "reset_buffered", after_body_bytes=BLOCK_BYTES // 2, skip=1))
    registries = {proxy.host: RegistryOptions(insecure=True, chunk_size_bytes=BLOCK_BYTES)}
    result = batchpush.push(f"oci:{tmp_path}/layout:v4", [f"{proxy.host}/big/resumed:v4"], PushOptions(registries=registries, metadata_dir=metadata_dir, spool_dir=str(spool), spool_limit=1 << 20, jobs=2))
    assert result.ok, result.images[0].error
    layer = result.images[0].layers[0].size
    assert [s.action for s in proxy.requests("PATCH")].count("reset_buffered") == 1
    status = [s for s in proxy.requests("GET", "/v2/big/resumed/blobs/uploads/") if s.status == 204]
    assert status, "the upload asked the registry where it was, and the session was there"
    assert len(proxy.requests("POST", "/v2/big/resumed/blobs/uploads/")) == 2  # the layer's one session and the config's
    # the first block was not made again: the resume began at the block that holds the offset
    assert layer + BLOCK_BYTES // 2 < result.bytes_compressed <= 2 * layer - BLOCK_BYTES // 2, (layer, result.bytes_compressed)
    assert proxy.body_bytes("PATCH", "/v2/big/resumed/blobs/uploads/") < 2 * layer - BLOCK_BYTES // 2
    assert pull_and_verify(registry, "big/resumed:v4", str(tmp_path / "pulled"))[0].diff_ids == diff_ids["v4"]


def test_a_layer_not_kept_is_compressed_again_from_the_block_where_its_upload_broke(registry, proxy, tmp_path, metadata_dir):
    """The cron path: a re-run whose store knows the layer, after the registry lost it.
    The layer is compressed again for its upload (the spool cannot keep it), and a
    chunk that breaks is resumed from the registry's offset, the bytes made again from
    the block that holds it: one session, less than the layer sent twice."""
    diff_ids = layout(str(tmp_path / "layout"), [5])
    spool = tmp_path / "spool"
    spool.mkdir()
    source, target = f"oci:{tmp_path}/layout:v5", f"{proxy.host}/big/again:v5"
    assert batchpush.push(source, [target], options(proxy.host, metadata_dir, str(spool), 1 << 20)).ok
    registry.restart(wipe=True)
    with proxy.lock:
        proxy.seen.clear()
    proxy.add(Rule("PATCH", "/v2/big/again/blobs/uploads/", "reset_buffered", after_body_bytes=BLOCK_BYTES + (BLOCK_BYTES // 2), skip=0))
    chunked = {proxy.host: RegistryOptions(insecure=True, monolithic_limit_bytes=BLOCK_BYTES, chunk_size_bytes=2 * BLOCK_BYTES)}
    result = batchpush.push(source, [target], PushOptions(registries=chunked, metadata_dir=metadata_dir, spool_dir=str(spool), spool_limit=1 << 20, jobs=2))
    assert result.ok, result.images[0].error
    layer = result.images[0].layers[0].size
    assert result.images[0].layers[0].outcome.value == "uploaded"
    assert [s.action for s in proxy.requests("PATCH")].count("reset_buffered") == 1
    assert proxy.requests("GET", "/v2/big/again/blobs/uploads/"), "the upload asked the registry where it was"
    sessions = proxy.requests("POST", "/v2/big/again/blobs/uploads/")
    assert len([s for s in sessions if s.status == 202]) <= 2, [(s.target, s.status) for s in sessions]  # the layer's (one) and the config's
    assert proxy.body_bytes("PATCH", "/v2/big/again/blobs/uploads/") < 2 * layer
    # compressed again for the upload, and from the broken block on for the resume: not three times
    assert layer < result.bytes_compressed < 2 * layer + 2 * BLOCK_BYTES
    assert pull_and_verify(registry, "big/again:v5", str(tmp_path / "pulled"))[0].diff_ids == diff_ids["v5"]


@pytest.fixture
def small_tmpfs(tmp_path):
    """A 40 MiB tmpfs: a small disk (CI runs as root)."""
    mount = tmp_path / "small"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=40m", "tmpfs", str(mount)], capture_output=True, text=True)
    assert done.returncode == 0, f"mounting a tmpfs needs root: {done.stderr}"
    yield mount
    subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def test_a_full_disk_loses_only_the_spool_never_an_image(registry, small_tmpfs, tmp_path, metadata_dir):
    """A spool limit the disk cannot honour (another process filled it): ENOSPC while
    keeping a layer drops that layer from the spool, and every image still arrives,
    with no traceback and no 'unexpected' line."""
    seeds = [1, 2, 3, 4]
    # one block each: not streamed while compressed, so the spool keeps them
    diff_ids = layout(str(tmp_path / "layout"), seeds, size=12 << 20)
    filler = small_tmpfs / "filler"
    filler.write_bytes(b"\0" * (12 << 20))  # someone else's file
    report = tmp_path / "report.json"
    done = subprocess.run(
        [sys.executable, "-m", "batchpush", "push", f"oci:{tmp_path}/layout", f"{registry.host}/big/full", "--insecure", registry.host,
         "--spool-dir", str(small_tmpfs), "--spool-limit", "1G", "--metadata-dir", metadata_dir, "--report", str(report)],
        capture_output=True, text=True, timeout=110,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Traceback" not in done.stderr and "unexpected" not in (done.stdout + done.stderr).lower()
    totals = json.loads(report.read_text())["totals"]
    assert totals["failed"] == 0 and totals["layers_not_kept"] >= 1, totals
    assert filler.stat().st_size == 12 << 20 and sorted(os.listdir(small_tmpfs)) == ["filler"]
    for seed in seeds:
        assert pull_and_verify(registry, f"big/full:v{seed}", str(tmp_path / f"pulled{seed}"))[0].diff_ids == diff_ids[f"v{seed}"]


def test_a_spool_dir_that_cannot_be_written_is_a_usage_error(tmp_path, metadata_dir):
    done = subprocess.run([sys.executable, "-m", "batchpush", "push", "oci:/nonexistent:v1", "127.0.0.1:9/x", "--spool-dir", str(tmp_path / "missing"), "--metadata-dir", metadata_dir], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "spool directory" in done.stderr and str(tmp_path / "missing") in done.stderr, done.stderr
