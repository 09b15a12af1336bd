"""The spool: compressed layers kept on disk for a second reading, within a limit.

A layer is compressed once and sent while it is compressed (``blocks.py``): its
blocks pass from the worker processes to the senders in memory, in a bounded window,
and never touch the disk. The spool keeps only what will be read again: a whole
compressed layer that a later image, a second target registry or a retry sends
again, so it is not compressed again then.

Keeping is never waited for. A layer's file takes its room as it is written, a
block at a time; once the limit (or the disk: ENOSPC, another process filled it)
says no, the partial file is deleted and the layer is not kept: whoever needs its
bytes again compresses it again from the source, streaming, resumable from any
offset (``blocks.RecompressedStream``). So no image waits for room another holds,
nothing deadlocks, a layer larger than the limit goes through all the same, and
our files never take more than the limit.

The default limit is half the space free on the spool's filesystem at the start
(``default_limit``): the other half is left to whoever else writes there.
"""

from __future__ import annotations

import contextlib
import errno
import mmap
import os
import tempfile
import threading
from typing import BinaryIO

#: the default limit: this share of the free space at the start
FREE_SHARE = 0.5


def default_limit(directory: str) -> int:
    """Half the space free on ``directory``'s filesystem now (for an unprivileged user)."""
    stats = os.statvfs(directory)
    return int(stats.f_bavail * stats.f_frsize * FREE_SHARE)


def free_bytes(directory: str) -> int:
    with contextlib.suppress(OSError):
        stats = os.statvfs(directory)
        return stats.f_bavail * stats.f_frsize
    return 0


class Spool:
    """The room the kept layers of one run take in ``directory``, at most ``limit``
    bytes (None: ``default_limit``). Thread-safe; its lock guards the counters only."""

    def __init__(self, directory: str, limit: int | None = None) -> None:
        self.directory = directory
        self.limit = default_limit(directory) if limit is None else limit
        self._lock = threading.Lock()
        self._used = 0
        #: the most bytes kept at once
        self.peak = 0
        #: layers that could not be kept (no room within the limit, or a full disk)
        self.not_kept = 0

    @property
    def used(self) -> int:
        with self._lock:
            return self._used

    def reserve(self, size: int) -> bool:
        """Take ``size`` bytes of room if the limit allows it now; never waits."""
        with self._lock:
            if self._used + size > self.limit:
                return False
            self._used += size
            self.peak = max(self.peak, self._used)
            return True

    def release(self, size: int) -> None:
        with self._lock:
            self._used = max(0, self._used - size)

    def dropped(self, size: int) -> None:
        """A layer's partial file is gone (not kept): its room is free."""
        with self._lock:
            self._used = max(0, self._used - size)
            self.not_kept += 1

    def keep(self) -> Keep:
        """A new file for one compressed layer, written as its blocks come."""
        return Keep(self)

    def remove(self, path: str, size: int) -> None:
        """A kept layer nobody needs any more: its file goes, its room is free."""
        with contextlib.suppress(OSError):
            os.unlink(path)
        self.release(size)


class Keep:
    """One layer's file in the spool, written a piece at a time while room is
    granted. ``write`` returns False once the layer is not kept (no room, or the
    disk is full): the partial file is gone then and later writes do nothing."""

    def __init__(self, spool: Spool) -> None:
        self.spool = spool
        self.size = 0
        self._file: BinaryIO | None = None
        self.path: str | None = None
        self.dropped = False
        try:
            fd, self.path = tempfile.mkstemp(dir=spool.directory, prefix=".partial-")
            self._file = os.fdopen(fd, "wb", buffering=1 << 20)
        except OSError:
            self._drop()

    def write(self, data: bytes | memoryview | mmap.mmap) -> bool:
        if self.dropped:
            return False
        if not self.spool.reserve(len(data)):
            self._drop()
            return False
        self.size += len(data)
        try:
            assert self._file is not None
            self._file.write(data)
        except OSError as exc:
            if exc.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
                self._drop()
                raise
            self._drop()
            return False
        return True

    def finish(self, name: str) -> str | None:
        """The kept file, renamed to ``name`` in the spool; None if not kept."""
        if self.dropped or self._file is None or self.path is None:
            return None
        try:
            self._file.close()
            final = os.path.join(self.spool.directory, name)
            os.replace(self.path, final)
        except OSError:
            self._drop()
            return None
        self.path = final
        return final

    def abort(self) -> None:
        """The compression failed: nothing of it is kept."""
        if not self.dropped:
            self._drop()

    def _drop(self) -> None:
        self.dropped = True
        if self._file is not None:
            with contextlib.suppress(OSError):
                self._file.close()
        if self.path is not None:
            with contextlib.suppress(OSError):
                os.unlink(self.path)
        self.spool.dropped(self.size)
        self.size = 0
