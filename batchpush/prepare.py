"""Completes what a source knows into pushable layers: fingerprint, compress, verify.

A local layer's bytes are checked before they are sent. The first time, an
uncompressed layer is compressed (``compress.py``, in worker processes for large
layers) and its DiffID checked against the config; a compressed layer's bytes are
checked against its digest. What was learned is kept in the metadata store under
the layer's xxh3-128 fingerprint, size and digests. A later run that meets an
uncompressed layer declaring a DiffID the store learned (a cron re-run) prepares
it without reading it, as docker's pusher trusts a DiffID it pushed: the registry
only ever sees digests that were checked, and if the layer must really be
uploaded it is compressed again and checked (``materialize``). Other layers are
recognised by their fingerprint after one xxhash pass. Nothing is ever trusted on
a path or an mtime. Each blob is done once per batch.
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import functools
import hashlib
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Any

from . import mediatypes as mt
from . import waits
from .blocks import Block, BlockWindow, RecompressedStream, ordered_blocks
from .compress import BLOCK_BYTES, GZIP_HEADER, RECIPE, CompressedBlob, HashedBlob, combine_crc, fingerprint_blob, gzip_trailer, hash_blob, hash_input
from .digest import Digest
from .errors import BatchPushError, Cancelled, DigestMismatchError
from .metadata import Fingerprint, MetadataStore
from .sources.base import BlobSource, Compression, FileRange, RegistryBlob, SourceIndex, SourceLayer, SourceManifest, SourceNode
from .spool import Spool
from .workers import release_big_buffers

#: what a compression streams its output to, besides the spool: one sink per
#: target registry (``presend.UploadSink``), made for a layer when its pass starts
Sink = Any
Sinks = Callable[[SourceLayer], list[Sink]]

#: a tmpfs for the blocks the workers hand over
SHM_DIR = "/dev/shm"  # noqa: S108 - a private directory is made in it (mkdtemp, mode 0700)
#: blobs smaller than this are handled in the calling thread, not shipped to a worker
POOL_MIN_BYTES = 1 << 20
#: the fingerprint "recipe" of a blob pushed as it is (its digest is its sha256)
AS_IS = "as-is"


@dataclass(frozen=True, slots=True)
class PreparedLayer:
    """A layer ready to push: the digest, size and media type it will have remotely
    if we upload it, and where those bytes are (None: compressed on demand)."""

    source: SourceLayer
    diff_id: Digest | None
    digest: Digest
    size: int
    media_type: str
    #: what produced ``digest``: our RECIPE, or the source's own compression
    recipe: str
    #: where the bytes to send are (a file range, or a source registry's blob)
    blob: BlobSource | None
    #: its data sent while it was compressed, uncommitted (``presend.Presend``)
    presends: tuple[Any, ...] = ()

    @property
    def compressed_by_us(self) -> bool:
        return self.recipe == RECIPE

    @property
    def key(self) -> Digest:
        """The layer's identity in the push state and metadata store."""
        return self.diff_id or self.digest

    @property
    def urls(self) -> tuple[str, ...]:
        return self.source.descriptor.urls


@dataclass(frozen=True, slots=True)
class PreparedManifest:
    source: SourceManifest
    layers: tuple[PreparedLayer, ...]
    #: the config, pushed as a blob through the same path as a layer (so it is
    #: mounted like one); its bytes were checked when the source was read
    config: PreparedLayer


@dataclass(frozen=True, slots=True)
class PreparedIndex:
    source: SourceIndex
    children: tuple[PreparedNode, ...]


PreparedNode = PreparedManifest | PreparedIndex


@dataclass(frozen=True, slots=True)
class PendingManifest:
    """An image whose layers are still being compressed: each layer's future
    resolves (or raises) as soon as that layer is compressed and checked."""

    source: SourceManifest
    layers: tuple[cf.Future[PreparedLayer], ...]
    config: PreparedLayer

    def ready(self) -> bool:
        return all(future.done() for future in self.layers)

    def wait(self, cancel: threading.Event) -> PreparedManifest:
        """Every layer, or the first error (a SourceError naming the file)."""
        return PreparedManifest(self.source, tuple(waits.result(future, cancel) for future in self.layers), self.config)


