"""The batch: sources to targets, with shared state, pools and independent failures.

Jobs are expanded into (source image, target) pushes a bounded window ahead of
them, many at once (expansion.py: a registry source's tag list is a round trip),
and the pushes run on a thread pool, a bounded number queued (so memory stays flat
for any plan size). A registry source's image is first checked (its tag's HEAD at
the source and at the target, at once) on a pool of its own, as many at once as a
registry takes requests: only the images to copy go on to the pushes, at most
``max_concurrent_images`` at once, in the order they come. Each
source image is prepared once — compressed in a process pool, verified — and that
serves every target and every retry; its spooled files are released when its
last target is done. Within an image, layers go up on the target registry's own
bounded pool. One PushState spans the batch: a blob uploaded to R/x is the first
mount candidate for R/y, single-flight per (registry, blob). An image that fails
gets no manifest and is reported with its error; the others go on. Whatever
goes wrong inside one image (an unexpected exception included) fails that image
with a one-line reason, never the run. No lock is held while anything waits,
does I/O or runs foreign code (credential helpers, progress renderers).
"""

from __future__ import annotations

import concurrent.futures as cf
import functools
import json
import logging
import os
import re
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, TypeVar

from . import mediatypes as mt
from . import waits
from .catalog import GoneRepositories, RepositoryMap, is_catalog_source, list_repositories, repository_jobs
from .digest import Digest
from .errors import BatchPushError, Cancelled, InternalError, InterruptedError_, SourceError, UsageError
from .expansion import Expansion, Key
from .image_push import ImagePusher
from .layer_push import LayerPusher
from .metadata import OverlayStore, open_store
from .policy import hmac_key
from .prepare import PendingManifest, PreparedIndex, PreparedLayer, PreparedManifest, PreparedNode, Preparer, prepared_remote
from .presend import Presend, UploadSink
from .progress import NoProgress, Progress
from .reference import LAYOUT_TRANSPORT, Reference, RepositoryPrefix, is_layout, parse_target
from .registry.auth import CredentialProvider, Credentials
from .registry.client import RegistryClient, RegistryOptions
from .registry.credentials import DockerConfigCredentials, password_from
from .registry.errors import RegistryError
from .report import BatchResult, ImageResult
from .selection import TagSelection, VersionRange
from .sources import SourceImage, SourceManifest, open_source
from .sources.base import FileRange, ImageSource, RegistryBlob, SourceLayer
from .sources.registry import TRANSPORT as REGISTRY_TRANSPORT
from .sources.registry import Platform, RegistrySource, RemoteImage, parse_registry_source, referrers_tag, resolve
from .state import PushState, RemoteBlob
from .workers import WorkerPool

if TYPE_CHECKING:
    # imported where they are used: a run without an OCI layout target, a prune or a
    # dry run never loads their modules (bench/startup.py: the one-image cron re-run)
    from .layout import LayoutError, LayoutWriter
    from .registry.reads import BlobStream

log = logging.getLogger(__name__)
T = TypeVar("T")

#: after a cancel, how long an image may take to stop before it is reported interrupted unwaited
CANCEL_GRACE_S = 5.0
#: (image, target) pushes running at once: behind a far registry 8 left the
#: request limit half used (bench/README.md, *Behind a WAN*)
DEFAULT_MAX_CONCURRENT_IMAGES = 16
#: after a cancel, how long the spool's removal is tried again
CANCEL_SPOOL_S = 2.0
#: the most image checks (a registry source's two HEADs) run beyond the pushes, and
#: the most plan entries expanded (tag lists) at once: as many as a registry takes
#: requests at once (``max_requests_in_flight``), up to this many threads each
MAX_CHECKS_AHEAD = 64
#: pushes queued for the image pool, per thread of it: enough that a thread ending
#: finds the next image expanded, few enough that memory stays flat
QUEUED_PER_THREAD = 2


@dataclass(frozen=True, slots=True, kw_only=True)
class PushOptions:
    """Options of a run; per-host registry settings override ``registry_defaults``."""

    registry_defaults: RegistryOptions = field(default_factory=RegistryOptions)
    registries: Mapping[str, RegistryOptions] = field(default_factory=dict)
    #: hosts reached over plain HTTP (or unverified TLS)
    insecure_hosts: frozenset[str] = frozenset()
    #: hosts that receive foreign (non-distributable) layers too
    nondistributable_hosts: frozenset[str] = frozenset()
    #: where credentials come from; a plan's ``username`` for a host comes first
    credentials: CredentialProvider = field(default_factory=DockerConfigCredentials)
    metadata_dir: str | None = None
    #: compression worker processes; None: from cores and memory
    jobs: int | None = None
    #: (image, target) pushes at once
    max_concurrent_images: int = DEFAULT_MAX_CONCURRENT_IMAGES
    #: where compressed layers are kept for a second reading; None: the system
    #: temp directory (TMPDIR honoured)
    spool_dir: str | None = None
    #: the most bytes the spool may hold; None: half the free space of its
    #: filesystem at the start (spool.py)
    spool_limit: int | None = None
    #: say what would happen, with read requests only
    dry_run: bool = False
    #: OCI layouts (earlier exports) whose layers an ``oci:DIR`` target leaves out
    #: (the next disk carries only what they lack; layout.py)
    incremental_from: tuple[str, ...] = ()
    progress: Progress = field(default_factory=NoProgress)


@dataclass(frozen=True, slots=True)
class PushJob:
    """One source to some targets (a plan entry). ``tags``, ``exclude_tags``,
    ``semver`` and ``latest`` select the source's tags (selection.py); a catalog
    source (``docker://HOST/[PREFIX/]``) or a target ending in ``/`` is a
    migration of many repositories (catalog.py), which ``repositories`` filters
    and renames."""

    source: str
    targets: tuple[str, ...]
    tags: re.Pattern[str] | None = None
    #: of an index from a registry source, copy only these platforms (empty: all)
    platforms: tuple[Platform, ...] = ()
    #: from a registry source, copy each image's signatures, attestations and SBOMs
    #: (cosign's ``sha256-<hex>.sig`` tags, the referrers fallback tag) with it
    signatures: bool = True
    #: a true mirror: once every image arrived, delete the targets' tags the source
    #: no longer has (prune.py; a registry source without a tag, targets without one)
    prune: bool = False
    #: drop the tags this regex finds (after ``tags``)
    exclude_tags: re.Pattern[str] | None = None
    #: keep the tags that are semantic versions in this range
    semver: VersionRange | None = None
    #: keep the N highest versions of the tags selected
    latest: int | None = None
    #: of a catalog source: which repositories, under which path
    repositories: RepositoryMap = field(default_factory=RepositoryMap)
    #: the job could not be planned (a target refused, a catalog not served): each
    #: target fails with this, nothing is asked
    error: BatchPushError | None = None

    @property
    def selection(self) -> TagSelection:
        return TagSelection(self.tags, self.exclude_tags, self.semver, self.latest)


