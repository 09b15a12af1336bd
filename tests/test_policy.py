"""The seed's rules: tiers, likeness order, candidates, stale removal, HMACs."""

from __future__ import annotations

import hashlib
import hmac as hmac_module

from hypothesis import given
from hypothesis import strategies as st

from batchpush.digest import Digest
from batchpush.policy import (
    LARGE,
    MIDDLE,
    SMALL,
    V2Metadata,
    entry_hmac,
    hmac_key,
    hmac_matches,
    mount_candidates,
    remove_after_failed_mount,
    sort_by_likeness_and_age,
    tier_for,
)
from batchpush.registry.auth import Credentials

D1 = Digest("sha256", "1" * 64)
D2 = Digest("sha256", "2" * 64)
ALICE = Credentials("alice", "secret-a")
BOB = Credentials("bob", "secret-b")
TARGET = "reg.example:5000/team/app"


def entry(repo: str, key: bytes = b"", digest: Digest = D1) -> V2Metadata:
    return V2Metadata(digest, repo, entry_hmac(key, digest, repo))


def test_tiers_match_the_seed():
    assert tier_for(0) == SMALL == tier_for(100 * 1024)
    assert tier_for(100 * 1024 + 1) == MIDDLE == tier_for(10 * 1024 * 1024)
    assert tier_for(None) == MIDDLE
    assert tier_for(10 * 1024 * 1024 + 1) == LARGE
    assert (SMALL.max_mount_attempts, SMALL.max_existence_checks, SMALL.check_other_repositories) == (1, 1, False)
    assert (MIDDLE.max_mount_attempts, MIDDLE.max_existence_checks, MIDDLE.check_other_repositories) == (3, 1, False)
    assert (LARGE.max_mount_attempts, LARGE.max_existence_checks, LARGE.check_other_repositories) == (4, 3, True)


def test_hmac_key_is_the_digest_string_of_go_json():
    # encoding/json of authConfigKeyInput{Username, Password}: field order, empty omitted
    canonical = b'{"username":"alice","password":"secret-a"}'
    assert hmac_key(ALICE) == ("sha256:" + hashlib.sha256(canonical).hexdigest()).encode()
    assert hmac_key(None) == b""
    # Go escapes HTML characters in strings
    tricky = Credentials("a<b", "p&q")
    assert hmac_key(tricky) == ("sha256:" + hashlib.sha256(b'{"username":"a\\u003cb","password":"p\\u0026q"}').hexdigest()).encode()
    full = Credentials("u", "p", auth="dTpw", identity_token="it", registry_token="rt")
    assert hmac_key(full) == ("sha256:" + hashlib.sha256(b'{"username":"u","password":"p","auth":"dTpw","identitytoken":"it","registrytoken":"rt"}').hexdigest()).encode()


def test_entry_hmac_fixed_vector():
    key = hmac_key(ALICE)
    expected = hmac_module.new(key, (str(D1) + "reg/a/x").encode(), hashlib.sha256).hexdigest()
    assert entry_hmac(key, D1, "reg/a/x") == expected
    assert entry_hmac(b"", D1, "reg/a/x") == ""


def test_hmac_matching_rules():
    key = hmac_key(ALICE)
    assert hmac_matches(entry("r/a", key), key)
    assert not hmac_matches(entry("r/a", key), hmac_key(BOB))
    assert hmac_matches(entry("r/a"), b"")  # empty matches empty only
    assert not hmac_matches(entry("r/a"), key)
    assert not hmac_matches(entry("r/a", key), b"")


def test_likeness_hmac_beats_path_beats_age():
    key = hmac_key(ALICE)
    other = hmac_key(BOB)
    oldest_ours_far = entry("reg.example:5000/x/y", key)
    old_theirs_near = entry("reg.example:5000/team/app2", other)
    young_theirs_far = entry("reg.example:5000/z/w", other)
    youngest_ours_near = entry("reg.example:5000/team/other", key)
    ordered = sort_by_likeness_and_age(TARGET, key, [oldest_ours_far, old_theirs_near, young_theirs_far, youngest_ours_near])
    assert ordered == [youngest_ours_near, oldest_ours_far, old_theirs_near, young_theirs_far]


def test_likeness_ties_keep_youngest_first():
    entries = [entry(f"reg.example:5000/o/r{i}") for i in range(5)]  # oldest first
    assert sort_by_likeness_and_age(TARGET, b"", entries) == list(reversed(entries))


def test_more_matching_path_components_first():
    entries = [entry("reg.example:5000/team/app/sub"), entry("reg.example:5000/team/x"), entry("reg.example:5000/other/app")]
    ordered = sort_by_likeness_and_age(TARGET, b"", entries)
    # "reg.example:5000/team/app/sub" matches 3 components, ".../team/x" 2, ".../other/app" 1
    assert [e.source_repository for e in ordered] == ["reg.example:5000/team/app/sub", "reg.example:5000/team/x", "reg.example:5000/other/app"]


def test_mount_candidates_same_registry_never_target_and_capped():
    entries = [entry(TARGET), entry("other.example/team/app"), entry("reg.example:5000/a/b"), entry("reg.example:5000/c/d"), entry("reg.example:5000/e/f")]
    candidates = mount_candidates(TARGET, b"", 2, entries)
    assert [c.source_repository for c in candidates] == ["reg.example:5000/e/f", "reg.example:5000/c/d"]
    assert mount_candidates(TARGET, b"", 10, [entry(TARGET)]) == []


def test_stale_removal_rule():
    key = hmac_key(ALICE)
    ours = entry("r/a", key)
    theirs = entry("r/a", hmac_key(BOB))
    bare = entry("r/a")
    assert remove_after_failed_mount(ours, unauthorized=False, has_auth_info=True, key=key)
    assert remove_after_failed_mount(bare, unauthorized=False, has_auth_info=True, key=key)
    assert not remove_after_failed_mount(theirs, unauthorized=False, has_auth_info=True, key=key)
    # unauthorised while we have no credentials: the entry may be fine for someone else
    assert not remove_after_failed_mount(bare, unauthorized=True, has_auth_info=False, key=b"")
    assert remove_after_failed_mount(bare, unauthorized=True, has_auth_info=True, key=b"")
    assert not remove_after_failed_mount(V2Metadata(D1, ""), unauthorized=False, has_auth_info=True, key=b"")


@given(st.lists(st.tuples(st.sampled_from(["reg/a/b", "reg/a/c", "reg/x", "reg/a/b/c"]), st.booleans()), max_size=12))
def test_likeness_order_is_a_stable_permutation(items):
    key = hmac_key(ALICE)
    entries = []
    for i, (repo, ours) in enumerate(items):
        d = Digest("sha256", f"{i:064x}")
        entries.append(V2Metadata(d, repo, entry_hmac(key, d, repo) if ours else ""))
    ordered = sort_by_likeness_and_age("reg/a/b", key, entries)
    assert sorted(e.digest for e in ordered) == sorted(e.digest for e in entries)

    def rank(e: V2Metadata) -> tuple[bool, int]:
        matching = 0
        for have, want in zip(e.source_repository.split("/"), ["reg", "a", "b"], strict=False):
            if have != want:
                break
            matching += 1
        return (not hmac_matches(e, key), -matching)

    for a, b in zip(ordered, ordered[1:], strict=False):
        assert rank(a) <= rank(b)
        if rank(a) == rank(b):
            assert entries.index(a) > entries.index(b)  # ties: youngest first
