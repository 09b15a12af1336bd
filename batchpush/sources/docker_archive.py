"""Reads a ``docker save`` tarball in place: ``docker-archive:PATH[:REF]``.

Both shapes are read through the archive's ``manifest.json``: the legacy one
(``<id>/layer.tar``, ``<id>.json``) and Docker 25+'s, whose entries point into an OCI
layout inside the tar (``blobs/sha256/...``, with the legacy paths as symlinks).
Members are located by their offset in the tar and read by seeking; nothing is
extracted. The image is pushed as Docker schema2, as ``docker push`` would.
"""

from __future__ import annotations

import posixpath
import tarfile
from typing import Any

from .. import mediatypes as mt
from ..digest import Digest
from ..errors import BatchPushError, SourceError
from ..reference import parse_reference
from .base import (
    Compression,
    Descriptor,
    FileRange,
    SourceImage,
    SourceLayer,
    SourceManifest,
    diff_ids_of,
    parse_json,
    sniff_compression,
)
from .oci_layout import parse_descriptor

MAX_MANIFEST_JSON_BYTES = 1 << 20
MAX_CONFIG_BYTES = 1 << 20
#: symlink hops followed inside the archive before calling it a loop
MAX_LINK_HOPS = 16

_COMPRESSED_TYPE = {Compression.NONE: mt.DOCKER_LAYER_TAR, Compression.GZIP: mt.DOCKER_LAYER_GZIP, Compression.ZSTD: mt.DOCKER_LAYER_ZSTD}


def _clean_member_name(name: str) -> str:
    while name.startswith("./"):
        name = name[2:]
    return posixpath.normpath(name) if name else name