def _compresses(layer: SourceLayer) -> bool:
    return layer.compression is Compression.NONE and layer.descriptor.media_type in mt.GZIP_OF and not layer.is_foreign


def _key(layer: SourceLayer) -> Hashable:
    """A layer's identity for its passes: the digest it declares (every pass checks
    the bytes against it), else where its bytes are."""
    return layer.descriptor.digest or layer.blob


def _keys(node: SourceNode) -> list[Hashable]:
    if isinstance(node, SourceIndex):
        return [key for child in node.children for key in _keys(child)]
    return [_key(layer) for layer in node.layers if layer.blob is not None]


def _recipe(layer: SourceLayer) -> str:
    return RECIPE if _compresses(layer) else AS_IS


class Preparer:
    """Prepares source nodes. ``pool`` runs the heavy passes of large blobs; without
    one everything runs inline. Thread-safe.

    One place owns each layer's lifetime in the spool: an image holds its layers
    (``_hold``) before any pass starts, and the last ``release`` deletes the spool
    file, or has it deleted when a compression still under way ends. The lock
    guards the dictionaries only: no pass, future method, callback or file
    operation runs under it. Every wait looks at ``cancel``."""

    def __init__(self, spool_dir: str, store: MetadataStore, pool: cf.Executor | None = None, *, use_fingerprints: bool = True, cancel: threading.Event | None = None, spool_limit: int | None = None) -> None:
        self.spool_dir = spool_dir
        #: whole compressed layers kept for a second reading, within the limit
        self.spool = Spool(spool_dir, spool_limit)
        self._block_dir: str | None = None
        #: blocks compressed ahead of their consumers, across every compression
        self.window = BlockWindow((os.cpu_count() or 1) + 1)
        self.store = store
        self.pool = pool
        self.use_fingerprints = use_fingerprints
        #: set when the run is interrupted: waits end with Cancelled
        self.cancel = cancel or threading.Event()
        self._lock = threading.Lock()
        self._work: dict[tuple[str, Hashable], cf.Future[Any]] = {}
        #: the file each pass actually read, by its key
        self._read: dict[tuple[str, Hashable], FileRange] = {}
        #: prepared images holding each layer; at zero its spool file goes
        self._uses: dict[Hashable, int] = {}
        #: threads that run the pool's passes: each hands its blob (or a large
        #: layer's blocks) to the worker processes and joins the result; hashing
        #: releases the GIL
        self._assemblers = cf.ThreadPoolExecutor(max_workers=8, thread_name_prefix="assemble")
        #: threads that check layers as their passes finish (streaming images)
        self._finishers = cf.ThreadPoolExecutor(max_workers=32, thread_name_prefix="check")
        #: threads that hash a large layer's input while its blocks are compressed
        self._hashers = cf.ThreadPoolExecutor(max_workers=8, thread_name_prefix="hash-input")
        self.bytes_read = 0
        self.bytes_compressed = 0

    # -- running passes once per blob ---------------------------------------
    def _run(self, kind: str, key: Hashable, blob: FileRange, fn: Callable[..., Any], *args: object) -> cf.Future[Any]:
        """``fn(blob, *args)`` once per (kind, key); a failed run is forgotten. The key
        is the layer's declared digest where it has one, so the same layer held in
        several layouts or archives is read and compressed once."""
        # xxh3 runs at memory speed: shipping it to a worker costs more than it
        # saves, and a cron run that only fingerprints never starts the pool
        inline = self.pool is None or blob.size < POOL_MIN_BYTES or fn is fingerprint_blob
        with self._lock:
            running = self._work.get((kind, key))
            if running is not None:
                return running
            future: cf.Future[Any] = cf.Future()
            self._work[(kind, key)] = future
            self._read[(kind, key)] = blob
            self.bytes_read += blob.size
        if inline:
            self._fill(future, kind, key, fn, blob, *args)
            return future
        # a compression hands its blocks to the worker processes itself
        task: Callable[..., Any] = fn if fn == self._compress_pass else functools.partial(self._in_pool, fn)
        try:
            self._assemblers.submit(self._fill, future, kind, key, task, blob, *args)
        except RuntimeError as exc:  # shut down: the run is over
            self._fail(future, kind, key, Cancelled(f"not started: {exc}"))
        return future

    def _fill(self, future: cf.Future[Any], kind: str, key: Hashable, fn: Callable[..., Any], *args: Any) -> None:
        try:
            value = fn(*args)
        except BaseException as exc:
            self._fail(future, kind, key, exc)
            return
        if isinstance(value, CompressedBlob):
            with self._lock:
                self.bytes_compressed += value.size
        future.set_result(value)

    def _fail(self, future: cf.Future[Any], kind: str, key: Hashable, error: BaseException) -> None:
        """A failed pass is forgotten first, so the next caller runs it again."""
        with self._lock:
            if self._work.get((kind, key)) is future:
                del self._work[(kind, key)]
        future.set_exception(error)

    def _submit(self, fn: Callable[..., Any], *args: Any) -> cf.Future[Any]:
        """``fn`` in a worker process. On a WorkerPool, a task lost with a worker that
        died (the OOM killer) is sent again to a rebuilt pool (workers.py)."""
        assert self.pool is not None
        submit = getattr(self.pool, "submit_resubmitting", self.pool.submit)
        return submit(fn, *args)  # type: ignore[no-any-return]

    def _in_pool(self, fn: Callable[..., Any], blob: FileRange, *args: Any) -> Any:
        return waits.result(self._submit(fn, blob, *args), self.cancel)

    def join_streams(self, deadline: float) -> None:
        """After a cancel: until ``deadline`` at most, the compressions still ending,
        so the uploads they were streaming to are cancelled (a DELETE each)."""
        for thread in list(getattr(self._assemblers, "_threads", ())):
            thread.join(max(0.0, deadline - time.monotonic()))

    @property
    def block_dir(self) -> str:
        """Where the workers put each block they compress, for a moment: a tmpfs
        (/dev/shm) where this user can write one, else the spool. Made when the run
        first compresses (a run that compresses nothing makes none), and then too this
        process's heap is told to give big buffers back (the blocks pass through it)."""
        made = self._block_dir
        if made is None:
            release_big_buffers()
            made = tempfile.mkdtemp(prefix="batchpush-blocks-", dir=SHM_DIR if os.access(SHM_DIR, os.W_OK) else self.spool_dir)
            with self._lock:
                if self._block_dir is None:
                    self._block_dir = made
            if self._block_dir != made:  # another thread made one first
                os.rmdir(made)
        return self._block_dir  # type: ignore[return-value]

    def close(self, *, wait: bool = True) -> None:
        self._finishers.shutdown(wait=wait, cancel_futures=True)
        self._assemblers.shutdown(wait=wait, cancel_futures=True)
        self._hashers.shutdown(wait=wait, cancel_futures=True)
        if self._block_dir is not None:
            shutil.rmtree(self._block_dir, ignore_errors=True)

    def _compress_pass(self, blob: FileRange, layer: SourceLayer | None, sinks: Sinks | None) -> CompressedBlob:
        """The recipe, streamed: the blocks go to the workers a few ahead
        (``blocks.ordered_blocks``) while another thread hashes the input (hashing
        releases the GIL), and each block, as soon as it is back and in order, is
        hashed into the digest, kept in the spool while it has room, and handed to
        the sinks (the layer's upload to each target registry, see presend.py).
        A layer is never waited on for room: not kept, it is made again when read
        again. A layer that is not what it declares leaves no presend."""
        submit = None if self.pool is None or blob.size < POOL_MIN_BYTES else self._submit
        hashing = self._hashers.submit(hash_input, blob) if submit is not None else None
        wanted = sinks(layer) if sinks is not None and layer is not None and blob.size > BLOCK_BYTES else []
        started: list[Any] = []
        handed: list[Any] = []  # the presends made
        keep = None
        output_hash = hashlib.sha256()
        size = crc = 0
        blocks: list[tuple[int, int]] = []

        def emit(data: Block) -> None:
            nonlocal size
            output_hash.update(data)
            size += len(data)
            if keep is not None:
                keep.write(data)
            for sink in started:
                sink.put(data)

        try:
            started.extend(sink for sink in wanted if sink.start())
            # a layer streaming to every registry of its image is not kept: nothing reads
            # it again but a retry or another image (which compress it again, streaming)
            keep = self.spool.keep() if not wanted or len(started) < len(wanted) else None
            emit(GZIP_HEADER)
            with contextlib.closing(ordered_blocks(blob, submit, self.window, self.cancel, directory=self.block_dir)) as made:
                for index, (data, block_crc, block_input) in enumerate(made):
                    crc = combine_crc(crc, block_crc, block_input, index == 0)
                    blocks.append((len(data), block_crc))
                    emit(data)
                    del data
            emit(gzip_trailer(crc, blob.size))
            diff_id, fingerprint = waits.result(hashing, self.cancel) if hashing is not None else hash_input(blob)
            digest = Digest("sha256", output_hash.hexdigest())
            # named by digest and by this pass: a layer released and compressed again
            # while the first file is still being deleted never shares its name
            path = keep.finish(f"{digest.hex}-{id(keep):x}") if keep is not None else None
            declared = (layer.diff_id, layer.descriptor.digest) if layer is not None else ()
            if any(expected is not None and expected != diff_id for expected in declared):
                for sink in started:
                    sink.abort()
            else:
                for sink in started:
                    if (presend := sink.close(digest)) is not None:
                        handed.append(presend)
        except BaseException:
            if keep is not None:
                keep.abort()
            for sink in started:
                sink.abort()
            for presend in handed:  # closed before the failure: its claim too goes back
                presend.discard()
            raise
        return CompressedBlob(path, digest, size, diff_id, blob.size, fingerprint, blocks=tuple(blocks), presends=tuple(handed))

    def _compress(self, layer: SourceLayer, key: Hashable | None = None, sinks: Sinks | None = None) -> cf.Future[CompressedBlob]:
        assert layer.blob is not None
        return self._run("gzip", _key(layer) if key is None else key, layer.blob, self._compress_pass, layer, sinks)

    def _forget(self, future: cf.Future[Any]) -> None:
        """Done callback of a compression nobody needs any more: its kept file goes."""
        if not future.cancelled() and future.exception() is None:
            result = future.result()
            if isinstance(result, CompressedBlob) and result.path is not None:
                self.spool.remove(result.path, result.size)

    # -- preparing ----------------------------------------------------------
    def prepare(self, node: SourceNode) -> PreparedNode:
        """Raises SourceError / DigestMismatchError naming the file; nothing is pushed then."""
        self._hold(node)
        try:
            first: dict[int, cf.Future[Any]] = {}
            self._start(node, first)
            return self._finish(node, first)
        except BaseException:
            self.release(node)
            raise

    def start(self, node: SourceManifest, sinks: Sinks | None = None) -> PendingManifest:
        """Like ``prepare`` for one image manifest, without waiting: each layer is
        checked as soon as its own pass is done, so its upload can begin while the
        image's other layers are still compressing (the caller withholds every
        commit until all are checked). ``sinks`` makes, for a layer that is
        compressed now, the uploads its bytes are sent to as they are made."""
        self._hold(node)
        try:
            return self._started(node, sinks)
        except BaseException:
            self.release(node)
            raise

    def _started(self, node: SourceManifest, sinks: Sinks | None) -> PendingManifest:
        first: dict[int, cf.Future[Any]] = {}
        self._start(node, first, sinks)
        layers: list[cf.Future[PreparedLayer]] = []
        for layer in node.layers:
            future = first.get(id(layer))
            if future is None:
                done: cf.Future[PreparedLayer] = cf.Future()
                done.set_result(self._foreign(layer))
                layers.append(done)
            elif future.done():
                # done already (a fingerprint found in the store, a small layer done
                # inline): checked here, so a cron run sees the image ready at once
                checked: cf.Future[PreparedLayer] = cf.Future()
                try:
                    checked.set_result(self._layer(layer, future.result()))
                except BatchPushError as exc:
                    checked.set_exception(exc)
                layers.append(checked)
            else:
                layers.append(self._finishers.submit(self._check_when_done, layer, future))
        return PendingManifest(node, tuple(layers), self.config_layer(node))

    def _check_when_done(self, layer: SourceLayer, future: cf.Future[Any]) -> PreparedLayer:
        return self._layer(layer, waits.result(future, self.cancel))

    def _hold(self, node: SourceNode) -> None:
        with self._lock:
            for key in _keys(node):
                self._uses[key] = self._uses.get(key, 0) + 1

    def release(self, node: PreparedNode | PendingManifest | SourceNode) -> None:
        """The caller is done with ``node``: spool files no prepared image still
        holds are deleted (a compression still under way deletes its own when it
        ends), and their passes forgotten (a later image that needs one again finds
        its fingerprint and compresses on demand)."""
        source = node if isinstance(node, SourceIndex | SourceManifest) else node.source
        compressions: list[cf.Future[Any]] = []
        with self._lock:
            for key in _keys(source):
                left = self._uses.get(key, 0) - 1
                if left > 0:
                    self._uses[key] = left
                    continue
                self._uses.pop(key, None)
                for kind in ("xxh3", "sha", "gzip"):
                    self._read.pop((kind, key), None)
                    future = self._work.pop((kind, key), None)
                    if kind == "gzip" and future is not None:
                        compressions.append(future)
        for future in compressions:
            future.add_done_callback(self._forget)

    def _start(self, node: SourceNode, futures: dict[int, cf.Future[Any]], sinks: Sinks | None = None) -> None:
        """Start each layer's first pass. An uncompressed layer whose declared DiffID
        the store knows is not read; else a layer seen before is fingerprinted (xxh3, waited
        for: another image may be running the same pass) and looked up once: found,
        its future holds the Fingerprint; not found, or never seen, its full pass
        (compression or hashing) is under way."""
        if isinstance(node, SourceIndex):
            for child in node.children:
                self._start(child, futures, sinks)
            return
        for layer in node.layers:
            if layer.blob is not None:
                futures[id(layer)] = self._first_pass(layer, sinks)

    def _first_pass(self, layer: SourceLayer, sinks: Sinks | None = None) -> cf.Future[Any]:
        assert layer.blob is not None
        known = self._declared(layer)
        if known is None and self.use_fingerprints and self.store.has_fingerprints(layer.blob.size, _recipe(layer)):
            xxh3 = waits.result(self._run("xxh3", _key(layer), layer.blob, fingerprint_blob), self.cancel)
            known = self.store.get_fingerprint(xxh3, layer.blob.size, _recipe(layer))
        if known is None:
            return self._full_pass(layer, sinks=sinks)
        found: cf.Future[Any] = cf.Future()
        found.set_result(known)
        return found

    def prepare_layer(self, layer: SourceLayer) -> PreparedLayer:
        """One layer of a local source alone, as ``prepare`` does it (a cluster run's
        blob task); its spool file lives until the preparer's spool goes."""
        if layer.blob is None:
            return self._foreign(layer)
        return self._layer(layer, waits.result(self._first_pass(layer), self.cancel))

    def _declared(self, layer: SourceLayer) -> Fingerprint | None:
        """What the store learned of the content the layer declares by digest, if it
        compressed that content before. A layer is then prepared without
        reading it, as docker's pusher trusts a DiffID it has pushed: everything it
        stands for was checked when learned (the DiffID, and the digest our recipe
        made of it); only the registry sees it unless it must be uploaded, and an
        upload compresses the file again and checks it (``materialize``)."""
        digest = layer.descriptor.digest
        # only layers we compress: their upload always compresses and checks the file
        # again (a layer pushed as it is would be sent from the file unchecked)
        if not self.use_fingerprints or digest is None or layer.blob is None or not _compresses(layer):
            return None
        return self.store.get_fingerprint_by_diff_id(digest, layer.blob.size, RECIPE)

    def _full_pass(self, layer: SourceLayer, key: Hashable | None = None, sinks: Sinks | None = None) -> cf.Future[Any]:
        assert layer.blob is not None
        if _compresses(layer):
            return self._compress(layer, key, sinks)
        return self._run("sha", _key(layer) if key is None else key, layer.blob, hash_blob, self._algorithm(layer))

    @staticmethod
    def _algorithm(layer: SourceLayer) -> str:
        return layer.descriptor.digest.algorithm if layer.descriptor.digest else "sha256"

    def _finish(self, node: SourceNode, futures: dict[int, cf.Future[Any]]) -> PreparedNode:
        if isinstance(node, SourceIndex):
            return PreparedIndex(node, tuple(self._finish(child, futures) for child in node.children))
        layers = []
        for layer in node.layers:
            future = futures.get(id(layer))
            layers.append(self._foreign(layer) if future is None else self._layer(layer, waits.result(future, self.cancel)))
        return PreparedManifest(node, tuple(layers), self.config_layer(node))

    @staticmethod
    def config_layer(node: SourceManifest) -> PreparedLayer:
        config = node.config_descriptor
        assert config.digest is not None
        source = SourceLayer(config, None, node.config_blob if isinstance(node.config_blob, FileRange) else None, Compression.NONE)
        return PreparedLayer(source, None, config.digest, config.size, config.media_type, AS_IS, node.config_blob)

    def _foreign(self, layer: SourceLayer) -> PreparedLayer:
        descriptor = layer.descriptor
        assert descriptor.digest is not None
        return PreparedLayer(layer, layer.diff_id, descriptor.digest, descriptor.size, descriptor.media_type, layer.compression.value, None)

    def _layer(self, layer: SourceLayer, first: Fingerprint | CompressedBlob | HashedBlob) -> PreparedLayer:
        assert layer.blob is not None
        if isinstance(first, Fingerprint):
            return self._from_fingerprint(layer, first)
        result: CompressedBlob | HashedBlob = first
        try:
            prepared = self._from_pass(layer, result)
        except DigestMismatchError:
            kind = "gzip" if _compresses(layer) else "sha"
            if self._read.get((kind, _key(layer)), layer.blob) == layer.blob:
                raise
            # the pass read another file that claims the same digest: judge this file by itself
            result = waits.result(self._full_pass(layer, key=layer.blob), self.cancel)
            prepared = self._from_pass(layer, result)
        if self.use_fingerprints:
            fingerprint = Fingerprint(prepared.diff_id or prepared.digest, prepared.digest, prepared.size)
            self.store.put_fingerprint(result.fingerprint, layer.blob.size, _recipe(layer), fingerprint)
        return prepared

    def _check_diff_id(self, layer: SourceLayer, actual: Digest) -> None:
        if layer.diff_id is not None and actual != layer.diff_id:
            raise DigestMismatchError(layer.blob.path if layer.blob else "?", "layer DiffID", str(layer.diff_id), str(actual))

    def _from_fingerprint(self, layer: SourceLayer, known: Fingerprint) -> PreparedLayer:
        descriptor = layer.descriptor
        if _compresses(layer):
            self._check_diff_id(layer, known.diff_id)
            return PreparedLayer(layer, known.diff_id, known.digest, known.compressed_size, mt.GZIP_OF[descriptor.media_type], RECIPE, None)
        return self._checked_as_is(layer, HashedBlob(known.digest, known.compressed_size, ""))

    def _from_pass(self, layer: SourceLayer, result: CompressedBlob | HashedBlob) -> PreparedLayer:
        if isinstance(result, CompressedBlob):
            digest = layer.descriptor.digest
            if digest is not None and digest != result.diff_id:  # an uncompressed blob is named by its DiffID
                raise DigestMismatchError(layer.blob.path if layer.blob else "?", "layer digest", str(digest), str(result.diff_id))
            self._check_diff_id(layer, result.diff_id)
            return PreparedLayer(layer, result.diff_id, result.digest, result.size, mt.GZIP_OF[layer.descriptor.media_type], RECIPE, result.blob, result.presends)
        return self._checked_as_is(layer, result)

    def _checked_as_is(self, layer: SourceLayer, result: HashedBlob) -> PreparedLayer:
        descriptor = layer.descriptor
        path = layer.blob.path if layer.blob else "?"
        if descriptor.digest is not None and result.digest != descriptor.digest:
            raise DigestMismatchError(path, "layer digest", str(descriptor.digest), str(result.digest))
        if layer.compression is Compression.NONE:
            self._check_diff_id(layer, result.digest)
        return PreparedLayer(layer, layer.diff_id, result.digest, result.size, descriptor.media_type, layer.compression.value, layer.blob)

    def materialize(self, layer: PreparedLayer) -> BlobSource | RecompressedStream:
        """The bytes of a layer to send: its file, or its spooled compression; a layer
        prepared from its fingerprint is compressed now, and checked to be exactly
        what the fingerprint promised. A compression the spool did not keep is made
        again as it is sent (``RecompressedStream``, resumable mid-way)."""
        if layer.blob is not None:
            return layer.blob
        blob = layer.source.blob
        assert blob is not None
        submit = None if self.pool is None or blob.size < POOL_MIN_BYTES else self._submit
        with self._lock:
            running = self._work.get(("gzip", _key(layer.source)))
        if running is None and self.spool.limit - self.spool.used < layer.size:
            # no room to keep it: compressed as it is sent, the digest checked at the end
            return RecompressedStream(blob, layer.digest, layer.size, submit, self.window, self.cancel, on_compressed=self._compressed_again, directory=self.block_dir)
        result = waits.result(self._compress(layer.source), self.cancel)
        if result.digest != layer.digest or result.diff_id != layer.diff_id:
            raise DigestMismatchError(blob.path, f"layer recompressed with {RECIPE}", str(layer.digest), str(result.digest))
        if result.blob is not None:
            return result.blob
        return RecompressedStream(blob, result.digest, result.size, submit, self.window, self.cancel, blocks=result.blocks, on_compressed=self._compressed_again, directory=self.block_dir)

    def _compressed_again(self, size: int) -> None:
        with self._lock:
            self.bytes_compressed += size


def prepared_remote(node: SourceNode) -> PreparedNode:
    """A registry source's image, ready to push as it is: nothing to read, compress
    or check here (each blob is checked against its digest while it streams)."""
    if isinstance(node, SourceIndex):
        return PreparedIndex(node, tuple(prepared_remote(child) for child in node.children))
    config_blob = node.config_blob
    assert isinstance(config_blob, RegistryBlob)
    layers = []
    for layer in node.layers:
        d = layer.descriptor
        assert d.digest is not None
        blob = RegistryBlob(config_blob.host, config_blob.repository, d.digest, d.size)
        layers.append(PreparedLayer(layer, None, d.digest, d.size, d.media_type, layer.compression.value, blob))
    config = node.config_descriptor
    assert config.digest is not None
    source = SourceLayer(config, None, None, Compression.NONE)
    return PreparedManifest(node, tuple(layers), PreparedLayer(source, None, config.digest, config.size, config.media_type, AS_IS, config_blob))
