"""Completes what a source knows into pushable layers: compress, hash, verify.

Every uncompressed layer is compressed once per batch (``compress.py``, in worker
processes for large layers) and its DiffID checked against the config before
anything of the image is pushed. Compressed layers are pushed as they are; their
bytes are checked against their digest. One compression serves every target.
"""

from __future__ import annotations

import concurrent.futures as cf
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Union

from . import mediatypes as mt
from .compress import RECIPE, CompressedBlob, HashedBlob, compress_to_spool, hash_blob
from .digest import Digest
from .errors import DigestMismatchError
from .sources.base import Compression, FileRange, SourceIndex, SourceLayer, SourceManifest, SourceNode

#: layers smaller than this are compressed in the calling thread, not shipped to a worker
POOL_MIN_BYTES = 1 << 20


@dataclass(frozen=True, slots=True)
class PreparedLayer:
    """A layer ready to push: the digest, size and media type it will have remotely
    if we upload it, and where those bytes are."""

    source: SourceLayer
    diff_id: Digest | None
    digest: Digest
    size: int
    media_type: str
    #: what produced ``digest``: our RECIPE, or the source's own compression
    recipe: str
    blob: FileRange | None

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


@dataclass(frozen=True, slots=True)
class PreparedIndex:
    source: SourceIndex
    children: tuple[PreparedNode, ...]


PreparedNode = Union[PreparedManifest, PreparedIndex]


class Preparer:
    """Prepares source nodes; layers shared by several images are done once.

    ``pool`` runs compression of large layers; without one everything runs inline.
    """

    def __init__(self, spool_dir: str, pool: cf.Executor | None = None) -> None:
        self.spool_dir = spool_dir
        self.pool = pool
        self._done: dict[FileRange, cf.Future[CompressedBlob | HashedBlob]] = {}
        self.bytes_read = 0
        self.bytes_compressed = 0

    def _submit(self, blob: FileRange, fn: Callable[..., CompressedBlob | HashedBlob], *args: object) -> cf.Future[CompressedBlob | HashedBlob]:
        future = self._done.get(blob)
        if future is None or (future.done() and future.exception() is not None):
            if self.pool is not None and blob.size >= POOL_MIN_BYTES:
                future = self.pool.submit(fn, blob, *args)
            else:
                future = cf.Future()
                try:
                    future.set_result(fn(blob, *args))
                except BaseException as exc:  # noqa: BLE001 - handed to the waiter
                    future.set_exception(exc)
            self._done[blob] = future
            self.bytes_read += blob.size
        return future

    def prepare(self, node: SourceNode) -> PreparedNode:
        """Raises SourceError / DigestMismatchError naming the file; nothing is pushed then."""
        futures: dict[int, cf.Future[CompressedBlob | HashedBlob]] = {}
        self._start(node, futures)
        return self._finish(node, futures)

    def _start(self, node: SourceNode, futures: dict[int, cf.Future[CompressedBlob | HashedBlob]]) -> None:
        if isinstance(node, SourceIndex):
            for child in node.children:
                self._start(child, futures)
            return
        for layer in node.layers:
            if layer.blob is None:
                continue
            if self._compresses(layer):
                futures[id(layer)] = self._submit(layer.blob, compress_to_spool, self.spool_dir)
            else:
                futures[id(layer)] = self._submit(layer.blob, hash_blob, layer.descriptor.digest.algorithm if layer.descriptor.digest else "sha256")

    @staticmethod
    def _compresses(layer: SourceLayer) -> bool:
        return layer.compression is Compression.NONE and layer.descriptor.media_type in mt.GZIP_OF and not layer.is_foreign

    def _finish(self, node: SourceNode, futures: dict[int, cf.Future[CompressedBlob | HashedBlob]]) -> PreparedNode:
        if isinstance(node, SourceIndex):
            return PreparedIndex(node, tuple(self._finish(child, futures) for child in node.children))
        return PreparedManifest(node, tuple(self._layer(layer, futures.get(id(layer))) for layer in node.layers))

    def _layer(self, layer: SourceLayer, future: cf.Future[CompressedBlob | HashedBlob] | None) -> PreparedLayer:
        descriptor = layer.descriptor
        if future is None:  # a foreign layer the source does not hold
            assert descriptor.digest is not None
            return PreparedLayer(layer, layer.diff_id, descriptor.digest, descriptor.size, descriptor.media_type, layer.compression.value, None)
        result = future.result()
        path = layer.blob.path if layer.blob else "?"
        if isinstance(result, CompressedBlob):
            if layer.diff_id is not None and result.diff_id != layer.diff_id:
                raise DigestMismatchError(path, "layer DiffID", str(layer.diff_id), str(result.diff_id))
            self.bytes_compressed += result.size
            return PreparedLayer(layer, result.diff_id, result.digest, result.size, mt.GZIP_OF[descriptor.media_type], RECIPE, result.blob)
        if descriptor.digest is not None and result.digest != descriptor.digest:
            raise DigestMismatchError(path, "layer digest", str(descriptor.digest), str(result.digest))
        if layer.compression is Compression.NONE and layer.diff_id is not None and result.digest != layer.diff_id:
            raise DigestMismatchError(path, "layer DiffID", str(layer.diff_id), str(result.digest))
        return PreparedLayer(layer, layer.diff_id, result.digest, result.size, descriptor.media_type, layer.compression.value, layer.blob)

    def cleanup(self) -> None:
        """Remove spooled files (the spool directory is the caller's)."""
        for name in os.listdir(self.spool_dir):
            try:
                os.unlink(os.path.join(self.spool_dir, name))
            except OSError:
                pass
