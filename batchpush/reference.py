"""Image references: ``registry/repository[:tag][@digest]``, normalised as docker does."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

from .digest import Digest, InvalidDigestError
from .errors import ReferenceError_

DOCKER_HUB = "docker.io"
#: the host that actually serves docker.io
DOCKER_HUB_API = "registry-1.docker.io"

# distribution/reference's grammar, lower-case path components. Every pattern is
# re.ASCII: the grammar's \w is [a-zA-Z0-9_], and without the flag Python's \w (and
# \d) also match letters and digits of any script ('é', Arabic-Indic digits), which
# no registry accepts in a tag.
_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_PATH = re.compile(rf"{_COMPONENT}(?:/{_COMPONENT})*", re.ASCII)
_TAG = re.compile(r"[\w][\w.-]{0,127}", re.ASCII)
_DOMAIN = re.compile(r"(?:[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?)(?:\.[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?)*(?::[0-9]+)?|\[[0-9a-fA-F:]+\](?::[0-9]+)?", re.ASCII)
MAX_NAME_LENGTH = 255
#: an OCI layout target: ``oci:DIR`` (a prefix: each repository's path is
#: appended) or ``oci:DIR:REPOSITORY[:TAG]``; its Reference's registry is
#: ``oci:`` and the directory's absolute path (layout.py writes it)
LAYOUT_TRANSPORT = "oci:"


@dataclass(frozen=True, slots=True)
class Reference:
    """A parsed reference. ``registry`` is the host[:port] as given (docker.io normalised)."""

    registry: str
    repository: str
    tag: str | None = None
    digest: Digest | None = None

    @property
    def name(self) -> str:
        """``registry/repository``: the seed's ``repoInfo.Name()``; of a layout,
        ``oci:DIR:repository`` (so ``str`` is what skopeo reads: ``oci:DIR:REPO:TAG``)."""
        return f"{self.registry}{':' if self.registry.startswith(LAYOUT_TRANSPORT) else '/'}{self.repository}"

    @property
    def api_host(self) -> str:
        return DOCKER_HUB_API if self.registry == DOCKER_HUB else self.registry

    def with_tag(self, tag: str) -> Reference:
        if not _TAG.fullmatch(tag):
            raise ReferenceError_(tag, "invalid tag")
        return Reference(self.registry, self.repository, tag, None)

    def __str__(self) -> str:
        text = self.name
        if self.tag:
            text += f":{self.tag}"
        if self.digest:
            text += f"@{self.digest}"
        return text


def is_repository_path(text: str) -> bool:
    """``text`` is a repository path (``team/app``) of at most MAX_NAME_LENGTH characters."""
    return len(text) <= MAX_NAME_LENGTH and _PATH.fullmatch(text) is not None


def split_domain(name: str) -> tuple[str, str]:
    """Docker's rule: the first component is a registry if it has '.', ':' or is localhost."""
    first, sep, rest = name.partition("/")
    if sep and ("." in first or ":" in first or first == "localhost" or first != first.lower()):
        return first, rest
    return DOCKER_HUB, name


def parse_reference(text: str) -> Reference:
    """Parse a reference; raises ReferenceError_ naming the input and the problem."""
    if not text or len(text) > 4096:
        raise ReferenceError_(text[:100], "empty or too long")
    remainder, at, digest_text = text.partition("@")
    digest = None
    if at:
        try:
            digest = Digest.parse(digest_text)
        except InvalidDigestError as exc:
            raise ReferenceError_(text, exc.message) from exc
    tag = None
    slash = remainder.rfind("/")
    colon = remainder.rfind(":")
    if colon > slash:
        remainder, tag = remainder[:colon], remainder[colon + 1 :]
        if not _TAG.fullmatch(tag):
            raise ReferenceError_(text, f"invalid tag {tag!r}")
    registry, path = split_domain(remainder)
    if not _DOMAIN.fullmatch(registry):
        raise ReferenceError_(text, f"invalid registry {registry!r}")
    if registry == DOCKER_HUB and "/" not in path:
        path = f"library/{path}"
    if not _PATH.fullmatch(path):
        raise ReferenceError_(text, "repository must be lower-case path components of [a-z0-9._-]")
    if len(registry) + 1 + len(path) > MAX_NAME_LENGTH:
        raise ReferenceError_(text, f"name longer than {MAX_NAME_LENGTH} characters")
    return Reference(registry, path, tag, digest)


