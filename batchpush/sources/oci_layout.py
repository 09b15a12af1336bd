"""Reads an OCI image layout directory in place: ``oci:PATH[:TAG]``."""

from __future__ import annotations

import os
from typing import Any

from .. import mediatypes as mt
from ..digest import Digest, InvalidDigestError
from ..errors import DigestMismatchError, SourceError
from .base import (
    Compression,
    Descriptor,
    FileRange,
    SourceImage,
    SourceIndex,
    SourceLayer,
    SourceManifest,
    SourceNode,
    diff_ids_of,
    file_size,
    parse_json,
)

REF_NAME = "org.opencontainers.image.ref.name"
#: index annotation of an incremental export (``--incremental-from``): the index
#: digests of the layouts it depends on, comma-separated. A layer blob such a
#: layout lacks is expected at the target (the layer path checks it there).
INCREMENTAL_FROM = "io.batchpush.incremental-from"
#: a source reference ``REPOSITORY:*``: every tag of that repository in the layout
#: (what a prefix target's import of ``oci:DIR`` makes of each repository)
ALL_TAGS = ":*"
#: the largest manifest or index we read
MAX_MANIFEST_BYTES = 4 << 20
#: the largest image config we read
MAX_CONFIG_BYTES = 4 << 20
#: indexes nested deeper than this are refused (a loop guard)
MAX_INDEX_DEPTH = 4


def parse_descriptor(entry: Any, where: str) -> Descriptor:
    """Validate a descriptor from a manifest or index; the digest before any use."""
    if not isinstance(entry, dict):
        raise SourceError(where, "descriptor is not an object")
    try:
        digest = Digest.parse(entry.get("digest"))  # type: ignore[arg-type]
    except InvalidDigestError as exc:
        raise SourceError(where, exc.message) from exc
    media_type = entry.get("mediaType")
    size = entry.get("size")
    if not isinstance(media_type, str) or not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise SourceError(where, f"descriptor {digest} needs a mediaType and a non-negative size")
    urls = entry.get("urls") or ()
    if not isinstance(urls, list | tuple) or not all(isinstance(u, str) for u in urls):
        raise SourceError(where, f"descriptor {digest}: urls must be a list of strings")
    return Descriptor(media_type, digest, size, tuple(urls))


def layer_compression(media_type: str) -> Compression:
    if media_type in mt.UNCOMPRESSED_LAYERS:
        return Compression.NONE
    if media_type in mt.GZIP_LAYERS:
        return Compression.GZIP
    if media_type in mt.ZSTD_LAYERS:
        return Compression.ZSTD
    # Blobs of other types (artifacts) are pushed as they are, never recompressed.
    return Compression.GZIP if media_type.endswith("gzip") else Compression.ZSTD


def split_ref_name(ref_name: str) -> tuple[str | None, str]:
    """``REPOSITORY:TAG`` (an export's ref name) as (repository, tag); a bare tag, or
    any other text, as (None, what follows its last colon)."""
    repository, colon, tag = ref_name.rpartition(":")
    if colon and "/" not in tag and repository:
        return repository, tag
    return None, ref_name.rsplit(":", 1)[-1]


