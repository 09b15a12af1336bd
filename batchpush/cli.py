"""The command line: argv -> options -> engine -> exit code; no decisions of its own."""

from __future__ import annotations

import argparse
import os
import sys
from typing import TYPE_CHECKING, NoReturn

from . import __version__
from .errors import BatchPushError, UsageError

if TYPE_CHECKING:
    import threading
    from collections.abc import Iterable, Iterator, Sequence
    from types import FrameType

    from .engine import Engine, PushJob, PushOptions
    from .progress import LineWriter, Progress
    from .registry.auth import CredentialProvider
    from .report import BatchResult
    from .sources.registry import Platform

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2

def _size(text: str) -> int:
    from .plan import parse_size

    try:
        return parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _platform(text: str) -> Platform:
    from .sources.registry import Platform

    try:
        return Platform.parse(text)
    except BatchPushError as exc:
        raise argparse.ArgumentTypeError(exc.message) from None


def _common(parser: argparse.ArgumentParser) -> None:
    from .engine import DEFAULT_MAX_CONCURRENT_IMAGES
    from .registry.client import DEFAULT_MAX_REQUESTS_IN_FLIGHT
    from .registry.retry import DEFAULT_MAX_ATTEMPTS

    parser.add_argument("--allow-nondistributable-artifacts", action="append", default=[], metavar="HOST[:PORT]", help="push foreign (non-distributable) layers to this host too (repeatable)")
    parser.add_argument("--max-attempts", type=int, metavar="N", help=f"attempts of each protocol step sequence, retries included (default {DEFAULT_MAX_ATTEMPTS}; overrides the plan)")
    parser.add_argument("--max-requests-in-flight", type=int, metavar="N", help=f"requests to each registry at once (default {DEFAULT_MAX_REQUESTS_IN_FLIGHT}; overrides the plan)")
    parser.add_argument("--report", metavar="FILE", help="write a JSON report of every image")
    parser.add_argument("--metadata-dir", metavar="DIR", help="where the DiffID/digest store lives (default: $XDG_CACHE_HOME/batchpush; kept in memory, with a warning, when that cannot be written); one that cannot be written is a usage error")
    parser.add_argument("--jobs", type=int, metavar="N", help="compression worker processes (default: from cores and memory)")
    parser.add_argument("--spool-dir", metavar="DIR", help="where compressed layers are kept for a second reading (default: the system temp directory; overrides the plan)")
    parser.add_argument("--spool-limit", type=_size, metavar="SIZE", help="the most the spool may hold, e.g. 2G (default: half the free space of its filesystem; overrides the plan)")
    parser.add_argument("--max-concurrent-images", type=int, default=DEFAULT_MAX_CONCURRENT_IMAGES, metavar="N", help="images pushed at once")
    parser.add_argument("--dry-run", action="store_true", help="print what would happen, with read requests only")
    parser.add_argument("--incremental-from", action="append", default=[], metavar="DIR", help="oci:DIR targets leave out the layers this earlier export (an OCI layout) holds, and its images unchanged (repeatable; adds to the plan's)")
    parser.add_argument("--no-signatures", action="store_true", help="from a registry source, do not copy each image's signatures, attestations and SBOMs (sha256-<digest>.sig tags; overrides the plan)")
    parser.add_argument("--scheduler", metavar="tcp://HOST:PORT", help="run on this Dask cluster's workers (needs batchpush[cluster] here and on every worker)")
    parser.add_argument("-q", "--quiet", action="store_true", help="print errors only")
    parser.add_argument("--debug", action="store_true", help="log every request (secrets and upload state redacted)")
    _operations(parser)


def _metrics_label(text: str) -> tuple[str, str]:
    from .metrics import parse_label

    try:
        return parse_label(text)
    except BatchPushError as exc:
        raise argparse.ArgumentTypeError(exc.message) from None


