"""The persistent DiffID <-> digest store (the seed's V2MetadataService), in SQLite.

WAL mode with a busy timeout, so overlapping cron runs can share one file; every
change is one transaction. The file is created with mode 0600. It holds digests,
repository names, HMACs and fingerprints — never a credential.

A service user (``nobody``, a systemd ``DynamicUser``, a pod with a read-only root
file system) may have no writable home: ``open_store`` then keeps the default
store in memory for the run, with one warning, as skopeo keeps its blob-info
cache; a directory the user named and cannot write is a usage error.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from .digest import Digest
from .errors import UsageError
from .policy import V2Metadata

log = logging.getLogger(__name__)

#: entries kept per DiffID; the oldest go first (seed: maxMetadata)
MAX_ENTRIES_PER_DIFF_ID = 50
#: how long a writer waits for another process's transaction
BUSY_TIMEOUT_S = 30.0
#: how often a connection asks again for WAL mode while a new store is locked
WAL_RETRY_S = 0.05
SCHEMA_VERSION = 1
#: how long the scheme an insecure host answered on is tried first: then https is
#: tried first again once (a host that took up TLS on another port is found)
SCHEME_KEPT_S = 7 * 24 * 3600.0

_SCHEMA = """
CREATE TABLE IF NOT EXISTS v2_metadata (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    diff_id TEXT NOT NULL,
    digest TEXT NOT NULL,
    source_repository TEXT NOT NULL,
    hmac TEXT NOT NULL,
    recipe TEXT NOT NULL,
    last_seen REAL NOT NULL,
    UNIQUE (diff_id, digest, source_repository, hmac)
);
CREATE INDEX IF NOT EXISTS v2_metadata_digest ON v2_metadata (digest);
CREATE TABLE IF NOT EXISTS fingerprints (
    xxh3_128 TEXT NOT NULL,
    size INTEGER NOT NULL,
    recipe TEXT NOT NULL,
    diff_id TEXT NOT NULL,
    digest TEXT NOT NULL,
    compressed_size INTEGER NOT NULL,
    last_seen REAL NOT NULL,
    PRIMARY KEY (xxh3_128, size, recipe)
);
CREATE INDEX IF NOT EXISTS fingerprints_size ON fingerprints (size, recipe);
CREATE INDEX IF NOT EXISTS fingerprints_diff_id ON fingerprints (diff_id, recipe);
CREATE TABLE IF NOT EXISTS schemes (
    host TEXT PRIMARY KEY,
    scheme TEXT NOT NULL,
    last_seen REAL NOT NULL
);
"""


def default_metadata_dir() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "batchpush")


@dataclass(frozen=True, slots=True)
class Fingerprint:
    """What a local layer's bytes compress to under a recipe."""

    diff_id: Digest
    digest: Digest
    compressed_size: int


def _use_wal(db: sqlite3.Connection) -> None:
    """WAL mode, asked for again for a bounded time while the store is locked: the
    switch of a new store's journal needs it alone, and SQLite answers "database is
    locked" at once, without its busy timeout, while another run's first connection
    writes the schema (two runs started together on a new store)."""
    deadline = time.monotonic() + BUSY_TIMEOUT_S
    while True:
        try:
            db.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(WAL_RETRY_S)


def _reason(exc: Exception) -> str:
    return (exc.strerror or str(exc)) if isinstance(exc, OSError) else str(exc)


def open_store(directory: str | None = None) -> MetadataStore:
    """The store in ``directory``, else in the default directory. A default
    directory that cannot be created or written gives an in-memory store and one
    warning (the run goes on; the next one will not know what this one learned);
    a ``directory`` named that cannot be raises UsageError, before any request."""
    if directory:
        try:
            return MetadataStore(directory)
        except (OSError, sqlite3.Error) as exc:
            raise UsageError(f"--metadata-dir {directory}: cannot write the metadata store there: {_reason(exc)}") from exc
    default = default_metadata_dir()
    try:
        return MetadataStore(default)
    except (OSError, sqlite3.Error) as exc:
        log.warning(
            "the metadata store cannot be written in %s (%s): it is kept in memory for this run, so the next run will not know "
            "what this one pushed (no one-HEAD re-run); give --metadata-dir a writable directory",
            default,
            _reason(exc),
        )
        return MetadataStore(in_memory=True)