class OCILayout:
    """An OCI image layout; ``tag`` None selects every tagged entry of index.json,
    ``REPOSITORY:*`` every ``REPOSITORY:TAG`` entry, anything else the entries
    whose ref name, or tag, it is."""

    def __init__(self, path: str, tag: str | None = None) -> None:
        self.path = path
        self.tag = tag
        self.spec = f"oci:{path}" + (f":{tag}" if tag else "")
        #: the index digests of the layouts this one depends on (INCREMENTAL_FROM)
        self.depends_on: tuple[str, ...] = ()

    # -- blobs ---------------------------------------------------------------
    def blob_path(self, digest: Digest) -> str:
        # digest is validated (algorithm and hex only), so this cannot leave the layout
        return os.path.join(self.path, "blobs", digest.algorithm, digest.hex)

    def blob_range(self, descriptor: Descriptor) -> FileRange:
        assert descriptor.digest is not None
        path = self.blob_path(descriptor.digest)
        actual = file_size(path)
        if actual != descriptor.size:
            raise SourceError(path, f"descriptor says {descriptor.size} bytes, blob has {actual}")
        return FileRange(path, 0, actual)

    def read_verified(self, descriptor: Descriptor, limit_bytes: int, what: str) -> bytes:
        blob = self.blob_range(descriptor)
        if blob.size > limit_bytes:
            raise SourceError(blob.path, f"{what} of {blob.size} bytes is over the {limit_bytes}-byte limit")
        data = blob.read_all(limit_bytes)
        assert descriptor.digest is not None
        actual = Digest.of(descriptor.digest.algorithm, data)
        if actual != descriptor.digest:
            raise DigestMismatchError(blob.path, what, str(descriptor.digest), str(actual))
        return data

    # -- structure -----------------------------------------------------------
    def read_index(self) -> dict[str, Any]:
        marker = os.path.join(self.path, "oci-layout")
        if not os.path.isfile(marker):
            raise SourceError(self.path, "not an OCI image layout (no oci-layout file)")
        index_path = os.path.join(self.path, "index.json")
        index = parse_json(FileRange(index_path, 0, file_size(index_path)).read_all(MAX_MANIFEST_BYTES), index_path, "index.json")
        if not isinstance(index, dict) or not isinstance(index.get("manifests"), list):
            raise SourceError(index_path, "index.json has no manifests list")
        return index

    def ref_names(self) -> list[tuple[str, Any]]:
        """Every (ref name, index entry) of index.json; reads the index's annotations."""
        index = self.read_index()
        annotations = index.get("annotations")
        depends = annotations.get(INCREMENTAL_FROM) if isinstance(annotations, dict) else None
        self.depends_on = tuple(d for d in depends.split(",") if d) if isinstance(depends, str) else ()
        named = []
        for entry in index["manifests"]:
            entry_annotations = entry.get("annotations") if isinstance(entry, dict) else None
            ref_name = entry_annotations.get(REF_NAME) if isinstance(entry_annotations, dict) else None
            if isinstance(ref_name, str) and ref_name:
                named.append((ref_name, entry))
        return named

    def repositories(self) -> list[str]:
        """The repositories of the layout's ``REPOSITORY:TAG`` ref names, each once."""
        return list(dict.fromkeys(repository for name, _ in self.ref_names() if (repository := split_ref_name(name)[0]) is not None))

    def images(self) -> list[SourceImage]:
        index_path = os.path.join(self.path, "index.json")
        found: list[SourceImage] = []
        every_tag_of = self.tag[: -len(ALL_TAGS)] if self.tag and self.tag.endswith(ALL_TAGS) else None
        for ref_name, entry in self.ref_names():
            # A ref name may be a full reference; the tag is what follows the last colon.
            repository, tag = split_ref_name(ref_name)
            if every_tag_of is not None:
                if repository != every_tag_of:
                    continue
            elif self.tag is not None and tag != self.tag and ref_name != self.tag:
                continue
            descriptor = parse_descriptor(entry, index_path)
            node = self.read_node(descriptor, depth=0)
            found.append(SourceImage(f"oci:{self.path}:{ref_name if repository else tag}", (tag,), node))
        if not found:
            wanted = f"tag {self.tag!r}" if self.tag else "any tagged image"
            raise SourceError(index_path, f"no {wanted} in the layout's index")
        return found

    def read_node(self, descriptor: Descriptor, depth: int) -> SourceNode:
        if descriptor.media_type in mt.INDEXES:
            return self.read_index_node(descriptor, depth)
        if descriptor.media_type in mt.IMAGE_MANIFESTS:
            return self.read_manifest(descriptor)
        assert descriptor.digest is not None
        raise SourceError(self.blob_path(descriptor.digest), f"unsupported manifest media type {descriptor.media_type!r}")

    def read_index_node(self, descriptor: Descriptor, depth: int) -> SourceIndex:
        assert descriptor.digest is not None
        where = self.blob_path(descriptor.digest)
        if depth >= MAX_INDEX_DEPTH:
            raise SourceError(where, f"image indexes nested more than {MAX_INDEX_DEPTH} deep")
        raw = self.read_verified(descriptor, MAX_MANIFEST_BYTES, "image index")
        document = parse_json(raw, where, "image index")
        if not isinstance(document, dict) or not isinstance(document.get("manifests"), list):
            raise SourceError(where, "image index has no manifests list")
        children = tuple(self.read_node(parse_descriptor(child, where), depth + 1) for child in document["manifests"])
        return SourceIndex(descriptor.media_type, raw, document, children)

    def read_manifest(self, descriptor: Descriptor) -> SourceManifest:
        assert descriptor.digest is not None
        where = self.blob_path(descriptor.digest)
        raw = self.read_verified(descriptor, MAX_MANIFEST_BYTES, "image manifest")
        document = parse_json(raw, where, "image manifest")
        if not isinstance(document, dict) or not isinstance(document.get("layers"), list):
            raise SourceError(where, "image manifest has no layers list")
        config_descriptor = parse_descriptor(document.get("config"), where)
        config = self.read_verified(config_descriptor, MAX_CONFIG_BYTES, "image config")
        config_path = self.blob_path(config_descriptor.digest)  # type: ignore[arg-type]
        diff_ids = None
        if config_descriptor.media_type in (mt.OCI_CONFIG, mt.DOCKER_CONFIG):
            diff_ids = diff_ids_of(parse_json(config, config_path, "image config"), config_path)
            if diff_ids is not None and len(diff_ids) != len(document["layers"]):
                raise SourceError(config_path, f"image config lists {len(diff_ids)} DiffIDs for {len(document['layers'])} layers")
        layers = []
        for i, entry in enumerate(document["layers"]):
            layer = parse_descriptor(entry, where)
            # a foreign layer, or one an incremental layout leaves to the layouts it
            # depends on (the target must hold it), need not be here
            blob = None if (layer.urls or self.depends_on) and not os.path.exists(self.blob_path(layer.digest)) else self.blob_range(layer)  # type: ignore[arg-type]
            layers.append(SourceLayer(layer, diff_ids[i] if diff_ids else None, blob, layer_compression(layer.media_type)))
        return SourceManifest(descriptor.media_type, raw, document, config_descriptor, config, self.blob_range(config_descriptor), tuple(layers))