def select_tags(images: Sequence[SourceImage], selection: TagSelection) -> list[SourceImage]:
    """The images with a tag ``selection`` selects, each with only those tags (all
    of them, untagged ones included, when it selects everything)."""
    if selection.everything:
        return list(images)
    chosen = set(selection.select(dict.fromkeys(tag for image in images for tag in image.tags)))
    selected = [SourceImage(i.name, tuple(t for t in i.tags if t in chosen), i.node) for i in images]
    return [i for i in selected if i.tags]


def expand_targets(images: Sequence[SourceImage], target: Reference) -> list[tuple[SourceImage, Reference]]:
    """Which image goes to which tag. A target with a tag takes the one image the
    source selects; a target without one takes every image under its own tags."""
    if target.tag:
        if len(images) != 1:
            raise UsageError(f"{target}: the source holds {len(images)} images; give a target without a tag to push them all, or select one in the source")
        return [(images[0], target)]
    pairs: list[tuple[SourceImage, Reference]] = []
    for image in images:
        if not image.tags:
            raise SourceError(image.name, f"the image has no tag; name one in the target ({target.name}:TAG)")
        pairs.extend((image, target.with_tag(tag)) for tag in image.tags)
    return pairs


class Entry:
    """A source image shared by its targets: prepared once, released after the last.

    The first target to need it prepares it; the others wait for that (with the
    cancel flag in view), never on a lock held while it is prepared."""

    def __init__(self, image: SourceImage, uses: int, platforms: tuple[Platform, ...] = ()) -> None:
        self.image = image
        self.uses = uses
        self.platforms = platforms
        #: where it goes: a new layer is sent to each registry of these while it is compressed
        self.targets: list[Reference] = []
        self.lock = threading.Lock()
        #: what was sent to a target while compressing, until that target's push ends
        self.presends: list[Presend] = []
        #: (registry, repository) of each target whose push has ended: a presend made
        #: for one after that is dropped at once (``Engine._adopt``)
        self.ended: set[tuple[str, str]] = set()
        #: what is done once for all targets ("node": the prepared image; "digest": a
        #: registry source's digest for it, one HEAD), by name
        self.once: dict[str, cf.Future[Any]] = {}


@dataclass(slots=True)
class _Prune:
    """A pruning plan entry: its source's tag list, its targets and its images."""

    job: PushJob
    listed: list[str] | None
    targets: list[Reference]
    works: list[Work] = field(default_factory=list)
    #: an image of it could not even be planned
    failed: bool = False
    #: its entry's position in the plan: pruned in plan order
    position: int = 0


@dataclass(frozen=True, slots=True)
class Work:
    source: str
    target: str
    entry: Entry | None = None
    reference: Reference | None = None
    error: BatchPushError | None = None


def _index_entries(raw: bytes) -> list[dict[str, Any]] | None:
    """The descriptors of an index's bytes; None if they are not an index."""
    try:
        document = json.loads(raw)
    except (ValueError, RecursionError):
        return None
    manifests = document.get("manifests") if isinstance(document, dict) else None
    if not isinstance(manifests, list) or not all(isinstance(entry, dict) for entry in manifests):
        return None
    return manifests


