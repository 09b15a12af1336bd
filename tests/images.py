"""Builds test images: OCI layouts with uncompressed layers, multi-arch indexes."""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import tarfile
from dataclasses import dataclass

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER_TAR = "application/vnd.oci.image.layer.v1.tar"


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def layer_tar(seed: int, files: int = 3, file_size: int = 4096) -> bytes:
    """A deterministic tar with semi-compressible content."""
    rng = random.Random(seed)
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for i in range(files):
            words = [rng.choice((b"alpha", b"beta", b"gamma", b"delta", b"%d" % rng.randrange(10**6))) for _ in range(file_size // 5)]
            data = b" ".join(words)[:file_size]
            info = tarfile.TarInfo(f"layer{seed}/file{i}.txt")
            info.size = len(data)
            info.mtime = 0
            tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


@dataclass
class BuiltImage:
    manifest_digest: str
    config_digest: str
    diff_ids: list[str]


class LayoutWriter:
    """Writes an OCI image layout directory."""

    def __init__(self, path: str) -> None:
        self.path = path
        os.makedirs(os.path.join(path, "blobs", "sha256"), exist_ok=True)
        with open(os.path.join(path, "oci-layout"), "w") as out:
            json.dump({"imageLayoutVersion": "1.0.0"}, out)
        self.entries: list[dict] = []

    def blob(self, data: bytes) -> str:
        digest = sha256(data)
        with open(os.path.join(self.path, "blobs", "sha256", digest.split(":")[1]), "wb") as out:
            out.write(data)
        return digest

    def image(self, layers: list[bytes], *, arch: str = "amd64", layer_media_type: str = OCI_LAYER_TAR) -> tuple[dict, BuiltImage]:
        diff_ids = [sha256(layer) for layer in layers]
        config = json.dumps({
            "architecture": arch,
            "os": "linux",
            "config": {"Cmd": ["/bin/sh"]},
            "rootfs": {"type": "layers", "diff_ids": diff_ids},
        }).encode()
        config_digest = self.blob(config)
        manifest = json.dumps({
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {"mediaType": OCI_CONFIG, "digest": config_digest, "size": len(config)},
            "layers": [{"mediaType": layer_media_type, "digest": self.blob(layer), "size": len(layer)} for layer in layers],
        }).encode()
        digest = self.blob(manifest)
        descriptor = {"mediaType": OCI_MANIFEST, "digest": digest, "size": len(manifest), "platform": {"architecture": arch, "os": "linux"}}
        return descriptor, BuiltImage(digest, config_digest, diff_ids)

    def index(self, children: list[dict]) -> dict:
        data = json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": children}).encode()
        return {"mediaType": OCI_INDEX, "digest": self.blob(data), "size": len(data)}

    def tag(self, descriptor: dict, tag: str) -> None:
        entry = dict(descriptor)
        entry.pop("platform", None)
        entry["annotations"] = {"org.opencontainers.image.ref.name": tag}
        self.entries.append(entry)
        with open(os.path.join(self.path, "index.json"), "w") as out:
            json.dump({"schemaVersion": 2, "manifests": self.entries}, out)


def simple_layout(path: str, tags: dict[str, list[int]], file_size: int = 4096) -> dict[str, BuiltImage]:
    """A layout with one image per tag, its layers made from the given seeds."""
    writer = LayoutWriter(path)
    built = {}
    for tag, seeds in tags.items():
        descriptor, image = writer.image([layer_tar(s, file_size=file_size) for s in seeds])
        writer.tag(descriptor, tag)
        built[tag] = image
    return built


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def docker25_archive(path: str, repo_tag: str, layers: list[bytes], *, symlink_first_layer: bool = True) -> BuiltImage:
    """A ``docker save`` archive as Docker 25+ writes it: an OCI layout inside the tar
    plus manifest.json, the first layer reached through a legacy-path symlink."""
    diff_ids = [sha256(layer) for layer in layers]
    config = json.dumps({"architecture": "amd64", "os": "linux", "rootfs": {"type": "layers", "diff_ids": diff_ids}}).encode()
    layer_descriptors = [{"mediaType": OCI_LAYER_TAR, "digest": sha256(layer), "size": len(layer)} for layer in layers]
    manifest = json.dumps({"schemaVersion": 2, "mediaType": OCI_MANIFEST, "config": {"mediaType": OCI_CONFIG, "digest": sha256(config), "size": len(config)}, "layers": layer_descriptors}).encode()
    layer_paths = [f"blobs/sha256/{sha256(layer)[7:]}" for layer in layers]
    if symlink_first_layer:
        layer_paths[0] = f"{sha256(layers[0])[7:]}/layer.tar"
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        _add(tar, "oci-layout", b'{"imageLayoutVersion":"1.0.0"}')
        for blob in [config, manifest, *layers]:
            _add(tar, f"blobs/sha256/{sha256(blob)[7:]}", blob)
        if symlink_first_layer:
            link = tarfile.TarInfo(layer_paths[0])
            link.type = tarfile.SYMTYPE
            link.linkname = f"../blobs/sha256/{sha256(layers[0])[7:]}"
            tar.addfile(link)
        index = {"schemaVersion": 2, "manifests": [{"mediaType": OCI_MANIFEST, "digest": sha256(manifest), "size": len(manifest), "annotations": {"org.opencontainers.image.ref.name": repo_tag.rsplit(":", 1)[1]}}]}
        _add(tar, "index.json", json.dumps(index).encode())
        _add(tar, "manifest.json", json.dumps([{"Config": f"blobs/sha256/{sha256(config)[7:]}", "RepoTags": [repo_tag], "Layers": layer_paths}]).encode())
    return BuiltImage(sha256(manifest), sha256(config), diff_ids)


def random_layer(seed: int, size: int) -> bytes:
    """A tar holding ``size`` incompressible bytes: its gzip is about as large."""
    data = random.Random(seed).randbytes(size)
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w") as tar:
        info = tarfile.TarInfo(f"blob{seed}.bin")
        info.size = len(data)
        info.mtime = 0
        tar.addfile(info, io.BytesIO(data))
    return out.getvalue()
