"""Builds benchmark fleets: OCI layouts with uncompressed layers, as ``docker save``
writes them. Base layers are tars of real directories of this machine (shared by
repositories), middle layers are shared by groups, app layers are small and per tag.
Tars are deterministic (sorted, mtime 0, owner 0) so a fleet can be cached."""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import tarfile
from collections.abc import Callable
from dataclasses import dataclass, field

OCI_LAYER_TAR = "application/vnd.oci.image.layer.v1.tar"


def _normalise(info: tarfile.TarInfo) -> tarfile.TarInfo | None:
    if not (info.isfile() or info.isdir() or info.issym()):
        return None
    info.mtime, info.uid, info.gid, info.uname, info.gname = 0, 0, 0, "", ""
    return info


def directory_tar(path: str, limit_bytes: int | None = None) -> bytes:
    """A deterministic tar of a real directory (up to ``limit_bytes`` of file data)."""
    out = io.BytesIO()
    total = 0
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for root, dirs, files in os.walk(path):
            dirs.sort()
            for name in sorted(files):
                full = os.path.join(root, name)
                try:
                    if os.path.islink(full) or not os.path.isfile(full):
                        continue
                    size = os.path.getsize(full)
                    if limit_bytes is not None and total + size > limit_bytes:
                        continue
                    tar.add(full, filter=_normalise, recursive=False)
                    total += size
                except OSError:
                    continue
    return out.getvalue()


def synthetic_tar(seed: int, size_bytes: int) -> bytes:
    """An app layer: text-like content that compresses about 3:1, unique per seed."""
    rng = random.Random(seed)
    words = [bytes(rng.choice(b"abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 9))) for _ in range(2000)]
    data = b" ".join(rng.choice(words) for _ in range(size_bytes // 5 + 1))[:size_bytes]
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w") as tar:
        info = tarfile.TarInfo(f"app/{seed}/data.txt")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


def _digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@dataclass
class Fleet:
    root: str
    #: (layout path, tag) for every image
    images: list[tuple[str, str]] = field(default_factory=list)
    layer_bytes: int = 0  # unique uncompressed layer bytes

    def repositories(self) -> list[str]:
        return sorted({path for path, _ in self.images})


def write_layout(path: str, images: dict[str, list[bytes]]) -> None:
    os.makedirs(os.path.join(path, "blobs", "sha256"), exist_ok=True)
    with open(os.path.join(path, "oci-layout"), "w") as f:
        json.dump({"imageLayoutVersion": "1.0.0"}, f)

    def blob(data: bytes) -> str:
        digest = _digest(data)
        target = os.path.join(path, "blobs", "sha256", digest[7:])
        if not os.path.exists(target):
            with open(target, "wb") as f:
                f.write(data)
        return digest

    entries = []
    for tag, layers in images.items():
        config = json.dumps({"architecture": "amd64", "os": "linux", "config": {"Cmd": ["/bin/sh"]}, "rootfs": {"type": "layers", "diff_ids": [_digest(layer) for layer in layers]}}).encode()
        manifest = json.dumps({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": blob(config), "size": len(config)},
            "layers": [{"mediaType": OCI_LAYER_TAR, "digest": blob(layer), "size": len(layer)} for layer in layers],
        }).encode()
        entries.append({"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": blob(manifest), "size": len(manifest), "annotations": {"org.opencontainers.image.ref.name": tag}})
    with open(os.path.join(path, "index.json"), "w") as f:
        json.dump({"schemaVersion": 2, "manifests": entries}, f)


def build(root: str, *, repositories: int, tags: int, groups: int, bases: Callable[[], list[bytes]], middle_bytes: int, app_bytes: int) -> Fleet:
    """``repositories`` layouts of ``tags`` images: every image has the bases, its
    group's middle layer and its own app layer. Built once; later calls read it back."""
    summary = os.path.join(root, "fleet.json")
    if os.path.exists(summary):
        with open(summary) as f:
            saved = json.load(f)
        return Fleet(root, [tuple(i) for i in saved["images"]], saved["layer_bytes"])  # type: ignore[misc]
    fleet = Fleet(root)
    base_layers = bases()
    middles = [synthetic_tar(10_000 + g, middle_bytes) for g in range(groups)]
    unique: dict[str, int] = {}
    for r in range(repositories):
        path = os.path.join(root, f"svc{r:03d}")
        images = {}
        for t in range(tags):
            layers = [*base_layers, middles[r % groups], synthetic_tar(r * 1000 + t, app_bytes)]
            images[f"v{t}"] = layers
            fleet.images.append((path, f"v{t}"))
            for layer in layers:
                unique[_digest(layer)] = len(layer)
        write_layout(path, images)
    fleet.layer_bytes = sum(unique.values())
    with open(summary, "w") as f:
        json.dump({"images": fleet.images, "layer_bytes": fleet.layer_bytes}, f)
    return fleet
