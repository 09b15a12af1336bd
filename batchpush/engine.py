"""The batch: sources to targets, with shared state, pools and independent failures.

Each source is opened and its images prepared once (compressed in a process pool,
verified); each prepared image is then pushed to every target. An image that fails
gets no manifest and is reported with its error; the others go on.
"""

from __future__ import annotations

import concurrent.futures as cf
import multiprocessing
import shutil
import tempfile
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace

import psutil

from .errors import BatchPushError, SourceError, UsageError
from .image_push import ImagePusher
from .layer_push import LayerPusher
from .metadata import MetadataStore
from .policy import hmac_key
from .prepare import PreparedNode, Preparer
from .progress import NoProgress, Progress
from .reference import Reference, parse_reference
from .registry.auth import CredentialProvider, no_credentials
from .registry.client import RegistryClient, RegistryOptions
from .report import BatchResult, ImageResult
from .sources import SourceImage, open_source
from .state import PushState

#: memory one compression worker may need (isal state, buffers, interpreter)
WORKER_MEMORY_BYTES = 256 << 20


def default_jobs() -> int:
    """Compression workers: one per core, fewer if memory is short."""
    cores = psutil.cpu_count(logical=True) or 1
    by_memory = max(1, psutil.virtual_memory().available // WORKER_MEMORY_BYTES)
    return max(1, min(cores, by_memory))


@dataclass(frozen=True, slots=True, kw_only=True)
class PushOptions:
    """Options of a run; per-host registry settings override ``registry_defaults``."""

    registry_defaults: RegistryOptions = field(default_factory=RegistryOptions)
    registries: Mapping[str, RegistryOptions] = field(default_factory=dict)
    #: hosts reached over plain HTTP (or unverified TLS)
    insecure_hosts: frozenset[str] = frozenset()
    credentials: CredentialProvider = no_credentials
    metadata_dir: str | None = None
    #: compression worker processes; None: from cores and memory
    jobs: int | None = None
    #: where compressed layers are spooled; None: the system temp directory
    spool_dir: str | None = None
    progress: Progress = field(default_factory=NoProgress)


@dataclass(frozen=True, slots=True)
class PushJob:
    source: str
    targets: tuple[str, ...]


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


class Engine:
    """Runs push jobs. Use as a context manager; closes pools, sessions and the spool."""

    def __init__(self, options: PushOptions | None = None) -> None:
        self.options = options or PushOptions()
        self.state = PushState()
        self.store = MetadataStore(self.options.metadata_dir)
        self._clients: dict[str, RegistryClient] = {}
        self._executors: dict[str, cf.ThreadPoolExecutor] = {}
        jobs = self.options.jobs or default_jobs()
        self._pool = cf.ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("forkserver")) if jobs > 1 else None
        self._spool = tempfile.mkdtemp(prefix="batchpush-spool-", dir=self.options.spool_dir)
        self.preparer = Preparer(self._spool, self.store, self._pool)

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        for executor in self._executors.values():
            executor.shutdown(wait=True, cancel_futures=True)
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
        for client in self._clients.values():
            client.close()
        self.store.close()
        shutil.rmtree(self._spool, ignore_errors=True)

    def registry_options(self, host: str) -> RegistryOptions:
        options = self.options.registries.get(host, self.options.registry_defaults)
        if host in self.options.insecure_hosts and not options.insecure:
            options = replace(options, insecure=True)
        return options

    def client(self, host: str) -> RegistryClient:
        if host not in self._clients:
            options = self.registry_options(host)
            self._clients[host] = RegistryClient(host, options, self.options.credentials(host))
            self._executors[host] = cf.ThreadPoolExecutor(max_workers=options.max_concurrent_uploads, thread_name_prefix=f"push-{host}")
        return self._clients[host]

    def run(self, jobs: Iterable[PushJob]) -> BatchResult:
        result = BatchResult()
        for job in jobs:
            result.images.extend(self._run_job(job))
        result.bytes_read = self.preparer.bytes_read
        result.bytes_compressed = self.preparer.bytes_compressed
        for client in self._clients.values():
            result.requests_by_method.update(client.requests_by_method)
            result.bytes_uploaded += client.bytes_sent
        return result

    def _failed(self, source: str, target: str, error: BatchPushError, started: float) -> ImageResult:
        self.options.progress.failed(target, error.message)
        return ImageResult(source, target, "failed", error=error.message, error_kind=error.kind, seconds=time.monotonic() - started)

    def _run_job(self, job: PushJob) -> list[ImageResult]:
        started = time.monotonic()
        targets: list[Reference] = []
        results: list[ImageResult] = []
        for text in job.targets:
            try:
                targets.append(parse_reference(text))
            except BatchPushError as exc:
                results.append(self._failed(job.source, text, exc, started))
        try:
            images = open_source(job.source).images()
        except BatchPushError as exc:
            return results + [self._failed(job.source, str(t), exc, started) for t in targets]
        prepared: dict[int, PreparedNode | BatchPushError] = {}
        for target in targets:
            try:
                pairs = expand_targets(images, target)
            except BatchPushError as exc:
                results.append(self._failed(job.source, str(target), exc, started))
                continue
            for image, tagged in pairs:
                node = prepared.get(id(image))
                if node is None:
                    try:
                        node = self.preparer.prepare(image.node)
                    except BatchPushError as exc:
                        node = exc
                    prepared[id(image)] = node
                results.append(self._push_one(image, node, tagged))
        return results

    def _push_one(self, image: SourceImage, node: PreparedNode | BatchPushError, target: Reference) -> ImageResult:
        started = time.monotonic()
        if isinstance(node, BatchPushError):
            return self._failed(image.name, str(target), node, started)
        progress = self.options.progress
        try:
            client = self.client(target.api_host)
            layer_pusher = LayerPusher(client, target, self.state, self.store, hmac_key(client.auth.credentials), materialize=self.preparer.materialize)
            progress.repository(target.name)
            pushed = ImagePusher(layer_pusher, self._executors[target.api_host]).push(node, target.tag or "latest")
        except BatchPushError as exc:
            return self._failed(image.name, str(target), exc, started)
        for layer in pushed.layers:
            progress.layer(str(target), layer)
        progress.pushed(str(target), target.tag or "latest", str(pushed.digest), pushed.size)
        return ImageResult(image.name, str(target), "pushed", str(pushed.digest), pushed.size, seconds=time.monotonic() - started, layers=pushed.layers)


def push(source: str, targets: Sequence[str], options: PushOptions | None = None) -> BatchResult:
    """Push every image ``source`` selects to every target; see ``Engine``."""
    with Engine(options) as engine:
        return engine.run([PushJob(source, tuple(targets))])