class Engine:
    """Runs push jobs. Use as a context manager; closes pools, sessions and the spool."""

    def __init__(self, options: PushOptions | None = None) -> None:
        self.options = options or PushOptions()
        self.state = PushState()
        self.store = open_store(self.options.metadata_dir)
        #: where the layer path records what it learns of registries (a dry run's stays in memory)
        self._remote_store = OverlayStore(self.store) if self.options.dry_run else self.store
        self._layout_store = OverlayStore(self.store)
        self._clients: dict[str, RegistryClient] = {}
        #: the OCI layout targets' writers (in ``_clients`` too, by their ``oci:DIR``)
        self._layouts: dict[str, LayoutWriter] = {}
        #: a layout target that could not be opened: every image bound for it fails
        #: with that at once (not after waiting for its lock again, each in turn)
        self._layout_failures: dict[str, LayoutError] = {}
        self._executors: dict[str, cf.ThreadPoolExecutor] = {}
        self._clients_lock = threading.Lock()
        #: pruning plan entries of this run, pruned once every image is done
        self._prunes: list[_Prune] = []
        #: pruning catalog entries: their targets' repositories no longer copied are reported
        self._gone: list[GoneRepositories] = []
        #: set by ``cancel()``: no new work starts, uploads stop, sessions are cancelled
        self.cancelled = threading.Event()
        #: when a wait for an image first saw the cancel (the run's grace starts then)
        self._cancel_seen_at: float | None = None
        #: image checks run beyond the pushes, and plan entries expanded at once
        self.checks_ahead = min(MAX_CHECKS_AHEAD, max(o.max_requests_in_flight for o in (self.options.registry_defaults, *self.options.registries.values())))
        self._pool = WorkerPool(self.options.jobs) if self.options.jobs != 1 else None
        self._spool = tempfile.mkdtemp(prefix="batchpush-spool-", dir=self.options.spool_dir)
        self.preparer = Preparer(self._spool, self.store, self._pool, cancel=self.cancelled, spool_limit=self.options.spool_limit)

    def cancel(self) -> None:
        """Stop: start nothing new; in-flight uploads stop and their sessions are
        cancelled; their images fail as interrupted (no manifest). Signal-safe."""
        self.cancelled.set()

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Release pools, sessions and the spool. After ``cancel()`` nothing is
        waited for: a request still waiting for its answer ends on its own timeout."""
        wait = not self.cancelled.is_set()
        for executor in self._executors.values():
            executor.shutdown(wait=wait, cancel_futures=True)
        if not wait:
            # uploads stopped by the cancel still cancel their sessions (a DELETE
            # each): they get CANCEL_GRACE_S in all, not a wait without end
            deadline = time.monotonic() + CANCEL_GRACE_S
            for executor in self._executors.values():
                for thread in list(getattr(executor, "_threads", ())):
                    thread.join(max(0.0, deadline - time.monotonic()))
            # and so do the streams of layers that were being compressed (presend.py)
            self.preparer.join_streams(deadline)
        self.preparer.close(wait=wait)
        if self._pool is not None:
            self._pool.shutdown(wait=wait, cancel_futures=True)
        for host, client in self._clients.items():
            client.close()
            learned = getattr(client, "learned_scheme", None)  # a layout target has none
            if learned is not None and not self.options.dry_run:
                self.store.put_scheme(host, learned)
        self.store.close()
        shutil.rmtree(self._spool, ignore_errors=True)
        # after a cancel, a compression thread still ending may write into the spool
        # while it goes: a second pass, for a bounded moment
        deadline = time.monotonic() + CANCEL_SPOOL_S
        while not wait and os.path.exists(self._spool) and time.monotonic() < deadline:
            time.sleep(waits.POLL_S)
            shutil.rmtree(self._spool, ignore_errors=True)

    def registry_options(self, host: str) -> RegistryOptions:
        options = self.options.registries.get(host, self.options.registry_defaults)
        if host in self.options.insecure_hosts and not options.insecure:
            options = replace(options, insecure=True)
        if host in self.options.nondistributable_hosts:
            options = replace(options, allow_nondistributable_artifacts=True)
        return options

    def credentials(self, host: str, options: RegistryOptions) -> Credentials | None:
        if options.username:
            return Credentials(options.username, password_from(host, password_env=options.password_env, password_file=options.password_file))
        return self.options.credentials(host)

    def client(self, host: str) -> RegistryClient:
        """The client for ``host``; raises CredentialsError (that host's images fail).
        Made outside the lock: asking for credentials may run a helper program."""
        with self._clients_lock:
            client = self._clients.get(host)
        if client is not None:
            return client
        if is_layout(host):
            return self._layout(host)  # type: ignore[return-value]
        options = self.registry_options(host)
        kind = RegistryClient
        if self.options.dry_run:
            from .registry.dry_run import DryRunClient

            kind = DryRunClient
        made = kind(
            host,
            options,
            self.credentials(host, options),
            cancel=self.cancelled,
            other_threads=self.options.max_concurrent_images + self.checks_ahead + 2,
            marked_insecure=lambda other: self.registry_options(other).insecure,
        )
        if options.insecure:
            # before another thread can find the client and ping it
            made.prefer_scheme(self.store.get_scheme(host))
        with self._clients_lock:
            client = self._clients.setdefault(host, made)
            if client is made:
                # a thread per request the host may have in flight: layers' checks and
                # mounts overlap up to the limit, uploads up to max_concurrent_uploads
                self._executors[host] = cf.ThreadPoolExecutor(max_workers=max(options.max_requests_in_flight, options.max_concurrent_uploads), thread_name_prefix=f"push-{host}")
        if client is not made:  # another thread made it first
            made.close()
        return client

    def _layout(self, host: str) -> LayoutWriter:
        """The writer of the OCI layout target ``host`` (``oci:DIR``), as a client:
        the layer and image paths write to it as to a registry (layout.py)."""
        with self._clients_lock:
            writer = self._clients.get(host)
            failed = self._layout_failures.get(host)
        if writer is not None:
            return writer  # type: ignore[return-value]
        from .layout import MAX_CONCURRENT_WRITES, BaseLayout, LayoutError, LayoutWriter

        if failed is not None:
            raise LayoutError(failed.path, failed.problem)
        bases = tuple(BaseLayout.read(path) for path in self.options.incremental_from)
        try:
            made = LayoutWriter(host[len(LAYOUT_TRANSPORT) :], bases=bases, cancel=self.cancelled, dry_run=self.options.dry_run)
        except LayoutError as exc:
            with self._clients_lock:
                self._layout_failures.setdefault(host, exc)
            raise
        with self._clients_lock:
            writer = self._clients.setdefault(host, made)  # type: ignore[arg-type]
            if writer is made:  # type: ignore[comparison-overlap]
                self._layouts[host] = made
                self._executors[host] = cf.ThreadPoolExecutor(max_workers=MAX_CONCURRENT_WRITES, thread_name_prefix="layout")
        if writer is not made:  # type: ignore[comparison-overlap]
            made.discard()  # another thread made it first
        return writer  # type: ignore[return-value]

    # -- the batch -----------------------------------------------------------
    def run(self, jobs: Iterable[PushJob]) -> BatchResult:
        """Every job's images to their targets. Each (image, target) ends ``pushed``,
        ``up-to-date``, ``dry-run`` or ``failed`` with a one-line reason. A
        KeyboardInterrupt (the Python API's Ctrl-C) cancels the run: the images in
        flight stop and fail as interrupted, then it is raised again."""
        result = BatchResult()
        keyed: list[tuple[Key, ImageResult | tuple[Work, cf.Future[ImageResult]]]] = []
        interrupted = False
        images = cf.ThreadPoolExecutor(max_workers=self.options.max_concurrent_images, thread_name_prefix="image")
        checks = cf.ThreadPoolExecutor(max_workers=self.checks_ahead, thread_name_prefix="check")
        try:
            try:
                self._submit_all(jobs, _Pools(images, checks), (self.options.max_concurrent_images + self.checks_ahead) * QUEUED_PER_THREAD, keyed)
            except KeyboardInterrupt:
                interrupted = True
                self.cancel()
            # the images were started as their entries were expanded: back into the plan's order
            keyed.sort(key=lambda item: item[0])
            ordered = [item for _, item in keyed]
            while True:
                try:
                    result.images = [self._image_result(item) for item in ordered]
                    break
                except KeyboardInterrupt:  # the images stop at once; collect what they say
                    interrupted = True
                    self.cancel()
        finally:
            checks.shutdown(wait=not self.cancelled.is_set(), cancel_futures=True)
            images.shutdown(wait=not self.cancelled.is_set(), cancel_futures=True)
        if not self.cancelled.is_set():
            arrived = {id(item[0]) for item, image in zip(ordered, result.images, strict=True) if isinstance(item, tuple) and image.ok}
            self.run_prunes(arrived, result)
        self.flush_layouts(result)
        self.add_totals(result)
        if interrupted:
            raise KeyboardInterrupt
        return result

    def flush_layouts(self, result: BatchResult) -> None:
        """Each OCI layout target's ``index.json`` written (layout.py); when it cannot
        be, the images that went there fail: nothing names them on the disk."""
        with self._clients_lock:
            writers = list(self._layouts.values())
        for writer in writers:
            try:
                writer.flush()
            except (OSError, BatchPushError) as exc:
                error = exc if isinstance(exc, BatchPushError) else InternalError.of(exc, writer.path)
                prefix = f"{writer.host}:"
                for i, image in enumerate(result.images):
                    if image.ok and image.target.startswith(prefix):
                        result.images[i] = replace(image, status="failed", error=f"the layout's index was not written: {error.message}", error_kind=error.kind)

    def add_totals(self, result: BatchResult) -> None:
        """What this engine read, compressed and sent, added to ``result`` (a cluster
        run adds each task's engine)."""
        result.bytes_read += self.preparer.bytes_read
        result.bytes_compressed += self.preparer.bytes_compressed
        spool = self.preparer.spool
        result.spool_peak_bytes = max(result.spool_peak_bytes, spool.peak)
        result.spool_limit_bytes = max(result.spool_limit_bytes, spool.limit)
        result.layers_not_kept += spool.not_kept
        with self._clients_lock:
            clients = [client for host, client in self._clients.items() if host not in self._layouts]
            layouts = list(self._layouts.values())
        for writer in layouts:
            result.layout_bytes[writer.path] += writer.bytes_sent
        for client in clients:
            result.requests_by_method.update(client.requests_by_method)
            result.requests_by_registry[client.host] += sum(client.requests_by_method.values())
            result.errors_by_registry[client.host] += client.errors
            result.bytes_uploaded += client.bytes_sent
            result.bytes_read += client.bytes_read  # blobs streamed from registry sources

    def run_prunes(self, arrived: set[int], result: BatchResult) -> None:
        """Each pruning plan entry whose images all arrived (``arrived``: the ``id`` of
        each work that did) drops the targets' tags its source no longer has; one
        that cannot is a failure of its own, added to ``result``."""
        for prune in sorted(self._prunes, key=lambda prune: prune.position):
            if prune.failed or not all(id(work) in arrived for work in prune.works):
                log.warning("%s: not pruned: an image of it did not arrive", prune.job.source)
                continue
            assert prune.listed is not None
            from .prune import prune as prune_target

            for target in prune.targets:
                try:
                    result.pruned.extend(prune_target(self.client(target.api_host), target, prune.listed, prune.job.selection.may_select))
                except Exception as exc:
                    error = exc if isinstance(exc, BatchPushError) else InternalError.of(exc, str(target))
                    result.images.append(self.failed(prune.job.source, str(target), BatchPushError(f"prune: {error.message}"), time.monotonic()))
        for gone in self._gone:
            try:
                result.pruned.extend(gone.report(self.list_repositories))
            except BatchPushError as exc:  # a report only: nothing would have been deleted
                log.warning("%s: the target catalog could not be listed (%s): repositories no longer in the source catalog not reported", gone.job.source, exc)

    def _submit_all(self, jobs: Iterable[PushJob], pools: _Pools, queued: int, keyed: list[tuple[Key, ImageResult | tuple[Work, cf.Future[ImageResult]]]]) -> None:
        """Every job's works into the pools, as the expansion hands them on, each
        with its key. At most ``queued`` wait there or run: a full queue stops the
        expansion too, so a plan of any size is expanded as it runs and memory
        stays flat."""
        slots = threading.BoundedSemaphore(queued)
        for key, work in Expansion(self.repository_jobs(jobs), self._expanded, width=self.checks_ahead, cancel=self.cancelled):
            if self.cancelled.is_set():
                self._abandon(work)
                return
            if work.error is not None:
                keyed.append((key, self.failed(work.source, work.target, work.error, time.monotonic())))
                continue
            while not slots.acquire(timeout=waits.POLL_S):
                if self.cancelled.is_set():
                    self._abandon(work)
                    return
            future = self._checked_first(work, pools) if _checks_first(work) else pools.images.submit(self.run_work, work)
            future.add_done_callback(lambda _: slots.release())
            keyed.append((key, (work, future)))

    def _checked_first(self, work: Work, pools: _Pools) -> cf.Future[ImageResult]:
        """A registry source's image, checked on the check pool (a HEAD at each end,
        at once): up to date, its result is made there; else it goes on to the image
        pool with what the check found. Its result's future."""
        outcome: cf.Future[ImageResult] = cf.Future()

        def check() -> None:
            assert work.entry is not None and work.reference is not None
            try:
                pusher = self.pusher(self.client(work.reference.api_host), work.reference)
                checked = Checked(self.mirror_up_to_date(work.entry, work.entry.image.node, pusher, _tag(work.reference)))  # type: ignore[arg-type]
            except Exception:  # the push meets it again (a failed HEAD is remembered) and says it
                checked = Checked(None)
            if checked.current is not None:  # (its attachments, mostly up to date too, are checked here)
                _settle(outcome, lambda: self.run_work(work, checked=checked))
                return
            pushed = pools.images.submit(self.run_work, work, checked=checked)
            pushed.add_done_callback(lambda done: _settle(outcome, done.result))

        try:
            pools.checks.submit(_settle_on_error, outcome, check)
        except RuntimeError as exc:  # the pool is shut down: the run is ending
            outcome.set_exception(exc)
        return outcome

    def _expanded(self, job: PushJob, position: int) -> list[Work]:
        """``job`` expanded (on an expansion thread): its works, each failure one
        that carries its error."""
        if job.source.startswith(REGISTRY_TRANSPORT):  # (a local source is read in no time)
            self._connect_early(job)
        try:
            return list(self.expand(job, position))
        except Exception as exc:  # a bug: this entry's images fail, the run goes on
            log.debug("%s: unexpected error while expanding", job.source, exc_info=True)
            return [Work(job.source, target, error=InternalError.of(exc, job.source)) for target in job.targets]

    def _connect_early(self, job: PushJob) -> None:
        """The job's target registries not yet reached are pinged now, on their own
        pools, while its source is listed: the ping (the scheme, the auth challenge)
        that their first request would wait for. One that fails is said again by
        that request, as its image's failure."""
        for text in job.targets:
            try:
                host = parse_target(text).api_host
                with self._clients_lock:
                    if host in self._clients:
                        continue
                client = self.client(host)
                self._executors[host].submit(_ping, client)
            except Exception as exc:  # (a bad target or credentials: its works carry the error)
                log.debug("%s: not reached early: %s", text, exc)

    def _abandon(self, work: Work) -> None:
        if work.entry is not None:
            if work.reference is not None:
                self._drop_presends(work.entry, work.reference)
            self._release(work.entry)

    def _image_result(self, item: ImageResult | tuple[Work, cf.Future[ImageResult]]) -> ImageResult:
        """The image's result; once the run is cancelled, an image that has not
        stopped within CANCEL_GRACE_S (a request waiting for its answer) is reported
        interrupted without waiting for it."""
        if isinstance(item, ImageResult):
            return item
        work, future = item
        while True:  # a wait the main thread's Ctrl-C can interrupt
            done, _ = cf.wait((future,), timeout=waits.POLL_S * 5)
            if done:
                try:
                    return future.result()
                except Exception as exc:  # a fault outside the image's own guard: still its own
                    return self.failed(work.source, work.target, InternalError.of(exc, work.source), time.monotonic())
            if self.cancelled.is_set():
                # the grace is the run's, from when the cancel was first seen: not
                # CANCEL_GRACE_S more for each image still waiting, one after another
                cancelled_at = self._cancel_seen_at = self._cancel_seen_at or time.monotonic()
                if time.monotonic() - cancelled_at > CANCEL_GRACE_S:
                    return self.failed(work.source, work.target, InterruptedError_("interrupted while a request was waiting for its answer; no manifest was written"), cancelled_at)

    def repository_jobs(self, jobs: Iterable[PushJob]) -> Iterator[PushJob]:
        """The jobs as the run expands them: a catalog source as one job per
        repository (its catalog listed when the job is reached), prefix targets
        resolved (catalog.py); any other job as it is."""
        for job in jobs:
            gone = GoneRepositories(job, set()) if job.prune and is_catalog_source(job.source) else None
            for each in repository_jobs(job, self.list_repositories):
                if gone is not None:
                    gone.record(each)
                yield each
            if gone is not None:
                self._gone.append(gone)

    def list_repositories(self, source: RepositoryPrefix, spec: str) -> list[str]:
        """The repositories the catalog of ``source``'s registry lists below its
        prefix (``spec``: the source as written, for messages); see
        ``catalog.list_repositories``."""
        return list_repositories(self.client(source.api_host), source, spec)

    def expand(self, job: PushJob, position: int = 0) -> Iterator[Work]:
        """The job's (image, target) works; a job that cannot be expanded gives one
        work per target that carries its error. Lists a registry source's tags.
        ``position``: the job's in the plan (its pruning is done in that order)."""
        if job.error is not None:
            for text in job.targets:
                yield Work(job.source, text, error=job.error)
            return
        targets: list[Reference] = []
        for text in job.targets:
            try:
                targets.append(parse_target(text))
            except BatchPushError as exc:
                yield Work(job.source, text, error=exc)
        try:
            opened = self._open(job.source, signatures=job.signatures)
            images = opened.images()
        except Exception as exc:
            error = exc if isinstance(exc, BatchPushError) else InternalError.of(exc, job.source)
            for target in targets:
                yield Work(job.source, str(target), error=error)
            return
        prune = _Prune(job, opened.listed, targets, position=position) if job.prune and isinstance(opened, RegistrySource) and opened.listed and len(targets) == len(job.targets) else None
        if prune is not None:
            self._prunes.append(prune)
        selection = job.selection
        if not selection.everything:
            images = select_tags(images, selection)
            if not images:
                for target in targets:
                    yield Work(job.source, str(target), error=SourceError(job.source, f"no tag is selected ({selection})"))
                return
        planned: list[tuple[SourceImage, Reference]] = []
        for target in targets:
            try:
                planned.extend(expand_targets(images, target))
            except BatchPushError as exc:
                if prune is not None:
                    prune.failed = True
                yield Work(job.source, str(target), error=exc)
        entries: dict[int, Entry] = {}
        for image, reference in planned:
            entry = entries.setdefault(id(image), Entry(image, 0, job.platforms))
            entry.uses += 1
            entry.targets.append(reference)
        for image, reference in planned:
            work = Work(image.name, str(reference), entries[id(image)], reference)
            if prune is not None:
                prune.works.append(work)
            yield work

    def _open(self, spec: str, *, signatures: bool = True) -> ImageSource:
        if spec.startswith(REGISTRY_TRANSPORT):
            return RegistrySource(spec, self.client(parse_registry_source(spec).api_host), signatures=signatures)
        return open_source(spec)

    def failed(self, source: str, target: str, error: BatchPushError, started: float, *, tell: bool = True) -> ImageResult:
        """A failed image's result, told to the renderers unless it is an
        attachment's (``tell`` False: its image tells its own failure)."""
        failed = ImageResult(source, target, "failed", error=error.message, error_kind=error.kind, seconds=time.monotonic() - started)
        if not tell:
            return failed
        self._tell(lambda: self.options.progress.failed(target, error.message))
        return self._done(failed)

    def _done(self, result: ImageResult) -> ImageResult:
        """Tell the renderers ``result`` is final: a failure where it is made
        (``failed``, a failed attachment), every other image from ``run_work``."""
        self._tell(lambda: self.options.progress.image_done(result))
        return result

    @staticmethod
    def _tell(event: Callable[[], None]) -> None:
        try:
            event()
        except Exception:  # a renderer's fault must not lose the image's result
            log.exception("progress renderer failed")

    def _once(self, entry: Entry, name: str, make: Callable[[], Any]) -> Any:
        """``make()`` once for all the entry's targets: the first to ask runs it, the
        others wait for its result (with the cancel flag in view), never on a lock
        held meanwhile."""
        future, mine = self._once_future(entry, name)
        if mine:
            _settle(future, make)
        return waits.result(future, self.cancelled)

    def _once_started(self, entry: Entry, name: str, make: Callable[[], T], executor: cf.Executor) -> cf.Future[T]:
        """``make()`` once for all the entry's targets, started on ``executor`` by the
        first to ask; everyone gets its future at once."""
        future, mine = self._once_future(entry, name)
        if mine:
            try:
                executor.submit(_settle, future, make)
            except RuntimeError as exc:  # the pool is shut down: the run is ending
                future.set_exception(exc)
        return future

    @staticmethod
    def _once_future(entry: Entry, name: str) -> tuple[cf.Future[Any], bool]:
        """The entry's future named ``name``, and whether the caller made it (and so
        must settle it)."""
        with entry.lock:
            future = entry.once.get(name)
            if future is not None:
                return future, False
            future = entry.once[name] = cf.Future()
            return future, True

    def prepared(self, entry: Entry) -> PreparedNode | PendingManifest:
        """The entry's image, prepared once for all its targets. A single manifest
        is started without waiting (its layers upload as they are checked); an index
        (or a dry run) is prepared whole."""

        def prepare() -> PreparedNode | PendingManifest:
            source = entry.image.node
            if isinstance(source, RemoteImage):
                return self._resolve(entry, source)
            if isinstance(source, SourceManifest) and not self.options.dry_run:
                return self.preparer.start(source, functools.partial(self._sinks, entry))
            return self.preparer.prepare(source)

        return self._once(entry, "node", prepare)  # type: ignore[no-any-return]

    def _resolve(self, entry: Entry, image: RemoteImage) -> PreparedNode:
        """A registry source's image, read by the digest its tag had when compared
        with the target (so the copy is what was compared, even if the tag moves)."""
        client = self.client(image.reference.api_host)
        digest, size = self.source_head(entry, image)
        pinned = RemoteImage(replace(image.reference, digest=digest))

        def fetch(repository: str, reference: str, declared: int | None) -> tuple[bytes, str, Digest]:
            _check_pull_budget(client, image)
            fetched = client.with_retries(lambda: client.get_manifest(repository, reference, mt.MANIFEST_ACCEPT, size=declared), f"manifest {repository}@{reference}")
            return fetched.raw, fetched.media_type, fetched.digest

        return prepared_remote(resolve(pinned, fetch, entry.platforms, size))

    def _source_digest(self, entry: Entry, image: RemoteImage) -> Digest:
        return self.source_head(entry, image)[0]

    def source_head(self, entry: Entry, image: RemoteImage) -> tuple[Digest, int | None]:
        """The digest the source's tag names now, and the manifest's size the HEAD
        stated (None when pinned by digest, or stated as 0, which no manifest is):
        one HEAD, once for all targets."""
        return waits.result(self._source_head_started(entry, image), self.cancelled)

    def _source_head_started(self, entry: Entry, image: RemoteImage) -> cf.Future[tuple[Digest, int | None]]:
        """``source_head``'s answer to come: its HEAD sent now, on the source host's
        own pool (once for all targets), so that the caller asks the target meanwhile."""
        if image.reference.digest is not None:
            pinned: cf.Future[tuple[Digest, int | None]] = cf.Future()
            pinned.set_result((image.reference.digest, None))
            return pinned
        client = self.client(image.reference.api_host)
        repository, tag = image.reference.repository, image.selector

        def head() -> tuple[Digest, int | None]:
            found = client.with_retries(lambda: client.head_manifest(repository, tag, mt.MANIFEST_ACCEPT), f"manifest {repository}:{tag}")
            if found is None:
                raise SourceError(image.spec, "the source has no such tag (any more)")
            return found[0], found[1] or None

        return self._once_started(entry, "digest", head, self._executors[client.host])

    def mirror_up_to_date(self, entry: Entry, image: RemoteImage, pusher: ImagePusher, tag: str) -> tuple[Digest, int] | None:
        """The mirror's cron fast path: the target's tag already names the source's
        digest (a HEAD at each end, both at once, nothing read); its digest and size.
        A platform subset is never "up to date" this way: its index is not the source's."""
        if entry.platforms:
            return None
        source = self._source_head_started(entry, image)
        current = pusher.tag_manifest(tag)
        digest = waits.result(source, self.cancelled)[0]
        return current if current is not None and current[0] == digest else None

    def pusher(self, client: RegistryClient, target: Reference) -> ImagePusher:
        # what a layout holds is not remembered across runs (a disk goes away): an overlay
        store = self._layout_store if is_layout(target.registry) else self._remote_store
        layers = LayerPusher(client, target, self.state, store, hmac_key(client.auth.credentials), materialize=self._materialize, progress=self.options.progress, allow_nondistributable=client.options.allow_nondistributable_artifacts)
        return ImagePusher(layers, self._executors[target.api_host])

    def _held_by_source(self, image: RemoteImage, node: PreparedNode | PendingManifest) -> None:
        """The source repository holds every blob of its image: on the same registry,
        the push state names it as the first mount candidate of each."""
        registry, repository = image.reference.registry, image.reference.repository
        for layer in _blobs(node):
            self.state.add_layer(registry, repository, layer.key, RemoteBlob(layer.digest, layer.size, layer.media_type))

    def _sinks(self, entry: Entry, layer: SourceLayer) -> list[UploadSink]:
        """The uploads a new layer of ``entry`` is sent to while it is compressed: one
        per target registry (its first repository there; the others mount from it).
        None for a layer the store knows by its DiffID (a mount or a check may place
        it without sending anything)."""
        key = layer.diff_id or layer.descriptor.digest
        if self.cancelled.is_set() or (key is not None and self.store.get_metadata(key)):
            return []
        firsts: dict[str, Reference] = {}
        for target in entry.targets:
            if not is_layout(target.registry):  # a layout is written from the spool, never streamed to
                firsts.setdefault(target.registry, target)
        sinks = []
        for target in firsts.values():
            try:
                sinks.append(UploadSink(self.client(target.api_host), target, self.state, adopt=functools.partial(self._adopt, entry)))
            except BatchPushError as exc:  # the layer goes the usual way, which says what is wrong
                log.debug("%s: no stream while compressing: %s", target, exc)
        return sinks

    @staticmethod
    def _adopt(entry: Entry, presend: Presend) -> bool:
        """A sink's presend, made once its compression ended: kept for its target's
        push to take up, unless that push has ended already (False: the sink drops
        it). With ``_drop_presends``, every presend is taken up or dropped, whenever
        its image fails (even before it knew its layers): a staging claim left
        behind would hold every other push of the blob to that registry."""
        with entry.lock:
            if (presend.registry, presend.repository) in entry.ended:
                return False
            entry.presends.append(presend)
        return True

    @staticmethod
    def _drop_presends(entry: Entry, target: Reference) -> None:
        """``target``'s push has ended: what was sent to it while compressing that the
        push did not take up is dropped (the session cancelled, the claim given back),
        and what is sent to it later will be (``_adopt``)."""
        with entry.lock:
            entry.ended.add((target.registry, target.repository))
            mine = [presend for presend in entry.presends if presend.for_target(target)]
            entry.presends = [presend for presend in entry.presends if not presend.for_target(target)]
        for presend in mine:
            presend.discard()

    def _release(self, entry: Entry) -> None:
        with entry.lock:
            entry.uses -= 1
            last = entry.uses == 0
            node = entry.once.pop("node", None) if last else None
        if node is not None and node.done() and node.exception() is None:
            self.preparer.release(node.result())

    def _materialize(self, layer: PreparedLayer) -> FileRange | BlobStream:
        if self.options.dry_run:  # nothing is read or sent: the size is what counts
            return FileRange("", 0, layer.size)
        blob = self.preparer.materialize(layer)
        if isinstance(blob, RegistryBlob):  # streamed from the source registry, checked as it passes
            return self.client(blob.host).blob_reader(blob)
        return blob

    def run_work(self, work: Work, *, checked: Checked | None = None) -> ImageResult:
        """``work``'s image to its target, its attachments with it; ``checked``: what
        the check of a registry source's image found already (None: ask now)."""
        result = self._push_work(work, checked=checked)
        assert work.entry is not None and work.reference is not None
        remote = work.entry.image.node
        if result.ok and isinstance(remote, RemoteImage) and (remote.attachments or remote.referrers) and not work.entry.platforms and result.source_digest:
            result = self._copy_attachments(work, remote, Digest.parse(result.source_digest), result)
        return self._done(result) if result.ok else result  # a failure was told where it was made

    def _copy_attachments(self, work: Work, image: RemoteImage, digest: Digest, result: ImageResult) -> ImageResult:
        """The image's signatures, attestations and SBOMs (tags naming its digest),
        each copied as an image of its own under the same tag. One that fails fails
        the image: it did not arrive whole."""
        assert work.reference is not None
        copied: list[str] = []
        started = time.monotonic()

        def failed(error: str, kind: str | None) -> ImageResult:  # told once, as the image's failure
            self._tell(lambda: self.options.progress.failed(result.target, error))
            return self._done(replace(result, status="failed", error=error, error_kind=kind, seconds=result.seconds + time.monotonic() - started))

        for tag in image.attachments_of(digest):
            attached = self._copy_one(image.reference.with_tag(tag), work.reference.with_tag(tag))
            if not attached.ok:
                return failed(f"{tag}: {attached.error}", attached.error_kind)
            copied.append(tag)
        if image.referrers:
            try:
                copied += self._copy_referrers(image, digest, work.reference)
            except BatchPushError as exc:
                return failed(f"referrers of {digest}: {exc.message}", exc.kind)
        return replace(result, attachments=tuple(copied))

    def _copy_one(self, source: Reference, target: Reference) -> ImageResult:
        """One attachment (a tag or a digest of the source repository) copied as an image of its own."""
        image = SourceImage(f"{REGISTRY_TRANSPORT}{source}", (source.tag,) if source.tag else (), RemoteImage(source))  # type: ignore[arg-type]
        return self._push_work(Work(image.name, str(target), Entry(image, 1), target), tell=False)

    def _copy_referrers(self, image: RemoteImage, digest: Digest, target: Reference) -> list[str]:
        """What the source's referrers API lists for ``digest``, each copied by digest
        (nothing when the source does not serve the API: the fallback tag, an
        attachment tag, carried them). A target that does not serve the API finds
        them by the fallback tag, which the client keeps (OCI distribution 1.1): its
        index gains what it lacks. Raises on the first referrer that fails."""
        source = self.client(image.reference.api_host)
        repository = image.reference.repository
        listed = source.with_retries(lambda: source.referrers(repository, digest), f"referrers of {image.reference.name}@{digest}")
        if not listed:
            return []
        copied = []
        for descriptor in listed:
            referrer = Digest.parse(descriptor["digest"])
            attached = self._copy_one(replace(image.reference, tag=None, digest=referrer), replace(target, tag=None, digest=referrer))
            if not attached.ok:
                raise SourceError(f"{REGISTRY_TRANSPORT}{image.reference.name}@{referrer}", attached.error or "not copied")
            copied.append(str(referrer))
        if self._keep_fallback_tag(target, digest, listed):
            copied.append(referrers_tag(digest))
        return copied

    def _keep_fallback_tag(self, target: Reference, digest: Digest, listed: list[dict[str, Any]]) -> bool:
        """Adds what ``listed`` names to the target's fallback tag index when the
        target does not serve the referrers API; True if the tag was written."""
        client = self.client(target.api_host)
        if client.with_retries(lambda: client.referrers(target.repository, digest), f"referrers of {target.name}@{digest}") is not None:
            return False  # served: the registry indexed them as their manifests arrived
        tag = referrers_tag(digest)
        manifests: list[dict[str, Any]] | None
        try:
            current = client.with_retries(lambda: client.get_manifest(target.repository, tag, mt.OCI_INDEX), f"manifest {tag}")
        except RegistryError as exc:
            if exc.status != 404:
                raise
            manifests = []
        else:
            manifests = _index_entries(current.raw)
            if manifests is None:
                raise RegistryError("GET", f"{client.base_url}/v2/{target.repository}/manifests/{tag}", 200, (), "the referrers fallback tag is not an OCI index: left as it is", permanent=True)
        known = {entry.get("digest") for entry in manifests}
        missing = [descriptor for descriptor in listed if descriptor["digest"] not in known]
        if not missing:
            return False
        data = json.dumps({"schemaVersion": 2, "mediaType": mt.OCI_INDEX, "manifests": manifests + missing}, separators=(",", ":")).encode()
        named = [str(Digest.sha256_of(data)), *(str(entry.get("digest")) for entry in manifests + missing)]
        with self.state.manifest_writes(target.registry, target.repository, named, client.cancel):
            client.with_retries(lambda: client.put_manifest(target.repository, tag, mt.OCI_INDEX, data), f"manifest {tag}")
        return True

    def _push_work(self, work: Work, *, tell: bool = True, checked: Checked | None = None) -> ImageResult:
        assert work.entry is not None and work.reference is not None
        started = time.monotonic()
        target = work.reference
        tag = _tag(target)
        progress = self.options.progress
        node: PreparedNode | PendingManifest | None = None
        try:
            remote = work.entry.image.node if isinstance(work.entry.image.node, RemoteImage) else None
            client = self.client(target.api_host)
            pusher = self.pusher(client, target)
            if remote is not None:
                current = self.mirror_up_to_date(work.entry, remote, pusher, tag) if checked is None else checked.current
                if current is not None:
                    digest, size = current
                    progress.pushed(str(target), tag, str(digest), size, up_to_date=True)
                    return ImageResult(work.source, str(target), "up-to-date", str(digest), size, seconds=time.monotonic() - started, source_digest=str(digest))
            node = self.prepared(work.entry)
            if remote is not None and remote.reference.registry == target.registry:
                self._held_by_source(remote, node)  # a mount from the source repository sends nothing
            progress.image_started(str(target), target.name)
            if isinstance(node, PendingManifest) and not node.ready():
                # layers still compressing: none is known to this store, so the tag
                # cannot already hold what we would push; start sending now
                pushed = pusher.push_streaming(node, tag)
            else:
                if isinstance(node, PendingManifest):
                    node = node.wait(self.cancelled)
                current = pusher.up_to_date(node, tag)
                if current is not None:
                    progress.pushed(str(target), tag, str(current.digest), current.size, up_to_date=True)
                    return ImageResult(work.source, str(target), "up-to-date", str(current.digest), current.size, seconds=time.monotonic() - started)
                pushed = pusher.push(node, tag)
            if self.options.dry_run:  # (each layer's line was printed by the layer path)
                return ImageResult(work.source, str(target), "dry-run", None, None, seconds=time.monotonic() - started, layers=pushed.layers)
            progress.pushed(str(target), tag, str(pushed.digest), pushed.size)
            source_digest = str(self._source_digest(work.entry, remote)) if remote is not None else None
        except Cancelled:
            return self.failed(work.source, str(target), InterruptedError_("interrupted before every blob arrived; no manifest was written"), started, tell=tell)
        except BatchPushError as exc:
            return self.failed(work.source, str(target), exc, started, tell=tell)
        except Exception as exc:  # a bug, a dead worker pool, a full disk...: this image fails, the run goes on
            log.debug("%s: unexpected error", target, exc_info=True)
            return self.failed(work.source, str(target), InternalError.of(exc, work.source), started, tell=tell)
        finally:
            self._drop_presends(work.entry, target)
            self._release(work.entry)
        return ImageResult(work.source, str(target), "pushed", str(pushed.digest), pushed.size, seconds=time.monotonic() - started, layers=pushed.layers, source_digest=source_digest)


@dataclass(frozen=True, slots=True)
class Checked:
    """What the check of a registry source's image found: the target tag's digest
    and size when it names the source's digest already, else None."""

    current: tuple[Digest, int] | None


@dataclass(frozen=True, slots=True)
class _Pools:
    #: the pushes, ``max_concurrent_images`` threads
    images: cf.ThreadPoolExecutor
    #: registry sources' checks, ``checks_ahead`` threads
    checks: cf.ThreadPoolExecutor


def _checks_first(work: Work) -> bool:
    """Whether ``work``'s image is checked on the check pool first: a registry
    source's whole image (a platform subset is compared through its manifests)."""
    return work.entry is not None and isinstance(work.entry.image.node, RemoteImage) and not work.entry.platforms


def _tag(target: Reference) -> str:
    """The tag a target's image goes under: a referrer goes by its digest, untagged."""
    return target.tag or (str(target.digest) if target.digest else "latest")


def _settle_on_error(future: cf.Future[Any], step: Callable[[], None]) -> None:
    """``step()``, which settles ``future`` itself; what it raises settles it instead."""
    try:
        step()
    except BaseException as exc:
        if not future.done():
            future.set_exception(exc)


def _ping(client: RegistryClient) -> None:
    try:
        client.ping()
    except Exception as exc:  # the first request pings again and fails with it
        log.debug("%s: the early ping failed: %s", client.host, exc)


def _settle(future: cf.Future[T], make: Callable[[], T]) -> None:
    """``future`` given ``make()``'s result, or what it raised."""
    try:
        future.set_result(make())
    except BaseException as exc:
        future.set_exception(exc)


def _check_pull_budget(client: RegistryClient, image: RemoteImage) -> None:
    """Docker Hub counts a manifest GET as a pull (a HEAD is free) and says what is
    left (RateLimit-Remaining). Once the budget is spent, the source is not asked
    again: each image still to copy fails at once with this line, instead of
    earning a 429 each, and the mirror's cron run tries again after the window."""
    budget = client.rate_limit
    if budget is not None and budget.remaining is not None and budget.remaining <= 0:
        window = f" per {budget.window_s} s" if budget.window_s else ""
        limit = f" of {budget.limit}{window}" if budget.limit is not None else ""
        raise SourceError(image.spec, f"the source's pull budget is spent (RateLimit-Remaining 0{limit}); not asked again in this run")


def _blobs(node: PreparedNode | PendingManifest) -> Iterator[PreparedLayer]:
    """The config and layers of every manifest of a prepared image."""
    if isinstance(node, PreparedIndex):
        for child in node.children:
            yield from _blobs(child)
    elif isinstance(node, PreparedManifest):
        yield node.config
        yield from node.layers


def push(source: str, targets: Sequence[str], options: PushOptions | None = None) -> BatchResult:
    """Push every image ``source`` selects to every target; see ``Engine``."""
    with Engine(options) as engine:
        return engine.run([PushJob(source, tuple(targets))])
