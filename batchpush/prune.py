"""Prune: a true mirror drops the target tags its source no longer has (opt-in).

Only after every image of the plan entry arrived, and only from a tag listing of
the source that succeeded and was not empty (a source that answers "no tags" by
mistake must not empty the mirror). A target tag goes when the source has no
such tag (and, with tag filters, when ``tags``, ``exclude_tags`` and ``semver``
select it: tags this entry does not mirror are never touched; ``latest`` plays no
part, a version that left the N highest is still the source's). Its manifest is
deleted by digest, which deletes every tag naming it: so a digest that a kept tag
also names is not deleted, and its stale tag stays (the report says so).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection
from dataclasses import dataclass

from . import mediatypes as mt
from .digest import Digest
from .reference import Reference
from .registry.client import RegistryClient

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Pruned:
    """A target tag the source no longer has: deleted, or kept (and why)."""

    target: str
    digest: Digest | None
    deleted: bool
    reason: str = ""


def prune(client: RegistryClient, target: Reference, source_tags: Collection[str], mirrored: Callable[[str], bool] | None = None) -> list[Pruned]:
    """Delete ``target``'s tags that ``source_tags`` lacks, of those ``mirrored``
    says the entry copies (all without it); raises RegistryError if the target's
    tags cannot be listed (nothing is deleted then)."""
    repository = target.repository
    listed = client.with_retries(lambda: client.list_tags(repository), f"tags of {target.name}")
    stale = [tag for tag in listed if tag not in source_tags and (mirrored is None or mirrored(tag))]
    if not stale:
        return []

    def digest_of(tag: str) -> Digest | None:
        found = client.with_retries(lambda: client.head_manifest(repository, tag, mt.MANIFEST_ACCEPT), f"manifest {tag}")
        return found[0] if found else None

    kept = {digest_of(tag) for tag in listed if tag not in stale}
    deleted: set[Digest] = set()
    done: list[Pruned] = []
    for tag in stale:
        digest = digest_of(tag)
        name = f"{target.name}:{tag}"
        if digest is None:
            continue  # gone meanwhile
        if digest in kept:
            done.append(Pruned(name, digest, False, "a tag the source still has names the same manifest"))
            continue
        if digest not in deleted:  # a second stale tag naming it went with the first
            client.with_retries(lambda digest=digest: client.delete_manifest(repository, digest), f"delete {name}")  # type: ignore[misc]
            deleted.add(digest)
        done.append(Pruned(name, digest, True))
        log.info("pruned %s (%s)", name, digest)
    return done
