"""Bounded soak: the real server and Mosquitto against a churning emulated fleet, with a broker
restart and a ``kill -9`` of the server followed by ``--resume`` in the middle.

The longer run is ``python tools/bench_orchestration.py --soak --devices 100 --rounds 200``
(docs/scale.md). Here: 16 devices, a quarter of them churning (late answers, dropped links,
clean departures, garbage, duplicates), 30 rounds with a 2.5 s deadline; a couple of minutes.
"""

from __future__ import annotations

import json

import pytest
from conftest import require_tool

pytestmark = pytest.mark.slow


def test_soak_every_round_committed_once_with_exactly_the_devices_that_answered_in_time(tmp_path):
    from edgehmoe.server.bench import run_soak

    require_tool("mosquitto")
    # Execute
    res = run_soak(16, 30, work_dir=tmp_path, churn=0.25, round_timeout_s=2.5, train_ms=50.0, seed=3,
                   time_limit_s=900)
    # Assert: nothing lost, nothing repeated, no result counted twice or out of time
    assert res.problems == []
    assert [r["round"] for r in res.rows] == list(range(30))
    assert res.broker_restart_unix is not None and res.server_kill_unix is not None
    assert 10 <= res.resumed_at_round < 30  # killed after round 20 was committed, mid-round
    assert res.checked_rounds >= 15  # rounds away from the two disruptions: checked both ways
    # the faults really happened and reached the server
    outcomes = {}
    for r in res.rows:
        for o in r["outcomes"].values():
            outcomes[o] = outcomes.get(o, 0) + 1
    assert outcomes["ok"] > 300
    # A late answer ends as "timeout" only when it misses the deadline of a round that is then
    # committed; on a loaded machine the schedule can put every late fault elsewhere (seen once:
    # 0 timeouts at load 20), so it is not required here; the events log below shows it acted.
    # A dropped device comes back within the 2.5 s deadline here; the server sends it its task
    # again (schedule.offline_grace_s) and, the emulated device never answering a task it dropped,
    # ends it "timeout" (or "offline" when it is still away at the deadline). A departed device
    # stopped on purpose: its task ends "offline" at once.
    assert outcomes.get("offline", 0) + outcomes.get("timeout", 0) >= 1 and outcomes.get("invalid", 0) >= 1
    events = [json.loads(ln) for ln in (tmp_path / "soak-16" / "events.jsonl").read_text().splitlines()]
    acted = {e["action"] for e in events}
    assert {"ok", "late", "drop", "leave", "garbage", "dup", "rejoin", "redelivered"} <= acted
    # every duplicate answer was counted once: its device appears once in its round's row
    for r in res.rows:
        devices = [d["device"] for d in r["per_device"]]
        assert len(devices) == len(set(devices))
