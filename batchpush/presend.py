"""A new layer's data sent to its target registries while it is compressed.

docker's pusher compresses a layer while it uploads it; batchpush compresses each
layer once for every target, in parallel blocks (``blocks.py``). The two meet
here: when a large layer that nothing in the store or the batch knows is
compressed, an ``UploadSink`` per target registry of its image opens an upload
session before the first block and sends the blocks as they come, in streamed
PATCHes (chunked transfer encoding, as docker pushes) of ``--chunk-size`` each, the
digest hashed by the compression as the bytes pass. Nothing is committed: the layer is not checked yet (its DiffID), and
its image's other layers may still fail. What was sent becomes a ``Presend``, which
the layer push to that repository takes up (``LayerPusher``): its commit is one
bodiless ``PUT ?digest=``, once the image is checked.

- A sink takes one of the host's upload slots and one of its request slots for
  its whole stream, or is not used (the layer then goes the usual way, after its
  compression): it never waits for one, so a compression never waits on another
  image's upload, nor a stream on a slot another stream's body holds.
- The sink holds nothing once sent. A stream that breaks stops the sink, and its
  session is handed on as it is: the layer push asks the registry where it is and
  resumes from that offset, the bytes made again from the source by compressing
  from the block that holds it (``blocks.RecompressedStream``), not from the start.
- A sink that sent everything claims the blob's staging in the push state
  (``PushState.stage``) before the layer is released to any push, so every other
  push of the blob to that registry waits for its commit and mounts it. A presend
  nobody took up (its image failed first) is dropped by that image's push: the
  session cancelled, the claim given back.
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
from collections.abc import Callable, Iterator

from . import waits
from .blocks import Block
from .digest import Digest
from .errors import BatchPushError, Cancelled
from .reference import Reference
from .registry.client import BlobUpload, RegistryClient
from .state import PushState

log = logging.getLogger(__name__)

#: pieces a sink may have queued, not yet sent: the producer waits beyond that
QUEUED_PIECES = 1
_END = None


class Presend:
    """A layer's data, whole or in part, in an upload session of ``repository``,
    not committed. ``take`` gives it to one push; ``drop`` cancels it."""

    def __init__(self, client: RegistryClient, target: Reference, state: PushState, upload: BlobUpload, digest: Digest, *, staging: bool) -> None:
        self.client = client
        self.registry = target.registry
        self.repository = target.repository
        self.state = state
        self.upload = upload
        self.digest = digest
        #: this presend holds the blob's staging claim in the push state
        self.staging = staging
        self._lock = threading.Lock()
        self._taken = False

    def for_target(self, target: Reference) -> bool:
        return (target.registry, target.repository) == (self.registry, self.repository)

    def take(self) -> bool:
        """True for the first caller only: that push commits it (or drops it)."""
        with self._lock:
            taken, self._taken = self._taken, True
        return not taken

    def discard(self) -> None:
        """Dropped, unless a push took it up (or it was discarded) already: each
        presend is dropped once at most (a second ``unstage`` would end the claim
        of a push that staged the blob since)."""
        if self.take():
            self.drop()

    def drop(self) -> None:
        """Nobody will commit it: the session is cancelled, the claim given back."""
        self.client.cancel_upload(self.repository, self.upload.session)
        if self.staging:
            self.state.unstage(self.registry, self.digest)


class UploadSink:
    """Sends one compression's output into an upload session of ``target`` as it is
    made (see the module docstring). The producer calls ``start``, then ``put`` for
    each piece in order, then ``close`` (or ``abort``). Its own thread does the
    requests; ``put`` waits (the cancel flag in view) while it is behind."""

    def __init__(self, client: RegistryClient, target: Reference, state: PushState, *, adopt: Callable[[Presend], bool] | None = None) -> None:
        self.client = client
        self.target = target
        self.state = state
        #: told of the presend at the close: False if its target's push has ended
        self.adopt = adopt
        self.upload: BlobUpload | None = None
        self.failure: BaseException | None = None
        self._queue: queue.Queue[Block | None] = queue.Queue(QUEUED_PIECES)
        self._thread: threading.Thread | None = None
        self._stopped = threading.Event()
        #: bytes the producer handed over
        self.produced = 0

    def start(self) -> bool:
        """Takes an upload slot of the host if one is free now; False: not used."""
        if not self.client.try_upload_slot():
            return False
        try:
            self._thread = threading.Thread(target=self._run, name=f"presend-{self.target.registry}", daemon=True)
            self._thread.start()
        except BaseException:
            self._thread = None
            self.client.give_upload_slot()
            raise
        return True

    def put(self, data: Block | memoryview) -> None:
        """The next piece of the stream (nothing once the sink has stopped). A view
        is copied (its buffer may be reused); bytes and a block's map are not."""
        self.produced += len(data)
        self._offer(bytes(data) if isinstance(data, memoryview) else data)

    def _offer(self, item: Block | None) -> None:
        cancel = self.client.cancel
        while not self._stopped.is_set():
            try:
                self._queue.put(item, timeout=waits.POLL_S)
                return
            except queue.Full:
                if cancel.is_set():
                    raise Cancelled() from None

    def close(self, digest: Digest) -> Presend | None:
        """The stream is whole: waits for the last chunk, then hands the session on
        (``adopt`` refusing it: dropped). None when nothing useful was sent (the sink
        failed at the start) or another push stages the blob."""
        self._offer(_END)
        self._join()
        upload, self.upload = self.upload, None  # handed on: ``abort`` leaves it alone
        if upload is None:
            return None
        whole = self.failure is None and upload.offset == self.produced
        if whole:
            if self.state.stage(self.target.registry, digest) is not None:
                # another push is sending the same blob to this registry: ours goes
                self.client.cancel_upload(self.target.repository, upload.session)
                return None
        else:
            upload.interrupted = True  # the layer push asks the registry where it is
            log.debug("%s: the stream of %s stopped at %d of %d bytes (%s); handed on to be resumed", self.target, digest, upload.offset, self.produced, self.failure)
        presend = Presend(self.client, self.target, self.state, upload, digest, staging=whole)
        if self.adopt is not None and not self.adopt(presend):
            presend.discard()  # its target's push has ended: nobody would take it up
            return None
        return presend

    def abort(self) -> None:
        """The compression failed (or the run stopped): the session is cancelled."""
        self._stopped.set()
        self._join()
        if self.upload is not None:
            self.client.cancel_upload(self.target.repository, self.upload.session)
            self.upload = None

    def _join(self) -> None:
        thread = self._thread
        cancel = self.client.cancel
        while thread is not None and thread.is_alive():
            thread.join(waits.POLL_S)
            if cancel.is_set():
                self._stopped.set()

    def _run(self) -> None:
        try:
            # the stream holds one of the host's request slots from its start to its
            # end, or does not go (the layer then goes the usual way): its PATCH's
            # body waits on the compression, which may wait for blocks that another
            # compression holds while it waits on its own stream; that stream, were
            # it waiting for the slot this body holds, would never get it
            # (``--max-requests-in-flight`` at or below the streams under way)
            with self.client.in_flight.try_hold() as held:
                if held:
                    self._stream()
        finally:
            self._stopped.set()
            self.client.give_upload_slot()

    def _stream(self) -> None:
        repository = self.target.repository
        try:
            session = self.client.with_retries(lambda: self.client.start_upload(repository), f"upload to {self.target}")
            self.upload = upload = BlobUpload(session)
            pieces = self._pieces()
            # PATCHes of --chunk-size (64 MiB by default; at least the registry's
            # minimum chunk, each but the last): a break costs one of them
            limit = self.client.patch_bytes(session)
            while (first := next(pieces, None)) is not None:
                self.client.send_stream(repository, upload, itertools.chain((first,), pieces), limit)
        except Cancelled as exc:  # the run stops: nobody will take the session up
            self.failure = exc
            if self.upload is not None:
                self.client.cancel_upload(repository, self.upload.session)
                self.upload = None
        except (BatchPushError, OSError) as exc:
            # the bytes sent are the registry's; those not sent are gone with the
            # stream: the layer push resumes from the registry's offset (blocks.py)
            self.failure = exc
            log.debug("%s: a layer's stream stopped: %s", self.target, exc)
        except BaseException as exc:  # never lost: the layer goes the usual way
            self.failure = exc
            log.debug("%s: a layer's stream stopped", self.target, exc_info=True)

    def _pieces(self) -> Iterator[memoryview]:
        """The stream's pieces as the producer hands them over, until its end."""
        while (item := self._next()) is not _END:
            assert item is not None
            yield memoryview(item)

    def _next(self) -> Block | None:
        """The next piece; the end once the sink is stopped (aborted)."""
        while True:
            try:
                return self._queue.get(timeout=waits.POLL_S)
            except queue.Empty:
                if self._stopped.is_set():
                    return _END
                if self.client.cancel.is_set():
                    raise Cancelled() from None


__all__ = ["Presend", "UploadSink"]
