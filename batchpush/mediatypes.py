"""OCI and Docker media type constants, and how layer types map between them."""

from __future__ import annotations

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER_TAR = "application/vnd.oci.image.layer.v1.tar"
OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
OCI_LAYER_ZSTD = "application/vnd.oci.image.layer.v1.tar+zstd"
OCI_LAYER_ND_TAR = "application/vnd.oci.image.layer.nondistributable.v1.tar"
OCI_LAYER_ND_GZIP = "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip"
OCI_LAYER_ND_ZSTD = "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd"

DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_MANIFEST_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER_TAR = "application/vnd.docker.image.rootfs.diff.tar"
DOCKER_LAYER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"
DOCKER_LAYER_ZSTD = "application/vnd.docker.image.rootfs.diff.tar.zstd"
DOCKER_FOREIGN_LAYER_GZIP = "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip"

IMAGE_MANIFESTS = frozenset({OCI_MANIFEST, DOCKER_MANIFEST})
INDEXES = frozenset({OCI_INDEX, DOCKER_MANIFEST_LIST})

UNCOMPRESSED_LAYERS = frozenset({OCI_LAYER_TAR, DOCKER_LAYER_TAR, OCI_LAYER_ND_TAR})
GZIP_LAYERS = frozenset({OCI_LAYER_GZIP, DOCKER_LAYER_GZIP, OCI_LAYER_ND_GZIP, DOCKER_FOREIGN_LAYER_GZIP})
ZSTD_LAYERS = frozenset({OCI_LAYER_ZSTD, DOCKER_LAYER_ZSTD, OCI_LAYER_ND_ZSTD})
LAYERS = UNCOMPRESSED_LAYERS | GZIP_LAYERS | ZSTD_LAYERS

#: uncompressed layer type -> its gzip counterpart, in the same manifest format
GZIP_OF = {
    OCI_LAYER_TAR: OCI_LAYER_GZIP,
    OCI_LAYER_ND_TAR: OCI_LAYER_ND_GZIP,
    DOCKER_LAYER_TAR: DOCKER_LAYER_GZIP,
}

#: the accept list sent with manifest reads
MANIFEST_ACCEPT = ", ".join(sorted(IMAGE_MANIFESTS | INDEXES))
