"""The seed's rules: size tiers, mount candidates, likeness order, stale removal, HMACs.

Ported from moby's ``distribution/push_v2.go`` and ``distribution/metadata``; each
function names the seed function it reproduces.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Sequence
from dataclasses import dataclass

from .digest import Digest
from .reference import split_domain
from .registry.auth import Credentials

#: layers up to this size are "small": one mount attempt, one check (seed: smallLayerMaximumSize)
SMALL_LAYER_MAX_BYTES = 100 << 10
#: layers up to this size, or of unknown size, are "middle" (seed: middleLayerMaximumSize)
MIDDLE_LAYER_MAX_BYTES = 10 << 20


@dataclass(frozen=True, slots=True)
class Tier:
    max_mount_attempts: int
    max_existence_checks: int
    check_other_repositories: bool


SMALL = Tier(1, 1, False)
MIDDLE = Tier(3, 1, False)
LARGE = Tier(4, 3, True)


def tier_for(size_bytes: int | None) -> Tier:
    """seed: getMaxMountAndExistenceCheckAttempts."""
    if size_bytes is None:
        return MIDDLE
    if size_bytes > MIDDLE_LAYER_MAX_BYTES:
        return LARGE
    if size_bytes > SMALL_LAYER_MAX_BYTES:
        return MIDDLE
    return SMALL


@dataclass(frozen=True, slots=True)
class V2Metadata:
    """One remembered blob for a DiffID: seed's metadata.V2Metadata, plus the recipe
    that produced the digest (``""``: unknown, e.g. a gzip layer pushed as it was)."""

    digest: Digest
    source_repository: str
    hmac: str = ""
    recipe: str = ""


def _go_json(value: object) -> str:
    """encoding/json's output for a flat object of strings (HTML characters escaped)."""
    text = json.dumps(value, separators=(",", ":"), ensure_ascii=False)
    for char, escape in (("&", "\\u0026"), ("<", "\\u003c"), (">", "\\u003e"), ("\u2028", "\\u2028"), ("\u2029", "\\u2029")):
        text = text.replace(char, escape)
    return text


def hmac_key(credentials: Credentials | None) -> bytes:
    """seed: metadata.ComputeV2MetadataHMACKey — the sha256 digest *string* of the
    canonical JSON of the auth config, empty fields omitted. No credentials, no key."""
    if credentials is None:
        return b""
    fields = {
        "username": credentials.username,
        "password": credentials.password,
        "auth": credentials.auth,
        "identitytoken": credentials.identity_token,
        "registrytoken": credentials.registry_token,
    }
    canonical = _go_json({k: v for k, v in fields.items() if v})
    return str(Digest.sha256_of(canonical.encode())).encode()


def entry_hmac(key: bytes, digest: Digest, source_repository: str) -> str:
    """seed: metadata.ComputeV2MetadataHMAC."""
    if not key:
        return ""
    mac = hmac.new(key, digestmod=hashlib.sha256)
    mac.update(str(digest).encode())
    mac.update(source_repository.encode())
    return mac.hexdigest()


def hmac_matches(entry: V2Metadata, key: bytes) -> bool:
    """seed: metadata.CheckV2MetadataHMAC — an empty HMAC matches only an empty key."""
    if not entry.hmac or not key:
        return not entry.hmac and not key
    return hmac.compare_digest(entry.hmac, entry_hmac(key, entry.digest, entry.source_repository))


def _matching_path_components(path: str, target_components: Sequence[str]) -> int:
    """seed: numOfMatchingPathComponents."""
    count = 0
    for have, want in zip(path.split("/"), target_components, strict=False):
        if have != want:
            break
        count += 1
    return count


def sort_by_likeness_and_age(target_name: str, key: bytes, entries: Sequence[V2Metadata]) -> list[V2Metadata]:
    """seed: sortV2MetadataByLikenessAndAge. ``entries`` run oldest to youngest.

    Same-credentials HMAC first, then more leading path components equal to the
    target's, then youngest first (a stable sort of the reversed list).
    """
    components = target_name.split("/")
    youngest_first = list(reversed(entries))
    return sorted(youngest_first, key=lambda e: (not hmac_matches(e, key), -_matching_path_components(e.source_repository, components)))


def mount_candidates(target_name: str, key: bytes, max_count: int, entries: Sequence[V2Metadata]) -> list[V2Metadata]:
    """seed: getRepositoryMountCandidates — same registry only, never the target itself."""
    target_registry, _ = split_domain(target_name)
    same_registry = [e for e in entries if e.source_repository != target_name and "/" in e.source_repository and split_domain(e.source_repository)[0] == target_registry]
    ordered = sort_by_likeness_and_age(target_name, key, same_registry)
    return ordered[:max_count] if max_count >= 0 else ordered


def remove_after_failed_mount(entry: V2Metadata, *, unauthorized: bool, has_auth_info: bool, key: bytes) -> bool:
    """seed's rule for dropping a candidate whose mount failed: it names a source
    repository, the failure is not "unauthorised while we have no credentials",
    and its HMAC is ours or it has none."""
    return bool(entry.source_repository) and not (unauthorized and not has_auth_info) and (hmac_matches(entry, key) or not entry.hmac)
