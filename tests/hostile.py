"""Sources that lie: archives and layouts built to break a reader."""

from __future__ import annotations

import io
import json
import os
import tarfile
from collections.abc import Callable

from images import LayoutWriter, layer_tar, sha256

Member = tuple[str, bytes | None, str | None, str | None]  # name, data, symlink target, hardlink target


def write_tar(path: str, members: list[Member]) -> None:
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        for name, data, symlink, hardlink in members:
            info = tarfile.TarInfo(name)
            if symlink is not None:
                info.type, info.linkname = tarfile.SYMTYPE, symlink
                tar.addfile(info)
            elif hardlink is not None:
                info.type, info.linkname = tarfile.LNKTYPE, hardlink
                tar.addfile(info)
            else:
                assert data is not None
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def _archive(path: str, layer_names: list[str], extra: list[Member], *, config: bytes | None = None, manifest_padding: int = 0) -> str:
    layer = layer_tar(1)
    config = config if config is not None else json.dumps({"architecture": "amd64", "os": "linux", "rootfs": {"type": "layers", "diff_ids": [sha256(layer)] * len(layer_names)}}).encode()
    manifest = json.dumps([{"Config": "config.json", "RepoTags": ["evil/app:1"], "Layers": layer_names, "Padding": "x" * manifest_padding}]).encode()
    write_tar(path, [("manifest.json", manifest, None, None), ("config.json", config, None, None), ("good/layer.tar", layer, None, None), *extra])
    return f"docker-archive:{path}"


def _truncated(path: str) -> str:
    big = layer_tar(2, files=4, file_size=100_000)
    config = json.dumps({"rootfs": {"type": "layers", "diff_ids": [sha256(big)]}}).encode()
    manifest = json.dumps([{"Config": "config.json", "RepoTags": ["evil/app:1"], "Layers": ["big/layer.tar"]}]).encode()
    write_tar(path, [("manifest.json", manifest, None, None), ("config.json", config, None, None), ("big/layer.tar", big, None, None)])
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)
    return f"docker-archive:{path}"


def _layout(path: str, mutate: Callable[[LayoutWriter, dict, dict], None]) -> str:
    """A one-image layout whose index/manifest entries ``mutate`` may falsify."""
    writer = LayoutWriter(path)
    descriptor, _ = writer.image([layer_tar(3)])
    manifest_path = os.path.join(path, "blobs", "sha256", descriptor["digest"][7:])
    manifest = json.loads(open(manifest_path).read())
    mutate(writer, descriptor, manifest)
    if manifest.get("_rewrite"):
        manifest.pop("_rewrite")
        data = json.dumps(manifest).encode()
        descriptor = {"mediaType": descriptor["mediaType"], "digest": writer.blob(data), "size": len(data)}
    writer.tag(descriptor, "1")
    return f"oci:{path}"


def _bad_manifest_digest(value: str) -> Callable[[LayoutWriter, dict, dict], None]:
    def mutate(writer: LayoutWriter, descriptor: dict, manifest: dict) -> None:
        descriptor["digest"] = value

    return mutate


def _corrupt_layer(writer: LayoutWriter, descriptor: dict, manifest: dict) -> None:
    path = os.path.join(writer.path, "blobs", "sha256", manifest["layers"][0]["digest"][7:])
    data = bytearray(open(path, "rb").read())
    data[600] ^= 0xFF
    open(path, "wb").write(bytes(data))


def _missing_layer(writer: LayoutWriter, descriptor: dict, manifest: dict) -> None:
    os.unlink(os.path.join(writer.path, "blobs", "sha256", manifest["layers"][0]["digest"][7:]))


def _wrong_size(writer: LayoutWriter, descriptor: dict, manifest: dict) -> None:
    manifest["layers"][0]["size"] += 1
    manifest["_rewrite"] = True


def _dotdot_layer(writer: LayoutWriter, descriptor: dict, manifest: dict) -> None:
    manifest["layers"][0]["digest"] = "sha256:../../../../etc/passwd"
    manifest["_rewrite"] = True


def _huge_manifest(writer: LayoutWriter, descriptor: dict, manifest: dict) -> None:
    manifest["annotations"] = {"padding": "x" * (4 << 20)}
    manifest["_rewrite"] = True


def _config_not_json(writer: LayoutWriter, descriptor: dict, manifest: dict) -> None:
    data = b"{not json"
    manifest["config"] = {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": writer.blob(data), "size": len(data)}
    manifest["_rewrite"] = True


#: case name -> (builder(tmpdir) -> source spec, a word the error must contain)
CASES: dict[str, tuple[Callable[[str], str], str]] = {
    "archive-dotdot": (lambda d: _archive(f"{d}/a.tar", ["../../etc/passwd"], []), "'..'"),
    "archive-absolute": (lambda d: _archive(f"{d}/a.tar", ["/etc/passwd"], []), "absolute"),
    "archive-symlink-escape": (lambda d: _archive(f"{d}/a.tar", ["evil/layer.tar"], [("evil/layer.tar", None, "../../../etc/passwd", None)]), "outside the archive"),
    "archive-hardlink-escape": (lambda d: _archive(f"{d}/a.tar", ["evil/layer.tar"], [("evil/layer.tar", None, None, "/etc/passwd")]), "outside the archive"),
    "archive-symlink-loop": (lambda d: _archive(f"{d}/a.tar", ["loop/a"], [("loop/a", None, "b", None), ("loop/b", None, "a", None)]), "loop"),
    "archive-missing-member": (lambda d: _archive(f"{d}/a.tar", ["nowhere/layer.tar"], []), "missing"),
    "archive-truncated": (lambda d: _truncated(f"{d}/t.tar"), "archive"),
    "archive-huge-manifest-json": (lambda d: _archive(f"{d}/a.tar", ["good/layer.tar"], [], manifest_padding=(1 << 20) + 1), "limit"),
    "archive-huge-config": (lambda d: _archive(f"{d}/a.tar", ["good/layer.tar"], [], config=b" " * ((1 << 20) + 1)), "limit"),
    "archive-config-not-json": (lambda d: _archive(f"{d}/a.tar", ["good/layer.tar"], [], config=b"{nope"), "not valid JSON"),
    "layout-digest-dotdot": (lambda d: _layout(f"{d}/l", _bad_manifest_digest("sha256:../../../etc/passwd")), "invalid digest"),
    "layout-digest-uppercase": (lambda d: _layout(f"{d}/l", _bad_manifest_digest("sha256:" + "A" * 64)), "lowercase hex"),
    "layout-digest-md5": (lambda d: _layout(f"{d}/l", _bad_manifest_digest("md5:" + "a" * 32)), "unsupported algorithm"),
    "layout-layer-dotdot": (lambda d: _layout(f"{d}/l", _dotdot_layer), "invalid digest"),
    "layout-missing-blob": (lambda d: _layout(f"{d}/l", _missing_layer), "cannot read"),
    "layout-corrupt-blob": (lambda d: _layout(f"{d}/l", _corrupt_layer), "expected sha256:"),
    "layout-wrong-size": (lambda d: _layout(f"{d}/l", _wrong_size), "descriptor says"),
    "layout-huge-manifest": (lambda d: _layout(f"{d}/l", _huge_manifest), "limit"),
    "layout-config-not-json": (lambda d: _layout(f"{d}/l", _config_not_json), "not valid JSON"),
}
