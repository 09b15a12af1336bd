"""``docker://REGISTRY/REPOSITORY[:TAG|@DIGEST]``: a registry as a source (mirroring).

skopeo's syntax. No tag and no digest: every tag of the repository (the tag list,
followed page by page to its end). An image is resolved when its push starts, not
when the source is listed: a mirror re-run first compares the tag's digest at the
source and at the target (two HEADs) and reads nothing more when they match.

Manifests and indexes are copied as they are, byte for byte; blobs stream from
the source registry to the target (``RegistryBlob``), checked against their digest
while they pass. A platform selection copies a subset of an index: the index is
then rewritten to list only what was copied (its digest changes; the report gives
both). Nothing read from the source is trusted: every manifest is checked against
the digest that named it, and its JSON is validated before any blob is copied.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .. import mediatypes as mt
from ..digest import Digest, InvalidDigestError
from ..errors import BatchPushError, SourceError, UsageError
from ..patterns import LazyPattern
from ..reference import Reference, parse_reference
from .base import Compression, Descriptor, RegistryBlob, SourceImage, SourceIndex, SourceLayer, SourceManifest

if TYPE_CHECKING:
    from ..registry.client import RegistryClient

log = logging.getLogger(__name__)

TRANSPORT = "docker://"


def parse_registry_source(spec: str) -> Reference:
    """The reference after ``docker://``; a bare name means Docker Hub, as in skopeo."""
    if not spec.startswith(TRANSPORT) or len(spec) == len(TRANSPORT):
        raise UsageError(f"bad source {spec!r}: expected docker://REGISTRY/REPOSITORY[:TAG|@DIGEST]")
    try:
        return parse_reference(spec[len(TRANSPORT) :])
    except BatchPushError as exc:
        raise UsageError(f"bad source {spec!r}: {exc.message}") from exc


#: the tags cosign and the OCI 1.1 referrers fallback give an image's attachments:
#: ``sha256-<hex>`` (the referrers index), ``sha256-<hex>.sig`` / ``.att`` / ``.sbom``
ATTACHMENT_TAG = LazyPattern(r"sha256-([0-9a-f]{64})(?:\.(?:sig|att|sbom))?", re.ASCII)


def referrers_tag(digest: Digest) -> str:
    """The referrers fallback tag of ``digest`` (OCI distribution 1.1): ``<alg>-<hex>``,
    the hex cut to 64 characters."""
    return f"{digest.algorithm}-{digest.hex[:64]}"


@dataclass(frozen=True, slots=True)
class RemoteImage:
    """An image of a source registry, resolved (its manifests read) when its push starts."""

    #: the source repository, with the tag or digest that names the image
    reference: Reference
    #: the repository's attachment tags (signatures, attestations, SBOMs, referrers
    #: index), copied with the image whose digest they name; empty: none copied
    attachments: tuple[str, ...] = ()
    #: ask the source's referrers API for the image's referrers (signatures on)
    referrers: bool = False

    def attachments_of(self, digest: Digest) -> list[str]:
        """The attachment tags naming ``digest``."""
        return [tag for tag in self.attachments if (m := ATTACHMENT_TAG.fullmatch(tag)) and m.group(1) == digest.hex and digest.algorithm == "sha256"]

    @property
    def spec(self) -> str:
        return f"{TRANSPORT}{self.reference}"

    @property
    def selector(self) -> str:
        """What names the image in its repository: its digest if given, else its tag."""
        return str(self.reference.digest) if self.reference.digest else str(self.reference.tag)


class RegistrySource:
    """The images a ``docker://`` source selects (tags listed now, manifests read later).

    Attachment tags (``ATTACHMENT_TAG``) are never images of their own: with
    ``signatures`` they go with the image whose digest they name, else nowhere.
    Listing the tags costs one request per repository (pages aside), for a single
    tag too when ``signatures`` is on."""

    def __init__(self, spec: str, client: RegistryClient, *, signatures: bool = True) -> None:
        self.spec = spec
        self.reference = parse_registry_source(spec)
        self.client = client
        self.signatures = signatures
        #: every tag the listing gave (attachments included); None if not listed
        self.listed: list[str] | None = None

    def _tags(self) -> list[str]:
        client, ref = self.client, self.reference
        self.listed = client.with_retries(lambda: client.list_tags(ref.repository), f"tags of {ref.name}")
        return self.listed

    def images(self) -> list[SourceImage]:
        ref = self.reference
        if ref.digest is not None or ref.tag is not None:
            attachments: tuple[str, ...] = ()
            if self.signatures:
                try:
                    attachments = tuple(t for t in self._tags() if ATTACHMENT_TAG.fullmatch(t))
                except BatchPushError as exc:  # the image itself may still be copied
                    log.warning("%s: the tag list (for signatures) failed: %s; copying the image without them", self.spec, exc)
            return [SourceImage(self.spec, (ref.tag,) if ref.tag else (), RemoteImage(ref, attachments, self.signatures))]  # type: ignore[arg-type]
        tags = self._tags()
        images = [tag for tag in tags if not ATTACHMENT_TAG.fullmatch(tag)]
        if not images:
            raise SourceError(self.spec, "the repository has no tags")
        attachments = tuple(t for t in tags if ATTACHMENT_TAG.fullmatch(t)) if self.signatures else ()
        return [SourceImage(f"{self.spec}:{tag}", (tag,), RemoteImage(ref.with_tag(tag), attachments, self.signatures)) for tag in images]  # type: ignore[arg-type]