class DockerArchive:
    """A docker-archive. ``ref`` selects one image: ``name:tag`` from RepoTags or
    ``@N`` (the N-th manifest.json entry); None selects every image."""

    def __init__(self, path: str, ref: str | None = None) -> None:
        self.path = path
        self.ref = ref
        self.spec = f"docker-archive:{path}" + (f":{ref}" if ref else "")
        self._members: dict[str, tarfile.TarInfo] = {}

    def _scan(self) -> None:
        try:
            with tarfile.open(self.path, "r:") as tar:
                for member in tar:
                    self._members[_clean_member_name(member.name)] = member
        except tarfile.ReadError as exc:
            raise SourceError(self.path, f"not a readable (uncompressed) tar archive: {exc}") from exc
        except (OSError, EOFError) as exc:
            raise SourceError(self.path, f"cannot read archive: {exc}") from exc

    def _resolve(self, name: str, what: str) -> tarfile.TarInfo:
        """The regular-file member ``name`` refers to, following links inside the archive."""
        if not isinstance(name, str) or not name or name.startswith("/") or ".." in name.split("/"):
            raise SourceError(self.path, f"{what}: refusing member path {name!r} (absolute or with '..')")
        current = posixpath.normpath(name)
        for _ in range(MAX_LINK_HOPS):
            member = self._members.get(current)
            if member is None:
                raise SourceError(self.path, f"{what}: member {current!r} is missing from the archive")
            if member.isfile():
                return member
            if member.issym():
                target = posixpath.normpath(posixpath.join(posixpath.dirname(current), member.linkname))
            elif member.islnk():
                target = posixpath.normpath(member.linkname)
            else:
                raise SourceError(self.path, f"{what}: member {current!r} is not a regular file")
            if target.startswith("/") or target == ".." or target.startswith("../"):
                raise SourceError(self.path, f"{what}: link {current!r} points outside the archive")
            current = target
        raise SourceError(self.path, f"{what}: links from {name!r} loop or nest over {MAX_LINK_HOPS} deep")

    def _range(self, member: tarfile.TarInfo) -> FileRange:
        return FileRange(self.path, member.offset_data, member.size)

    def _read_member(self, name: str, limit_bytes: int, what: str) -> bytes:
        member = self._resolve(name, what)
        if member.size > limit_bytes:
            label = what if what == name else f"{what} {name!r}"
            raise SourceError(self.path, f"{label} is {member.size} bytes, over the {limit_bytes}-byte limit")
        return self._range(member).read_all(limit_bytes)

    def images(self) -> list[SourceImage]:
        self._scan()
        entries = parse_json(self._read_member("manifest.json", MAX_MANIFEST_JSON_BYTES, "manifest.json"), self.path, "manifest.json")
        if not isinstance(entries, list) or not entries:
            raise SourceError(self.path, "manifest.json is not a non-empty list")
        selected = self._select(entries)
        return [self._image(i, entry) for i, entry in selected]

    def _select(self, entries: list[Any]) -> list[tuple[int, Any]]:
        if self.ref is None:
            return list(enumerate(entries))
        if self.ref.startswith("@"):
            try:
                index = int(self.ref[1:])
            except ValueError:
                raise SourceError(self.path, f"bad image index {self.ref!r}") from None
            if not 0 <= index < len(entries):
                raise SourceError(self.path, f"image index {self.ref} out of range (archive holds {len(entries)})")
            return [(index, entries[index])]
        wanted = parse_reference(self.ref)
        for i, entry in enumerate(entries):
            for repo_tag in (entry.get("RepoTags") or []) if isinstance(entry, dict) else []:
                try:
                    have = parse_reference(str(repo_tag))
                except BatchPushError:  # an odd RepoTags entry just doesn't match
                    continue
                if (have.name, have.tag) == (wanted.name, wanted.tag or "latest"):
                    return [(i, entry)]
        raise SourceError(self.path, f"no image tagged {self.ref!r} in the archive")

    def _image(self, index: int, entry: Any) -> SourceImage:
        label = f"{self.path}:@{index}"
        if not isinstance(entry, dict) or not isinstance(entry.get("Config"), str) or not isinstance(entry.get("Layers"), list):
            raise SourceError(self.path, f"manifest.json entry {index} needs Config and Layers")
        config_member = self._resolve(entry["Config"], "image config")
        config = self._read_member(entry["Config"], MAX_CONFIG_BYTES, "image config")
        config_document = parse_json(config, self.path, f"image config {entry['Config']!r}")
        diff_ids = diff_ids_of(config_document, self.path)
        if diff_ids is None or len(diff_ids) != len(entry["Layers"]):
            raise SourceError(self.path, f"image config {entry['Config']!r} lists {len(diff_ids or [])} DiffIDs for {len(entry['Layers'])} layers", image=label)
        sources = entry.get("LayerSources")
        foreign: dict[str, Any] = sources if isinstance(sources, dict) else {}
        layers = []
        for name, diff_id in zip(entry["Layers"], diff_ids, strict=True):
            layers.append(self._layer(name, diff_id, foreign.get(str(diff_id))))
        tags = []
        for repo_tag in entry.get("RepoTags") or []:
            try:
                tag = parse_reference(repo_tag).tag
            except BatchPushError:
                raise SourceError(self.path, f"bad RepoTags entry {repo_tag!r}", image=label) from None
            if tag and tag not in tags:
                tags.append(tag)
        config_descriptor = Descriptor(mt.DOCKER_CONFIG, Digest.sha256_of(config), len(config))
        node = SourceManifest(mt.DOCKER_MANIFEST, None, None, config_descriptor, config, self._range(config_member), tuple(layers))
        name = ",".join(entry.get("RepoTags") or []) or label
        return SourceImage(f"{self.path}:{name}", tuple(tags), node)

    def _layer(self, name: str, diff_id: Digest, foreign: Any) -> SourceLayer:
        member = self._resolve(name, "layer")
        blob = self._range(member)
        with blob.open() as reader:
            compression = sniff_compression(reader.read(4))
        if isinstance(foreign, dict) and foreign.get("urls"):
            descriptor = parse_descriptor(foreign, self.path)
            return SourceLayer(descriptor, diff_id, blob, compression)
        digest = diff_id if compression is Compression.NONE else None
        return SourceLayer(Descriptor(_COMPRESSED_TYPE[compression], digest, member.size), diff_id, blob, compression)
