"""max_requests_in_flight: one limit on a host's requests at once, whatever they are for.

The registry sits behind our WAN proxy (bench/wan_proxy.py: 25 ms per request, so
requests overlap as they would in front of a far registry), which counts the
requests it sees begun and not yet answered; its peak must stay within the limit.
"""

from __future__ import annotations

import json
import os
import sys
import threading

import pytest
from conftest import pull_and_verify
from test_batch import fleet, fleet_plan, uploads_by_digest, write_plan

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "bench"))

from wan_proxy import behind_wan

from batchpush.errors import Cancelled, PlanError
from batchpush.plan import load_plan
from batchpush.registry.client import DEFAULT_MAX_REQUESTS_IN_FLIGHT
from batchpush.waits import Slots


@pytest.mark.parametrize(("limit", "where"), [(3, "plan"), (5, "cli")])
def test_requests_in_flight_stay_within_the_limit(registry, tmp_path, batchpush, limit, where):
    far = behind_wan(registry, delay_ms=25)
    try:
        document = fleet_plan(far, fleet(tmp_path, repositories=8), "far")
        args: tuple[str, ...] = ()
        if where == "plan":
            document["registries"][far.host]["max_requests_in_flight"] = limit
        else:
            args = ("--max-requests-in-flight", str(limit))
        report = tmp_path / "report.json"
        run = batchpush("run", write_plan(tmp_path, document), "--report", str(report), "--max-concurrent-images", "16", *args)
        assert run.code == 0, run.err
    finally:
        far.stop_proxy()
    seen = far.seen
    assert seen is not None
    # the proxy saw every request of ours the registry logged, so its count is not
    # vacuous (and the TLS hello of the insecure host's https attempt, which is not logged)
    assert seen["requests"] >= sum('"batchpush/' in line for line in registry.access_log()) > 16
    assert 1 <= seen["peak_in_flight"] <= limit, seen
    images = json.loads(report.read_text())["images"]
    assert [image["status"] for image in images] == ["pushed"] * 16
    assert max(uploads_by_digest(registry).values()) == 1
    pull_and_verify(registry, "far/svc7:v1", str(tmp_path / "pulled"))


@pytest.mark.parametrize("value", [0, -1, True, "8", 2.5])
def test_plan_refuses_a_limit_that_is_not_a_positive_integer(tmp_path, value):
    path = write_plan(tmp_path, {"version": 1, "registries": {"r.example": {"max_requests_in_flight": value}}, "images": [{"source": "oci:x", "targets": ["r.example/a"]}]})
    with pytest.raises(PlanError) as caught:
        load_plan(path)
    assert path in str(caught.value)
    assert "registries['r.example'].max_requests_in_flight: must be a positive integer" in str(caught.value)


def test_plan_limit_flows_from_defaults(tmp_path):
    path = write_plan(tmp_path, {"version": 1, "defaults": {"max_requests_in_flight": 7}, "registries": {"a.example": {}, "b.example": {"max_requests_in_flight": 2}}, "images": [{"source": "oci:x", "targets": ["a.example/x"]}]})
    plan = load_plan(path)
    assert (plan.defaults.max_requests_in_flight, plan.registries["a.example"].max_requests_in_flight, plan.registries["b.example"].max_requests_in_flight) == (7, 7, 2)
    assert load_plan(write_plan(tmp_path, {"version": 1, "images": [{"source": "oci:x", "targets": ["a.example/x"]}]}, "bare.yaml")).defaults.max_requests_in_flight == DEFAULT_MAX_REQUESTS_IN_FLIGHT


@pytest.mark.parametrize("value", ["0", "-3"])
def test_cli_refuses_a_limit_below_one(tmp_path, batchpush, value):
    path = write_plan(tmp_path, {"version": 1, "images": [{"source": "oci:x", "targets": ["r.example/a"]}]})
    run = batchpush("run", path, "--max-requests-in-flight", value)
    assert run.code == 2
    assert "--max-requests-in-flight must be at least 1" in run.err


def test_cli_refuses_a_limit_that_is_not_a_number(tmp_path, batchpush):
    path = write_plan(tmp_path, {"version": 1, "images": [{"source": "oci:x", "targets": ["r.example/a"]}]})
    run = batchpush("run", path, "--max-requests-in-flight", "many")
    assert run.code == 2


def test_a_wait_for_a_slot_ends_with_the_cancel():
    """A request waiting for one of its host's slots stops when the run is cancelled;
    a DELETE (cancelling an upload session) still gets its bounded while."""
    slots, cancel = Slots(1), threading.Event()
    outcome: list[str] = []

    def wait(after_cancel_s: float) -> None:
        try:
            with slots.hold(cancel, after_cancel_s=after_cancel_s):
                outcome.append("held")
        except Cancelled:
            outcome.append("cancelled")

    with slots.hold(cancel):
        waiter = threading.Thread(target=wait, args=(0.0,))
        waiter.start()
        cancel.set()
        waiter.join(30)
        assert outcome == ["cancelled"]
        late = threading.Thread(target=wait, args=(60.0,))
        late.start()
    late.join(30)  # the slot came free within its while after the cancel
    assert outcome == ["cancelled", "held"]
    assert slots.peak == 1


def test_a_thread_holding_a_slot_rides_on_it():
    """A request made while another's body is sent on the same thread (a mirror's blob
    read from the same host) does not wait for the slot its own thread holds."""
    slots, cancel = Slots(1), threading.Event()
    with slots.hold(cancel), slots.hold(cancel):
        assert slots.peak == 1