class MetadataStore:
    """DiffID -> [V2Metadata] (oldest first) and digest -> DiffID, plus fingerprints.

    ``in_memory``: the store lives in this process only (``path`` is ``:memory:``),
    one connection shared by every thread, its transactions one at a time."""

    def __init__(self, directory: str | None = None, *, in_memory: bool = False) -> None:
        #: the in-memory store's one connection (check_same_thread off: SQLite
        #: serialises its use), and the lock that keeps its transactions apart
        self._memory: sqlite3.Connection | None = None
        self._memory_lock = threading.Lock()
        if in_memory:
            self.path = ":memory:"
            self._memory = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        else:
            directory = directory or default_metadata_dir()
            os.makedirs(directory, mode=0o700, exist_ok=True)
            self.path = os.path.join(directory, "metadata.db")
            if not os.path.exists(self.path):
                os.close(os.open(self.path, os.O_CREAT | os.O_WRONLY, 0o600))
        #: one connection per thread: SQLite (WAL, busy timeout) orders the writers,
        #: so no lock of ours is held while a statement waits or does I/O
        self._local = threading.local()
        self._lock = threading.Lock()  # guards the list below only
        self._connections: list[sqlite3.Connection] = []
        self._closed = False
        try:
            with self._transaction() as db:
                for statement in filter(str.strip, _SCHEMA.split(";")):
                    db.execute(statement)
                db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        except BaseException:
            self.close()  # a store that cannot be written: its connections go with it
            raise

    @property
    def _db(self) -> sqlite3.Connection:
        """This thread's connection, opened on first use (the in-memory store's one)."""
        if self._memory is not None:
            return self._memory
        db: sqlite3.Connection | None = getattr(self._local, "db", None)
        if db is None:
            db = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=False)
            _use_wal(db)
            db.execute("PRAGMA synchronous=NORMAL")
            with self._lock:
                closed = self._closed
                if not closed:
                    self._connections.append(db)
            if closed:
                db.close()
                raise sqlite3.ProgrammingError("the metadata store is closed")
            self._local.db = db
        return db

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        # the in-memory store's threads share one connection: one transaction at a
        # time (memory only, no I/O under the lock); a file's are ordered by SQLite
        with self._memory_lock if self._memory is not None else contextlib.nullcontext():
            db = self._db
            db.execute("BEGIN IMMEDIATE")
            try:
                yield db
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")

    def close(self) -> None:
        with self._lock:
            self._closed = True
            connections, self._connections = self._connections, []
        if self._memory is not None:
            connections.append(self._memory)
        for db in connections:
            db.close()

    # -- V2 metadata ---------------------------------------------------------
    def get_metadata(self, diff_id: Digest) -> list[V2Metadata]:
        """Entries for a DiffID, oldest first (seed: GetMetadata)."""
        rows = self._db.execute("SELECT digest, source_repository, hmac, recipe FROM v2_metadata WHERE diff_id = ? ORDER BY seq", (str(diff_id),)).fetchall()
        return [V2Metadata(Digest.parse(d), repo, mac, recipe) for d, repo, mac, recipe in rows]

    def get_diff_id(self, digest: Digest) -> Digest | None:
        row = self._db.execute("SELECT diff_id FROM v2_metadata WHERE digest = ? ORDER BY seq DESC LIMIT 1", (str(digest),)).fetchone()
        return Digest.parse(row[0]) if row else None

    def add(self, diff_id: Digest, entry: V2Metadata) -> None:
        """Record an entry as the youngest for its DiffID, keeping at most
        MAX_ENTRIES_PER_DIFF_ID (seed: Add / TagAndAdd, the caller computes the HMAC)."""
        with self._transaction() as db:
            self._add(db, diff_id, entry)

    @staticmethod
    def _add(db: sqlite3.Connection, diff_id: Digest, entry: V2Metadata) -> None:
        db.execute("DELETE FROM v2_metadata WHERE diff_id = ? AND digest = ? AND source_repository = ? AND hmac = ?", (str(diff_id), str(entry.digest), entry.source_repository, entry.hmac))
        db.execute(
            "INSERT INTO v2_metadata (diff_id, digest, source_repository, hmac, recipe, last_seen) VALUES (?, ?, ?, ?, ?, ?)",
            (str(diff_id), str(entry.digest), entry.source_repository, entry.hmac, entry.recipe, time.time()),
        )
        db.execute(
            "DELETE FROM v2_metadata WHERE diff_id = ? AND seq NOT IN (SELECT seq FROM v2_metadata WHERE diff_id = ? ORDER BY seq DESC LIMIT ?)",
            (str(diff_id), str(diff_id), MAX_ENTRIES_PER_DIFF_ID),
        )

    def remove(self, entry: V2Metadata) -> None:
        """Forget an entry under every DiffID it is recorded for (seed: Remove)."""
        with self._transaction() as db:
            db.execute("DELETE FROM v2_metadata WHERE digest = ? AND source_repository = ? AND hmac = ?", (str(entry.digest), entry.source_repository, entry.hmac))

    # -- schemes -------------------------------------------------------------
    def get_scheme(self, host: str) -> str | None:
        """The scheme an insecure ``host`` answered on in an earlier run, within
        SCHEME_KEPT_S (None: not known, forgotten, or the store cannot be read: the
        ping then tries https first, and learns it again)."""
        try:
            row = self._db.execute("SELECT scheme FROM schemes WHERE host = ? AND last_seen > ?", (host, time.time() - SCHEME_KEPT_S)).fetchone()
        except sqlite3.Error:
            return None
        return row[0] if row and row[0] in ("http", "https") else None

    def put_scheme(self, host: str, scheme: str) -> None:
        """Remember the scheme ``host`` answered on; a store that cannot be written
        loses only this (the next run's ping tries https first again)."""
        try:
            with self._transaction() as db:
                db.execute("INSERT OR REPLACE INTO schemes (host, scheme, last_seen) VALUES (?, ?, ?)", (host, scheme, time.time()))
        except sqlite3.Error as exc:
            log.debug("the scheme of %s is not remembered: %s", host, exc)

    # -- fingerprints --------------------------------------------------------
    def get_fingerprint(self, xxh3_128: str, size: int, recipe: str) -> Fingerprint | None:
        row = self._db.execute("SELECT diff_id, digest, compressed_size FROM fingerprints WHERE xxh3_128 = ? AND size = ? AND recipe = ?", (xxh3_128, size, recipe)).fetchone()
        return Fingerprint(Digest.parse(row[0]), Digest.parse(row[1]), row[2]) if row else None

    def get_fingerprint_by_diff_id(self, diff_id: Digest, size: int, recipe: str) -> Fingerprint | None:
        """What this store learned of a layer of ``size`` bytes whose DiffID is
        ``diff_id``, compressed with ``recipe``."""
        row = self._db.execute(
            "SELECT diff_id, digest, compressed_size FROM fingerprints WHERE diff_id = ? AND size = ? AND recipe = ? ORDER BY last_seen DESC LIMIT 1",
            (str(diff_id), size, recipe),
        ).fetchone()
        return Fingerprint(Digest.parse(row[0]), Digest.parse(row[1]), row[2]) if row else None

    def has_fingerprints(self, size: int, recipe: str) -> bool:
        """Whether any layer of this size was fingerprinted: if not, a fingerprint
        pass could only miss, and the full pass runs at once."""
        return self._db.execute("SELECT 1 FROM fingerprints WHERE size = ? AND recipe = ? LIMIT 1", (size, recipe)).fetchone() is not None

    def put_fingerprint(self, xxh3_128: str, size: int, recipe: str, fingerprint: Fingerprint) -> None:
        with self._transaction() as db:
            self._put_fingerprint(db, xxh3_128, size, recipe, fingerprint)

    @staticmethod
    def _put_fingerprint(db: sqlite3.Connection, xxh3_128: str, size: int, recipe: str, fingerprint: Fingerprint) -> None:
        db.execute(
            "INSERT OR REPLACE INTO fingerprints VALUES (?, ?, ?, ?, ?, ?, ?)",
            (xxh3_128, size, recipe, str(fingerprint.diff_id), str(fingerprint.digest), fingerprint.compressed_size, time.time()),
        )

    # -- handing knowledge between stores (a cluster run's tasks) -------------
    def export(self, keys: Iterable[Digest] | None = None) -> Knowledge:
        """What this store knows of the layers ``keys`` (DiffIDs, or digests of layers
        without one), all of it if None: their entries oldest first, and fingerprints."""
        where, args = "", tuple[str, ...]()
        if keys is not None:
            args = tuple(sorted({str(k) for k in keys}))
            where = f" WHERE diff_id IN ({','.join('?' * len(args))})"
        db = self._db
        entries = tuple((d, Digest.parse(g), repo, mac, recipe) for d, g, repo, mac, recipe in db.execute(f"SELECT diff_id, digest, source_repository, hmac, recipe FROM v2_metadata{where} ORDER BY seq", args))  # noqa: S608 - placeholders only
        prints = tuple(db.execute(f"SELECT xxh3_128, size, recipe, diff_id, digest, compressed_size FROM fingerprints{where}", args))  # noqa: S608 - placeholders only
        return Knowledge(tuple((Digest.parse(d), V2Metadata(g, repo, mac, recipe)) for d, g, repo, mac, recipe in entries), tuple((x, n, r, Fingerprint(Digest.parse(d), Digest.parse(g), c)) for x, n, r, d, g, c in prints))

    def absorb(self, knowledge: Knowledge) -> None:
        """Add what another store exported (its entries keep their order, as the
        youngest), in one transaction."""
        if not (knowledge.entries or knowledge.fingerprints):
            return
        with self._transaction() as db:
            for diff_id, entry in knowledge.entries:
                self._add(db, diff_id, entry)
            for xxh3, size, recipe, fingerprint in knowledge.fingerprints:
                self._put_fingerprint(db, xxh3, size, recipe, fingerprint)