@dataclass(frozen=True, slots=True)
class RepositoryPrefix:
    """``registry/[path/]``: many repositories at once, each named by its path below
    ``prefix``. As a source (``docker://HOST/team1/``) it selects what the registry's
    catalog lists below it; as a target (``new.example/t1/``) it receives each
    source repository under its path appended."""

    registry: str
    #: ``""`` (the whole registry) or ``"path/"``, ending in ``/``
    prefix: str

    @property
    def api_host(self) -> str:
        return DOCKER_HUB_API if self.registry == DOCKER_HUB else self.registry

    def below(self, repository: str) -> str | None:
        """The path of ``repository`` below the prefix; None if it is not below it."""
        return repository[len(self.prefix) :] if repository.startswith(self.prefix) and len(repository) > len(self.prefix) else None

    def join(self, path: str) -> Reference:
        """The repository ``path`` below the prefix; ReferenceError_ if that is not a
        valid repository name."""
        name = f"{self.prefix}{path}"
        if not is_repository_path(name) or len(self.registry) + 1 + len(name) > MAX_NAME_LENGTH:
            raise ReferenceError_(f"{self}{path}", "repository must be lower-case path components of [a-z0-9._-], the whole name at most 255 characters")
        return Reference(self.registry, name)

    def __str__(self) -> str:
        if self.registry.startswith(LAYOUT_TRANSPORT):
            return self.registry
        return f"{self.registry}/{self.prefix}"


def is_layout(text: str) -> bool:
    """A target (or a reference's registry) naming an OCI layout: ``oci:...``."""
    return text.startswith(LAYOUT_TRANSPORT)


def is_layout_prefix(text: str) -> bool:
    """``oci:DIR`` with no repository: a layout that takes each repository under its path."""
    return text.startswith(LAYOUT_TRANSPORT) and ":" not in text[len(LAYOUT_TRANSPORT) :]


def is_prefix(text: str) -> bool:
    """A target or source text ending in ``/`` (a repository prefix), or a layout
    target naming no repository."""
    return text.endswith("/") or is_layout_prefix(text)


def _layout_path(text: str, path: str) -> str:
    if not path:
        raise ReferenceError_(text, "an OCI layout target is oci:DIR[:REPOSITORY[:TAG]]")
    return f"{LAYOUT_TRANSPORT}{os.path.abspath(path)}"


def parse_prefix(text: str) -> RepositoryPrefix:
    """``REGISTRY/[PATH/]`` (``new.example/``, ``new.example/migrated/``). As in a
    reference, a first component without ``.`` or ``:`` (and not ``localhost``) is
    a path on Docker Hub. Raises ReferenceError_."""
    if is_layout_prefix(text):
        return RepositoryPrefix(_layout_path(text, text[len(LAYOUT_TRANSPORT) :]), "")
    if not is_prefix(text) or text.startswith("/") or text.endswith("//"):
        raise ReferenceError_(text, "a repository prefix is REGISTRY/[PATH/], ending in /")
    first, _, rest = text[:-1].partition("/")
    registry, path = (first, rest) if "." in first or ":" in first or first == "localhost" else (DOCKER_HUB, text[:-1])
    if not _DOMAIN.fullmatch(registry):
        raise ReferenceError_(text, f"invalid registry {registry!r}")
    if path and not is_repository_path(path):
        raise ReferenceError_(text, "the path must be lower-case path components of [a-z0-9._-]")
    return RepositoryPrefix(registry, f"{path}/" if path else "")


def target_host(text: str) -> str:
    """The host a target (or a prefix target) is pushed to; raises ReferenceError_."""
    return parse_prefix(text).api_host if is_prefix(text) else parse_reference(text).api_host


def parse_target(text: str) -> Reference:
    """Parse a push target, ``registry/repository[:tag]``; raises ReferenceError_.

    A target names where an image goes; its digest is whatever the pushed manifest
    hashes to, so a target naming one (``...@sha256:...``) is refused rather than
    silently ignored. ``oci:DIR:REPOSITORY[:TAG]`` names a repository of a layout."""
    if text.startswith(LAYOUT_TRANSPORT):
        return parse_layout_target(text)
    reference = parse_reference(text)
    if reference.digest is not None:
        raise ReferenceError_(text, "a target cannot name a digest; give a tag or none")
    return reference


def parse_layout_target(text: str) -> Reference:
    """``oci:DIR:REPOSITORY[:TAG]`` (the directory made absolute); raises ReferenceError_."""
    path, _, name = text[len(LAYOUT_TRANSPORT) :].partition(":")
    registry = _layout_path(text, path)
    repository, colon, tag = name.rpartition(":") if ":" in name else (name, "", "")
    if not is_repository_path(repository):
        raise ReferenceError_(text, "name the repository in the layout: oci:DIR:REPOSITORY[:TAG], lower-case path components of [a-z0-9._-]")
    if colon and not _TAG.fullmatch(tag):
        raise ReferenceError_(text, f"invalid tag {tag!r}")
    return Reference(registry, repository, tag or None)
