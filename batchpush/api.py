"""The Python API for migration scripts: plans built in code, runs with callbacks.

A script builds a plan from the same entries a plan file holds (``plan_of``,
validated exactly as ``batchpush run`` validates YAML), asks a registry what it
holds (``list_repositories``), runs the plan (``run``) with a callback per
finished image and per layer, and gets the ``BatchResult``: each image's
``ImageResult`` says whether it arrived and why not, so the script decides what
to do with failures (``retry_jobs`` turns them into jobs to run again).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import replace
from typing import Any

from .catalog import RepositoryMap, parse_catalog_source
from .engine import Engine, PushJob, PushOptions
from .outcome import LayerResult
from .plan import PLAN_VERSION, Plan, validate_plan
from .progress import NoProgress, Progress
from .report import BatchResult, ImageResult

log = logging.getLogger(__name__)

#: what a plan built in code is called in its errors (relative source paths are
#: relative to the working directory)
SCRIPT_PLAN = "<script>"

#: called once per (image, target) when it is final: pushed, up to date, dry run or failed
ImageCallback = Callable[[ImageResult], None]
#: called once per layer that reached its target (or was found there): the target, the layer
LayerCallback = Callable[[str, LayerResult], None]


def plan_of(images: Sequence[Mapping[str, Any]], *, registries: Mapping[str, Mapping[str, Any]] | None = None, defaults: Mapping[str, Any] | None = None) -> Plan:
    """A plan from the entries a plan file's ``images`` holds (``source``,
    ``targets``, ``tags``, ``semver``, ``latest``, ``rename``, ... see README),
    per-host ``registries`` settings and their ``defaults``. Validated as a plan
    file is: raises PlanError naming the entry and the field (``<script>`` for the
    file). Nothing is asked of a registry here."""
    document: dict[str, Any] = {"version": PLAN_VERSION, "images": [dict(entry) for entry in images]}
    if registries:
        document["registries"] = {host: dict(settings) for host, settings in registries.items()}
    if defaults:
        document["defaults"] = dict(defaults)
    return validate_plan(SCRIPT_PLAN, document)


class Callbacks(NoProgress):
    """A progress sink that hands a script's callbacks each finished image and
    layer. They are called from the run's threads, several at once: a callback
    must be quick and thread-safe. One that raises is logged; the run goes on and
    the image's result is kept."""

    def __init__(self, on_image: ImageCallback | None = None, on_layer: LayerCallback | None = None, then: Progress | None = None) -> None:
        self.on_image = on_image
        self.on_layer = on_layer
        #: another sink that gets every event as well (e.g. a renderer)
        self.then = then or NoProgress()

    def layer_done(self, target: str, layer: LayerResult) -> None:
        self.then.layer_done(target, layer)
        if self.on_layer is not None:
            _call(self.on_layer, target, layer)

    def image_done(self, result: ImageResult) -> None:
        self.then.image_done(result)
        if self.on_image is not None:
            _call(self.on_image, result)


def _call(callback: Callable[..., None], *args: Any) -> None:
    try:
        callback(*args)
    except Exception:  # a script's fault must not lose an image's result
        log.exception("a callback of the script failed")


def run(
    plan: Plan | Iterable[PushJob],
    options: PushOptions | None = None,
    *,
    jobs: Iterable[PushJob] | None = None,
    on_image: ImageCallback | None = None,
    on_layer: LayerCallback | None = None,
) -> BatchResult:
    """Run ``plan`` (or jobs) to the end; returns every image's result. A Plan's
    ``registries`` and ``defaults`` are the run's per-host settings unless
    ``options`` names some; ``jobs`` runs those instead of the plan's entries
    under its settings (``retry_jobs``). Failures do not raise: each failed image
    is in the result with its reason (``result.ok`` is False); a PlanError for a
    plan whose layouts or archives write one tag twice is raised before anything
    is sent. A KeyboardInterrupt cancels the run and is raised again."""
    options = options or PushOptions()
    if isinstance(plan, Plan):
        if not options.registries:
            options = replace(options, registry_defaults=plan.defaults, registries=plan.registries)
        if plan.incremental_from and not options.incremental_from:
            options = replace(options, incremental_from=plan.incremental_from)
        jobs = plan.jobs() if jobs is None else jobs
    elif jobs is None:
        jobs = plan
    options = replace(options, progress=Callbacks(on_image, on_layer, options.progress))
    with Engine(options) as engine:
        return engine.run(jobs)


def list_repositories(source: str, options: PushOptions | None = None) -> list[str]:
    """The repositories a catalog source (``docker://HOST/`` or
    ``docker://HOST/PREFIX/``) lists, in the registry's order (whole paths).
    Raises SourceError for a registry that serves no catalog, RegistryError for
    another failure (after the host's retries), UsageError for a bad source."""
    prefix = parse_catalog_source(source)
    with Engine(options) as engine:
        return engine.list_repositories(prefix, source)


def retry_jobs(result: BatchResult, ran: Plan | Iterable[PushJob]) -> list[PushJob]:
    """The failed images of ``result`` as jobs to run again, each with the settings
    of the job it came from (of ``ran``: the plan or the jobs that ran): a
    registry or layout image as its one source tag to its one target, filters and
    platforms kept (never a prune: one tag is not the repository); a job that failed whole (a catalog not served, a source that
    did not open) or an archive's image as that job again. A failure no job
    explains (not from ``jobs``) is left out, with a warning."""
    origins = list(ran.jobs() if isinstance(ran, Plan) else ran)
    again: dict[int, PushJob] = {}
    for image in result.images:
        if image.ok:
            continue
        origin = _origin(image.source, origins)
        if origin is None:
            log.warning("%s: not from the jobs given; not retried", image.source)
        elif image.source == origin.source or origin.source.startswith("docker-archive:"):
            again.setdefault(id(origin), origin)
        else:
            again[id(image)] = replace(origin, source=image.source, targets=(image.target,), repositories=RepositoryMap(), prune=False)
    return list(again.values())


def _origin(source: str, jobs: Sequence[PushJob]) -> PushJob | None:
    """The job whose expansion names ``source``: the same source, or the one it
    is an image of (``docker://HOST/[PREFIX/]`` for its repositories' tags,
    ``oci:PATH`` for ``oci:PATH:TAG``, an archive's path for ``PATH:NAME``)."""
    for job in jobs:
        transport, _, path = job.source.partition(":")
        if source == job.source or source.startswith(job.source if job.source.endswith("/") else (f"{job.source}:", f"{job.source}@")):
            return job
        if transport == "docker-archive" and source.startswith(f"{path}:"):
            return job
    return None
