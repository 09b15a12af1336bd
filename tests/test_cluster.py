"""One plan on a real Dask cluster (``--scheduler``): a ``dask scheduler`` and two
``dask worker`` processes on loopback, the real registry, skopeo reading back."""

from __future__ import annotations

import contextlib
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from conftest import pull_and_verify, remote_digest
from images import LayoutWriter, random_layer, simple_layout
from registry import free_port
from test_batch import WRITE_METHODS, uploads_by_digest, write_plan

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DASK = os.path.join(os.path.dirname(sys.executable), "dask")
#: how long the fixture waits for the scheduler and its workers to come up
START_TIMEOUT_S = 60.0


@dataclass
class Cluster:
    address: str
    scheduler: subprocess.Popen[bytes]
    workers: list[subprocess.Popen[bytes]]

    def worker_pids(self) -> list[int]:
        return [w.pid for w in self.workers if w.poll() is None]


def _env() -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=ROOT)
    # a killed worker's upload lease is freed after this, not the default 30 s
    env["DASK_DISTRIBUTED__SCHEDULER__LOCKS__LEASE_TIMEOUT"] = "3s"
    env["DASK_DISTRIBUTED__SCHEDULER__LOCKS__LEASE_VALIDATION_INTERVAL"] = "1s"
    from batchpush.cluster.client import _deadlocks

    if _deadlocks(platform.python_version()):
        # this Python's sys._current_frames() can deadlock a worker whose Dask profiler
        # samples it (CPython gh-106883; bench/README.md, *Hangs*): a frozen worker's
        # tasks wait for the client's silence bound (120 s), past the tests' own. The
        # tests run their workers as the client's note tells users to; a frozen worker
        # is tested on its own (test_a_worker_whose_event_loop_is_stuck_loses_nothing)
        env["DASK_DISTRIBUTED__WORKER__PROFILE__ENABLED"] = "False"
    return env


def _spawn(args: list[str], log: str, env: dict[str, str], prefix: list[str] | None = None) -> subprocess.Popen[bytes]:
    if not os.path.exists(DASK):
        pytest.fail(f"{DASK} is missing: install batchpush[cluster] (make setup)")
    with open(log, "ab") as out:
        # its own process group: torn down whole, whatever it started
        return subprocess.Popen([*(prefix or []), DASK, *args], stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    process.wait(timeout=30)


def _wait_workers(address: str, count: int) -> None:
    from distributed import Client

    with Client(address, timeout=START_TIMEOUT_S, set_as_default=False) as client:
        client.wait_for_workers(count, timeout=START_TIMEOUT_S)


def start_cluster(tmp_path, workers: int = 2, preload: str | None = None) -> Cluster:
    port = free_port()
    address = f"tcp://127.0.0.1:{port}"
    env = _env()
    scheduler = _spawn(["scheduler", "--host", "127.0.0.1", "--port", str(port), "--no-dashboard"], str(tmp_path / "scheduler.log"), env)
    cluster = Cluster(address, scheduler, [])
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert scheduler.poll() is None and time.monotonic() < deadline, "the scheduler did not start"
                time.sleep(0.2)
        for n in range(workers):
            cluster.workers.append(start_worker(tmp_path, address, f"w{n}", preload))
        if workers:
            _wait_workers(address, workers)
    except BaseException:
        stop_cluster(cluster)
        raise
    return cluster


def start_worker(tmp_path, address: str, name: str, preload: str | None = None, *, without_read_override: bool = False) -> subprocess.Popen[bytes]:
    # --no-nanny: the worker is the process itself, so a kill -9 loses it for good
    args = ["worker", address, "--nthreads", "2", "--no-nanny", "--no-dashboard", "--name", name, "--host", "127.0.0.1"]
    if preload:
        args += ["--preload", preload]
    # a worker bound by file permissions: root (the tests run as root) without the
    # capabilities that override them, so it reads only what root's own modes allow
    # (running it as another user would need the clone and its virtualenv readable by
    # that user, which a clone under a 0700 directory is not)
    prefix = ["setpriv", "--bounding-set=-dac_override,-dac_read_search"] if without_read_override else []
    return _spawn(args, str(tmp_path / f"worker-{name}.log"), _env(), prefix)


def stop_cluster(cluster: Cluster) -> None:
    for process in [*cluster.workers, cluster.scheduler]:
        _stop(process)


@pytest.fixture
def cluster(tmp_path) -> Iterator[Cluster]:
    started = start_cluster(tmp_path)
    try:
        yield started
    finally:
        stop_cluster(started)


def fleet(tmp_path) -> list[tuple[str, list[str]]]:
    """20 images over 8 layouts sharing a base layer (seed 1), a middle layer per
    group of layouts, an app layer each: (layout, tags)."""
    layouts = []
    for r in range(8):
        path = str(tmp_path / "layouts" / f"svc{r}")
        tags = {f"v{t}": [1, 100 + r % 3, 1000 + r * 10 + t] for t in range(3 if r < 4 else 2)}
        simple_layout(path, tags, file_size=30_000)
        layouts.append((path, sorted(tags)))
    return layouts


def plan_for(tmp_path, registries, layouts) -> str:
    return write_plan(tmp_path, {
        "version": 1,
        "defaults": {"max_concurrent_uploads": 2},
        "registries": {r.host: {"insecure": True} for r in registries},
        "images": [{"source": f"oci:{path}", "targets": [f"{r.host}/team/svc{i}" for r in registries]} for i, (path, _) in enumerate(layouts)],
    })


def batchpush_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "batchpush", *args], capture_output=True, text=True, timeout=110, env=env or dict(os.environ, PYTHONPATH=ROOT), cwd=ROOT)


def blob_puts_by_repository(registry) -> Counter[tuple[str, str]]:
    """Completed blob uploads per (repository, digest), from the registry's own log."""
    counts: Counter[tuple[str, str]] = Counter()
    for line in registry.access_log():
        if '"PUT /v2/' in line and "/blobs/uploads/" in line and '" 201' in line:
            path = line.split('"PUT /v2/', 1)[1].split(" ", 1)[0]
            repository = path.split("/blobs/uploads/", 1)[0]
            digest = path.split("digest=", 1)[1].split("&", 1)[0] if "digest=" in path else "?"
            counts[(repository, digest)] += 1
    return counts


