"""Compress-while-hashing: isal gzip plus sha256 in one pass, into a spool file.

Runs in worker processes: its inputs (FileRange) and outputs (CompressedBlob) are
picklable values. One pass reads the uncompressed layer once and yields the sha256
of the input (to check against the config's DiffID) and of the gzip stream (the
blob's digest), like the seed's TeeReader, but writing to a spool file so that one
compression serves every target registry and every retry.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import struct
import tempfile
from dataclasses import dataclass

import xxhash
from isal import isal_zlib

from .digest import Digest
from .sources.base import FileRange, read_chunks

#: The compression recipe. Its output is a pure function of the input bytes: a fixed
#: gzip header (no name, mtime 0, OS unknown), isal deflate at level 1 fed in fixed
#: CHUNK_BYTES blocks with no flushes, then the CRC32 and size trailer. The metadata
#: store keys cached compressed digests by this name; change it when the recipe changes.
RECIPE = "gzip-isal-l1"
ISAL_LEVEL = 1
GZIP_HEADER = b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xff"


@dataclass(frozen=True, slots=True)
class CompressedBlob:
    """A compressed layer in the spool: its gzip ``digest`` and ``size``, and the
    ``diff_id`` and ``uncompressed_size`` measured from the input."""

    path: str
    digest: Digest
    size: int
    diff_id: Digest
    uncompressed_size: int
    #: xxh3-128 of the input, for the fingerprint cache
    fingerprint: str
    recipe: str = RECIPE

    @property
    def blob(self) -> FileRange:
        return FileRange(self.path, 0, self.size)


@dataclass(frozen=True, slots=True)
class HashedBlob:
    digest: Digest
    size: int
    #: xxh3-128 of the bytes, for the fingerprint cache
    fingerprint: str


def gzip_chunks(chunks, on_input=None):  # type: ignore[no-untyped-def]
    """The recipe as a generator over input chunks; ``on_input`` sees every input chunk."""
    compressor = isal_zlib.compressobj(ISAL_LEVEL, isal_zlib.DEFLATED, -isal_zlib.MAX_WBITS)
    crc = 0
    size = 0
    yield GZIP_HEADER
    for chunk in chunks:
        if on_input is not None:
            on_input(chunk)
        crc = isal_zlib.crc32(chunk, crc)
        size += len(chunk)
        out = compressor.compress(chunk)
        if out:
            yield out
    yield compressor.flush() + struct.pack("<II", crc & 0xFFFFFFFF, size & 0xFFFFFFFF)


def compress_to_spool(blob: FileRange, spool_dir: str) -> CompressedBlob:
    """Compress ``blob`` into ``spool_dir``; the file is named by its digest.

    Raises SourceError if the source is short. The caller compares ``diff_id``.
    """
    input_hash = hashlib.sha256()
    input_fingerprint = xxhash.xxh3_128()
    output_hash = hashlib.sha256()
    size = 0
    fd, tmp_path = tempfile.mkstemp(dir=spool_dir, prefix=".partial-")
    try:
        with os.fdopen(fd, "wb", buffering=1 << 20) as out:
            def on_input(chunk: bytes) -> None:
                input_hash.update(chunk)
                input_fingerprint.update(chunk)

            for piece in gzip_chunks(read_chunks(blob), on_input):
                output_hash.update(piece)
                out.write(piece)
                size += len(piece)
        digest = Digest("sha256", output_hash.hexdigest())
        final = os.path.join(spool_dir, digest.hex)
        os.replace(tmp_path, final)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp_path)
        raise
    return CompressedBlob(final, digest, size, Digest("sha256", input_hash.hexdigest()), blob.size, input_fingerprint.hexdigest())


def fingerprint_blob(blob: FileRange) -> str:
    """xxh3-128 of the blob's bytes: ~15x cheaper than sha256, to recognise a local
    layer seen before (the store maps it to its DiffID and compressed digest)."""
    hasher = xxhash.xxh3_128()
    for chunk in read_chunks(blob):
        hasher.update(chunk)
    return hasher.hexdigest()


def hash_blob(blob: FileRange, algorithm: str = "sha256") -> HashedBlob:
    """The digest of a blob read in place (compressed layers are pushed as they are)."""
    hasher = hashlib.new(algorithm)
    fingerprint = xxhash.xxh3_128()
    for chunk in read_chunks(blob):
        hasher.update(chunk)
        fingerprint.update(chunk)
    return HashedBlob(Digest(algorithm, hasher.hexdigest()), blob.size, fingerprint.hexdigest())
