"""Big images (issue 21): batchpush against skopeo in the same run, as ratios.

Scenarios, each tool in turn on fresh registries (batchpush with a fresh metadata
store and spool directory, skopeo with an empty blob-info cache), ``BENCH_REPEATS``
times (default 3, the order of the tools alternating), the median kept:

- ``one2g``: one image of one uncompressed 2 GB layer;
- ``four400m``: one image of four uncompressed 400 MB layers;
- ``two_registries``: the 2 GB image to two registries, one batchpush run against
  skopeo copying it to each (the two copies one after the other, and both at once:
  the better is kept).

Layers are tars of model-like files: two thirds random bytes (weights), one third
text of words (vocabularies, configs); written streaming into an OCI layout (never
held in memory), cached under ``BENCH_WORK`` (default /tmp/bench-big).

Measured per run: wall time, peak RSS and CPU of the tool's process tree (psutil,
every 20 ms, bench/measure.py), the registries' CPU, batchpush's spool peak (its
report's ``spool_peak_bytes``) and the spool directory's peak on disk (polled every
20 ms), and the machine's floor: the compressed bytes each registry must take at
its ingest rate (a raw monolithic PUT of 256 MB, best of 3; for two registries, two
such PUTs at once), or at the WAN's rate if lower.

    .venv/bin/python bench/big.py [SCENARIO ...] [wan]

``wan`` (or ``BENCH_WAN=1``): every registry behind its own bench/wan_proxy.py of
``BENCH_WAN_MS`` per request (default 25) and ``BENCH_WAN_RATE`` bytes/s (default
100 MB/s). ``BENCH_SCALE=small``: sizes divided by 8, for a quick look (results in
the work directory, not a record). ``BENCH_BATCHPUSH_ARGS``: extra arguments of every
batchpush run (e.g. ``--spool-limit 512M``). Writes bench/results-big.json (-wan).
"""

from __future__ import annotations

import compileall
import dataclasses
import hashlib
import json
import os
import platform
import random
import shutil
import sys
import tarfile
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from types import TracebackType

import psutil
import requests

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))
sys.path.insert(0, HERE)

import run  # noqa: E402  (reads BENCH_WAN at import, as a delay in ms: not used here)
from images import OCI_CONFIG, OCI_LAYER_TAR, OCI_MANIFEST, LayoutWriter  # noqa: E402
from registry import Registry, start_registry  # noqa: E402
from wan_proxy import WanRegistry, behind_wan  # noqa: E402

