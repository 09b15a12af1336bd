"""Compress-while-hashing: isal gzip plus sha256, the recipe and its pieces.

Runs in worker processes: inputs (FileRange) and outputs are picklable values.
The layer is cut into fixed blocks that are deflated independently (so a large
layer keeps every worker busy, as pigz does) and joined into one gzip stream; one
sequential pass hashes the input (sha256, to check the config's DiffID; xxh3, for
the fingerprint cache) and the joined output (sha256: the blob's digest). The
engine streams the blocks to the registries as they come (``blocks.py``,
``deflate_block_bytes``); ``compress_to_spool`` is the whole recipe in one process.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import struct
import tempfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

# isal and xxhash are imported by the functions that use them: a run that compresses
# and fingerprints nothing (a re-run whose tags hold their images) never loads them
from .digest import CHUNK_BYTES, Digest
from .sources.base import FileRange, read_views

#: The compression recipe. Its output is a pure function of the input bytes: a
#: fixed gzip header (no name, mtime 0, OS unknown); the input cut into BLOCK_BYTES
#: blocks, each deflated by isal at level 1 from a fresh state, fed in CHUNK_BYTES
#: pieces, ended by a full flush (the last by the end of the stream); then the CRC32
#: and size trailer. However many workers share the blocks, the bytes are the same.
#: The metadata store keys cached compressed digests by this name: change it when
#: the recipe changes.
RECIPE = "gzip-isal-l1-b16m"
ISAL_LEVEL = 1
BLOCK_BYTES = 16 << 20
GZIP_HEADER = b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xff"


@dataclass(frozen=True, slots=True)
class CompressedBlob:
    """A compressed layer in the spool: its gzip ``digest`` and ``size``, and the
    ``diff_id`` and ``uncompressed_size`` measured from the input."""

    #: None: not kept in the spool (made again from the source when read again)
    path: str | None
    digest: Digest
    size: int
    diff_id: Digest
    uncompressed_size: int
    #: xxh3-128 of the input, for the fingerprint cache
    fingerprint: str
    recipe: str = RECIPE
    #: each block's compressed size and input CRC32: what a stream made again from
    #: mid-way needs (``blocks.RecompressedStream``)
    blocks: tuple[tuple[int, int], ...] = ()
    #: the data sent to target registries while it was compressed (``presend.Presend``)
    presends: tuple[Any, ...] = ()

    @property
    def blob(self) -> FileRange | None:
        return FileRange(self.path, 0, self.size) if self.path is not None else None


@dataclass(frozen=True, slots=True)
class HashedBlob:
    digest: Digest
    size: int
    #: xxh3-128 of the bytes, for the fingerprint cache
    fingerprint: str


@dataclass(frozen=True, slots=True)
class DeflatedBlock:
    """One block's raw deflate output, in a spool file, and its input's CRC32."""

    path: str
    crc32: int
    input_size: int


def blocks_of(blob: FileRange) -> list[tuple[FileRange, bool]]:
    """The recipe's blocks of ``blob``, each with whether it is the last."""
    count = max(1, -(-blob.size // BLOCK_BYTES))
    return [(FileRange(blob.path, blob.offset + i * BLOCK_BYTES, min(BLOCK_BYTES, blob.size - i * BLOCK_BYTES)), i == count - 1) for i in range(count)]


def _deflate(chunks: Iterable[memoryview], last: bool, on_input: Callable[[memoryview], None]) -> Iterator[bytes]:
    from isal import isal_zlib

    compressor = isal_zlib.compressobj(ISAL_LEVEL, isal_zlib.DEFLATED, -isal_zlib.MAX_WBITS)
    for chunk in chunks:
        on_input(chunk)
        out = compressor.compress(chunk)
        if out:
            yield out
    yield compressor.flush(isal_zlib.Z_FINISH if last else isal_zlib.Z_FULL_FLUSH)


def deflate_block(block: FileRange, last: bool, spool_dir: str) -> DeflatedBlock:
    """A worker's share: one block deflated into a spool file."""
    from isal import isal_zlib

    crc = 0

    def on_input(chunk: memoryview) -> None:
        nonlocal crc
        crc = isal_zlib.crc32(chunk, crc)

    fd, path = tempfile.mkstemp(dir=spool_dir, prefix=".block-")
    try:
        with os.fdopen(fd, "wb", buffering=1 << 20) as out:
            for piece in _deflate(read_views(block), last, on_input):
                out.write(piece)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(path)
        raise
    return DeflatedBlock(path, crc & 0xFFFFFFFF, block.size)


def deflate_block_bytes(block: FileRange, last: bool) -> tuple[bytes, int]:
    """A worker's share of a streamed compression: one block's raw deflate output,
    returned (pickled back to the sender, no file written), and its input's CRC32."""
    from isal import isal_zlib

    crc = 0

    def on_input(chunk: memoryview) -> None:
        nonlocal crc
        crc = isal_zlib.crc32(chunk, crc)

    return b"".join(_deflate(read_views(block), last, on_input)), crc & 0xFFFFFFFF


def gzip_trailer(crc: int, input_size: int) -> bytes:
    """The gzip stream's last 8 bytes: the input's CRC32 and its size modulo 2**32."""
    return struct.pack("<II", crc & 0xFFFFFFFF, input_size & 0xFFFFFFFF)


def combine_crc(crc: int, block_crc: int, block_size: int, first: bool) -> int:
    """The CRC32 of the input so far, with the next block's appended."""
    from isal import isal_zlib

    return block_crc if first else isal_zlib.crc32_combine(crc, block_crc, block_size)


def hash_input(blob: FileRange) -> tuple[Digest, str]:
    """The input's sha256 (its DiffID) and xxh3-128 (its fingerprint), in one pass.
    Raises SourceError if the source is short."""
    import xxhash

    input_hash = hashlib.sha256()
    fingerprint = xxhash.xxh3_128()
    for chunk in read_views(blob):
        input_hash.update(chunk)
        fingerprint.update(chunk)
    return Digest("sha256", input_hash.hexdigest()), fingerprint.hexdigest()


def assemble(blob: FileRange, parts: Iterable[DeflatedBlock], spool_dir: str, hashed: tuple[Digest, str] | None = None) -> CompressedBlob:
    """Join deflated blocks into the gzip stream in the spool, hashing the output.

    ``parts`` may be a generator: each block is hashed and appended as soon as it
    arrives (in order), so the joined stream is done right after the last block.
    ``hashed`` is the input's ``hash_input`` if done already (alongside the
    compression); else it is done here. Raises SourceError if the source is short.
    The caller compares ``diff_id``.
    """
    from isal import isal_zlib

    diff_id, fingerprint = hashed if hashed is not None else hash_input(blob)
    crc = 0
    output_hash = hashlib.sha256(GZIP_HEADER)
    size = len(GZIP_HEADER)
    fd, tmp_path = tempfile.mkstemp(dir=spool_dir, prefix=".partial-")
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(GZIP_HEADER)
            for index, part in enumerate(parts):
                crc = isal_zlib.crc32_combine(crc, part.crc32, part.input_size) if index else part.crc32
                try:
                    with open(part.path, "rb") as f:
                        while piece := f.read(CHUNK_BYTES):
                            output_hash.update(piece)
                            out.write(piece)
                            size += len(piece)
                finally:
                    with contextlib.suppress(OSError):
                        os.unlink(part.path)
            trailer = gzip_trailer(crc, blob.size)
            output_hash.update(trailer)
            out.write(trailer)
            size += len(trailer)
        digest = Digest("sha256", output_hash.hexdigest())
        # named by digest and by this compression: a layer released and compressed
        # again while the first file is still being deleted never shares its name
        final = os.path.join(spool_dir, f"{digest.hex}{os.path.basename(tmp_path).removeprefix('.partial')}")
        os.replace(tmp_path, final)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp_path)
        raise
    return CompressedBlob(final, digest, size, diff_id, blob.size, fingerprint)


def compress_to_spool(blob: FileRange, spool_dir: str) -> CompressedBlob:
    """The whole recipe in one process (the blocks one after another)."""
    return assemble(blob, (deflate_block(block, last, spool_dir) for block, last in blocks_of(blob)), spool_dir)


def fingerprint_blob(blob: FileRange) -> str:
    """xxh3-128 of the blob's bytes: ~15x cheaper than sha256, to recognise a local
    layer seen before (the store maps it to its DiffID and compressed digest)."""
    import xxhash

    hasher = xxhash.xxh3_128()
    for chunk in read_views(blob):
        hasher.update(chunk)
    return hasher.hexdigest()


def hash_blob(blob: FileRange, algorithm: str = "sha256") -> HashedBlob:
    """The digest of a blob read in place (compressed layers are pushed as they are)."""
    import xxhash

    hasher = hashlib.new(algorithm)
    fingerprint = xxhash.xxh3_128()
    for chunk in read_views(blob):
        hasher.update(chunk)
        fingerprint.update(chunk)
    return HashedBlob(Digest(algorithm, hasher.hexdigest()), blob.size, fingerprint.hexdigest())