def _operations(parser: argparse.ArgumentParser) -> None:
    """Flags for runs nobody watches (cron, CI): JSON logs and Prometheus metrics."""

    parser.add_argument("--log-format", choices=("text", "json"), default="text", help="json: every line written is one JSON object (an event or a log record), on stderr; no human line at all")
    parser.add_argument("--metrics-file", metavar="PATH", help="write the run's Prometheus metrics to PATH (node_exporter textfile format, atomically)")
    parser.add_argument("--pushgateway", metavar="URL", help="push the run's Prometheus metrics to this Pushgateway (a failed push is a warning only)")
    # no default here: the metrics module (its DEFAULT_JOB) is imported by a run that exports metrics only
    parser.add_argument("--metrics-job", metavar="NAME", help="the job label of the push (default batchpush)")
    parser.add_argument("--metrics-label", action="append", default=[], type=_metrics_label, metavar="KEY=VALUE", help="a grouping label of the push, and a label of every sample of the metrics file (repeatable)")


def build_parser() -> argparse.ArgumentParser:
    """The whole command line. It names the defaults of the engine and the registry
    client, so building it imports them: ``main`` answers ``--version`` before."""
    from .registry.client import DEFAULT_CHUNK_SIZE_BYTES, DEFAULT_MONOLITHIC_LIMIT_BYTES

    parser = _Parser(prog="batchpush", description="Push container images to OCI registries in bulk.")
    parser.add_argument("--version", action="version", version=f"batchpush {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    push = commands.add_parser("push", help="push the images of one source to one or more repositories")
    push.add_argument("source", help="oci:PATH[:TAG], docker-archive:PATH[:REF], docker://REGISTRY/REPOSITORY[:TAG|@DIGEST], or docker://REGISTRY/[PREFIX/] (every repository its catalog lists); oci:PATH with a prefix target: every REPOSITORY:TAG of an export")
    push.add_argument("targets", nargs="+", metavar="TARGET", help="REGISTRY/REPOSITORY[:TAG]; without a tag, the source's tags; REGISTRY/[PREFIX/] (ending in /): each source repository's path appended; oci:DIR[:REPOSITORY[:TAG]]: into one OCI layout (an air-gapped export)")
    push.add_argument("--insecure", action="append", default=[], metavar="HOST[:PORT]", help="plain HTTP or unverified TLS for this host (repeatable)")
    push.add_argument("--platform", action="append", default=[], type=_platform, metavar="OS/ARCH[/VARIANT]", help="of a registry source's index, copy only this platform (repeatable; default all)")
    push.add_argument("--username", metavar="NAME", help="log in to the target registries as NAME (password from --password-stdin)")
    push.add_argument("--password-stdin", action="store_true", help="read the password from standard input")
    push.add_argument("--ca-file", metavar="PATH", help="trust this CA for the target registries (docker's certs.d is read too)")
    push.add_argument("--chunk-size", type=_size, default=DEFAULT_CHUNK_SIZE_BYTES, metavar="SIZE", help="PATCH size of chunked uploads")
    push.add_argument("--monolithic-limit", type=_size, default=DEFAULT_MONOLITHIC_LIMIT_BYTES, metavar="SIZE", help="blobs above this size are sent in chunks")
    _common(push)
    run = commands.add_parser("run", help="run a plan file: many sources to many repositories and registries")
    run.add_argument("plan", metavar="PLAN", help="a plan file (YAML or JSON), see README")
    run.add_argument("--insecure", action="append", default=[], metavar="HOST[:PORT]", help="plain HTTP or unverified TLS for this host (repeatable)")
    _common(run)
    return parser


def _progress(args: argparse.Namespace, writer: LineWriter) -> Progress:
    from .progress import JsonProgress, PlainProgress, RichProgress

    if args.log_format == "json":  # the events, as JSON on stderr; no human line at all
        return JsonProgress()
    if sys.stdout.isatty() and not args.debug and not args.quiet:
        return RichProgress()
    return PlainProgress(quiet=args.quiet, writer=writer)


def _dry_run_lines(result: BatchResult) -> Iterator[str]:
    from .outcome import LayerOutcome

    total = 0
    for image in result.images:
        if image.status != "dry-run":
            yield f"{image.target}: {image.status}" + (f" ({image.digest})" if image.digest else "")
            continue
        yield f"{image.source} -> {image.target}:"
        for layer in image.layers:
            where = f" from {layer.mounted_from}" if layer.mounted_from else ""
            sent = f" {layer.bytes_sent} bytes" if layer.outcome is LayerOutcome.UPLOADED else ""
            yield f"  {layer.digest}: {'upload' if layer.outcome is LayerOutcome.UPLOADED else layer.outcome.value}{where}{sent}"
            total += layer.bytes_sent
    yield f"would send {total} bytes of layers"
    for path, size in sorted(result.layout_bytes.items()):
        yield f"oci:{path} needs {size} bytes more (the blobs, configs and manifests it lacks)"


def _closing_lines(args: argparse.Namespace, result: BatchResult) -> Iterator[str]:
    """What a run ends with before its summary: a dry run's plan, pruned tags."""
    if args.dry_run:
        yield from _dry_run_lines(result)
    for pruned in result.pruned:
        verb = ("would delete" if args.dry_run else "deleted") if pruned.deleted else "kept"
        yield f"{pruned.target}: {verb}{f' ({pruned.digest})' if pruned.digest else ''}{': ' + pruned.reason if pruned.reason else ''}"


def _close(args: argparse.Namespace, progress: Progress, result: BatchResult, seconds: float) -> None:
    """The closing lines and the summary, through the progress renderer (so never
    written by a thread that can block, and not at all with ``-q``): lines on
    stdout, or ``note`` events and one ``summary`` event of the same figures."""
    from .progress import JsonProgress
    from .summary import summary_figures, summary_line, summary_lines

    for line in _closing_lines(args, result):
        progress.note(line)
    if isinstance(progress, JsonProgress):  # each failure was an event of its own already
        figures = summary_figures(result, seconds)
        progress.summary(figures, summary_line(figures))
        return
    for line in summary_lines(result, seconds):
        progress.note(line)


def _exit_code(args: argparse.Namespace, result: BatchResult, started_at: float, started: float, *, interrupted: bool) -> int:
    """The run's exit code; its metrics exported, as a success only when every image arrived."""
    code = EXIT_USAGE if any(image.error_kind == "usage" for image in result.images) else result.exit_code
    _export_metrics(args, result, started_at, started, success=code == EXIT_OK and not interrupted)
    return code


def _push_credentials(args: argparse.Namespace) -> CredentialProvider:
    """``--username`` with ``--password-stdin`` for every target registry, else docker's config."""
    from .reference import target_host
    from .registry.auth import Credentials
    from .registry.credentials import ChainedCredentials, DockerConfigCredentials

    if args.password_stdin and not args.username:
        raise UsageError("--password-stdin needs --username")
    if not args.username:
        return DockerConfigCredentials()
    if not args.password_stdin:
        raise UsageError("--username needs --password-stdin (a password is never taken on the command line)")
    password = sys.stdin.readline().rstrip("\r\n")
    explicit = {}
    for target in args.targets:
        try:
            explicit[target_host(target)] = Credentials(args.username, password)
        except BatchPushError:
            continue  # reported as that target's failure
    return ChainedCredentials(explicit, DockerConfigCredentials())


def _export_metrics(args: argparse.Namespace, result: BatchResult, started_at: float, started: float, *, success: bool) -> None:
    """The run's metrics, if asked for; a dry run publishes none (it would be a success that sent nothing)."""
    if args.dry_run or not (args.metrics_file or args.pushgateway):
        return
    import time

    from .metrics import DEFAULT_JOB, MetricsOptions, RunTimes, export  # prometheus-client: only a run that asks for metrics

    options = MetricsOptions(textfile=args.metrics_file, pushgateway=args.pushgateway, job=args.metrics_job or DEFAULT_JOB, labels=dict(args.metrics_label))
    export(options, result, RunTimes(started_at, time.time(), time.monotonic() - started), success=success)


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["--version"]:
        # what argparse's version action prints, before the run's modules are
        # imported: a version probe costs the interpreter's start-up only
        print(f"batchpush {__version__}")
        return EXIT_OK
    import logging

    from .logs import JsonFormatter, RedactingFormatter, json_line
    from .progress import LineWriter, WriterHandler

    try:
        args = build_parser().parse_args(argv)
    except _CommandLineError as exc:
        if _asks_json(argv):  # the command line asked for JSON: its own error is JSON too
            sys.stderr.write(json_line(logging.ERROR, "usage-error", exc.message) + "\n")
        else:
            sys.stderr.write(exc.usage + exc.message + "\n")
        return EXIT_USAGE
    except SystemExit as exc:  # --help
        return EXIT_USAGE if exc.code else EXIT_OK
    json_logs = args.log_format == "json"
    # every line of the run, log records included, goes through one writer thread:
    # no thread of ours waits on a stdout or stderr that nobody reads
    writer = LineWriter(dropped_line=(lambda text: json_line(logging.WARNING, "lines-dropped", text)) if json_logs else None)
    handler = WriterHandler(writer, sys.stderr)
    handler.setFormatter(JsonFormatter() if json_logs else RedactingFormatter("%(levelname)s %(name)s: %(message)s"))
    # a JSON log carries the events and retries, logged at INFO (-q: failures only)
    level = logging.DEBUG if args.debug else logging.WARNING if args.quiet or not json_logs else logging.INFO
    logging.basicConfig(level=level, handlers=[handler], force=True)
    logging.captureWarnings(json_logs)  # a Python warning is a record like any other
    try:
        return _main(args, writer)
    finally:
        writer.close()


class _CommandLineError(Exception):
    """argparse's usage error, left to ``main`` to write (as JSON with ``--log-format json``)."""

    def __init__(self, usage: str, message: str) -> None:
        super().__init__(message)
        self.usage = usage
        self.message = message


class _Parser(argparse.ArgumentParser):
    """argparse's parser (its subcommands' too), whose usage errors are raised, not printed."""

    def error(self, message: str) -> NoReturn:
        raise _CommandLineError(self.format_usage(), f"{self.prog}: error: {message}")


def _asks_json(argv: Sequence[str]) -> bool:
    """Whether ``argv`` asks for JSON logs, read without parsing it (it did not parse)."""
    import itertools

    return "--log-format=json" in argv or ("--log-format", "json") in itertools.pairwise(argv)


def _main(args: argparse.Namespace, writer: LineWriter) -> int:
    import logging
    import signal
    import threading
    import time
    from dataclasses import replace

    from .engine import Engine, PushJob, PushOptions
    from .logs import json_line
    from .registry.client import RegistryOptions
    from .registry.credentials import DockerConfigCredentials
    from .report import BatchResult

    json_logs = args.log_format == "json"

    def say(text: str, event: str = "error") -> None:
        """An error line on stderr, never dropped: ``error: TEXT``, or a JSON ``event``."""
        writer.keep(sys.stderr, json_line(logging.ERROR, event, text) if json_logs else f"error: {text}")

    #: what a second signal writes from its handler, made ahead
    stopped_at_once = ((json_line(logging.ERROR, "interrupted", "stopped at once by a second signal") if json_logs else "error: stopped at once by a second signal") + "\n").encode()

    try:
        if args.command == "run":
            from .plan import load_plan

            plan = load_plan(args.plan)
            defaults, registries, jobs = plan.defaults, plan.registries, plan.jobs()
            spool_dir, spool_limit = args.spool_dir or plan.spool_dir, args.spool_limit or plan.spool_limit
            args.incremental_from = [*plan.incremental_from, *args.incremental_from]
            credentials: CredentialProvider = DockerConfigCredentials()
        else:
            defaults = RegistryOptions(chunk_size_bytes=args.chunk_size, monolithic_limit_bytes=args.monolithic_limit, ca_file=args.ca_file)
            registries, jobs = {}, iter([PushJob(args.source, tuple(args.targets), platforms=tuple(args.platform))])
            spool_dir, spool_limit = args.spool_dir, args.spool_limit
            credentials = _push_credentials(args)
        if args.scheduler and not args.dry_run:
            # each worker would write its own disk's layout, and none the whole index
            targets = [t for entry in plan.entries for t in entry["targets"]] if args.command == "run" else list(args.targets)
            layouts = [t for t in targets if t.startswith("oci:")]
            if layouts:
                raise UsageError(f"--scheduler cannot write an OCI layout ({layouts[0]}): run the export on one machine")
        if args.no_signatures:
            jobs = (replace(job, signatures=False) for job in jobs)
    except BatchPushError as exc:
        say(str(exc), "usage-error")
        return EXIT_USAGE
    if spool_dir is not None and not (os.path.isdir(spool_dir) and os.access(spool_dir, os.W_OK | os.X_OK)):
        say(f"spool directory {spool_dir}: not a directory this user can write", "usage-error")
        return EXIT_USAGE
    for option, field_name in (("--max-attempts", "max_attempts"), ("--max-requests-in-flight", "max_requests_in_flight")):
        value = getattr(args, field_name)
        if value is None:
            continue
        if value < 1:
            say(f"{option} must be at least 1", "usage-error")
            return EXIT_USAGE
        defaults = replace(defaults, **{field_name: value})
        registries = {host: replace(options, **{field_name: value}) for host, options in registries.items()}
    progress = _progress(args, writer)
    options = PushOptions(
        registry_defaults=defaults,
        registries=registries,
        credentials=credentials,
        insecure_hosts=frozenset(args.insecure),
        nondistributable_hosts=frozenset(args.allow_nondistributable_artifacts),
        metadata_dir=args.metadata_dir,
        jobs=args.jobs,
        max_concurrent_images=args.max_concurrent_images,
        spool_dir=spool_dir,
        spool_limit=spool_limit,
        dry_run=args.dry_run,
        incremental_from=tuple(args.incremental_from),
        progress=progress,
    )
    received: list[int] = []
    engine: Engine | None = None
    #: a cluster run's stop: it looks at it where it waits
    stopped = threading.Event()

    def stop(signum: int, frame: FrameType | None) -> None:
        # no lock is taken here (an Event's is not reentrant, and the main thread may
        # hold it where it was interrupted): the relay sets the flags
        if received:  # a second Ctrl-C: stop now, without waiting for anything
            os.write(2, stopped_at_once)
            os._exit(128 + signum)
        received.append(signum)

    def relay() -> None:
        while not received and not finished.wait(POLL_S):
            pass
        if received:
            stopped.set()
            if engine is not None:
                engine.cancel()

    from .waits import POLL_S

    finished = threading.Event()
    # installed until the engine is closed: a second Ctrl-C while it closes still ends the process
    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    threading.Thread(target=relay, name="signals", daemon=True).start()
    started_at, started = time.time(), time.monotonic()
    try:
        if args.scheduler and not args.dry_run:
            result = _run_on_cluster(args.scheduler, jobs, options, stopped)
        else:
            if args.scheduler:  # it writes nothing: nothing to spread
                progress.note("dry run: asked from this machine; no task is sent to the cluster")
            engine = Engine(options)
            if received:
                engine.cancel()
            try:
                result = engine.run(jobs)
            finally:
                engine.close()
        if args.report:  # before any line: a line may wait for a slow reader
            result.write(args.report)
        _close(args, progress, result, time.monotonic() - started)
    except BatchPushError as exc:
        say(str(exc), "usage-error" if isinstance(exc, UsageError) else "error")
        _export_metrics(args, BatchResult(), started_at, started, success=False)
        return EXIT_USAGE if isinstance(exc, UsageError) else EXIT_FAILED
    finally:
        for sig, earlier in previous.items():
            signal.signal(sig, earlier)
        finished.set()
        progress.close()
    code = _exit_code(args, result, started_at, started, interrupted=bool(received))
    if received:
        say(f"stopped by signal {received[0]}; {sum(i.ok for i in result.images)} image(s) finished, see the report", "interrupted")
        # the report is written and the spool gone; a request still waiting for its
        # answer must not hold the exit (the interpreter would join its thread)
        writer.close()
        os._exit(128 + received[0])
    return code


def _run_on_cluster(address: str, jobs: Iterable[PushJob], options: PushOptions, stop: threading.Event) -> BatchResult:
    from . import cluster  # only here: a local run never imports dask

    try:
        return cluster.run(address, jobs, options, stop)
    except cluster.Interrupted as stopped:  # the tasks were stopped; what finished is in it
        return stopped.result


if __name__ == "__main__":
    sys.exit(main())