def report_of(path) -> dict:
    with open(path) as f:
        return json.load(f)


def test_a_fleet_to_two_registries_on_two_workers(cluster, registry, tmp_path):
    from registry import start_registry

    second = start_registry(str(tmp_path / "second"))
    try:
        layouts = fleet(tmp_path)
        plan = plan_for(tmp_path, [registry, second], layouts)
        metadata = str(tmp_path / "md")
        done = batchpush_cli("run", plan, "--scheduler", cluster.address, "--metadata-dir", metadata, "--report", str(tmp_path / "r1.json"))
        assert done.returncode == 0, done.stderr
        report = report_of(tmp_path / "r1.json")
        images = report["images"]
        assert len(images) == 40 and all(i["status"] == "pushed" for i in images)
        # the totals count every request of the run: the client's own and the tasks'
        sent = sum('"batchpush/' in line for target in (registry, second) for line in target.access_log())
        # (and the client's one https attempt per registry, which the registry does not log)
        assert sum(report["totals"]["requests"].values()) == sent + 2, (report["totals"]["requests"], sent)
        # the client's display, fed by the workers: their layers' lines, its images' lines
        assert "Mounted from team/svc0" in done.stdout and ": Pushed" in done.stdout, done.stdout
        assert done.stdout.count(" size: ") == 40
        # both workers pushed images, and every image names its worker
        assert len({i["worker"] for i in images}) == 2, Counter(i["worker"] for i in images)
        for target in (registry, second):
            # each blob uploaded once per registry, every other repository mounted it
            uploads = uploads_by_digest(target)
            assert uploads and max(uploads.values()) == 1, uploads
            assert target.count("POST", "mount=") > 0
            # every image arrived whole
            for i, (_, tags) in enumerate(layouts):
                for tag in tags:
                    pulled = pull_and_verify(target, f"team/svc{i}:{tag}", str(tmp_path / f"pulled-{target.host.replace(':', '_')}-{i}-{tag}"))
                    assert pulled[0].manifest_digest == remote_digest(target, f"team/svc{i}:{tag}")
        digests = {i["target"].split("/", 1)[1]: i["digest"] for i in images}
        # the same digests as a local run of the same plan
        local = str(tmp_path / "local")
        third = start_registry(str(tmp_path / "third"))
        try:
            local_plan = plan_for(tmp_path / "layouts", [third], layouts)
            done = batchpush_cli("run", local_plan, "--metadata-dir", local, "--report", str(tmp_path / "local.json"))
            assert done.returncode == 0, done.stderr
            local_report = report_of(tmp_path / "local.json")
            assert {i["target"].split("/", 1)[1]: i["digest"] for i in local_report["images"]} == digests
            # each layer compressed once for the whole cluster and both registries, as a local run to one does
            assert report["totals"]["bytes_compressed"] == local_report["totals"]["bytes_compressed"]
        finally:
            third.stop()

        # a second run from the same client store, on the cluster and then locally:
        # up to date, no blob request at all (what the workers learned is the client's)
        for scheduler in (["--scheduler", cluster.address], []):
            for target in (registry, second):
                target.log_before = len(target.access_log())  # type: ignore[attr-defined]
            done = batchpush_cli("run", plan, *scheduler, "--metadata-dir", metadata, "--report", str(tmp_path / "r2.json"))
            assert done.returncode == 0, done.stderr
            assert all(i["status"] == "up-to-date" for i in report_of(tmp_path / "r2.json")["images"])
            for target in (registry, second):
                later = target.access_log()[target.log_before:]  # type: ignore[attr-defined]
                assert not [line for line in later if "/blobs/" in line], later
                assert not [line for line in later if any(f'"{m} ' in line for m in WRITE_METHODS)]
        # the check runs on the client, before the cluster is reached: with every image
        # up to date, no scheduler is needed (none listens at this address)
        done = batchpush_cli("run", plan, "--scheduler", f"tcp://127.0.0.1:{free_port()}", "--metadata-dir", metadata, "--report", str(tmp_path / "r3.json"))
        assert done.returncode == 0, done.stderr
        assert all(i["status"] == "up-to-date" for i in report_of(tmp_path / "r3.json")["images"])
        assert "the Dask scheduler at tcp://127.0.0.1:" in done.stdout and "was not contacted" in done.stdout, done.stdout
    finally:
        second.stop()


