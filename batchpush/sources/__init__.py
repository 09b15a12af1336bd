"""Image sources, named with a transport prefix as skopeo does."""

from __future__ import annotations

from ..errors import UsageError
from .base import (
    Compression,
    Descriptor,
    FileRange,
    ImageSource,
    SourceImage,
    SourceIndex,
    SourceLayer,
    SourceManifest,
    SourceNode,
)
from .docker_archive import DockerArchive
from .oci_layout import OCILayout

TRANSPORTS = ("oci", "docker-archive")


def open_source(spec: str) -> ImageSource:
    """``oci:PATH[:TAG]`` or ``docker-archive:PATH[:REF]``; raises UsageError otherwise.

    As in skopeo, the part after the last colon is the tag/ref unless it contains a
    slash (then it is still part of the path).
    """
    transport, sep, rest = spec.partition(":")
    if not sep or transport not in TRANSPORTS or not rest:
        raise UsageError(f"unknown source {spec!r}: expected oci:PATH[:TAG] or docker-archive:PATH[:REF]")
    path, ref = rest, None
    head, colon, tail = rest.rpartition(":")
    if colon and head and "/" not in tail:
        path, ref = head, tail
        if transport == "docker-archive" and ":" in head and not tail.startswith("@"):
            # docker-archive:PATH:name:tag — the ref itself holds a colon
            path, _, name = head.rpartition(":")
            if path and "/" not in name:
                ref = f"{name}:{tail}"
            else:
                path, ref = head, tail
    if transport == "oci":
        return OCILayout(path, ref)
    return DockerArchive(path, ref)


__all__ = [
    "Compression",
    "Descriptor",
    "DockerArchive",
    "FileRange",
    "ImageSource",
    "OCILayout",
    "SourceImage",
    "SourceIndex",
    "SourceLayer",
    "SourceManifest",
    "SourceNode",
    "open_source",
]
