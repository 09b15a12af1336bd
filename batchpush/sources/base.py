"""The ImageSource protocol and the value types every source reader produces.

A source reader knows little: where each blob's bytes lie (a byte range of a file,
read in place) and what the source's manifest says. Shared code (``prepare.py``)
completes each layer: compresses, hashes and verifies it.
"""

from __future__ import annotations

import enum
import io
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, BinaryIO, Protocol

from ..digest import CHUNK_BYTES, Digest
from ..errors import SourceError


class Compression(enum.Enum):
    NONE = "none"
    GZIP = "gzip"
    ZSTD = "zstd"


_MAGIC = ((b"\x1f\x8b", Compression.GZIP), (b"\x28\xb5\x2f\xfd", Compression.ZSTD))


def sniff_compression(head: bytes) -> Compression:
    """Compression of a blob from its first bytes (a tar starts with a file name)."""
    for magic, kind in _MAGIC:
        if head.startswith(magic):
            return kind
    return Compression.NONE


@dataclass(frozen=True, slots=True)
class FileRange:
    """``size`` bytes at ``offset`` of the file at ``path``: a blob read in place.

    Picklable, so a worker process can open it without the source reader.
    """

    path: str
    offset: int
    size: int

    def open(self) -> BinaryIO:
        """A reader over exactly this range; a file shorter than the range is a SourceError."""
        return _RangeReader(self)  # type: ignore[return-value]

    def read_all(self, limit_bytes: int) -> bytes:
        if self.size > limit_bytes:
            raise SourceError(self.path, f"blob of {self.size} bytes is over the {limit_bytes}-byte limit")
        with self.open() as reader:
            return reader.read()


class _RangeReader(io.RawIOBase):
    def __init__(self, blob: FileRange) -> None:
        try:
            self._file = open(blob.path, "rb")  # noqa: SIM115 - closed by close()
            self._file.seek(blob.offset)
        except OSError as exc:
            raise SourceError(blob.path, f"cannot read: {exc.strerror or exc}") from exc
        self._blob = blob
        self._left = blob.size

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        want = min(len(buffer), self._left)
        if want == 0:
            return 0
        view = memoryview(buffer)[:want]
        got = self._file.readinto(view)
        if not got:
            raise SourceError(self._blob.path, f"truncated: {self._left} bytes missing at offset {self._blob.offset + self._blob.size - self._left}")
        self._left -= got
        return got

    def read_chunk_into(self, view: memoryview) -> int:
        """Exactly ``len(view)`` bytes (fewer only at the end) into ``view``: with
        CHUNK_BYTES, the fixed block layout compression relies on."""
        want = min(len(view), self._left)
        got = 0
        while got < want:
            n = self._file.readinto(view[got:want])
            if not n:
                raise SourceError(self._blob.path, f"truncated: {self._left - got} bytes missing at offset {self._blob.offset + self._blob.size - self._left + got}")
            got += n
        self._left -= want
        return want

    def close(self) -> None:
        self._file.close()
        super().close()


@dataclass(frozen=True, slots=True)
class RegistryBlob:
    """A blob held by a registry (a ``docker://`` source): read by streaming it from
    there, its bytes checked against ``digest`` while they pass. Picklable."""

    #: the source registry's host[:port], as its RegistryClient knows it
    host: str
    repository: str
    digest: Digest
    size: int


#: where a blob's bytes come from: a range of a local file, or a source registry
BlobSource = FileRange | RegistryBlob


def read_views(blob: FileRange) -> Iterator[memoryview]:
    """The blob in CHUNK_BYTES pieces (the same split on every run), through one
    reused buffer: each view holds until the next one is asked for, so the
    consumer takes it at once (hashing, compressing, sending), and no piece is
    copied into a new bytes object."""
    view = memoryview(bytearray(max(1, min(CHUNK_BYTES, blob.size))))
    reader = _RangeReader(blob)
    try:
        while n := reader.read_chunk_into(view):
            yield view[:n]
    finally:
        reader.close()


@dataclass(frozen=True, slots=True)
class Descriptor:
    """An OCI descriptor's core fields. ``digest`` is None only for a layer of a
    docker-archive that is stored compressed (its digest is computed when prepared)."""

    media_type: str
    digest: Digest | None
    size: int
    urls: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"mediaType": self.media_type, "digest": str(self.digest), "size": self.size}
        if self.urls:
            out["urls"] = list(self.urls)
        return out


@dataclass(frozen=True, slots=True)
class SourceLayer:
    descriptor: Descriptor
    diff_id: Digest | None
    #: where the bytes are; None for a foreign layer that the source does not hold
    blob: FileRange | None
    compression: Compression

    @property
    def is_foreign(self) -> bool:
        return bool(self.descriptor.urls)


@dataclass(frozen=True, slots=True)
class SourceManifest:
    """One image manifest. ``document`` is None when the source has no manifest of its
    own (a legacy docker-archive): one is built as Docker schema2."""

    media_type: str
    raw: bytes | None
    document: dict[str, Any] | None
    config_descriptor: Descriptor
    #: the config's bytes (empty for a registry source: the config is copied as a blob, never read)
    config: bytes
    #: where the config's bytes lie, for uploading it
    config_blob: FileRange | RegistryBlob
    layers: tuple[SourceLayer, ...]


@dataclass(frozen=True, slots=True)
class SourceIndex:
    """An image index (multi-arch); ``children`` follow ``document['manifests']``."""

    media_type: str
    raw: bytes
    document: dict[str, Any]
    children: tuple[SourceNode, ...]


SourceNode = SourceManifest | SourceIndex


@dataclass(frozen=True, slots=True)
class SourceImage:
    """An image the source offers, with the tags it carries there (maybe none)."""

    name: str
    tags: tuple[str, ...]
    node: SourceNode = field(repr=False)


class ImageSource(Protocol):
    """What every source reader provides."""

    #: the source as the user named it, for messages
    spec: str

    def images(self) -> list[SourceImage]:
        """Every image selected by the source spec; raises SourceError on bad input."""
        ...


def parse_json(data: bytes, path: str, what: str) -> Any:
    try:
        return json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise SourceError(path, f"{what} is not valid JSON: {exc}") from exc


def diff_ids_of(config: dict[str, Any], path: str) -> list[Digest] | None:
    """The config's ``rootfs.diff_ids``, validated; None when the config has no rootfs."""
    rootfs = config.get("rootfs") if isinstance(config, dict) else None
    if not isinstance(rootfs, dict):
        return None
    diff_ids = rootfs.get("diff_ids")
    if not isinstance(diff_ids, list):
        raise SourceError(path, "image config: rootfs.diff_ids is not a list")
    return [Digest.parse(d) for d in diff_ids]


def file_size(path: str) -> int:
    try:
        return os.stat(path).st_size
    except OSError as exc:
        raise SourceError(path, f"cannot read: {exc.strerror or exc}") from exc