SMALL = os.environ.get("BENCH_SCALE") == "small"
SCALE = 8 if SMALL else 1
GB, MB = 1_000_000_000, 1_000_000
WAN_MS = float(os.environ.get("BENCH_WAN_MS", "25"))
WAN_RATE = run.WAN_RATE  # BENCH_WAN_RATE, default 100 MB/s per registry
REPEATS = run.REPEATS  # BENCH_REPEATS, default 3
WORK = os.environ.get("BENCH_WORK") or "/tmp/bench-big"
#: what the layers hold: a cached layout of another version is built again
CONTENT = 2
#: a file of the model-like tree: weights (random) two of three, text one of three
FILE_BYTES = 64 * MB // SCALE
TAG = "big"
#: layer sizes of each layout, and each scenario's layout and number of registries
LAYOUTS = {"one2g": [2 * GB // SCALE], "four400m": [400 * MB // SCALE] * 4}
SCENARIOS = {"one2g": ("one2g", 1), "four400m": ("four400m", 1), "two_registries": ("one2g", 2)}
#: the issue's targets on loopback (batchpush / skopeo)
TARGETS = {"one2g": 0.95, "four400m": 0.85, "two_registries": 0.65}
POLL_S = 0.02
WORDS = (
    b"lorem ipsum dolor sit amet consectetur adipiscing elit sed do eiusmod tempor incididunt ut labore et dolore magna aliqua enim ad minim veniam "
    b"quis nostrud exercitation ullamco laboris nisi aliquip ex ea commodo consequat duis aute irure in reprehenderit voluptate velit esse cillum "
    b"fugiat nulla pariatur excepteur sint occaecat cupidatat non proident sunt culpa qui officia deserunt mollit anim id est laborum "
    b"token embedding attention layer weight bias norm head vocab merges config tokenizer model shard"
).split()


# --- layouts, written streaming -----------------------------------------------------


class _HashingFile:
    """A file being written and the sha256 and size of what was written."""

    def __init__(self, path: str) -> None:
        self.file = open(path, "wb")  # noqa: SIM115  (closed by close())
        self.sha = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes | memoryview) -> None:
        self.file.write(data)
        self.sha.update(data)
        self.size += len(data)

    def close(self) -> None:
        self.file.close()


def _text_pool(rng: random.Random, size: int = 4 << 20) -> memoryview:
    """``size`` bytes of text: lines drawn from 200 sentences of random words, which
    isal's level 1 deflates to about 0.18 of their size (so a layer of two thirds
    random bytes to about 0.72, as the issue's layers did); slices of it make the text
    files (the pieces repeat far beyond deflate's 32 KB window)."""
    sentences = [b" ".join(rng.choice(WORDS) for _ in range(rng.randrange(4, 14))) + b".\n" for _ in range(200)]
    parts: list[bytes] = []
    length = 0
    while length < size:
        parts.append(rng.choice(sentences))
        length += len(parts[-1])
    return memoryview(b"".join(parts)[:size])


def _file_chunks(rng: random.Random, pool: memoryview, text: bool, size: int) -> Iterator[bytes | memoryview]:
    left = size
    while left:
        n = min(left, 4 << 20)
        if text:
            n = min(n, rng.randrange(64 << 10, 1 << 20))
            start = rng.randrange(len(pool) - n)
            yield pool[start:start + n]
        else:
            yield rng.randbytes(n)
        left -= n


def write_layer(blobs: str, seed: int, size: int) -> tuple[str, int]:
    """An uncompressed tar of about ``size`` bytes of model-like files, written straight
    into the layout's blobs (sha256 computed while writing); its digest and size."""
    rng = random.Random(seed)
    pool = _text_pool(rng)
    tmp = os.path.join(blobs, f".layer-{seed}.tmp")
    out = _HashingFile(tmp)
    try:
        left, index = size, 0
        while left > 0:
            text = index % 3 == 2
            file_size = min(FILE_BYTES, left)
            info = tarfile.TarInfo(f"model{seed}/{'vocab' if text else 'shard'}-{index:05}.{'txt' if text else 'bin'}")
            info.size, info.mtime, info.mode = file_size, 0, 0o644
            out.write(info.tobuf(format=tarfile.GNU_FORMAT))
            for chunk in _file_chunks(rng, pool, text, file_size):
                out.write(chunk)
            out.write(b"\0" * (-file_size % tarfile.BLOCKSIZE))
            left -= file_size + tarfile.BLOCKSIZE
            index += 1
        out.write(b"\0" * (2 * tarfile.BLOCKSIZE))
        out.write(b"\0" * (-out.size % tarfile.RECORDSIZE))
    finally:
        out.close()
    digest = "sha256:" + out.sha.hexdigest()
    os.replace(tmp, os.path.join(blobs, digest.split(":")[1]))
    return digest, out.size


def build_layout(path: str, sizes: list[int], seed: int) -> str:
    """The OCI layout at ``path`` (one image tagged TAG), built unless already there."""
    marker = f"{path}.complete"
    if os.path.exists(marker):
        with open(marker) as f:
            if json.load(f) == {"sizes": sizes, "content": CONTENT}:
                return path
    shutil.rmtree(path, ignore_errors=True)
    started = time.monotonic()
    writer = LayoutWriter(path)
    layers = [write_layer(os.path.join(path, "blobs", "sha256"), seed + i, size) for i, size in enumerate(sizes)]
    diff_ids = [digest for digest, _ in layers]
    config = json.dumps({"architecture": "amd64", "os": "linux", "config": {"Cmd": ["/bin/sh"]}, "rootfs": {"type": "layers", "diff_ids": diff_ids}}).encode()
    manifest = json.dumps({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": OCI_CONFIG, "digest": writer.blob(config), "size": len(config)},
        "layers": [{"mediaType": OCI_LAYER_TAR, "digest": digest, "size": size} for digest, size in layers],
    }).encode()
    writer.tag({"mediaType": OCI_MANIFEST, "digest": writer.blob(manifest), "size": len(manifest)}, TAG)
    with open(marker, "w") as f:
        json.dump({"sizes": sizes, "content": CONTENT}, f)
    print(f"built {path}: {len(sizes)} layer(s), {sum(size for _, size in layers) / MB:,.0f} MB in {time.monotonic() - started:.1f} s", flush=True)
    return path


# --- measuring ------------------------------------------------------------------------


class DiskPeak:
    """The most bytes the files under ``path`` took on disk at once (polled)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.peak = 0
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def __enter__(self) -> DiskPeak:
        self._thread.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None) -> None:
        self._done.set()
        self._thread.join()

    def _poll(self) -> None:
        while not self._done.is_set():
            self.peak = max(self.peak, _disk_bytes(self.path))
            self._done.wait(POLL_S)


def _disk_bytes(path: str) -> int:
    total = 0
    try:
        entries = list(os.scandir(path))
    except OSError:  # not there yet, or gone
        return 0
    for entry in entries:
        try:
            if entry.is_dir(follow_symlinks=False):
                total += _disk_bytes(entry.path)
            else:
                total += entry.stat(follow_symlinks=False).st_blocks * 512
        except OSError:  # removed meanwhile
            continue
    return total


def _proxy_cpu_s(registries: list[Registry]) -> float:
    total = 0.0
    for registry in registries:
        if isinstance(registry, WanRegistry) and registry.proxy is not None:
            times = psutil.Process(registry.proxy.pid).cpu_times()
            total += times.user + times.system
    return total


@dataclass
class BigRun:
    tool: str
    run: run.Run
    load_1m: float
    #: batchpush only: its report's spool peak, the spool directory's on disk, failed images
    spool_peak_bytes: int | None = None
    spool_disk_peak_bytes: int | None = None
    failed_images: int | None = None
    #: behind the WAN: the proxies' CPU (they share the cores too)
    proxy_cpu_s: float = 0.0
    #: registries without the image's tag after the run (read back, not timed)
    missing_tags: int = 0

    def line(self, scenario: str) -> str:
        r = self.run
        spool = f" spool {self.spool_peak_bytes / MB:6.0f}MB (disk {self.spool_disk_peak_bytes / MB:6.0f}MB)" if self.spool_peak_bytes is not None and self.spool_disk_peak_bytes is not None else ""
        proxy = f" proxy cpu {self.proxy_cpu_s:5.2f}s" if self.proxy_cpu_s else ""
        return (f"  {scenario:15} {self.tool:19} wall {r.wall_s:7.2f}s cpu {r.cpu_s:6.2f}s registry cpu {r.registry_cpu_s:6.2f}s rss {r.peak_rss_mb:5.0f}MB "
                f"up {r.bytes_uploaded / MB:7.1f}MB req {r.requests:4} fail {r.failures + self.missing_tags}{spool}{proxy} load {self.load_1m:.2f}")


def registries_for(work: str, count: int, wan: bool) -> list[Registry]:
    registries = [start_registry(work) for _ in range(count)]
    return [behind_wan(r, WAN_MS, WAN_RATE) for r in registries] if wan else registries


def stop(registries: list[Registry]) -> None:
    for registry in registries:
        registry.stop()
        shutil.rmtree(registry.root, ignore_errors=True)


def run_batchpush(work: str, layout: str, name: str, registries: list[Registry], label: str) -> BigRun:
    metadata, spool, report = (os.path.join(work, f"{label}-{kind}") for kind in ("md", "spool", "report.json"))
    os.makedirs(spool)
    insecure = [arg for r in registries for arg in ("--insecure", r.host)]
    command = [sys.executable, "-m", "batchpush", "push", f"oci:{layout}:{TAG}", *(f"{r.host}/big/{name}:{TAG}" for r in registries), *insecure,
               "-q", "--metadata-dir", metadata, "--report", report, "--spool-dir", spool, *run.BATCHPUSH_ARGS]
    load = os.getloadavg()[0]
    proxy_before = _proxy_cpu_s(registries)
    with DiskPeak(spool) as disk:
        measured = run.measure("batchpush", [command], 1, registries)
    result = BigRun("batchpush", measured, load, spool_disk_peak_bytes=disk.peak, proxy_cpu_s=_proxy_cpu_s(registries) - proxy_before)
    if os.path.exists(report):
        with open(report) as f:
            written = json.load(f)
        result.spool_peak_bytes, result.failed_images = written["totals"]["spool_peak_bytes"], written["totals"]["failed"]
        for image in written["images"]:
            if image["status"] == "failed":
                print(f"  batchpush failed: {image['target']}: {image['error']}", flush=True)
    elif measured.failures:
        print("  batchpush failed without a report", flush=True)
    shutil.rmtree(spool, ignore_errors=True)
    shutil.rmtree(metadata, ignore_errors=True)
    return result


def run_skopeo(layout: str, name: str, registries: list[Registry], parallel: int) -> BigRun:
    commands = [["skopeo", "--insecure-policy", "copy", "-q", "--dest-compress", "--dest-tls-verify=false", f"oci:{layout}:{TAG}", f"docker://{r.host}/big/{name}:{TAG}"] for r in registries]
    run.clear_skopeo_cache()
    load = os.getloadavg()[0]
    proxy_before = _proxy_cpu_s(registries)
    measured = run.measure(f"skopeo x{parallel}", commands, parallel, registries)
    tool = "skopeo" if len(registries) == 1 else ("skopeo one by one" if parallel == 1 else "skopeo both at once")
    return BigRun(tool, measured, load, proxy_cpu_s=_proxy_cpu_s(registries) - proxy_before)


def missing_tags(registries: list[Registry], name: str) -> int:
    missing = 0
    for registry in registries:
        response = requests.head(f"{registry.url}/v2/big/{name}/manifests/{TAG}", headers={"Accept": OCI_MANIFEST + ", application/vnd.docker.distribution.manifest.v2+json"}, timeout=30)
        missing += response.status_code != 200
    return missing


def median(runs: list[BigRun]) -> BigRun:
    return sorted(runs, key=lambda r: r.run.wall_s)[len(runs) // 2]


def scenario(work: str, name: str, layout: str, count: int, wan: bool, limits: dict) -> dict:
    """Each tool ``REPEATS`` times on fresh registries, in turn (the order alternating);
    the medians, the better of skopeo's ways, and the floor."""
    ways = ["batchpush", "skopeo"] if count == 1 else ["batchpush", "skopeo_seq", "skopeo_par"]
    runs: dict[str, list[BigRun]] = {way: [] for way in ways}
    load = os.getloadavg()[0]
    for repeat in range(REPEATS):
        for way in ways if repeat % 2 == 0 else ways[::-1]:
            registries = registries_for(work, count, wan)
            try:
                if way == "batchpush":
                    result = run_batchpush(work, layout, name, registries, f"{name}-{repeat}")
                else:
                    result = run_skopeo(layout, name, registries, 2 if way == "skopeo_par" else 1)
                result.missing_tags = missing_tags(registries, name)
            finally:
                stop(registries)
            runs[way].append(result)
            print(result.line(name), flush=True)
    medians = {way: median(found) for way, found in runs.items()}
    ours = medians["batchpush"]
    theirs = min((medians[way] for way in ways[1:]), key=lambda r: r.run.wall_s)
    # each registry takes the image's compressed layers (what batchpush sent it) at its ingest rate
    per_registry = ours.run.bytes_uploaded / count
    ingest = limits["ingest_mb_s"] if count == 1 else limits["ingest_two_mb_s"] / 2
    rate = min(ingest * MB, WAN_RATE) if wan else ingest * MB
    floor = per_registry / rate
    return {
        "scenario": name, "registries": count, "load_1m_at_start": load, "floor_s": floor, "compressed_bytes_per_registry": per_registry,
        "batchpush": ours, "skopeo": theirs, "runs": runs,
    }


def ingest_together_mb_s(work: str, count: int, size: int = 256 << 20) -> float:
    """The registries' ingest when ``count`` of them each take a raw monolithic PUT of
    ``size`` random bytes at once (run.registry_ingest_mb_s is one alone)."""
    registries = [start_registry(work) for _ in range(count)]
    data = os.urandom(size)
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    ready = threading.Barrier(count + 1)
    statuses: list[int] = []

    def put(registry: Registry) -> None:
        with requests.Session() as session:
            location = session.post(f"{registry.url}/v2/ingest/raw/blobs/uploads/").headers["Location"]
            location = location if location.startswith("http") else registry.url + location
            ready.wait()
            statuses.append(session.put(f"{location}&digest={digest}", data=data, headers={"Content-Type": "application/octet-stream"}).status_code)

    threads = [threading.Thread(target=put, args=(r,)) for r in registries]
    try:
        for thread in threads:
            thread.start()
        ready.wait()
        started = time.monotonic()
        for thread in threads:
            thread.join()
        elapsed = time.monotonic() - started
        assert statuses == [201] * count, statuses
        return count * size / elapsed / MB
    finally:
        stop(registries)


# --- output ---------------------------------------------------------------------------


HEADER = [
    "| scenario | batchpush s | skopeo s | ratio | target | our peak RSS MB | spool peak MB (report / disk) | our CPU s | registry CPU s ours / skopeo | floor s | ours / floor | load at start |",
    "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
]


def row(data: dict, wan: bool) -> str:
    ours, theirs = data["batchpush"], data["skopeo"]
    ratio = ours.run.wall_s / theirs.run.wall_s if theirs.run.wall_s else float("nan")
    spool = f"{(ours.spool_peak_bytes or 0) / MB:,.0f} / {(ours.spool_disk_peak_bytes or 0) / MB:,.0f}"
    target = "" if wan else f"≤ {TARGETS[data['scenario']]:.2f}"
    failed = ours.run.failures + theirs.run.failures + (ours.failed_images or 0) + ours.missing_tags + theirs.missing_tags
    return (f"| {data['scenario']} | {ours.run.wall_s:,.1f} | {theirs.run.wall_s:,.1f} ({theirs.tool}) | **{ratio:.2f}** | {target} | {ours.run.peak_rss_mb:,.0f} | {spool} "
            f"| {ours.run.cpu_s:,.1f} | {ours.run.registry_cpu_s:,.1f} / {theirs.run.registry_cpu_s:,.1f} | {data['floor_s']:,.1f} | {ours.run.wall_s / data['floor_s']:.2f} "
            f"| {data['load_1m_at_start']:.2f} |" + (f" FAILURES {failed}" if failed else ""))


def to_json(value: object) -> object:
    if isinstance(value, BigRun):
        return dataclasses.asdict(value)
    if isinstance(value, dict):
        return {key: to_json(item) for key, item in value.items()}
    if isinstance(value, list):
        return [to_json(item) for item in value]
    return value


def main(argv: list[str]) -> int:
    args = argv[1:]
    wan = "wan" in args or os.environ.get("BENCH_WAN", "0") not in ("", "0")
    only = [arg for arg in args if arg != "wan"]
    unknown = [arg for arg in only if arg not in SCENARIOS]
    if unknown:
        print(f"unknown scenario {unknown[0]!r}: {', '.join(SCENARIOS)} (and wan)", file=sys.stderr)
        return 2
    names = only or list(SCENARIOS)
    load = os.getloadavg()
    with open("/proc/cpuinfo") as f:
        cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), platform.processor())
    print(f"# batchpush big-image bench, {time.strftime('%Y-%m-%d %H:%M')}, {os.cpu_count()} cores, {cpu}, scale {'small (sizes / 8)' if SMALL else 'full'}, "
          f"{REPEATS} run(s) per tool, {'WAN' if wan else 'loopback'}", flush=True)
    print(f"load average at start: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}", flush=True)
    if load[0] > 1:
        print(f"warning: 1-minute load {load[0]:.2f} > 1: the cores are shared with other work, these figures are not a record", flush=True)
    if wan:
        print(f"WAN: every registry behind its own wan_proxy.py, {WAN_MS:g} ms per request and connection, {WAN_RATE / MB:g} MB/s", flush=True)
    # bytecode compiled ahead, as installing the package does (an editable install does not)
    compileall.compile_dir(os.path.join(HERE, "..", "batchpush"), quiet=1)
    layouts_dir = os.path.join(WORK, "layouts-small" if SMALL else "layouts")
    os.makedirs(layouts_dir, exist_ok=True)
    layouts = {name: build_layout(os.path.join(layouts_dir, name), sizes, seed=100 * i) for i, (name, sizes) in enumerate(LAYOUTS.items()) if any(SCENARIOS[n][0] == name for n in names)}
    work = tempfile.mkdtemp(prefix="runs-", dir=WORK)
    try:
        # a floor is the best case: the best of 3 of each (the machine is noisy)
        limits = {"ingest_mb_s": max(run.registry_ingest_mb_s(work) for _ in range(3)), "ingest_two_mb_s": max(ingest_together_mb_s(work, 2) for _ in range(3))}
        print(f"limits (best of 3): registry ingest {limits['ingest_mb_s']:,.0f} MB/s (one raw monolithic PUT of 256 MB), two registries at once {limits['ingest_two_mb_s']:,.0f} MB/s together", flush=True)
        results = {}
        for name in names:
            layout, count = SCENARIOS[name]
            results[name] = scenario(work, name, layouts[layout], count, wan, limits)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print()
    print("\n".join([*HEADER, *(row(data, wan) for data in results.values())]))
    for data in results.values():
        skopeo_way = f"; skopeo one by one {median(data['runs']['skopeo_seq']).run.wall_s:.1f} s, both at once {median(data['runs']['skopeo_par']).run.wall_s:.1f} s" if data["registries"] > 1 else ""
        print(f"{data['scenario']}: {data['compressed_bytes_per_registry'] / MB:,.0f} MB compressed per registry (batchpush's), "
              f"skopeo uploaded {data['skopeo'].run.bytes_uploaded / data['registries'] / MB:,.0f} MB per registry{skopeo_way}")
    record = {
        "date": time.strftime("%Y-%m-%d %H:%M"), "cpu": cpu, "cores": os.cpu_count(), "scale": "small" if SMALL else "full", "repeats": REPEATS,
        "load_at_start": load,
        # full scale on an idle machine (1-minute load at most 1) only
        "record": not SMALL and load[0] <= 1,
        "wan": {"delay_ms": WAN_MS, "rate_bytes_s": WAN_RATE} if wan else None, "limits": limits,
        "scenarios": to_json(results),
    }
    # a small run is not a record: kept in the work directory
    out = os.path.join(WORK if SMALL else HERE, f"results-big{'-small' if SMALL else ''}{'-wan' if wan else ''}.json")
    with open(out, "w") as f:
        json.dump(record, f, indent=1)
    print(f"\nwritten {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
