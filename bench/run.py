"""`make bench`: batchpush against skopeo in the same run, on fresh real registries.

Scenarios: heavy (few repositories, layers of tens to hundreds of MB), wide (40+
repositories, 100+ images, small layers), the cron re-run of both, the fan-out of
heavy to two registries, and 1,000 tiny images. For each, batchpush runs a plan;
skopeo copies image by image, sequentially and 4 at a time, and the better is
kept. Mirroring (heavy and wide, cold and cron re-run): a source registry filled
once with the fleet, mirrored to a fresh target by one batchpush plan of
``docker://`` sources against ``skopeo sync`` per repository (one at a time and 4
at a time, the better kept); ``python bench/run.py mirror`` runs only that.
Also measured: isal gzip throughput per core and the registry's ingest rate (a
raw monolithic PUT), the limits batchpush's throughput is compared with; for
mirroring, the registry's serving rate and a raw registry-to-registry relay.

BENCH_SCALE=small runs a reduced version (for a quick look; not for the record).
"""

from __future__ import annotations

import glob
import json
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

import psutil
import requests
import yaml

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))
sys.path.insert(0, os.path.join(HERE, ".."))

import registry_cost  # noqa: E402
from fleet import Fleet, build, directory_tar, synthetic_tar  # noqa: E402
from registry import Registry, start_registry  # noqa: E402
from wan_proxy import WanRegistry, behind_wan  # noqa: E402

from batchpush.compress import compress_to_spool  # noqa: E402
from batchpush.sources.base import FileRange  # noqa: E402

SMALL = os.environ.get("BENCH_SCALE") == "small"
#: BENCH_WAN=MS: every scenario's registries behind a WanProxy of that delay per
#: request (wan_proxy.py), both tools through the same one; the heavy fleet's
#: scenarios (heavy, fanout, mirror_heavy) with a link of BENCH_WAN_RATE bytes/s
#: per registry as well (default 100 MB/s)
WAN_MS = float(os.environ.get("BENCH_WAN", "0") or 0)
WAN_RATE = float(os.environ.get("BENCH_WAN_RATE", "100e6"))
CAPPED = ("heavy", "fanout", "mirror_heavy")
#: results behind the WAN are kept apart from the loopback ones
SUFFIX = "-wan" if WAN_MS else ""
#: extra arguments of every batchpush run (e.g. ``--max-requests-in-flight 16``)
BATCHPUSH_ARGS = shlex.split(os.environ.get("BENCH_BATCHPUSH_ARGS", ""))
CACHE = os.path.join(HERE, ".cache", "small" if SMALL else "full")
MEASURE = [sys.executable, os.path.join(HERE, "measure.py")]
_PUT_DONE = re.compile(r'"PUT /v2/\S+/blobs/uploads/\S*digest=sha256%3A([0-9a-f]{64})\S* HTTP/1.1" 201')
#: a body the registry served (its size as the access log gives it)
_GET_BODY = re.compile(r'"GET \S+ HTTP/1\.1" 20[06] (\d+) ')


@dataclass
class Run:
    tool: str
    wall_s: float
    cpu_s: float
    peak_rss_mb: float
    bytes_uploaded: int
    requests: int
    failures: int
    #: CPU the registries spent meanwhile: they share this machine's cores
    registry_cpu_s: float = 0.0
    #: mirroring: requests the source registry answered (included in ``requests``)
    #: and the body bytes it served
    source_requests: int = 0
    bytes_read: int = 0
    #: CPU the whole machine spent meanwhile (every process, ours or not): what is
    #: left after the tool's, the registries' and the sampler's is other work
    #: sharing the cores, and kernel work charged to no process (loopback
    #: softirqs, disk writeback: not negligible when hundreds of MB move)
    machine_cpu_s: float = 0.0
    sampler_cpu_s: float = 0.0
    #: behind the WAN: each registry's requests in flight during the run, as its
    #: proxy counted them (``average_in_flight`` over the time any was in flight,
    #: ``peak_in_flight``), in the order the scenario's registries were given
    in_flight: list[dict] = field(default_factory=list)


def scenario_registry(work: str, name: str) -> Registry:
    """A fresh registry for scenario ``name``: behind the WAN when BENCH_WAN is set."""
    return wan(start_registry(work), name)


