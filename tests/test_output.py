"""What a run prints without a terminal: lines naming their target, one line per
failure, the summary (checked against the report), ``-q``, and a stdout nobody reads."""

from __future__ import annotations

import fcntl
import io
import json
import logging
import os
import re
import subprocess
import sys
import threading
from collections import Counter

import pytest
import yaml
from images import simple_layout

from batchpush import progress
from batchpush.progress import LineWriter
from batchpush.summary import human_bytes

SUMMARY = re.compile(
    r"summary: (?P<images>\d+) images: (?P<pushed>\d+) pushed, (?P<up_to_date>\d+) up to date, (?P<failed>\d+) failed; "
    r"read (?P<read>[^,]+), compressed (?P<compressed>[^,]+), sent (?P<sent>[^;]+); (?P<mounted>\d+) blobs mounted; (?P<requests>\d+) requests; [0-9.]+ s"
)


def fleet_plan(tmp_path, registry, *, repositories: int = 4, tags: int = 3, missing: bool = False) -> str:
    """Layouts sharing a base layer to ``team/svcN``; ``missing`` adds an entry whose layout does not exist."""
    images = []
    for r in range(repositories):
        simple_layout(str(tmp_path / "layouts" / f"svc{r}"), {f"v{t}": [1, 100 + r, 1000 + r * 10 + t] for t in range(tags)})
        images.append({"source": f"oci:layouts/svc{r}", "targets": [f"{registry.host}/team/svc{r}"]})
    if missing:
        images.append({"source": "oci:layouts/gone", "targets": [f"{registry.host}/team/gone:v0"]})
    path = tmp_path / "plan.yaml"
    path.write_text(yaml.safe_dump({"version": 1, "registries": {registry.host: {"insecure": True}}, "images": images}))
    return str(path)


def check_summary(out: str, report_path) -> dict:
    """The summary's figures are the report's; every failed image follows it with its reason."""
    with open(report_path) as f:
        report = json.load(f)
    totals = report["totals"]
    lines = out.splitlines()
    (at,) = [i for i, line in enumerate(lines) if line.startswith("summary: ")]
    match = SUMMARY.fullmatch(lines[at])
    assert match, lines[at]
    statuses = Counter(image["status"] for image in report["images"])
    assert int(match["images"]) == totals["images"] == len(report["images"])
    assert (int(match["pushed"]), int(match["up_to_date"]), int(match["failed"])) == (statuses["pushed"], statuses["up-to-date"], statuses["failed"])
    assert int(match["failed"]) == totals["failed"]
    assert (match["read"], match["compressed"], match["sent"]) == tuple(human_bytes(totals[k]) for k in ("bytes_read", "bytes_compressed", "bytes_uploaded"))
    assert int(match["mounted"]) == totals["blobs_mounted"]
    assert int(match["requests"]) == sum(totals["requests"].values())
    failed = [f"failed: {image['target']}: {image['error']}" for image in report["images"] if image["status"] == "failed"]
    assert lines[at + 1 :] == failed  # the summary ends the output
    return report


def test_batch_lines_name_their_target_and_the_summary_matches_the_report(tmp_path, registry, batchpush):
    plan = fleet_plan(tmp_path, registry, missing=True)
    report_path = tmp_path / "report.json"
    run = batchpush("run", plan, "--metadata-dir", str(tmp_path / "md"), "--report", str(report_path), "--max-concurrent-images", "4")
    assert run.code == 1, run.err
    report = check_summary(run.out, report_path)
    totals = report["totals"]
    assert totals["failed"] == 1 and totals["blobs_mounted"] >= 3  # the shared base, mounted into svc1..svc3
    targets = {image["target"] for image in report["images"]}
    for line in run.out.splitlines():
        if not line.startswith(("summary: ", "failed: ")):
            assert line.split(": ", 1)[0] in targets, line  # no line without its target
    for image in report["images"]:
        if image["status"] == "pushed":
            assert f"{image['target']}: digest: {image['digest']} size: {image['size']}" in run.out
            for layer in image["layers"]:
                assert re.search(rf"^{re.escape(image['target'])}: {layer['digest'][7:19]}: (Pushed|Mounted from team/svc\d|Layer already exists)$", run.out, re.M)
    # a failure is one line on stderr, with the image and the reason
    (failed,) = [image for image in report["images"] if image["status"] == "failed"]
    assert run.err.splitlines() == [f"error: {failed['target']}: {failed['error']}"]
    assert "layouts/gone" in failed["error"]

    run = batchpush("run", plan, "--metadata-dir", str(tmp_path / "md"), "--report", str(report_path))  # the nightly run
    report = check_summary(run.out, report_path)
    assert Counter(image["status"] for image in report["images"]) == {"up-to-date": 12, "failed": 1}
    assert report["totals"]["requests"].get("HEAD") == 12


def test_quiet_prints_only_failures(tmp_path, registry, batchpush):
    plan = fleet_plan(tmp_path, registry, repositories=2, tags=2)
    run = batchpush("run", plan, "--metadata-dir", str(tmp_path / "md"), "-q")
    assert run.code == 0, run.err
    assert (run.out, run.err) == ("", "")  # all is well: nothing at all
    document = yaml.safe_load(open(plan))
    document["images"].append({"source": "oci:layouts/gone", "targets": [f"{registry.host}/team/gone:v0"]})
    plan = str(tmp_path / "with-a-failure.yaml")
    with open(plan, "w") as f:
        yaml.safe_dump(document, f)
    report_path = tmp_path / "report.json"
    run = batchpush("run", plan, "--metadata-dir", str(tmp_path / "md"), "-q", "--report", str(report_path))
    assert run.code == 1
    assert run.out == ""
    (failed,) = [image for image in json.loads(report_path.read_text())["images"] if image["status"] == "failed"]
    assert run.err.splitlines() == [f"error: {failed['target']}: {failed['error']}"]


