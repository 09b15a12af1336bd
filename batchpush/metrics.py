"""Prometheus metrics of a finished run: a node_exporter textfile, a Pushgateway push.

Every metric describes the last run, so every one is a gauge: a run's counts start
from zero, and as counters Prometheus's ``increase()`` would read a bigger run after
a smaller one as traffic of the last scrape interval. Hence no ``_total`` suffix (it
names counters); units are in the names (``_bytes``, ``_seconds``,
``_timestamp_seconds``).

``batchpush_last_success_timestamp_seconds`` is the alerting metric: a failed run
must not erase the time of the last good one. A failed run leaves it out, and both
ways of publishing keep the earlier value: the Pushgateway's POST replaces only the
metric names pushed, and the textfile carries it over from the file it replaces.
"""

from __future__ import annotations

import functools
import logging
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING
from urllib.parse import unquote

from .errors import UsageError
from .logs import redact
from .outcome import LayerOutcome
from .registry.errors import redact_url
from .report import BatchResult

if TYPE_CHECKING:
    # prometheus-client is imported where metrics are made: a run without them never loads it
    from prometheus_client import CollectorRegistry
    from prometheus_client.metrics_core import Metric

log = logging.getLogger(__name__)

#: the longest a Pushgateway may take to accept a push (each of connect and answer)
PUSH_TIMEOUT_S = 5.0
#: the default ``job`` label of a push
DEFAULT_JOB = "batchpush"
#: statuses always written, 0 when no image had them, so a query never finds them absent
STATUSES = ("pushed", "up-to-date", "failed")
LAST_SUCCESS = "batchpush_last_success_timestamp_seconds"
#: a Prometheus label name; ``__`` names are Prometheus's own
_LABEL_NAME = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")


@dataclass(frozen=True, slots=True)
class RunTimes:
    """When the run started and ended (Unix time) and how long it took (a monotonic clock's)."""

    started_at: float
    ended_at: float
    duration_s: float


@dataclass(frozen=True, slots=True, kw_only=True)
class MetricsOptions:
    #: the node_exporter textfile to write; None: none
    textfile: str | None = None
    #: the Pushgateway's URL; None: no push. Userinfo in it is sent as basic auth, never printed
    pushgateway: str | None = None
    job: str = DEFAULT_JOB
    #: grouping labels of a push; labels of every sample of the textfile
    labels: Mapping[str, str] = field(default_factory=dict)


def parse_label(text: str) -> tuple[str, str]:
    """``KEY=VALUE`` of ``--metrics-label``."""
    key, sep, value = text.partition("=")
    if not sep or not _LABEL_NAME.fullmatch(key) or key.startswith("__") or key in ("job", "registry", "status"):
        raise UsageError(f"--metrics-label {text!r}: expected KEY=VALUE with KEY a label name other than job, registry and status")
    return key, value


def families(result: BatchResult, times: RunTimes, *, success: bool, last_success_at: float | None, labels: Mapping[str, str] | None = None) -> list[Metric]:
    """The run's metrics; ``labels`` added to every sample. ``last_success_at``:
    this run's end if it succeeded, else the last successful run's (None: unknown)."""
    from prometheus_client.metrics_core import GaugeMetricFamily

    const = dict(labels or {})
    out: list[Metric] = []

    def gauge(name: str, documentation: str, value: float | Mapping[str, float], label: str | None = None) -> None:
        family = GaugeMetricFamily(name, documentation, labels=[*const, *([label] if label else [])])
        samples = value.items() if isinstance(value, Mapping) else [("", value)]
        for key, number in samples:
            family.add_metric([*const.values(), *([key] if label else [])], number)
        out.append(family)

    statuses = dict.fromkeys(STATUSES, 0)
    for image in result.images:
        statuses[image.status] = statuses.get(image.status, 0) + 1
    gauge("batchpush_last_run_start_timestamp_seconds", "When the last run started.", times.started_at)
    gauge("batchpush_last_run_end_timestamp_seconds", "When the last run ended.", times.ended_at)
    gauge("batchpush_last_run_duration_seconds", "How long the last run took.", times.duration_s)
    gauge("batchpush_last_run_success", "1 if every image of the last run arrived (exit code 0), else 0.", 1 if success else 0)
    if success:
        last_success_at = times.ended_at
    if last_success_at is not None:
        gauge(LAST_SUCCESS, "When the last run that succeeded ended.", last_success_at)
    gauge("batchpush_images", "Images (image, target) of the last run by status.", statuses, "status")
    gauge("batchpush_read_bytes", "Bytes read from sources in the last run.", result.bytes_read)
    gauge("batchpush_compressed_bytes", "Bytes of layers compressed in the last run.", result.bytes_compressed)
    gauge("batchpush_sent_bytes", "Body bytes sent to registries in the last run (retries included).", result.bytes_uploaded)
    mounted = sum(layer.outcome is LayerOutcome.MOUNTED for image in result.images for layer in image.layers)
    gauge("batchpush_blobs_mounted", "Blobs mounted from another repository instead of sent, in the last run.", mounted)
    gauge("batchpush_requests", "HTTP requests to each registry in the last run.", dict(result.requests_by_registry), "registry")
    gauge("batchpush_request_errors", "Requests to each registry that failed in the last run (no answer, or a status not expected).", dict(result.errors_by_registry), "registry")
    return out


