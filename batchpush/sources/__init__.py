"""Image sources, named with a transport prefix as skopeo does."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

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
from .oci_layout import OCILayout

if TYPE_CHECKING:
    from .docker_archive import DockerArchive

TRANSPORTS = ("oci", "docker-archive")


def open_source(spec: str) -> ImageSource:
    """``oci:PATH[:TAG]`` or ``docker-archive:PATH[:REF]``; raises UsageError otherwise.

    As in skopeo (containers/image), the first colon after the transport ends the
    path: everything after it is the tag or reference, colons included.
    """
    transport, sep, rest = spec.partition(":")
    if not sep or transport not in TRANSPORTS or not rest:
        raise UsageError(f"unknown source {spec!r}: expected oci:PATH[:TAG] or docker-archive:PATH[:REF]")
    path, colon, ref = rest.partition(":")
    if not path or (colon and not ref):
        raise UsageError(f"bad source {spec!r}: empty path or reference")
    if transport == "oci":
        return OCILayout(path, ref or None)
    from .docker_archive import DockerArchive  # tarfile: only a docker-archive source loads it

    return DockerArchive(path, ref or None)


def __getattr__(name: str) -> Any:
    if name == "DockerArchive":
        from .docker_archive import DockerArchive

        return DockerArchive
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


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