def test_a_single_push_names_its_target_and_ends_with_the_summary(tmp_path, registry, batchpush):
    simple_layout(str(tmp_path / "app"), {"1.0": [1, 2]})
    report_path = tmp_path / "report.json"
    run = batchpush("push", f"oci:{tmp_path}/app", f"{registry.host}/team/app", "--insecure", registry.host, "--report", str(report_path))
    assert run.code == 0, run.err
    check_summary(run.out, report_path)
    lines = run.out.splitlines()
    assert [line.split(": ")[0] for line in lines[:-1]] == [f"{registry.host}/team/app:1.0"] * 3
    assert lines[0].endswith(": Pushed") and lines[2].startswith(f"{registry.host}/team/app:1.0: digest: sha256:")


class BlockingStream(io.StringIO):
    """A stream whose first write blocks until released, as a pipe nobody reads does."""

    def __init__(self) -> None:
        super().__init__()
        self.entered = threading.Event()
        self.release = threading.Event()

    def write(self, text: str) -> int:
        self.entered.set()
        assert self.release.wait(60), "never released"
        return super().write(text)


def test_a_line_never_waits_for_a_blocked_stream_and_the_drops_are_counted(monkeypatch):
    stream = BlockingStream()
    writer = LineWriter(queue_lines=3)
    writer.write(stream, "line 0")
    assert stream.entered.wait(60)  # the writer thread is stuck in write()
    for i in range(1, 11):
        writer.write(stream, f"line {i}")  # returns at once: 3 are queued, 7 dropped
    monkeypatch.setattr(progress, "CLOSE_STALL_S", 0.3)
    assert writer.close() is False  # still stuck: close gives up instead of waiting for ever
    stream.release.set()
    writer._thread.join(60)
    assert stream.getvalue().splitlines() == [
        "line 0",
        "(7 output line(s) dropped: the output was not read fast enough; the report has every result)",
        "line 1",
        "line 2",
        "line 3",
    ]


def test_the_notice_of_dropped_lines_is_json_in_a_json_log(monkeypatch):
    from batchpush.logs import json_line

    stream = BlockingStream()
    writer = LineWriter(queue_lines=1, dropped_line=lambda text: json_line(logging.WARNING, "lines-dropped", text))
    writer.write(stream, "{}")
    assert stream.entered.wait(60)
    for _ in range(3):
        writer.write(stream, "{}")  # 1 queued, 2 dropped
    monkeypatch.setattr(progress, "CLOSE_STALL_S", 0.3)
    writer.close()
    stream.release.set()
    writer._thread.join(60)
    notice = json.loads(stream.getvalue().splitlines()[1])
    assert notice["event"] == "lines-dropped" and notice["level"] == "warning" and notice["message"].startswith("(2 output line(s) dropped")


class SlowStream(io.StringIO):
    """A reader that keeps up, slowly."""

    def write(self, text: str) -> int:
        threading.Event().wait(0.02)
        return super().write(text)


def test_a_slow_reader_loses_progress_lines_but_never_a_failure_or_the_summary():
    stream = SlowStream()
    writer = LineWriter(queue_lines=5)
    for i in range(20):
        writer.write(stream, f"layer line {i}")  # most are dropped: the queue holds 5
    writer.keep(stream, "error: x: boom")
    assert writer.write_waiting(stream, "summary: 20 images")  # waits for room: the writer moves
    assert writer.close()
    lines = stream.getvalue().splitlines()
    assert "error: x: boom" in lines and lines[-1] == "summary: 20 images"
    assert any("dropped" in line for line in lines)


@pytest.mark.parametrize("unread", ["stdout", "stderr-json"])
def test_a_run_whose_stdout_nobody_reads_still_finishes_and_writes_its_report(tmp_path, registry, unread):
    # a 4 KiB pipe that is never read: the first lines fill it, the writer thread
    # blocks in write(); the engine's threads must not, and the process must end
    plan = fleet_plan(tmp_path, registry, repositories=4, tags=6)
    report_path = tmp_path / "report.json"
    read_end, write_end = os.pipe()
    capacity = fcntl.fcntl(write_end, fcntl.F_SETPIPE_SZ, 4096)
    try:
        # stderr-json: the JSON log (an event per layer, from the engine's threads) is what fills the pipe
        with open(tmp_path / "stderr.txt", "wb") as other:
            json_log = ["--log-format", "json"] if unread == "stderr-json" else []
            process = subprocess.Popen(
                [sys.executable, "-m", "batchpush", "run", plan, "--metadata-dir", str(tmp_path / "md"), "--report", str(report_path), *json_log],
                stdout=write_end if unread == "stdout" else other, stderr=write_end if unread != "stdout" else other,
            )
        os.close(write_end)
        write_end = -1
        try:
            code = process.wait(timeout=90)
        finally:
            if process.poll() is None:
                process.kill()
                process.wait(10)
        os.set_blocking(read_end, False)
        got = os.read(read_end, capacity * 2)
    finally:
        os.close(read_end)
        if write_end >= 0:
            os.close(write_end)
    assert code == 0, (tmp_path / "stderr.txt").read_text()
    assert len(got) > capacity - 1024  # the pipe filled up (a line did not fit): the writer was blocked
    report = json.loads(report_path.read_text())
    assert Counter(image["status"] for image in report["images"]) == {"pushed": 24}