def wan(registry: Registry, name: str) -> Registry:
    if not WAN_MS:
        return registry
    return behind_wan(registry, WAN_MS, WAN_RATE if name in CAPPED else None)


def registry_traffic(registries: list[Registry], since: list[int]) -> tuple[int, int]:
    """Requests and uploaded bytes (committed blobs' sizes) from the registries' own logs."""
    total_requests = 0
    total_bytes = 0
    for registry, start in zip(registries, since, strict=True):
        lines = registry.access_log()[start:]
        total_requests += len(lines)
        for line in lines:
            match = _PUT_DONE.search(line)
            if match:
                hex_ = match.group(1)
                path = os.path.join(registry.root, "data", "docker", "registry", "v2", "blobs", "sha256", hex_[:2], hex_, "data")
                total_bytes += os.path.getsize(path) if os.path.exists(path) else 0
    return total_requests, total_bytes


def registry_cpu_s(registries: list[Registry]) -> float:
    total = 0.0
    for registry in registries:
        times = psutil.Process(registry.process.pid).cpu_times()
        total += times.user + times.system
    return total


def machine_busy_s() -> float:
    """CPU seconds the whole machine has spent (all cores, idle and I/O wait excluded)."""
    times = psutil.cpu_times()
    return sum(times) - times.idle - getattr(times, "iowait", 0.0) - getattr(times, "guest", 0.0) - getattr(times, "guest_nice", 0.0)


def measure(tool: str, commands: list[list[str]], parallel: int, registries: list[Registry], source: Registry | None = None) -> Run:
    """``source``: one of ``registries``, read by a mirror; its requests and the
    bytes it served are counted apart too."""
    since = [len(r.access_log()) for r in registries]
    for registry in registries:  # a new in-flight window at each WAN proxy
        in_flight_of(registry)
    cpu_before = registry_cpu_s(registries)
    machine_before = machine_busy_s()
    done = subprocess.run([*MEASURE, str(parallel)], input=json.dumps(commands), capture_output=True, text=True, check=True)
    machine = machine_busy_s() - machine_before
    stats = json.loads(done.stdout)
    requests_count, uploaded = registry_traffic(registries, since)
    run = Run(tool, stats["wall_s"], stats["cpu_s"], stats["peak_rss_mb"], uploaded, requests_count, stats["failures"], registry_cpu_s(registries) - cpu_before, machine_cpu_s=machine, sampler_cpu_s=stats["sampler_cpu_s"])
    run.in_flight = [figures for registry in registries if (figures := in_flight_of(registry))]
    if source is not None:
        lines = source.access_log()[since[registries.index(source)]:]
        run.source_requests = len(lines)
        run.bytes_read = sum(int(match.group(1)) for line in lines if (match := _GET_BODY.search(line)))
    return run


def in_flight_of(registry: Registry) -> dict:
    """The requests in flight at ``registry``'s WAN proxy since the last call (empty
    on loopback): how many round trips a tool overlaps there."""
    return registry.in_flight() if isinstance(registry, WanRegistry) else {}


def in_flight_text(run: Run) -> str:
    """Average/peak requests in flight per registry (source + target for a mirror)."""
    return " + ".join(f"{figures['average_in_flight']:.1f}/{figures['peak_in_flight']}" for figures in run.in_flight)


def batchpush_commands(work: str, fleet: Fleet, registries: list[Registry], name: str, run: str) -> list[list[str]]:
    """One plan for the fleet; ``run`` names the metadata store (a fresh one is a cold run)."""
    plan = {
        "version": 1,
        "registries": {r.host: {"insecure": True} for r in registries},
        "images": [{"source": f"oci:{path}", "targets": [f"{r.host}/{name}/{os.path.basename(path)}" for r in registries]} for path in fleet.repositories()],
    }
    plan_path = os.path.join(work, f"{name}-{run}.yaml")
    with open(plan_path, "w") as f:
        yaml.safe_dump(plan, f)
    return [[sys.executable, "-m", "batchpush", "run", plan_path, "-q", "--metadata-dir", os.path.join(work, f"md-{name}-{run}"), "--report", os.path.join(work, f"{name}-{run}.json"), *BATCHPUSH_ARGS]]


