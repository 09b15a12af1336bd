"""A layer compressed as a stream: its blocks, in order, from the workers to the senders.

The recipe (``compress.RECIPE``) cuts the input into blocks deflated independently.
``ordered_blocks`` hands them to the worker processes a few ahead of the consumer
and yields each one's output in order as soon as it is there: compression of the
next blocks overlaps the sending of this one, and the window (how many blocks are
submitted and not yet taken) is what bounds memory, per layer and across the run
(``BlockWindow``). A consumer that falls behind holds the producer back.

Because blocks are independent, the bytes from any offset of the compressed
stream can be made again from the source by compressing from the block that holds
it (``RecompressedStream``): a layer that was not kept in the spool is sent again,
or resumed mid-way after a broken upload, without compressing it all.
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import hashlib
import mmap
import os
import threading
from collections import deque
from collections.abc import Callable, Generator, Iterator
from typing import Any

from . import waits
from .compress import BLOCK_BYTES, GZIP_HEADER, DeflatedBlock, blocks_of, combine_crc, deflate_block, deflate_block_bytes, gzip_trailer
from .digest import Digest
from .errors import Cancelled, DigestMismatchError
from .sources.base import FileRange

#: blocks one layer's compression has submitted and not yet handed on, at most
AHEAD_PER_LAYER = 3
#: a block's pages mapped in one call, not faulted in one by one (Linux)
_POPULATE = getattr(mmap, "MAP_POPULATE", 0)

Submit = Callable[..., "cf.Future[Any]"]


class BlockWindow:
    """Blocks submitted to the workers and not yet handed to a consumer, across
    every compression of the run: at most ``limit`` (each holds up to a block's
    compressed bytes in memory). A compression takes a place for each block it
    submits without waiting while it has blocks under way (so it never waits while
    holding places its own consumer must free), and waits (with the cancel flag in
    view) only when it has none."""

    def __init__(self, limit: int) -> None:
        self.limit = max(1, limit)
        self._free = threading.Semaphore(self.limit)

    def take(self, cancel: threading.Event, *, wait: bool) -> bool:
        if not wait:
            return self._free.acquire(blocking=False)
        while not self._free.acquire(timeout=waits.POLL_S):
            if cancel.is_set():
                raise Cancelled()
        return True

    def give(self) -> None:
        self._free.release()


#: a compressed block as handed on: bytes, or the worker's file mapped (read-only)
Block = bytes | mmap.mmap


def _read_block(future: cf.Future[Any]) -> tuple[Block, int]:
    """A worker's block, mapped from its file (the name then goes; the pages go
    with the last view of the map), and its input's CRC32. Mapped, not read: the
    pages the worker wrote are used as they are, where a read would copy them into
    fresh memory (zeroed, then faulted in page by page: a third of this process's
    CPU on a 2 GB layer)."""
    made: DeflatedBlock = future.result()
    try:
        with open(made.path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size == 0:
                return b"", made.crc32
            return mmap.mmap(f.fileno(), size, flags=mmap.MAP_SHARED | _POPULATE, prot=mmap.PROT_READ), made.crc32
    finally:
        with contextlib.suppress(OSError):
            os.unlink(made.path)


def _drop_block(future: cf.Future[Any]) -> None:
    """Done callback of a block nobody will read: its file goes."""
    if not future.cancelled() and future.exception() is None:
        with contextlib.suppress(OSError):
            os.unlink(future.result().path)


def ordered_blocks(blob: FileRange, submit: Submit | None, window: BlockWindow, cancel: threading.Event, *, first: int = 0, directory: str | None = None) -> Generator[tuple[Block, int, int], None, None]:
    """Each block of ``blob`` from block ``first`` on, deflated: ``(output, input
    CRC32, input size)``, in order. ``submit`` runs ``deflate_block`` in a worker,
    which writes the block into a file in ``directory`` (a tmpfs where there is
    one) and answers its name: a worker killed while it answered a 16 MiB message
    would leave the pool's reader waiting for the rest of it for ever (CPython's
    ProcessPoolExecutor sees a dead worker only between messages). None: here,
    one after another. Blocks left unconsumed are cancelled, their files removed."""
    blocks = blocks_of(blob)[first:]
    if submit is None:
        for block, last in blocks:
            if cancel.is_set():
                raise Cancelled()
            output, crc = deflate_block_bytes(block, last)
            yield output, crc, block.size
        return
    pending: deque[tuple[cf.Future[Any], int]] = deque()
    following = iter(blocks)
    more = True
    try:
        while pending or more:
            while more and len(pending) < AHEAD_PER_LAYER and window.take(cancel, wait=not pending):
                step = next(following, None)
                if step is None:
                    window.give()
                    more = False
                    break
                block, last = step
                try:
                    pending.append((submit(deflate_block, block, last, directory), block.size))
                except BaseException:
                    window.give()
                    raise
            if not pending:
                continue
            future, size = pending.popleft()
            try:
                waits.wait_done((future,), cancel)
                data, crc = _read_block(future)
            except BaseException:
                future.cancel()  # (a cancelled run: the worker need not finish it)
                future.add_done_callback(_drop_block)
                raise
            finally:
                window.give()
            yield data, crc, size
    finally:
        for future, _ in pending:
            future.cancel()
            future.add_done_callback(_drop_block)
            window.give()


class RecompressedStream:
    """A compressed layer that the spool does not hold, as a ``BlobStream``: its bytes
    made again from the source as they are read. ``views(start)`` begins at byte
    ``start`` of the compressed stream, compressing from the block that holds it
    (``resumable``: an upload broken mid-way goes on from the registry's offset).
    Each block's compressed size and input CRC32 are learned as it passes (or given,
    from the compression that made the digest), so a read from mid-way knows where
    to begin and what the trailer says. A read from the first byte checks the digest
    (and the size) before its last piece; a read from mid-way cannot, and the
    registry checks the digest at the commit."""

    resumable = True

    def __init__(self, source: FileRange, digest: Digest, size: int, submit: Submit | None, window: BlockWindow, cancel: threading.Event, *, blocks: tuple[tuple[int, int], ...] = (), on_compressed: Callable[[int], None] | None = None, directory: str | None = None) -> None:
        self.source = source
        #: where the workers put the blocks they compress
        self.directory = directory
        self.digest = digest
        self._size = size
        #: each block's (compressed size, input CRC32), as far as known
        self.blocks: list[tuple[int, int]] = list(blocks)
        self._submit = submit
        self._window = window
        self._cancel = cancel
        #: told the size of each block compressed again
        self.on_compressed = on_compressed

    @property
    def size(self) -> int:
        return self._size

    @property
    def name(self) -> str:
        return self.source.path

    def views(self, start: int = 0) -> Iterator[memoryview]:
        hasher = hashlib.sha256() if start == 0 else None
        # the block holding ``start``, and where it begins in the stream
        first, offset = 0, len(GZIP_HEADER)
        if start >= offset:
            while first < len(self.blocks) and offset + self.blocks[first][0] <= start:
                offset += self.blocks[first][0]
                first += 1
            if first == len(self.blocks) and offset < start and first * BLOCK_BYTES < self.source.size:
                raise ValueError(f"{self.source.path}: byte {start} of the compressed stream is past what was made of it")
        else:
            piece = memoryview(GZIP_HEADER)[start:]
            if hasher is not None:
                hasher.update(piece)
            yield piece
        crc = 0  # the input's CRC32 so far: the skipped blocks' as learned, then each one's
        for index, (_, block_crc) in enumerate(self.blocks[:first]):
            crc = combine_crc(crc, block_crc, min(BLOCK_BYTES, self.source.size - index * BLOCK_BYTES), index == 0)
        blocks = ordered_blocks(self.source, self._submit, self._window, self._cancel, first=first, directory=self.directory)
        with contextlib.closing(blocks):  # a read left mid-way cancels the blocks under way
            yield from self._made(blocks, first, start, offset, crc, hasher)

    def _made(self, blocks: Iterator[tuple[Block, int, int]], first: int, start: int, offset: int, crc: int, hasher: Any) -> Iterator[memoryview]:
        for index, (data, block_crc, block_input) in enumerate(blocks, start=first):
            crc = combine_crc(crc, block_crc, block_input, index == 0)
            if index == len(self.blocks):
                self.blocks.append((len(data), block_crc))
            if self.on_compressed is not None:
                self.on_compressed(len(data))
            view = memoryview(data)
            if offset < start:
                view = view[start - offset :]
            offset += len(data)
            if hasher is not None:
                hasher.update(view)
            if view:
                yield view
        trailer = gzip_trailer(crc, self.source.size)
        piece = memoryview(trailer)
        if offset < start:
            piece = piece[start - offset :]
        if hasher is not None:
            hasher.update(piece)
            if offset + len(trailer) != self._size or Digest("sha256", hasher.hexdigest()) != self.digest:
                raise DigestMismatchError(self.source.path, "layer compressed again", str(self.digest), f"sha256:{hasher.hexdigest()} ({offset + len(trailer)} bytes)")
        if piece:
            yield piece