class _Fixed:
    """A collector of families made once."""

    def __init__(self, made: list[Metric]) -> None:
        self.made = made

    def collect(self) -> list[Metric]:
        return self.made


def _registry(made: list[Metric]) -> CollectorRegistry:
    from prometheus_client import CollectorRegistry

    registry = CollectorRegistry()
    registry.register(_Fixed(made))
    return registry


def previous_success(path: str) -> float | None:
    """The last success time written in the textfile ``path``, if any."""
    from prometheus_client.parser import text_string_to_metric_families

    try:
        with open(path, encoding="utf-8") as existing:
            text = existing.read()
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == LAST_SUCCESS:
                    return float(sample.value)
    except (OSError, ValueError):
        pass  # no file yet, or not ours: no earlier success is known
    return None


def write_textfile(path: str, made: list[Metric]) -> None:
    """The node_exporter textfile format, atomically: written to a temporary file
    beside ``path`` (same directory, so the same file system) and renamed over it."""
    from prometheus_client.exposition import write_to_textfile

    write_to_textfile(os.path.abspath(path), _registry(made))


def push(url: str, job: str, grouping: Mapping[str, str], made: list[Metric]) -> None:
    """POST (pushadd) to the Pushgateway: it replaces the group's metrics of the names
    pushed and keeps the others, so a failed run, which leaves out the last success
    time, keeps the last successful run's. Userinfo in ``url`` is sent as basic auth."""
    from prometheus_client.exposition import basic_auth_handler, default_handler, pushadd_to_gateway

    address, userinfo = split_userinfo(url)
    handler: Callable[..., Callable[[], None]] = default_handler
    if userinfo is not None:
        username, _, password = userinfo.partition(":")
        handler = functools.partial(basic_auth_handler, username=unquote(username), password=unquote(password))
    pushadd_to_gateway(address, job, _registry(made), grouping_key=dict(grouping), timeout=PUSH_TIMEOUT_S, handler=handler)


def split_userinfo(url: str) -> tuple[str, str | None]:
    """``url`` (a scheme added if it has none) without its userinfo, and the
    userinfo. Split at the last ``@`` before anything is parsed: a password may
    hold ``/``, ``?`` or ``#``, which would otherwise end the host part early and
    leave the secret in the "host" or the path, and so in an error message."""
    scheme, _, rest = (url if "://" in url else f"http://{url}").partition("://")
    userinfo, at, address = rest.rpartition("@")
    return f"{scheme}://{address}", (userinfo if at else None)


def export(options: MetricsOptions, result: BatchResult, times: RunTimes, *, success: bool) -> None:
    """Write the textfile and push, as ``options`` ask. Neither changes the run's
    outcome: a failure is one warning line (the URL without userinfo or query)."""
    if options.textfile:
        try:
            write_textfile(options.textfile, families(result, times, success=success, last_success_at=previous_success(options.textfile), labels=options.labels))
        except OSError as exc:
            log.warning("metrics not written to %s: %s", options.textfile, exc.strerror or exc)
    if options.pushgateway:
        try:
            push(options.pushgateway, options.job, options.labels, families(result, times, success=success, last_success_at=None))
        except Exception as exc:  # urllib's errors, an HTTP error answer, a URL that does not parse
            # the address holds no userinfo, nor does anything urllib says of it
            log.warning("metrics not pushed to %s: %s", redact_url(split_userinfo(options.pushgateway)[0]), redact(str(exc)))
