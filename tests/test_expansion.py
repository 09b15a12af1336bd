"""Expanding ``docker://`` sources concurrently (issue 26): behind a far registry,
the tag lists of many repositories are in flight at once, a repository's images
are checked while others are still listed, an image's source and target HEADs go
together, and the checks fill the host's request limit; a plan of thousands of
entries is expanded as it runs, never ahead of it.

Against the real registry, through our fault proxy: concurrency is observed there,
by what was in flight as each request arrived and by ``hold`` rules that forward
a request only once others have arrived (a client that waits for one answer
before sending the next cannot meet them), never by timings. The pure logic of
the expansion (order, nesting, bounds) is tested first, directly.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import threading
from collections.abc import Iterator

import pytest
import yaml
from conftest import remote_digest, skopeo
from fault_proxy import FaultProxy, Rule
from images import LayoutWriter, layer_tar
from registry import Registry, start_registry

from batchpush.engine import QUEUED_PER_THREAD, Engine, PushJob, PushOptions
from batchpush.expansion import Expansion
from batchpush.progress import NoProgress
from batchpush.registry.client import RegistryOptions
from batchpush.report import ImageResult

#: a hold's longest wait: a client that cannot meet its condition costs this, then fails the test
HOLD_S = 20.0


# -- the expansion alone ------------------------------------------------------------
def expand_letters(job: str, position: int) -> list[str]:
    """A job "a3" gives works a0 a1 a2."""
    return [f"{job[0]}{i}" for i in range(int(job[1:]))]


def test_works_come_with_keys_that_sort_in_plan_order():
    expansion = Expansion(["a2", "b3", "c1", "d2"], expand_letters, width=3, cancel=threading.Event())
    keyed = list(expansion)
    assert [work for _, work in sorted(keyed)] == ["a0", "a1", "b0", "b1", "b2", "c0", "d0", "d1"]
    assert 1 <= expansion.peak <= 3


def test_no_more_jobs_are_taken_than_the_width_ahead_of_the_consumer():
    taken: list[int] = []

    def jobs() -> Iterator[str]:
        for i in itertools.count():
            taken.append(i)
            yield "x1"

    expansion = iter(Expansion(jobs(), expand_letters, width=4, cancel=threading.Event()))
    for consumed in range(1, 51):
        next(expansion)
        # the jobs expanding now, and the one whose work was just handed on
        assert len(taken) <= consumed + 4, (len(taken), consumed)


def test_a_cancel_ends_the_expansion():
    cancel = threading.Event()
    seen = []
    for _, work in Expansion((f"j{i}" for i in range(1000)), lambda job, position: [job], width=2, cancel=cancel):
        seen.append(work)
        if len(seen) == 5:
            cancel.set()
    assert 5 <= len(seen) <= 7  # what had been expanded already is handed on, nothing more starts


# -- against the real registry -------------------------------------------------------
@pytest.fixture
def source(tmp_path):
    started = start_registry(str(tmp_path / "source"))
    yield started
    started.stop()


def fill(registry: Registry, tmp_path, tags: list[str], repository: str = "team/seed") -> None:
    """skopeo copies an image per tag into ``repository``."""
    writer = LayoutWriter(str(tmp_path / "layout"))
    for i, tag in enumerate(tags):
        descriptor, _ = writer.image([layer_tar(1), layer_tar(100 + i)])
        writer.tag(descriptor, tag)
    for tag in tags:
        done = skopeo("copy", "--dest-tls-verify=false", f"oci:{tmp_path / 'layout'}:{tag}", f"docker://{registry.host}/{repository}:{tag}")
        assert done.returncode == 0, done.stderr


def clone(registry: Registry, names: list[str], seed: str = "team/seed") -> None:
    """Repositories ``names``, each a copy of ``seed`` made in the registry's own
    storage (its blobs are shared): many repositories at once, served by the real
    registry as if each had been pushed."""
    root = os.path.join(registry.root, "data", "docker", "registry", "v2", "repositories")
    for name in names:
        shutil.copytree(os.path.join(root, seed), os.path.join(root, name))


def mirror_plan(tmp_path, source_host: str, target_host: str, names: list[str]) -> str:
    path = tmp_path / "mirror.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "version": 1,
                "defaults": {"insecure": True},
                "images": [{"source": f"docker://{source_host}/team/{name}", "targets": [f"{target_host}/mirror/{name}"]} for name in names],
            }
        )
    )
    return str(path)


def test_tag_lists_overlap_and_a_repositorys_images_are_checked_while_others_are_listed(source, front, registry, tmp_path, batchpush):
    fill(source, tmp_path, ["v0", "v1"])
    names = [f"r{i}" for i in range(6)]
    clone(source, [f"team/{name}" for name in names])
    front.delay_s = 0.02  # a round trip: what a client sends at once overlaps here
    # r0's tag list goes on only once an image of another repository is checked
    held = front.add(Rule("GET", r"^/v2/team/r0/tags/list", "hold", until_method="HEAD", until_path=r"^/v2/team/r[1-5]/manifests/", stall_s=HOLD_S))
    report = tmp_path / "report.json"
    run = batchpush("run", mirror_plan(tmp_path, front.host, registry.host, names), "--report", str(report), "--metadata-dir", str(tmp_path / "md"))
    assert run.code == 0, run.err
    assert held.fired == 1
    (r0_list,) = front.requests("GET", "/v2/team/r0/tags/list")
    assert r0_list.held == "met", "no image of another repository was checked while r0 was being listed"
    lists = front.requests("GET", "/tags/list")
    assert any(any("/tags/list" in other for other in seen.concurrent) for seen in lists), [seen.concurrent for seen in lists]
    # every image arrived, whole, in the plan's order in the report
    images = json.loads(report.read_text())["images"]
    assert [image["target"].rsplit(":", 1)[0] for image in images] == [f"{registry.host}/mirror/{name}" for name in names for _ in range(2)]  # (a repository's tags as listed)
    assert [image["status"] for image in images] == ["pushed"] * 12
    assert all(image["digest"] == image["source_digest"] for image in images)
    assert remote_digest(registry, "mirror/r0:v1") == remote_digest(source, "team/r0:v1")


def test_an_images_source_and_target_heads_are_asked_at_once(source, front, tmp_path, batchpush):
    fill(source, tmp_path, ["v1"], "team/app")
    args = ("push", f"docker://{front.host}/team/app:v1", f"{front.host}/mirror/app:v1", "--insecure", front.host, "--no-signatures")
    run = batchpush(*args)
    assert run.code == 0, run.err
    mark = len(front.seen)
    # the cron re-run: the first manifest HEAD goes on only once the second has arrived
    front.add(Rule("HEAD", r"/manifests/", "hold", until_method="HEAD", until_path=r"/manifests/", until_count=2, stall_s=HOLD_S))
    front.delay_s = 0.02
    run = batchpush(*args)
    assert run.code == 0, run.err
    assert "up to date" in run.out
    heads = [seen for seen in front.seen[mark:] if seen.method == "HEAD"]
    assert sorted(seen.target.split("/manifests/")[0] for seen in heads) == ["/v2/mirror/app", "/v2/team/app"]
    (held,) = [seen for seen in heads if seen.held]  # the first to reach the rule (after the proxy's delay)
    (other,) = [seen for seen in heads if seen is not held]
    assert held.held == "met", "the second HEAD was not sent while the first was in flight"
    # the later arrival saw the earlier one in flight (the held one may be either: the
    # two race through the proxy's delay between their arrival and the rule)
    assert f"HEAD {held.target}" in other.concurrent or f"HEAD {other.target}" in held.concurrent, (held, other)


def test_image_checks_fill_the_hosts_request_limit(source, front, tmp_path, batchpush):
    """The queue of expanded images is deep enough that the checks alone keep the
    source host's ``max_requests_in_flight`` (32 by default) busy: every one of its
    places holds a manifest HEAD at once, and never more. (The targets are the same
    registry, reached as another host: its requests have places of their own.)"""
    fill(source, tmp_path, ["v1"])
    names = [f"r{i}" for i in range(40)]
    clone(source, [f"team/{name}" for name in names] + [f"mirror/{name}" for name in names])  # the targets are up to date
    limit = RegistryOptions().max_requests_in_flight
    front.add(Rule("HEAD", r"/manifests/", "hold", times=-1, until_method="HEAD", until_path=r"/manifests/", until_count=limit, stall_s=HOLD_S))
    target = FaultProxy(source.host)
    try:
        report = tmp_path / "report.json"
        run = batchpush("run", mirror_plan(tmp_path, front.host, target.host, names), "--report", str(report), "--metadata-dir", str(tmp_path / "md"), "--no-signatures")
    finally:
        target.stop()
    assert run.code == 0, run.err
    heads = front.requests("HEAD", "/manifests/")
    assert len(heads) == len(target.requests("HEAD", "/manifests/")) == 40
    assert all(seen.held == "met" for seen in heads), f"never {limit} HEADs in flight at once: at most {max(len(seen.concurrent) + 1 for seen in heads)} requests"
    assert front.peak_in_flight == limit
    assert [image["status"] for image in json.loads(report.read_text())["images"]] == ["up-to-date"] * 40


def test_the_targets_are_reached_while_the_sources_are_listed(source, front, tmp_path, batchpush):
    """A target registry is pinged (its scheme, its auth challenge) while the source
    is being listed, not after: the first image's check waits for no ping."""
    fill(source, tmp_path, ["v1"], "team/app")
    target = FaultProxy(source.host)
    try:
        front.add(Rule("GET", r"/tags/list", "hold", until_proxy=target, until_method="GET", until_path=r"^/v2/$", stall_s=HOLD_S))
        run = batchpush("push", f"docker://{front.host}/team/app", f"{target.host}/mirror/app", "--insecure", front.host, "--insecure", target.host)
    finally:
        target.stop()
    assert run.code == 0, run.err
    (listed,) = front.requests("GET", "/tags/list")
    assert listed.held == "met", "the target was pinged only once the source was listed"