def test_a_local_run_never_imports_dask(registry, tmp_path):
    layouts = fleet(tmp_path)[:1]
    plan = plan_for(tmp_path, [registry], layouts)
    code = (
        "import sys\n"
        "from batchpush.cli import main\n"
        f"code = main(['run', {plan!r}, '--metadata-dir', {str(tmp_path / 'md')!r}])\n"
        "loaded = [m for m in sys.modules if m.split('.')[0] in ('dask', 'distributed')]\n"
        "print('LOADED', loaded)\n"
        "sys.exit(code)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=110, env=dict(os.environ, PYTHONPATH=ROOT), cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert "LOADED []" in done.stdout


def test_an_unreachable_scheduler_is_one_line_and_exit_2(registry, tmp_path):
    plan = plan_for(tmp_path, [registry], fleet(tmp_path)[:1])
    done = batchpush_cli("run", plan, "--scheduler", f"tcp://127.0.0.1:{free_port()}", "--metadata-dir", str(tmp_path / "md"))
    assert done.returncode == 2
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "cannot reach the Dask scheduler" in lines[0], done.stderr
    assert registry.count("POST") == registry.count("PUT") == registry.count("HEAD") == 0


def test_a_worker_of_another_version_is_refused_before_any_work(tmp_path, registry):
    preload = tmp_path / "other_version.py"
    preload.write_text("import batchpush\nbatchpush.__version__ = '0.0.0-other'\n")
    started = start_cluster(tmp_path, workers=1)
    try:
        started.workers.append(start_worker(tmp_path, started.address, "old", str(preload)))
        _wait_workers(started.address, 2)
        plan = plan_for(tmp_path, [registry], fleet(tmp_path)[:1])
        done = batchpush_cli("run", plan, "--scheduler", started.address, "--metadata-dir", str(tmp_path / "md"))
        assert done.returncode == 2
        lines = [line for line in done.stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and "refused" in lines[0] and "0.0.0-other" in lines[0], done.stderr
        assert registry.count("HEAD") == registry.count("POST") == registry.count("PUT") == 0
    finally:
        stop_cluster(started)


def test_a_source_a_worker_cannot_read_fails_that_image_naming_the_worker(registry, tmp_path):
    """A worker without the permission to read one layout (owned by another user,
    mode 0700; the client may read it): that layout's images fail, naming the
    worker; the others arrive."""
    readable = str(tmp_path / "svc0")
    simple_layout(readable, {"v0": [1, 2]})
    private = str(tmp_path / "svc1")
    simple_layout(private, {"v0": [1, 3]})
    for where, dirs, files in os.walk(private):
        for name in [*dirs, *files]:
            os.chown(os.path.join(where, name), 65534, 65534)
    os.chown(private, 65534, 65534)
    os.chmod(private, 0o700)
    plan = write_plan(tmp_path, {
        "version": 1,
        "registries": {registry.host: {"insecure": True}},
        "images": [{"source": f"oci:{path}", "targets": [f"{registry.host}/team/svc{i}"]} for i, path in enumerate((readable, private))],
    })
    started = start_cluster(tmp_path, workers=0)
    try:
        started.workers.append(start_worker(tmp_path, started.address, "bound", without_read_override=True))
        _wait_workers(started.address, 1)
        done = batchpush_cli("run", plan, "--scheduler", started.address, "--metadata-dir", str(tmp_path / "md"), "--report", str(tmp_path / "r.json"))
    finally:
        stop_cluster(started)
    assert done.returncode == 1, done.stderr
    svc0, svc1 = report_of(tmp_path / "r.json")["images"]
    assert svc0["status"] == "pushed", svc0
    assert svc1["status"] == "failed" and "on worker tcp://127.0.0.1:" in svc1["error"] and private in svc1["error"], svc1
    assert f"{registry.host}/team/svc1" in done.stderr
    assert registry.count("PUT", "/team/svc1/manifests/") == 0
    pull_and_verify(registry, "team/svc0:v0", str(tmp_path / "pulled"))


def slow_fleet(tmp_path, proxy, file_size: int) -> tuple[list[tuple[str, list[str]]], str]:
    """20 images over 8 layouts (as ``fleet``) with layers of ``file_size``, and a plan
    pushing them through ``proxy``: (layouts, plan)."""
    layouts = []
    for r in range(8):
        path = str(tmp_path / "layouts" / f"svc{r}")
        tags = {f"v{t}": [1, 100 + r % 3, 1000 + r * 10 + t] for t in range(3 if r < 4 else 2)}
        simple_layout(path, tags, file_size=file_size)
        layouts.append((path, sorted(tags)))
    plan = write_plan(tmp_path, {
        "version": 1,
        "defaults": {"max_concurrent_uploads": 2},
        "registries": {proxy.host: {"insecure": True}},
        "images": [{"source": f"oci:{path}", "targets": [f"{proxy.host}/team/svc{i}"]} for i, (path, _) in enumerate(layouts)],
    })
    return layouts, plan


@contextlib.contextmanager
def running(client: subprocess.Popen[str]) -> Iterator[subprocess.Popen[str]]:
    """The client process, killed if the test leaves before it ended."""
    try:
        yield client
    finally:
        if client.poll() is None:
            client.kill()
            client.wait()


def start_client(plan: str, cluster: Cluster, tmp_path, report: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "batchpush", "run", plan, "--scheduler", cluster.address, "--metadata-dir", str(tmp_path / "md"), "--report", report],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=dict(os.environ, PYTHONPATH=ROOT), cwd=ROOT)


def wait_cluster_idle(address: str, timeout_s: float = 60) -> None:
    """Until the scheduler holds no task and no worker runs one: after that, no task
    of a finished run can send anything. Asked of Dask, not guessed from a quiet spell."""
    from distributed import Client

    # nested, so that they are pickled by value (the workers cannot import this module)
    def _tasks_running(dask_worker) -> int:  # type: ignore[no-untyped-def]
        # a task the scheduler let go of keeps running on its worker until its thread
        # returns (Dask cannot stop a thread): it stays among the worker's executing ones
        return len(dask_worker.state.executing) + len(dask_worker.state.long_running)

    def _tasks_known(dask_scheduler) -> int:  # type: ignore[no-untyped-def]
        return len(dask_scheduler.tasks)

    with Client(address, timeout=START_TIMEOUT_S, set_as_default=False) as client:
        deadline = time.monotonic() + timeout_s
        while True:
            running = client.run(_tasks_running)
            known = client.run_on_scheduler(_tasks_known)
            if not known and not any(running.values()):
                return
            assert time.monotonic() < deadline, f"tasks still there after {timeout_s} s: {known} at the scheduler, running {running}"
            time.sleep(0.2)


def committed(proxy, *, large: bool = False) -> int:
    """Blob uploads the registry committed (``large``: those of 1 MiB and more, sent whole)."""
    return len([s for s in proxy.requests("PUT", "/blobs/uploads/") if s.status == 201 and (not large or s.body_bytes >= 1 << 20)])


def wait_for_uploads(proxy, client: subprocess.Popen[str], count: int) -> None:
    deadline = time.monotonic() + 60
    while committed(proxy) < count:
        assert client.poll() is None, "the batch ended before it could be disturbed"
        assert time.monotonic() < deadline, "no upload in sight"
        time.sleep(0.05)


def test_a_worker_killed_mid_batch_loses_nothing(cluster, registry, tmp_path):
    """kill -9 of a worker once uploads are under way (they are slowed by our proxy
    so the batch is still going): its tasks run on the other worker, the batch
    completes, every image arrives whole, no blob is uploaded twice."""
    from fault_proxy import FaultProxy

    proxy = FaultProxy(registry.host)
    proxy.throttle_bytes_per_s = 400_000
    try:
        layouts, plan = slow_fleet(tmp_path, proxy, 150_000)
        report = str(tmp_path / "r.json")
        with running(start_client(plan, cluster, tmp_path, report)) as client:
            wait_for_uploads(proxy, client, 2)
            victim = cluster.workers[0]
            os.kill(victim.pid, signal.SIGKILL)
            victim.wait(timeout=30)
            out, err = client.communicate(timeout=100)
        assert client.returncode == 0, err
        images = report_of(report)["images"]
        assert len(images) == 20 and all(i["status"] == "pushed" for i in images), [i["error"] for i in images]
        # the dead worker's blob tasks ran again, asking first (a first attempt asks no
        # blob HEAD here: 0 without the kill)
        assert registry.count("HEAD", "/blobs/") > 0
        # no blob uploaded twice, to any repository, by the retries
        per_repository = blob_puts_by_repository(registry)
        assert per_repository and max(per_repository.values()) == 1, per_repository
        assert max(uploads_by_digest(registry).values()) == 1
        for i, (_, tags) in enumerate(layouts):
            for tag in tags:
                pulled = pull_and_verify(registry, f"team/svc{i}:{tag}", str(tmp_path / f"pulled-{i}-{tag}"))
                assert pulled[0].manifest_digest == next(im["digest"] for im in images if im["target"].endswith(f"/team/svc{i}:{tag}"))
    finally:
        proxy.stop()


def test_max_concurrent_uploads_holds_across_the_cluster(cluster, registry, tmp_path):
    """Blobs of 1 MiB and more take one of the registry's max_concurrent_uploads
    slots cluster-wide (a Dask semaphore): two workers that could each send 8 at
    once never have more than 2 bodies in flight at the registry."""
    from fault_proxy import FaultProxy

    proxy = FaultProxy(registry.host)
    proxy.throttle_bytes_per_s = 2_000_000
    try:
        layouts = []
        for r in range(8):
            path = str(tmp_path / "layouts" / f"big{r}")
            simple_layout(path, {"v0": [500 + r]}, file_size=1_500_000)  # ~1.8 MB compressed
            layouts.append(path)
        plan = write_plan(tmp_path, {
            "version": 1,
            "defaults": {"max_concurrent_uploads": 2},
            "registries": {proxy.host: {"insecure": True}},
            "images": [{"source": f"oci:{path}", "targets": [f"{proxy.host}/big/svc{i}"]} for i, path in enumerate(layouts)],
        })
        done = batchpush_cli("run", plan, "--scheduler", cluster.address, "--metadata-dir", str(tmp_path / "md"), "--report", str(tmp_path / "r.json"))
        assert done.returncode == 0, done.stderr
        assert [i["status"] for i in report_of(tmp_path / "r.json")["images"]] == ["pushed"] * 8
        assert 1 <= proxy.peak_large_bodies <= 2, proxy.peak_large_bodies
        pull_and_verify(registry, "big/svc5:v0", str(tmp_path / "pulled"))
    finally:
        proxy.stop()


def test_credentials_are_read_on_the_client_only_and_never_shown(cluster, token_registry, tmp_path):
    """The workers have no credentials: without any, the images fail clearly; with
    the plan's (a password in the client's environment only) they arrive, and the
    password or a token is in no output, log or report."""
    from conftest import assert_no_secret

    registry, issuer = token_registry
    simple_layout(str(tmp_path / "layout"), {"1.0": [8, 9]})
    plan = tmp_path / "plan.yaml"
    entry = {"version": 1, "registries": {registry.host: {"insecure": True}}, "images": [{"source": "oci:./layout", "targets": [f"{registry.host}/auth/app"]}]}
    plan.write_text(json.dumps(entry))
    env = dict(os.environ, PYTHONPATH=ROOT, DOCKER_CONFIG=str(tmp_path / "none"))
    done = batchpush_cli("run", str(plan), "--scheduler", cluster.address, "--metadata-dir", str(tmp_path / "md"), "--report", str(tmp_path / "r0.json"), env=env)
    assert done.returncode == 1, done.stderr
    failed = report_of(tmp_path / "r0.json")["images"][0]
    assert failed["status"] == "failed" and failed["error_kind"] == "auth", failed
    assert f"{registry.host}/auth/app:1.0" in done.stderr
    assert registry.count("PUT", "/manifests/") == 0

    entry["registries"][registry.host].update(username="alice", password_env="BATCHPUSH_TEST_PASSWORD")
    plan.write_text(json.dumps(entry))
    env["BATCHPUSH_TEST_PASSWORD"] = "alice-secret-pw"
    done = batchpush_cli("run", str(plan), "--debug", "--scheduler", cluster.address, "--metadata-dir", str(tmp_path / "md"), "--report", str(tmp_path / "r1.json"), env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    pull_and_verify(registry, "auth/app:1.0", str(tmp_path / "pulled"))
    logs = [open(path, errors="replace").read() for path in tmp_path.glob("*.log")]
    assert len(logs) >= 3  # the scheduler's and both workers'
    assert_no_secret(["alice-secret-pw", *issuer.tokens], done.stdout, done.stderr, (tmp_path / "r1.json").read_text(), *logs)


def test_sigterm_stops_the_cluster_run_writes_the_report_and_the_workers_stop(cluster, registry, tmp_path):
    """SIGTERM to the client mid-batch (12 blobs of 1.2 MB, two uploads at a time,
    slowed by our proxy): exit 143, the report written (each image pushed or
    interrupted), the workers start no more uploads, and every manifest in the
    registry names only blobs that are there."""
    from fault_proxy import FaultProxy

    proxy = FaultProxy(registry.host)
    proxy.throttle_bytes_per_s = 1_000_000
    try:
        layouts = []
        for r in range(4):
            writer = LayoutWriter(str(tmp_path / "layouts" / f"big{r}"))
            descriptor, _ = writer.image([random_layer(100 + r * 3 + k, 1_200_000) for k in range(3)])
            writer.tag(descriptor, "v0")
            layouts.append(writer.path)
        plan = write_plan(tmp_path, {
            "version": 1,
            "defaults": {"max_concurrent_uploads": 2},
            "registries": {proxy.host: {"insecure": True}},
            "images": [{"source": f"oci:{path}", "targets": [f"{proxy.host}/big/svc{i}"]} for i, path in enumerate(layouts)],
        })
        report = str(tmp_path / "r.json")
        with running(start_client(plan, cluster, tmp_path, report)) as client:
            deadline = time.monotonic() + 60
            while proxy.large_bodies_in_flight < 1:  # uploads under way
                assert client.poll() is None and time.monotonic() < deadline, "no upload in sight"
                time.sleep(0.05)
            at_stop = committed(proxy, large=True)
            client.send_signal(signal.SIGTERM)
            out, err = client.communicate(timeout=60)
        assert client.returncode == 128 + signal.SIGTERM, err
        assert "stopped by signal 15" in err, err
        images = report_of(report)["images"]
        assert len(images) == 4
        assert {i["status"] for i in images} <= {"pushed", "failed"}
        interrupted = [i for i in images if i["status"] == "failed"]
        assert interrupted and all(i["error_kind"] == "interrupted" for i in interrupted), interrupted
        # the workers heard the stop: once no task of the run is left anywhere (none
        # queued, none running on a worker), nothing more can be sent; most blobs never were
        wait_cluster_idle(cluster.address)
        assert proxy.large_bodies_in_flight == 0
        # the two uploads under way may end, and one that took its lease as the stop
        # came; the rest never start (without telling the workers, all of them go)
        assert committed(proxy, large=True) - at_stop <= 4, (committed(proxy, large=True), at_stop)
        # whatever manifest arrived is whole (skopeo reads every blob it names)
        assert_present_images_whole(registry, images, tmp_path)
    finally:
        proxy.stop()


def assert_present_images_whole(registry, images: list[dict], tmp_path) -> int:
    """Every manifest the registry holds under a reported tag is whole (skopeo reads
    every blob it names); a pushed image must be there, a failed one may be absent
    (its tag answers 404: asked, not skipped), never half there. Each manifest the
    registry accepted (its access log) is under a reported tag. Returns how many
    reported tags the registry holds."""
    import re

    import requests

    accept = "application/vnd.oci.image.manifest.v1+json, application/vnd.oci.image.index.v1+json, application/vnd.docker.distribution.manifest.v2+json, application/vnd.docker.distribution.manifest.list.v2+json"
    reported = {image["target"].split("/", 1)[1] for image in images}
    written = {f"{m[1]}:{m[2]}" for line in registry.access_log() if (m := re.search(r'"PUT /v2/(.+)/manifests/([^ ?]+)[^"]*" 201 ', line))}
    assert {name for name in written if "sha256:" not in name} <= reported, written - reported
    present = 0
    for image in images:
        name = image["target"].split("/", 1)[1]
        repository, tag = name.rsplit(":", 1)
        status = requests.head(f"{registry.url}/v2/{repository}/manifests/{tag}", headers={"Accept": accept}, timeout=30).status_code
        assert status in (200, 404), (name, status)
        assert status == 200 or image["status"] != "pushed", f"{name} is reported pushed and the registry does not have it"
        if status == 200:
            os.makedirs(tmp_path / "pulled", exist_ok=True)  # skopeo makes the layout's directory, not its parent
            pull_and_verify(registry, name, str(tmp_path / "pulled" / name.replace("/", "_").replace(":", "_")))
            present += 1
    return present


def test_a_worker_that_joined_with_another_version_refuses_each_task():
    """connect() refuses a cluster with a worker of another version; one that joins
    later gets tasks, and each refuses before any work: its images fail with that line."""
    from batchpush import cluster
    from batchpush.registry.client import RegistryOptions

    setup = cluster._Setup(RegistryOptions(), {}, cluster._Secrets({}), "run", {}, version="0.0.0-other")
    with pytest.raises(cluster.ClusterError, match=r"refused: worker local runs batchpush \S+, this client 0.0.0-other"):
        cluster._TaskEngine(setup, ())
    assert cluster._lost("blob", cluster.ClusterError("refused: x"), "tcp://h:1") == "refused: x"


def test_the_scheduler_killed_mid_batch_fails_what_is_left_and_says_why(registry, tmp_path):
    """kill -9 of the scheduler once uploads are under way: the client ends (exit 1,
    the report written), each image pushed or failed, a failure asking whether the
    scheduler still runs, and every manifest in the registry whole."""
    from fault_proxy import FaultProxy

    proxy = FaultProxy(registry.host)
    proxy.throttle_bytes_per_s = 400_000
    started = start_cluster(tmp_path)
    try:
        _, plan = slow_fleet(tmp_path, proxy, 150_000)
        report = str(tmp_path / "r.json")
        with running(start_client(plan, started, tmp_path, report)) as client:
            wait_for_uploads(proxy, client, 2)
            os.killpg(started.scheduler.pid, signal.SIGKILL)
            out, err = client.communicate(timeout=100)
        assert client.returncode == 1, err
        images = report_of(report)["images"]
        assert len(images) == 20 and {i["status"] for i in images} <= {"pushed", "failed"}
        failed = [i for i in images if i["status"] == "failed"]
        assert failed and all(f"is the Dask scheduler at {started.address} still running?" in i["error"] for i in failed), failed
        assert_present_images_whole(registry, images, tmp_path)
    finally:
        stop_cluster(started)
        proxy.stop()


# -- a long-lived cluster (issue 27) ------------------------------------------------
#: a worker preload: the result of each blob task that ``DROPPED`` matches is
#: deleted from the worker's memory once stored, the scheduler not told: it
#: believes the worker holds it, and asks it again and again for it, in silence
DROP_RESULTS = """
import re
from distributed import WorkerPlugin

DROPPED = re.compile({pattern!r})


class DropResults(WorkerPlugin):
    def setup(self, worker):
        self.worker = worker

    def transition(self, key, start, finish, **kwargs):
        if finish == "memory" and DROPPED.fullmatch(str(key)):
            self.worker.loop.add_callback(self.drop, key)

    def drop(self, key):
        if key in self.worker.data:
            del self.worker.data[key]


async def dask_setup(worker):
    await worker.plugin_add(DropResults(), name="drop-results")
"""

#: a worker preload: the worker pauses when it is handed its first batchpush task,
#: which it keeps and never runs (nor any other)
PAUSE_ON_FIRST_TASK = """
import asyncio
from distributed.core import Status


async def dask_setup(worker):
    execute = worker.execute

    async def paused(key, *args, **kwargs):
        if str(key).startswith("batchpush-"):
            worker.status = Status.paused
            await asyncio.Event().wait()
        return await execute(key, *args, **kwargs)

    worker.execute = paused
"""

#: a worker preload: the worker named w1 stops its event loop for good when handed
#: its first batchpush task (as a worker deadlocked by CPython gh-106883 does: every
#: thread waits, nothing answers, the scheduler still lists it)
STUCK_ON_FIRST_TASK = """
import time


async def dask_setup(worker):
    execute = worker.execute

    async def stuck(key, *args, **kwargs):
        if worker.name == "w1" and str(key).startswith("batchpush-"):
            time.sleep(3600)
        return await execute(key, *args, **kwargs)

    worker.execute = stuck
"""

#: what a test makes the client's bound on a silent task (TASK_SILENCE_S)
SILENCE_S = "3"


def cluster_with(tmp_path, preload_source: str, workers: int = 2) -> Cluster:
    preload = tmp_path / "preload_for_test.py"
    preload.write_text(preload_source)
    started = start_cluster(tmp_path, workers=0)
    try:
        for n in range(workers):
            started.workers.append(start_worker(tmp_path, started.address, f"w{n}", str(preload)))
        _wait_workers(started.address, workers)
    except BaseException:
        stop_cluster(started)
        raise
    return started


def silent_env() -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=ROOT, BATCHPUSH_CLUSTER_SILENCE_S=SILENCE_S)


def push_silently(started: Cluster, registry, tmp_path, layouts: list[tuple[str, list[str]]]) -> tuple[list[tuple[str, list[str]]], subprocess.CompletedProcess[str]]:
    """The layouts pushed on ``started`` with the small silence bound (report r.json)."""
    plan = plan_for(tmp_path, [registry], layouts)
    return layouts, batchpush_cli("run", plan, "--scheduler", started.address, "--metadata-dir", str(tmp_path / "md"), "--report", str(tmp_path / "r.json"), env=silent_env())


def assert_fleet_arrived(registry, layouts: list[tuple[str, list[str]]], tmp_path) -> None:
    for i, (_, tags) in enumerate(layouts):
        for tag in tags:
            pull_and_verify(registry, f"team/svc{i}:{tag}", str(tmp_path / f"pulled-{i}-{tag}"))


def leftovers(address: str) -> dict[str, list[str]]:
    """What batchpush keeps in the scheduler and the workers, listed through a client:
    its event-log topics (any with events), published datasets, Dask events,
    semaphores, variables, tasks, and in each worker process the runs it knows and
    the Semaphore objects alive (one that refreshes its leases lives for ever)."""
    from distributed import Client

    def in_scheduler(dask_scheduler) -> dict[str, list[str]]:
        extensions = dask_scheduler.extensions
        return {
            "dask events": sorted(map(str, extensions["events"]._events)),
            "semaphores": sorted(map(str, extensions["semaphores"].max_leases)),
            "variables": sorted(map(str, extensions["variables"].variables)),
            "tasks": sorted(map(str, dask_scheduler.tasks)),
        }

    def in_worker() -> list[str]:
        import gc
        import sys

        from distributed import Semaphore

        module = sys.modules.get("batchpush.cluster.tasks")
        gc.collect()
        semaphores = [f"semaphore {s.name}" for s in gc.get_objects() if isinstance(s, Semaphore)]
        return sorted([*getattr(module, "_RUNS", {}), *semaphores])

    with Client(address, timeout=30, set_as_default=False) as client:
        held = client.run_on_scheduler(in_scheduler)
        held["topics"] = sorted(client.get_events())
        held["datasets"] = sorted(map(str, client.list_datasets()))
        held["in workers"] = sorted(run for runs in client.run(in_worker).values() for run in runs)
    return {what: [name for name in names if "batchpush" in name or what == "in workers"] for what, names in held.items()}


def test_a_run_leaves_nothing_behind_in_the_scheduler_or_the_workers(cluster, registry, tmp_path):
    """A run on a long-lived cluster (blobs of 1 MiB and more, so its upload leases
    are used; two runs, a second to another repository) leaves no event-log topic,
    Dask event, semaphore, variable, dataset, task or worker state behind: the
    scheduler's event log kept every run's topics, and its semaphores per registry."""
    layouts = []
    for r in range(3):
        path = str(tmp_path / "layouts" / f"big{r}")
        simple_layout(path, {"v0": [700 + r, 1]}, file_size=1_300_000)
        layouts.append(path)
    before = leftovers(cluster.address)
    assert not any(before.values()), before
    for run in range(2):
        plan = write_plan(tmp_path, {
            "version": 1,
            "defaults": {"max_concurrent_uploads": 2},
            "registries": {registry.host: {"insecure": True}},
            "images": [{"source": f"oci:{path}", "targets": [f"{registry.host}/run{run}/svc{i}"]} for i, path in enumerate(layouts)],
        })
        done = batchpush_cli("run", plan, "--scheduler", cluster.address, "--metadata-dir", str(tmp_path / f"md{run}"), "--report", str(tmp_path / f"r{run}.json"))
        assert done.returncode == 0, done.stderr
        assert [i["status"] for i in report_of(tmp_path / f"r{run}.json")["images"]] == ["pushed"] * 3
        assert leftovers(cluster.address) == before
    # each run (a store of its own) uploaded each blob once, those of 1 MiB and more under a lease
    assert set(uploads_by_digest(registry).values()) == {2}
    pull_and_verify(registry, "run1/svc2:v0", str(tmp_path / "pulled"))


def test_a_blob_result_that_never_comes_is_tried_once_more(tmp_path, registry):
    """Each blob task's result is dropped by its worker once stored (the scheduler
    not told, as in issue 27's hang: Dask says the task is done, its result never
    comes): within the bound, the client gives each up with a line naming the task
    and the cluster, and tries its blobs once more by a task of their own, whose
    result comes. Every image arrives whole, no blob is uploaded twice (the second
    attempt asks first), and the run leaves nothing behind."""
    started = cluster_with(tmp_path, DROP_RESULTS.format(pattern=r"batchpush-blobs-\w+-\d+"))
    try:
        layouts, done = push_silently(started, registry, tmp_path, fleet(tmp_path)[:4])
        assert done.returncode == 0, done.stderr
        images = report_of(tmp_path / "r.json")["images"]
        assert len(images) == 12 and all(i["status"] == "pushed" for i in images), images
        said = [line for line in done.stdout.splitlines() if "; tried once more" in line]
        assert said and all("task batchpush-blobs-" in line and f"the Dask cluster at {started.address}" in line and f"within {SILENCE_S} s" in line for line in said), done.stdout
        assert max(uploads_by_digest(registry).values()) == 1
        assert registry.count("HEAD", "/blobs/") > 0
        assert_fleet_arrived(registry, layouts, tmp_path)
        assert not any(leftovers(started.address).values())
    finally:
        stop_cluster(started)


def test_a_blob_result_that_never_comes_twice_fails_its_images(tmp_path, registry):
    """Every blob task's result is dropped, its second attempt's too: the run ends
    (exit 1, the report written), each image failed with a line naming its task and
    the cluster, and no manifest was written."""
    started = cluster_with(tmp_path, DROP_RESULTS.format(pattern=r"batchpush-blobs-.*"))
    try:
        _, done = push_silently(started, registry, tmp_path, fleet(tmp_path)[:2])
        assert done.returncode == 1, done.stderr
        images = report_of(tmp_path / "r.json")["images"]
        assert len(images) == 6 and all(i["status"] == "failed" for i in images), images
        for image in images:
            assert "-retry: done, said the Dask cluster at" in image["error"] and started.address in image["error"], image
            assert "its first attempt gave none either" in image["error"], image
        assert registry.count("PUT", "/manifests/") == 0
        assert not any(leftovers(started.address).values())
    finally:
        stop_cluster(started)


def test_a_worker_paused_with_the_tasks_fails_their_images(tmp_path, registry):
    """The only worker pauses when handed its first task, which it keeps and never
    runs: no worker runs the run's tasks, the run falls silent; within the bound each
    task is given up (the blobs' second attempt too), every image fails with a line
    naming its task and the cluster, and the run ends with its report."""
    started = cluster_with(tmp_path, PAUSE_ON_FIRST_TASK, workers=1)
    try:
        _, done = push_silently(started, registry, tmp_path, fleet(tmp_path)[:2])
        assert done.returncode == 1, done.stderr
        images = report_of(tmp_path / "r.json")["images"]
        assert len(images) == 6 and all(i["status"] == "failed" for i in images), images
        for image in images:
            assert f"no word of it from the Dask cluster at {started.address} for {SILENCE_S} s" in image["error"], image
        assert "; tried once more" in done.stdout
        assert registry.count("PUT") == registry.count("POST") == 0
    finally:
        stop_cluster(started)


def test_a_worker_whose_event_loop_is_stuck_loses_nothing(tmp_path, registry):
    """One of two workers stops its event loop for good when handed its first task
    (a deadlocked worker, as a soak found one): the client, whose polls that worker
    no longer answers, gives each of its tasks up within the bound and tries it once
    more on the worker that answers; every image arrives whole, each blob uploaded
    once, and the run ends."""
    started = cluster_with(tmp_path, STUCK_ON_FIRST_TASK)
    try:
        layouts, done = push_silently(started, registry, tmp_path, fleet(tmp_path)[:4])
        assert done.returncode == 0, done.stderr
        images = report_of(tmp_path / "r.json")["images"]
        assert len(images) == 12 and all(i["status"] == "pushed" for i in images), images
        assert "; tried once more" in done.stdout and ("which has not answered for" in done.stdout or "has not answered the client" in done.stdout), done.stdout
        assert max(uploads_by_digest(registry).values()) == 1
        assert_fleet_arrived(registry, layouts, tmp_path)
    finally:
        stop_cluster(started)


def test_the_pythons_whose_profiler_can_deadlock_a_worker_are_named():
    """CPython gh-106883 (fixed in 3.11.9): a worker on such a Python, with Dask's
    profiler on, gets the client's note at the start of each run."""
    from batchpush.cluster.client import _deadlocks

    assert [_deadlocks(v) for v in ("3.11.0", "3.11.7", "3.11.8")] == [True] * 3
    assert [_deadlocks(v) for v in ("3.11.9", "3.11.12", "3.12.1", "3.13.0", "3.10.13", "3.11.7+", "pypy")] == [False] * 7


@contextlib.contextmanager
def stopped(process: subprocess.Popen[bytes]) -> Iterator[None]:
    """``process`` stopped (SIGSTOP: it answers nothing, its sockets stay open) until the block ends."""
    os.kill(process.pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(process.pid, signal.SIGCONT)


def wait_until(condition, what: str, bound_s: float = 60) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + bound_s
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


def test_the_watch_polls_its_workers_while_the_scheduler_does_not_list_them(tmp_path):
    """The client's watch asks the scheduler for its workers from a thread of its
    own: with the scheduler stopped (SIGSTOP), that call does not return, and the
    watch still sends its polls and stops when told (it made the call itself, and
    every poll and the stop waited for it: a call that never returned stopped the
    polls for good, and every worker looked silent)."""
    from distributed import Client

    from batchpush.cluster.client import _Watch
    from batchpush.progress import NoProgress

    started = start_cluster(tmp_path, workers=1)
    try:
        with Client(started.address, timeout=START_TIMEOUT_S, set_as_default=False) as client:
            workers = list(client.nthreads())
            with stopped(started.scheduler):
                watch = _Watch(client, "run0", NoProgress(), workers)
                try:
                    wait_until(lambda: watch._asked_at, "the watch sent no poll while the scheduler did not list the workers")
                finally:
                    watch.close()
                watch._thread.join(60)
                assert not watch._thread.is_alive(), "the watch did not stop"
    finally:
        stop_cluster(started)


#: a worker preload: the engine's ``run_work`` raises an unexpected error for the
#: image pushed to ``team/svc0:v1`` (a bug's stand-in; nothing else changes)
FAIL_ONE_IMAGE = """
import batchpush.engine

# (Dask imports a preload twice: the engine's own run_work, kept the first time)
run_work = batchpush.engine.Engine.__dict__.get("test_run_work", batchpush.engine.Engine.run_work)
batchpush.engine.Engine.test_run_work = run_work


def failing(self, work, **kwargs):
    if work.target.endswith("/team/svc0:v1"):
        raise RuntimeError("injected by the test")
    return run_work(self, work, **kwargs)


batchpush.engine.Engine.run_work = failing
"""


def test_an_unexpected_error_of_one_image_in_a_repository_task_fails_that_image_alone(tmp_path, registry):
    """One image of a repository task (team/svc0, three tags, one task) meets an
    unexpected error on its worker: that image fails, naming the error and the
    worker; the task's other images, pushed, are reported pushed and read back
    whole (a task whose image raised failed as a whole: the images it had pushed
    were reported lost); no manifest went for the failed one; exit 1."""
    started = cluster_with(tmp_path, FAIL_ONE_IMAGE)
    try:
        layouts = fleet(tmp_path)[:2]
        plan = plan_for(tmp_path, [registry], layouts)
        done = batchpush_cli("run", plan, "--scheduler", started.address, "--metadata-dir", str(tmp_path / "md"), "--report", str(tmp_path / "r.json"))
    finally:
        stop_cluster(started)
    assert done.returncode == 1, done.stderr
    images = {i["target"].split("/", 1)[1]: i for i in report_of(tmp_path / "r.json")["images"]}
    failed = {name for name, image in images.items() if image["status"] != "pushed"}
    assert failed == {"team/svc0:v1"}, images
    assert "on worker tcp://127.0.0.1:" in images["team/svc0:v1"]["error"] and "unexpected RuntimeError: injected by the test" in images["team/svc0:v1"]["error"]
    assert registry.count("PUT", "/team/svc0/manifests/v1") == 0
    for name in sorted(set(images) - failed):
        pulled = pull_and_verify(registry, name, str(tmp_path / f"pulled-{name.replace('/', '_').replace(':', '-')}"))
        assert pulled[0].manifest_digest == images[name]["digest"]


def test_an_unexpected_error_of_one_image_checked_on_the_client_fails_that_image_alone(registry, tmp_path, monkeypatch, capsys):
    """A re-run on a cluster: each image is checked on the client first (the cron
    fast path); the check of one meets an unexpected error: that image fails with
    it, the others are up to date, exit 1 (the error went up through the whole
    run). In-process: the error is injected into the client's check of that image;
    nothing is left to push, so the scheduler is never reached."""
    from batchpush.cli import main
    from batchpush.cluster import client

    layouts = fleet(tmp_path)[:2]
    plan = plan_for(tmp_path, [registry], layouts)
    md = str(tmp_path / "md")
    assert main(["run", plan, "--metadata-dir", md]) == 0
    checked = client._up_to_date

    def failing(engine, work):  # type: ignore[no-untyped-def]
        if work.target.endswith("/team/svc1:v1"):
            raise RuntimeError("injected by the test")
        return checked(engine, work)

    monkeypatch.setattr(client, "_up_to_date", failing)
    code = main(["run", plan, "--scheduler", f"tcp://127.0.0.1:{free_port()}", "--metadata-dir", md, "--report", str(tmp_path / "r.json")])
    err = capsys.readouterr().err
    assert code == 1, err
    images = {i["target"].split("/", 1)[1]: i for i in report_of(tmp_path / "r.json")["images"]}
    assert len(images) == 6 and {name for name, image in images.items() if image["status"] != "up-to-date"} == {"team/svc1:v1"}, images
    assert images["team/svc1:v1"]["status"] == "failed" and "unexpected RuntimeError: injected by the test" in images["team/svc1:v1"]["error"]
    assert "team/svc1:v1" in err


def test_an_upload_lease_call_the_scheduler_does_not_answer_is_given_up(tmp_path, monkeypatch, caplog):
    """A blob task's upload lease calls with the scheduler stopped (SIGSTOP): an
    acquire is given up at its bound (lowered here) with a line naming the
    registry, one waiting when the run stops ends with the stop, and a release
    is given up at its bound with a warning (each waited for ever: a Dask call has
    no bound of its own, ``acquire(timeout=...)`` bounds only the scheduler's
    wait). In-process, against a real scheduler; each step waited for in a thread
    of the test's own, with a bound, so that a call that never returns fails."""
    import threading

    from distributed import Client, Semaphore

    from batchpush.cluster import tasks
    from batchpush.cluster.common import ClusterTimeout, _started
    from batchpush.errors import Cancelled

    def lease_held(lease: Semaphore, cancelled: threading.Event, while_held=lambda: None) -> None:  # type: ignore[no-untyped-def]
        with tasks._leased(lease, "registry.test", cancelled):
            while_held()

    started = start_cluster(tmp_path, workers=0)
    try:
        with Client(started.address, timeout=START_TIMEOUT_S, set_as_default=False) as client:
            lease = Semaphore(max_leases=1, name="batchpush-test-lease", scheduler_rpc=client.scheduler, loop=client.loop)
            _started(lambda: lease_held(lease, threading.Event()), "test").result(timeout=30)  # the scheduler answers
            monkeypatch.setattr(tasks, "CALL_WAIT_S", 1.0)
            with stopped(started.scheduler):
                given_up = _started(lambda: lease_held(lease, threading.Event()), "test")
                with pytest.raises(ClusterTimeout, match=r"the Dask scheduler, asked for an upload lease for registry\.test: no answer within 2 s"):
                    given_up.result(timeout=30)
                monkeypatch.setattr(tasks, "CALL_WAIT_S", 600.0)
                cancelled = threading.Event()
                waiting = _started(lambda: lease_held(lease, cancelled), "test")
                threading.Timer(0.5, cancelled.set).start()  # (most likely once the call is under way; before, the same line)
                with pytest.raises(Cancelled, match=r"stopped while waiting for an upload lease for registry\.test"):
                    waiting.result(timeout=30)
            monkeypatch.setattr(tasks, "CALL_WAIT_S", 1.0)
            # taken while the scheduler answers, given back while it is stopped (another
            # semaphore: the acquires given up above may have taken this one's lease since)
            other = Semaphore(max_leases=1, name="batchpush-test-lease-2", scheduler_rpc=client.scheduler, loop=client.loop)
            _started(lambda: lease_held(other, threading.Event(), lambda: os.kill(started.scheduler.pid, signal.SIGSTOP)), "test").result(timeout=30)
            os.kill(started.scheduler.pid, signal.SIGCONT)
            assert "told an upload lease for registry.test is free: no answer within 1 s: the scheduler frees it after its lease timeout" in caplog.text
    finally:
        os.kill(started.scheduler.pid, signal.SIGCONT)
        stop_cluster(started)
