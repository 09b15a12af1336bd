"""The persistent DiffID <-> digest store."""

from __future__ import annotations

import base64
import multiprocessing
import stat

from batchpush.digest import Digest
from batchpush.metadata import MAX_ENTRIES_PER_DIFF_ID, Fingerprint, MetadataStore
from batchpush.policy import V2Metadata, entry_hmac, hmac_key
from batchpush.registry.auth import Credentials

DIFF = Digest("sha256", "d" * 64)


def digest(i: int) -> Digest:
    return Digest("sha256", f"{i:064x}")


def test_add_get_remove_and_order(tmp_path):
    store = MetadataStore(str(tmp_path))
    a = V2Metadata(digest(1), "reg/a", "h1", "gzip-isal-l1")
    b = V2Metadata(digest(2), "reg/b", "", "")
    store.add(DIFF, a)
    store.add(DIFF, b)
    assert store.get_metadata(DIFF) == [a, b]  # oldest first
    store.add(DIFF, a)  # re-adding makes it the youngest, no duplicate
    assert store.get_metadata(DIFF) == [b, a]
    assert store.get_diff_id(digest(1)) == DIFF
    store.remove(b)
    assert store.get_metadata(DIFF) == [a]
    assert store.get_diff_id(digest(2)) is None


def test_cap_drops_the_oldest(tmp_path):
    store = MetadataStore(str(tmp_path))
    for i in range(MAX_ENTRIES_PER_DIFF_ID + 7):
        store.add(DIFF, V2Metadata(digest(i), f"reg/r{i}"))
    entries = store.get_metadata(DIFF)
    assert len(entries) == MAX_ENTRIES_PER_DIFF_ID == 50
    assert entries[0].source_repository == "reg/r7"
    assert entries[-1].source_repository == f"reg/r{MAX_ENTRIES_PER_DIFF_ID + 6}"


def test_the_store_is_private_and_holds_no_credential(tmp_path):
    """The store's files are 0600 (its WAL's too, while it is open), and what a push
    with credentials records in it (the seed's HMAC of the blob and repository, keyed
    by the credentials) is none of the password, the auth string or that key."""
    password = "s3cret-Pa55word-xyz"
    auth = base64.b64encode(f"pusher:{password}".encode()).decode()
    key = hmac_key(Credentials("pusher", password, auth))
    entry = V2Metadata(digest(1), "reg/a", entry_hmac(key, digest(1), "reg/a"), "gzip-isal-l1")
    directory = tmp_path / "md"
    store = MetadataStore(str(directory))
    store.add(DIFF, entry)
    assert store.get_metadata(DIFF) == [entry] and entry.hmac
    files = sorted(directory.iterdir())
    assert {stat.S_IMODE(path.stat().st_mode) for path in files} == {0o600}, [(path.name, oct(path.stat().st_mode)) for path in files]
    stored = b"".join(path.read_bytes() for path in files)
    store.close()
    stored += b"".join(path.read_bytes() for path in directory.iterdir())
    assert entry.hmac.encode() in stored  # what is searched is where the entry went
    for secret in (password.encode(), auth.encode(), key):
        assert secret not in stored, "a credential, or the key made from it, is in the store"


def test_fingerprints(tmp_path):
    store = MetadataStore(str(tmp_path))
    fp = Fingerprint(DIFF, digest(9), 1234)
    assert store.get_fingerprint("ff" * 16, 10, "gzip-isal-l1") is None
    store.put_fingerprint("ff" * 16, 10, "gzip-isal-l1", fp)
    assert store.get_fingerprint("ff" * 16, 10, "gzip-isal-l1") == fp
    assert store.get_fingerprint("ff" * 16, 11, "gzip-isal-l1") is None
    assert store.get_fingerprint("ff" * 16, 10, "other") is None


def _writer(directory: str, worker: int, count: int) -> None:
    store = MetadataStore(directory)
    for i in range(count):
        store.add(Digest("sha256", f"{i % 5:064x}"), V2Metadata(Digest("sha256", f"{worker * 1000 + i:064x}"), f"reg/w{worker}/r{i}"))
        if i % 7 == 0:
            store.put_fingerprint(f"{worker:032x}", i, "gzip-isal-l1", Fingerprint(DIFF, digest(i), i))
    store.close()


def test_concurrent_writers_from_several_processes(tmp_path):
    directory = str(tmp_path / "shared")
    MetadataStore(directory).close()
    context = multiprocessing.get_context("spawn")
    workers = [context.Process(target=_writer, args=(directory, w, 60)) for w in range(4)]
    for p in workers:
        p.start()
    for p in workers:
        p.join(120)
        assert p.exitcode == 0
    store = MetadataStore(directory)
    for i in range(5):
        entries = store.get_metadata(Digest("sha256", f"{i:064x}"))
        assert len(entries) == 48  # 4 workers x 12 adds each, under the cap
    assert store._db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"


def test_runs_that_open_a_new_store_at_once_all_open_it(tmp_path):
    """Eight openers of one new store at the same moment, 200 times: the switch of
    a new store to WAL needs it alone, and SQLite answers 'database is locked' at
    once (no busy timeout) to those that ask meanwhile; each asks again, bounded.
    (Before: about 1 opener in 250 failed; two cron runs on a new host hit it.)"""
    import threading

    failures: list[str] = []

    def open_store(directory: str, barrier: threading.Barrier) -> None:
        barrier.wait(timeout=30)
        try:
            MetadataStore(directory).close()
        except Exception as exc:
            failures.append(repr(exc))

    for trial in range(200):
        barrier = threading.Barrier(8)
        openers = [threading.Thread(target=open_store, args=(str(tmp_path / f"store{trial}"), barrier)) for _ in range(8)]
        for opener in openers:
            opener.start()
        for opener in openers:
            opener.join(timeout=60)
        assert not failures, failures[:3]