@dataclass(frozen=True, slots=True)
class Platform:
    """``os/arch[/variant]`` as docker and skopeo write it."""

    os: str
    architecture: str
    variant: str | None = None

    @classmethod
    def parse(cls, text: str) -> Platform:
        parts = text.split("/")
        if len(parts) not in (2, 3) or not all(parts):
            raise UsageError(f"bad platform {text!r}: expected OS/ARCH[/VARIANT], e.g. linux/arm64/v8")
        return cls(parts[0], parts[1], parts[2] if len(parts) == 3 else None)

    def matches(self, platform: Any) -> bool:
        if not isinstance(platform, dict):
            return False
        if (platform.get("os"), platform.get("architecture")) != (self.os, self.architecture):
            return False
        return self.variant is None or platform.get("variant") == self.variant

    def __str__(self) -> str:
        return "/".join(p for p in (self.os, self.architecture, self.variant) if p)


#: fetch(repository, digest-or-tag, declared size or None) -> (raw bytes, media type,
#: digest), checked by the client (a body of another size is refused as it is read)
Fetch = Callable[[str, str, int | None], tuple[bytes, str, Digest]]


def resolve(image: RemoteImage, fetch: Fetch, platforms: Sequence[Platform] = (), size: int | None = None) -> SourceManifest | SourceIndex:
    """The image's manifest (or index, with its children), read and validated.
    ``platforms``: copy only those children of an index (empty: every one).
    ``size``: the manifest's length as a HEAD stated it, if known."""
    raw, media_type, digest = fetch(image.reference.repository, image.selector, size)
    return _node(image, fetch, raw, media_type, digest, platforms)


def _where(image: RemoteImage, digest: Digest | str) -> str:
    return f"{TRANSPORT}{image.reference.name}@{digest}"


def _document(image: RemoteImage, raw: bytes, digest: Digest | str) -> dict[str, Any]:
    try:
        document = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise SourceError(_where(image, digest), f"manifest is not valid JSON: {exc}") from None
    if not isinstance(document, dict):
        raise SourceError(_where(image, digest), "manifest is not a JSON object")
    return document


def _descriptor(image: RemoteImage, entry: Any, digest: Digest | str, what: str) -> Descriptor:
    where = _where(image, digest)
    if not isinstance(entry, dict):
        raise SourceError(where, f"{what} is not a descriptor")
    media_type, size = entry.get("mediaType"), entry.get("size")
    if not isinstance(media_type, str) or not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise SourceError(where, f"{what}: mediaType and a size of 0 or more are required")
    try:
        blob_digest = Digest.parse(str(entry.get("digest")))
    except InvalidDigestError as exc:
        raise SourceError(where, f"{what}: {exc.message}") from None
    urls = entry.get("urls") or ()
    if not isinstance(urls, list | tuple) or not all(isinstance(u, str) for u in urls):
        raise SourceError(where, f"{what}: urls must be a list of strings")
    return Descriptor(media_type, blob_digest, size, tuple(urls))


def _media_type(document: dict[str, Any], header: str) -> str:
    """The document's own mediaType, else the one the registry served it as."""
    declared = document.get("mediaType")
    return declared if isinstance(declared, str) and declared else header


def _node(image: RemoteImage, fetch: Fetch, raw: bytes, served_as: str, digest: Digest, platforms: Sequence[Platform]) -> SourceManifest | SourceIndex:
    document = _document(image, raw, digest)
    media_type = _media_type(document, served_as)
    if media_type in mt.INDEXES or "manifests" in document:
        return _index(image, fetch, raw, media_type, digest, document, platforms)
    config = _descriptor(image, document.get("config"), digest, "config")
    entries = document.get("layers")
    if not isinstance(entries, list):
        raise SourceError(_where(image, digest), "manifest has no layers list")
    repository, host = image.reference.repository, image.reference.api_host
    layers = []
    for i, entry in enumerate(entries):
        descriptor = _descriptor(image, entry, digest, f"layers[{i}]")
        assert descriptor.digest is not None
        # a foreign layer stays where its urls say (as docker's pusher skips it)
        layers.append(SourceLayer(descriptor, None, None, _compression(descriptor.media_type)))
    assert config.digest is not None
    return SourceManifest(media_type, raw, document, config, b"", RegistryBlob(host, repository, config.digest, config.size), tuple(layers))


def _compression(media_type: str) -> Compression:
    if media_type in mt.GZIP_LAYERS:
        return Compression.GZIP
    if media_type in mt.ZSTD_LAYERS:
        return Compression.ZSTD
    return Compression.NONE  # or a type we do not know: copied as it is all the same


def _index(image: RemoteImage, fetch: Fetch, raw: bytes, media_type: str, digest: Digest, document: dict[str, Any], platforms: Sequence[Platform]) -> SourceIndex:
    entries = document.get("manifests")
    if not isinstance(entries, list):
        raise SourceError(_where(image, digest), "index has no manifests list")
    chosen = [entry for entry in entries if not platforms or (isinstance(entry, dict) and any(p.matches(entry.get("platform")) for p in platforms))]
    if not chosen:
        raise SourceError(_where(image, digest), f"no manifest for {', '.join(map(str, platforms))}")
    children = []
    for i, entry in enumerate(chosen):
        descriptor = _descriptor(image, entry, digest, f"manifests[{i}]")
        child_raw, child_type, child_digest = fetch(image.reference.repository, str(descriptor.digest), descriptor.size)
        if len(child_raw) != descriptor.size:
            raise SourceError(_where(image, child_digest), f"manifest of {len(child_raw)} bytes, the index says {descriptor.size}")
        children.append(_node(image, fetch, child_raw, child_type, child_digest, ()))
    if len(chosen) != len(entries):
        # a subset: the index lists only what is copied (so it names no missing manifest)
        document = {**document, "manifests": chosen}
        raw = json.dumps(document, separators=(",", ":"), ensure_ascii=False).encode()
    return SourceIndex(media_type, raw, document, tuple(children))