@dataclass(frozen=True, slots=True)
class Knowledge:
    """Part of a store, exported to be absorbed by another: no credential, only
    digests, repository names, HMACs and fingerprints."""

    entries: tuple[tuple[Digest, V2Metadata], ...] = ()
    #: (xxh3-128, size, recipe, fingerprint)
    fingerprints: tuple[tuple[str, int, str, Fingerprint], ...] = ()


class OverlayStore:
    """The dry run's view of a store: reads see the store and what this run would
    have written; writes stay in memory, so a dry run changes nothing on disk
    (the next real run must find the store as the dry run found it)."""

    def __init__(self, store: MetadataStore) -> None:
        self.store = store
        self._lock = threading.Lock()
        self._added: dict[Digest, list[V2Metadata]] = {}
        self._removed: set[V2Metadata] = set()

    def get_metadata(self, diff_id: Digest) -> list[V2Metadata]:
        entries = self.store.get_metadata(diff_id)
        with self._lock:
            added = [e for e in self._added.get(diff_id, ()) if e not in entries]
            return [e for e in entries + added if e not in self._removed]

    def add(self, diff_id: Digest, entry: V2Metadata) -> None:
        with self._lock:
            self._removed.discard(entry)
            self._added.setdefault(diff_id, []).append(entry)

    def remove(self, entry: V2Metadata) -> None:
        with self._lock:
            self._removed.add(entry)