def skopeo_commands(fleet: Fleet, registries: list[Registry], name: str) -> list[list[str]]:
    return [
        ["skopeo", "--insecure-policy", "copy", "-q", "--dest-tls-verify=false", f"oci:{path}:{tag}", f"docker://{r.host}/{name}/{os.path.basename(path)}:{tag}"]
        for r in registries
        for path, tag in fleet.images
    ]


def clear_skopeo_cache() -> None:
    for path in glob.glob("/var/lib/containers/cache/blob-info-cache-v1*") + glob.glob(os.path.expanduser("~/.local/share/containers/cache/blob-info-cache-v1*")):
        os.unlink(path)


#: cold runs of each tool per scenario (the median is kept); the machine is noisy
REPEATS = int(os.environ.get("BENCH_REPEATS", "3"))
#: cron re-runs of each tool after its last cold run (the median is kept)
CRON_REPEATS = 3
TOOLS = ("batchpush", "skopeo_p1", "skopeo_p4")


def median_run(runs: list[Run]) -> Run:
    return sorted(runs, key=lambda run: run.wall_s)[len(runs) // 2]


def scenario(work: str, fleet: Fleet, name: str, registry_count: int = 1, cron: bool = False, repeats: int = REPEATS) -> dict:
    """Each tool's cold run on fresh registries (batchpush with a fresh metadata
    store, skopeo with an empty blob-info cache), ``repeats`` times in turn; the
    median is kept. ``cron``: after each tool's last cold run, the same again with
    nothing changed, on its registries and with its store or cache as that run left
    them (what a nightly job finds)."""
    results: dict = {"scenario": name, "images": len(fleet.images) * registry_count, "layer_bytes": fleet.layer_bytes}
    cold: dict[str, list[Run]] = {tool: [] for tool in TOOLS}
    crons: dict[str, Run] = {}
    for repeat in range(repeats):
        for tool in TOOLS:
            registries = [scenario_registry(work, name) for _ in range(registry_count)]
            try:
                if tool == "batchpush":
                    label, parallel, commands = "batchpush", 1, batchpush_commands(work, fleet, registries, name, f"{repeat}")
                else:
                    parallel = int(tool.rsplit("p", 1)[1])
                    label, commands = f"skopeo x{parallel}", skopeo_commands(fleet, registries, name)
                    clear_skopeo_cache()
                cold[tool].append(measure(label, commands, parallel, registries))
                if cron and repeat == repeats - 1:
                    crons[tool] = median_run([measure(label, commands, parallel, registries) for _ in range(CRON_REPEATS)])
            finally:
                for registry in registries:
                    registry.stop()
                    shutil.rmtree(registry.root, ignore_errors=True)
    for tool in TOOLS:
        results[tool] = median_run(cold[tool])
    best = min(("skopeo_p1", "skopeo_p4"), key=lambda tool: results[tool].wall_s)
    results["skopeo"] = results[best]
    if cron:
        results["cron_batchpush"] = crons["batchpush"]
        results["cron_skopeo"] = crons[best]
    return results


# --- mirroring: registry to registry ---------------------------------------------

_MANIFEST_ACCEPT = ", ".join((
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
    "application/vnd.docker.distribution.manifest.v2+json",
))


def tag_digests(registry: Registry, repository: str) -> dict[str, str]:
    """Every tag of ``repository`` and the digest it names, as the registry says."""
    with requests.Session() as session:
        listed = session.get(f"{registry.url}/v2/{repository}/tags/list", params={"n": "1000"})
        if listed.status_code == 404:
            return {}
        listed.raise_for_status()
        digests = {}
        for tag in listed.json().get("tags") or []:
            head = session.head(f"{registry.url}/v2/{repository}/manifests/{tag}", headers={"Accept": _MANIFEST_ACCEPT})
            head.raise_for_status()
            digests[tag] = head.headers["Docker-Content-Digest"]
        return digests


def fill_source(work: str, fleet: Fleet, name: str) -> tuple[Registry, dict[str, dict[str, str]]]:
    """A source registry holding the fleet as ``team/svcNNN:vN``, filled by
    batchpush from the layouts (one plan); returns it and every tag's digest."""
    source = start_registry(work)
    plan = {
        "version": 1,
        "registries": {source.host: {"insecure": True}},
        "images": [{"source": f"oci:{path}", "targets": [f"{source.host}/team/{os.path.basename(path)}"]} for path in fleet.repositories()],
    }
    plan_path = os.path.join(work, f"fill-{name}.yaml")
    with open(plan_path, "w") as f:
        yaml.safe_dump(plan, f)
    started = time.monotonic()
    subprocess.run([sys.executable, "-m", "batchpush", "run", plan_path, "-q", "--metadata-dir", os.path.join(work, f"md-fill-{name}")], check=True)
    expected = {os.path.basename(path): tag_digests(source, f"team/{os.path.basename(path)}") for path in fleet.repositories()}
    count = sum(len(tags) for tags in expected.values())
    if count != len(fleet.images):
        raise RuntimeError(f"{name}: the source holds {count} tags, the fleet has {len(fleet.images)} images")
    print(f"{name}: source registry filled by batchpush from the layouts in {time.monotonic() - started:.1f} s ({count} images)", flush=True)
    return source, expected


def mirror_commands(tool: str, work: str, source: Registry, target: Registry, fleet: Fleet, name: str, run: str) -> tuple[str, int, list[list[str]]]:
    """batchpush: one plan, a ``docker://`` source without tag (every tag) per
    repository. skopeo: ``skopeo sync`` per repository, ``parallel`` at a time."""
    names = [os.path.basename(path) for path in fleet.repositories()]
    if tool == "batchpush":
        plan = {
            "version": 1,
            "registries": {source.host: {"insecure": True}, target.host: {"insecure": True}},
            "images": [{"source": f"docker://{source.host}/team/{repo}", "targets": [f"{target.host}/mirror/{repo}"]} for repo in names],
        }
        plan_path = os.path.join(work, f"{name}-{run}.yaml")
        with open(plan_path, "w") as f:
            yaml.safe_dump(plan, f)
        report = os.path.join(work, f"{name}-{run}.json")
        return "batchpush", 1, [[sys.executable, "-m", "batchpush", "run", plan_path, "-q", "--metadata-dir", os.path.join(work, f"md-{name}-{run}"), "--report", report, *BATCHPUSH_ARGS]]
    parallel = int(tool.rsplit("p", 1)[1])
    # no --scoped: SRC/team/svcNNN:TAG lands as DST/mirror/svcNNN:TAG, as batchpush's plan puts it
    commands = [
        ["skopeo", "--insecure-policy", "sync", "--src", "docker", "--dest", "docker", "--src-tls-verify=false", "--dest-tls-verify=false", f"{source.host}/team/{repo}", f"{target.host}/mirror/"]
        for repo in names
    ]
    return f"skopeo sync x{parallel}", parallel, commands


def mirror_check(target: Registry, expected: dict[str, dict[str, str]]) -> int:
    """Tags of the source missing at the target or naming another digest there."""
    wrong = 0
    for repo, tags in expected.items():
        found = tag_digests(target, f"mirror/{repo}")
        wrong += sum(found.get(tag) != digest for tag, digest in tags.items())
    return wrong


def report_statuses(path: str) -> dict[str, int]:
    """The statuses in batchpush's report, which is then removed (the next run
    writes its own)."""
    if not os.path.exists(path):
        return {"no report": 1}
    with open(path) as f:
        images = json.load(f)["images"]
    os.unlink(path)
    counts: dict[str, int] = {}
    for image in images:
        counts[image["status"]] = counts.get(image["status"], 0) + 1
    return counts


def mirror_scenario(work: str, fleet: Fleet, name: str, repeats: int = REPEATS) -> dict:
    """The fleet in a source registry (filled once), mirrored to a fresh target
    registry by each tool in turn, ``repeats`` times (fresh batchpush metadata store,
    empty skopeo blob-info cache); the median is kept. After each tool's last cold
    run, the cron re-run: the same command again on that target, with the store or
    cache that run left (median of 3). Every run's result is checked tag by tag
    against the source's digests; batchpush's report statuses are kept."""
    source, expected = fill_source(work, fleet, name)
    source = wan(source, name)  # filled directly; read through the WAN
    results: dict = {"scenario": name, "images": len(fleet.images), "layer_bytes": fleet.layer_bytes, "wrong_tags": {}, "batchpush_statuses": {}}
    cold: dict[str, list[Run]] = {tool: [] for tool in TOOLS}
    crons: dict[str, Run] = {}
    try:
        for repeat in range(repeats):
            for tool in TOOLS:
                target = scenario_registry(work, name)
                try:
                    label, parallel, commands = mirror_commands(tool, work, source, target, fleet, name, f"{repeat}")
                    report = os.path.join(work, f"{name}-{repeat}.json")
                    if tool != "batchpush":
                        clear_skopeo_cache()
                    cold[tool].append(measure(label, commands, parallel, [source, target], source))
                    # read back after the run (not measured): what the target holds
                    results["wrong_tags"][f"{tool} cold {repeat}"] = mirror_check(target, expected)
                    if tool == "batchpush":
                        results["batchpush_statuses"][f"cold {repeat}"] = report_statuses(report)
                    if repeat == repeats - 1:
                        again = []
                        for cron in range(CRON_REPEATS):
                            again.append(measure(label, commands, parallel, [source, target], source))
                            if tool == "batchpush":
                                results["batchpush_statuses"][f"cron {cron}"] = report_statuses(report)
                        crons[tool] = median_run(again)
                        results["wrong_tags"][f"{tool} cron"] = mirror_check(target, expected)
                finally:
                    target.stop()
                    shutil.rmtree(target.root, ignore_errors=True)
    finally:
        source.stop()
        shutil.rmtree(source.root, ignore_errors=True)
    for tool in TOOLS:
        results[tool] = median_run(cold[tool])
    best = min(("skopeo_p1", "skopeo_p4"), key=lambda tool: results[tool].wall_s)
    results["skopeo"] = results[best]
    results["cron_batchpush"] = crons["batchpush"]
    # the better re-run of the two skopeo ways, whichever won the cold run
    results["cron_skopeo"] = min(crons["skopeo_p1"], crons["skopeo_p4"], key=lambda run: run.wall_s)
    return results


MIRROR_HEADER = [
    "| scenario | batchpush s | skopeo sync s (best of x1, x4) | ratio | MB read from source ours / skopeo | MB uploaded ours / skopeo "
    "| requests source + target, ours / skopeo | peak RSS MB ours / skopeo | CPU s ours / skopeo | in flight avg/peak source + target, ours / skopeo |",
    "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
]


def mirror_row(name: str, ours: Run, theirs: Run) -> str:
    ratio = ours.wall_s / theirs.wall_s if theirs.wall_s else float("nan")

    def split(run: Run) -> str:
        return f"{run.source_requests:,} + {run.requests - run.source_requests:,}"

    return (
        f"| {name} | {ours.wall_s:,.1f} | {theirs.wall_s:,.1f} ({theirs.tool}) | **{ratio:.2f}** | {ours.bytes_read / 1e6:,.1f} / {theirs.bytes_read / 1e6:,.1f} "
        f"| {ours.bytes_uploaded / 1e6:,.1f} / {theirs.bytes_uploaded / 1e6:,.1f} | {split(ours)} / {split(theirs)} | {ours.peak_rss_mb:,.0f} / {theirs.peak_rss_mb:,.0f} "
        f"| {ours.cpu_s:,.1f} / {theirs.cpu_s:,.1f} | {in_flight_text(ours)} / {in_flight_text(theirs)} |" + (f" failures {ours.failures}/{theirs.failures}" if ours.failures or theirs.failures else "")
    )


def mirror_table(results: dict) -> list[str]:
    lines = list(MIRROR_HEADER)
    for kind in ("heavy", "wide"):
        data = results[f"mirror_{kind}"]
        lines.append(mirror_row(f"mirror {kind} cold", data["batchpush"], data["skopeo"]))
    for kind in ("heavy", "wide"):
        data = results[f"mirror_{kind}"]
        lines.append(mirror_row(f"mirror {kind} cron re-run", data["cron_batchpush"], data["cron_skopeo"]))
    for kind in ("heavy", "wide"):
        data = results[f"mirror_{kind}"]
        wrong = {run: count for run, count in data["wrong_tags"].items() if count}
        lines.append(f"mirror {kind}: tags missing or wrong at the target: {wrong or 'none'}; batchpush statuses: {data['batchpush_statuses']}")
    return lines


def print_runs(results: dict) -> None:
    for name, data in results.items():
        for key, value in data.items():
            if isinstance(value, Run):
                bound = (value.cpu_s + value.registry_cpu_s) / (os.cpu_count() or 1)
                per_request = value.registry_cpu_s / value.requests * 1e3 if value.requests else 0.0
                read = f" read {value.bytes_read / 1e6:7.1f}MB src req {value.source_requests:5}" if value.source_requests else ""
                # the machine's CPU not spent by the tool, the registries or the sampler: other work
                # on the same cores (and the kernel's own, see Run.machine_cpu_s)
                read += f" other cpu {max(0.0, value.machine_cpu_s - value.cpu_s - value.registry_cpu_s - value.sampler_cpu_s):5.2f}s"
                if value.in_flight:
                    read += f" in flight avg/peak {in_flight_text(value)}"
                print(f"  {name:12} {key:15} {value.tool:15} wall {value.wall_s:7.2f}s cpu {value.cpu_s:7.2f}s registry cpu {value.registry_cpu_s:6.2f}s ({per_request:4.1f} ms/req) "
                      f"(cpu bound {bound:5.2f}s) rss {value.peak_rss_mb:6.0f}MB up {value.bytes_uploaded / 1e6:8.1f}MB req {value.requests:6} fail {value.failures}{read}")


def to_json(results: dict) -> dict:
    return {k: {kk: (vv.__dict__ if isinstance(vv, Run) else vv) for kk, vv in v.items()} for k, v in results.items()}


def isal_throughput_mb_s(sample: bytes, work: str) -> float:
    path = os.path.join(work, "sample.tar")
    with open(path, "wb") as f:
        f.write(sample)
    started = time.monotonic()
    compressed = compress_to_spool(FileRange(path, 0, len(sample)), work)
    elapsed = time.monotonic() - started
    os.unlink(compressed.path)
    return len(sample) / elapsed / 1e6


def startup_s(command: list[str], repeats: int = 5) -> float:
    """The best wall time of ``command`` alone: a floor under any run of the tool."""
    best = float("inf")
    for _ in range(repeats):
        started = time.monotonic()
        subprocess.run(command, check=True, capture_output=True)
        best = min(best, time.monotonic() - started)
    return best


def registry_ingest_mb_s(work: str, size: int = 256 << 20) -> float:
    registry = start_registry(work)
    try:
        data = os.urandom(size)
        import hashlib

        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        with requests.Session() as session:
            started = time.monotonic()
            location = session.post(f"{registry.url}/v2/ingest/raw/blobs/uploads/").headers["Location"]
            location = location if location.startswith("http") else registry.url + location
            response = session.put(f"{location}&digest={digest}", data=data, headers={"Content-Type": "application/octet-stream"})
            elapsed = time.monotonic() - started
            assert response.status_code == 201, response.status_code
        return size / elapsed / 1e6
    finally:
        registry.stop()


def registry_relay_mb_s(work: str, size: int = 256 << 20) -> tuple[float, float]:
    """What bounds a mirror of large blobs: the registry's serving rate (a blob's
    GET read and discarded) and a relay from one registry to another (the GET's body
    streamed straight into a monolithic PUT, no other client work). 256 MB of
    random bytes, in 1 MB reads."""
    import hashlib

    source, target = start_registry(work), start_registry(work)
    try:
        data = os.urandom(size)
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        with requests.Session() as session:

            def put(registry: Registry, body: object) -> None:
                location = session.post(f"{registry.url}/v2/relay/raw/blobs/uploads/").headers["Location"]
                location = location if location.startswith("http") else registry.url + location
                response = session.put(f"{location}&digest={digest}", data=body, headers={"Content-Type": "application/octet-stream"})
                assert response.status_code == 201, response.status_code

            put(source, data)
            del data
            started = time.monotonic()
            with session.get(f"{source.url}/v2/relay/raw/blobs/{digest}", stream=True) as response:
                for _ in response.iter_content(1 << 20):
                    pass
            serve = size / (time.monotonic() - started) / 1e6
            started = time.monotonic()
            with session.get(f"{source.url}/v2/relay/raw/blobs/{digest}", stream=True) as response:
                put(target, response.iter_content(1 << 20))
            relay = size / (time.monotonic() - started) / 1e6
        return serve, relay
    finally:
        source.stop()
        target.stop()


def fleets(root: str) -> dict[str, Fleet]:
    scale = 0.2 if SMALL else 1.0

    def heavy_bases() -> list[bytes]:
        return [directory_tar("/usr/lib/python3.11", int(60e6 * scale)), directory_tar("/usr/include", int(130e6 * scale))]

    return {
        "heavy": build(os.path.join(root, "heavy"), repositories=3, tags=2, groups=2, bases=heavy_bases, middle_bytes=int(40e6 * scale), app_bytes=int(4e6 * scale)),
        "wide": build(os.path.join(root, "wide"), repositories=10 if SMALL else 42, tags=3, groups=8, bases=lambda: [directory_tar("/usr/share/perl", 3_000_000)], middle_bytes=400_000, app_bytes=30_000),
        "tiny": build(os.path.join(root, "tiny"), repositories=20 if SMALL else 100, tags=10, groups=1, bases=lambda: [synthetic_tar(1, 20_000)], middle_bytes=2_000, app_bytes=500),
    }


def row(name: str, ours: Run, theirs: Run, layer_bytes: int | None = None) -> str:
    ratio = ours.wall_s / theirs.wall_s if theirs.wall_s else float("nan")
    throughput = f"{layer_bytes / ours.wall_s / 1e6:,.0f}" if layer_bytes else ""
    return (
        f"| {name} | {ours.wall_s:,.1f} | {theirs.wall_s:,.1f} ({theirs.tool}) | **{ratio:.2f}** | {ours.bytes_uploaded / 1e6:,.1f} / {theirs.bytes_uploaded / 1e6:,.1f} "
        f"| {ours.requests:,} / {theirs.requests:,} | {ours.peak_rss_mb:,.0f} / {theirs.peak_rss_mb:,.0f} | {ours.cpu_s:,.1f} / {theirs.cpu_s:,.1f} | {throughput} "
        f"| {in_flight_text(ours)} / {in_flight_text(theirs)} |"
        + (f" failures {ours.failures}/{theirs.failures}" if ours.failures or theirs.failures else "")
    )


def machine_limits(work: str, built: dict[str, Fleet], only: str | None) -> dict:
    """What bounds any tool on this machine: isal, the registry's ingest, serving and
    relay rates, its CPU per request, each tool's start-up (printed as measured)."""
    isal = 0.0
    if only != "mirror":  # mirroring compresses nothing
        largest = max(glob.glob(os.path.join(built["heavy"].repositories()[0], "blobs", "sha256", "*")), key=os.path.getsize)
        with open(largest, "rb") as f:
            sample = f.read()
        isal = isal_throughput_mb_s(sample, work)
    ingest = registry_ingest_mb_s(work)
    print(f"limits: isal {isal:,.0f} MB/s per core (input), registry ingest {ingest:,.0f} MB/s (raw monolithic PUT)" if isal else f"limits: registry ingest {ingest:,.0f} MB/s (raw monolithic PUT)", flush=True)
    serve, relay = registry_relay_mb_s(work)
    print(f"mirror limits: registry serves {serve:,.0f} MB/s (a blob's GET), relays {relay:,.0f} MB/s (GET streamed into a PUT to another registry)", flush=True)
    costs = registry_cost.measure(work)
    print("registry CPU per request: " + ", ".join(f"{name} {ms:.1f} ms" for name, ms in costs.items()), flush=True)
    starts = {"batchpush": startup_s([sys.executable, "-m", "batchpush", "--version"]), "skopeo": startup_s(["skopeo", "--version"])}
    print(f"start-up (--version, best of 5): batchpush {starts['batchpush']:.2f} s, skopeo {starts['skopeo']:.2f} s", flush=True)
    return {"isal_mb_s_per_core": isal, "ingest_mb_s": ingest, "serve_mb_s": serve, "relay_mb_s": relay, "registry_cpu_ms_per_request": costs, "startup_s": starts}


def main() -> int:
    os.makedirs(CACHE, exist_ok=True)
    work = tempfile.mkdtemp(prefix="batchpush-bench-")
    try:
        built = fleets(CACHE)
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), platform.processor())
        print(f"# batchpush bench, {time.strftime('%Y-%m-%d')}, {os.cpu_count()} cores, {cpu}, scale {'small' if SMALL else 'full'}", flush=True)
        # `bench/run.py mirror` (or BENCH_ONLY=mirror): the mirror scenarios alone
        only = sys.argv[1] if len(sys.argv) > 1 else os.environ.get("BENCH_ONLY")
        if only not in (None, "heavy", "wide", "tiny", "mirror"):
            print(f"unknown scenario {only!r}: heavy, wide, tiny or mirror", file=sys.stderr)
            return 2
        limits: dict = {}
        if WAN_MS:  # the machine's limits do not change behind the WAN: not measured again
            print(f"WAN: {WAN_MS:g} ms per request and connection (wan_proxy.py); {', '.join(CAPPED)}: {WAN_RATE / 1e6:g} MB/s per registry", flush=True)
        else:
            limits = machine_limits(work, built, only)
        if only == "mirror":
            mirrors = {"mirror_heavy": mirror_scenario(work, built["heavy"], "mirror_heavy"), "mirror_wide": mirror_scenario(work, built["wide"], "mirror_wide")}
            print("\n".join(mirror_table(mirrors)))
            print_runs(mirrors)
            with open(os.path.join(HERE, f"results-mirror{SUFFIX}.json"), "w") as f:
                json.dump(to_json(mirrors) | {"limits": limits}, f, indent=1)
            return 0
        if only:  # one scenario, for profiling: BENCH_ONLY=heavy|wide|tiny (batchpush and skopeo)
            result = scenario(work, built[only], only, cron=only != "tiny", repeats=1 if only == "tiny" else REPEATS)
            print_runs({only: result})
            print(row(f"{only} cold", result["batchpush"], result["skopeo"]))
            if "cron_batchpush" in result:
                print(row(f"{only} cron re-run", result["cron_batchpush"], result["cron_skopeo"]))
            return 0
        results = {
            "heavy": scenario(work, built["heavy"], "heavy", cron=True),
            "wide": scenario(work, built["wide"], "wide", cron=True),
            "fanout": scenario(work, built["heavy"], "fanout", registry_count=2),
            # skopeo one by one takes minutes here: one cold run of each tool
            "tiny": scenario(work, built["tiny"], "tiny", repeats=1),
            "mirror_heavy": mirror_scenario(work, built["heavy"], "mirror_heavy"),
            "mirror_wide": mirror_scenario(work, built["wide"], "mirror_wide"),
        }
        lines = [
            "| scenario | batchpush s | skopeo s (best of x1, x4) | ratio | MB uploaded ours / skopeo | requests ours / skopeo | peak RSS MB ours / skopeo | CPU s ours / skopeo | batchpush MB/s of layers "
            "| in flight avg/peak per registry, ours / skopeo |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
            row("heavy cold", results["heavy"]["batchpush"], results["heavy"]["skopeo"], built["heavy"].layer_bytes),
            row("wide cold", results["wide"]["batchpush"], results["wide"]["skopeo"]),
            row("heavy cron re-run", results["heavy"]["cron_batchpush"], results["heavy"]["cron_skopeo"]),
            row("wide cron re-run", results["wide"]["cron_batchpush"], results["wide"]["cron_skopeo"]),
            row("fan-out heavy to 2 registries", results["fanout"]["batchpush"], results["fanout"]["skopeo"], built["heavy"].layer_bytes),
            row("1,000 tiny images", results["tiny"]["batchpush"], results["tiny"]["skopeo"]),
        ]
        print("\n".join(lines))
        print()
        print("\n".join(mirror_table(results)))
        heavy = results["heavy"]["batchpush"]
        isal, ingest = limits.get("isal_mb_s_per_core", 0.0), limits.get("ingest_mb_s", 0.0)
        compression_ratio = max(1.0, built["heavy"].layer_bytes / max(1, heavy.bytes_uploaded))
        limit = min(isal * (os.cpu_count() or 1), ingest * compression_ratio)
        effective = built["heavy"].layer_bytes / heavy.wall_s / 1e6
        if limits:
            print(f"\nheavy cold: {effective:,.0f} MB/s of uncompressed layers; the machine's limit is min(isal x {os.cpu_count()} cores = {isal * (os.cpu_count() or 1):,.0f}, "
                  f"ingest x compression ratio {compression_ratio:.2f} = {ingest * compression_ratio:,.0f}) = {limit:,.0f} MB/s -> {effective / limit:.0%} of the limit")
        print_runs(results)
        with open(os.path.join(HERE, f"results{SUFFIX}.json"), "w") as f:
            json.dump(to_json(results) | {"limits": limits}, f, indent=1)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