class Finished(NoProgress):
    """Counts the images done."""

    def __init__(self) -> None:
        self.done = 0
        self.lock = threading.Lock()

    def image_done(self, result: ImageResult) -> None:
        with self.lock:
            self.done += 1


def test_a_plan_of_thousands_of_repositories_is_expanded_as_it_runs(source, tmp_path):
    """Memory stays flat: a plan entry is taken only when fewer than a fixed number
    of its predecessors' images are unfinished (entries being listed, images queued
    or running), whatever the plan's size."""
    fill(source, tmp_path, ["v1"])
    names = [f"r{i:04}" for i in range(2000)]
    clone(source, [f"team/{name}" for name in names] + [f"mirror/{name}" for name in names])
    finished = Finished()
    ahead: list[int] = []

    def jobs() -> Iterator[PushJob]:
        for i, name in enumerate(names):
            with finished.lock:
                ahead.append(i - finished.done)
            yield PushJob(f"docker://{source.host}/team/{name}", (f"{source.host}/mirror/{name}",), signatures=False)

    options = PushOptions(registry_defaults=RegistryOptions(insecure=True), metadata_dir=str(tmp_path / "md"), progress=finished)
    with Engine(options) as engine:
        result = engine.run(jobs())
        threads = options.max_concurrent_images + engine.checks_ahead
        bound = engine.checks_ahead + threads * QUEUED_PER_THREAD + 1
    assert [image.status for image in result.images] == ["up-to-date"] * len(names)
    assert [image.target for image in result.images] == [f"{source.host}/mirror/{name}:v1" for name in names]
    assert max(ahead) <= bound < len(names) / 10, (max(ahead), bound)
