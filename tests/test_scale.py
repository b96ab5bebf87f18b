"""What makes the server scale to a thousand devices (issue #12), checked piece by piece.

- ``wire.encode_many``: the tasks of a round share one serialised copy of the expert's weights;
  every payload still decodes to its own message.
- ``FedAvgStream``: FedAvg folds each result into a running sum (memory O(model)); the robust
  rules still see every update.
- The round ends when the last device answers (no idle wait), and counts its bytes.
- ``metrics.jsonl`` rows of 1,000 devices keep their keys and summarise per-device detail.

The server-side tests drive rounds through ``test_rounds``' fake transport and clock.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from edgehmoe.fl import wire


def _task(i: int, weights: dict, label_map: np.ndarray, node: int = 1) -> wire.TrainTask:
    return wire.TrainTask(run="r", round=3, task_id=f"r3-t{i}", node=node, arch={"kind": "expert", "width": 8},
                          label_map=label_map, weights=weights, epochs=1, batch_size=16, lr=0.05, momentum=0.9,
                          weight_decay=5e-4, deadline_unix=1_000_000.0 + i, seed=100 + i,
                          preprocess={"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]})


def test_encode_many_shares_the_tensors_and_decodes_like_encode():
    # Prepare: 5 tasks of one expert (same arrays), then 2 of another expert
    rng = np.random.default_rng(0)
    w1 = {"conv.weight": rng.standard_normal((8, 3, 3, 3)).astype(np.float32),
          "bn.num_batches_tracked": np.array(4, np.int64)}
    w2 = {"conv.weight": rng.standard_normal((4, 3, 3, 3)).astype(np.float32)}
    lm1, lm2 = np.array([0, 1, -1, -1], np.int64), np.array([-1, -1, 0, 1], np.int64)
    tasks = [_task(i, w1, lm1) for i in range(5)] + [_task(5 + i, w2, lm2, node=2) for i in range(2)]
    # Execute
    many = wire.encode_many(tasks)
    # Assert: each payload decodes to its own task, with the right arrays
    assert len(many) == 7
    for t, blob in zip(tasks, many):
        d = wire.decode(blob, expect=wire.TrainTask)
        assert (d.task_id, d.seed, d.deadline_unix, d.node, d.preprocess) == (t.task_id, t.seed, t.deadline_unix,
                                                                               t.node, t.preprocess)
        assert np.array_equal(d.label_map, t.label_map)
        assert d.weights.keys() == t.weights.keys()
        for k in t.weights:
            assert d.weights[k].dtype == t.weights[k].dtype and np.array_equal(d.weights[k], t.weights[k])
        assert len(blob) == len(wire.encode(t)) or abs(len(blob) - len(wire.encode(t))) <= 8  # header padding
    # the tensor bytes are shared: everything after the header is the same for one expert
    def data(b: bytes) -> bytes:
        return b[8 + int.from_bytes(b[:8], "little"):]

    assert data(many[0]) == data(many[4]) and data(many[5]) == data(many[6]) and data(many[0]) != data(many[5])


def test_encode_many_still_checks_every_message():
    w = {"conv.weight": np.zeros((2, 2), np.float32)}
    lm = np.array([0, -1], np.int64)
    good = _task(0, w, lm)
    bad = wire.TrainTask(**{**vars(_task(1, w, lm)), "task_id": "bad/id"})  # not an id: a topic separator
    with pytest.raises(wire.WireError, match="task_id"):
        wire.encode_many([good, bad])
    with pytest.raises(wire.WireError, match="NaN"):
        wire.encode_many([_task(2, {"conv.weight": np.full((2, 2), np.nan, np.float32)}, lm)])


# ---------------------------------------------------------------------- streaming FedAvg
def test_fedavg_stream_equals_fedavg_and_keeps_no_update():
    from edgehmoe.fl.aggregation import FedAvgStream, InvalidUpdate, fedavg

    # Prepare: 50 updates of a float32 conv, a float16 vector and an int64 counter
    rng = np.random.default_rng(3)
    template = {"conv": np.zeros((4, 3, 3), np.float32), "half": np.zeros(6, np.float16),
                "count": np.array(0, np.int64)}
    updates = [({"conv": rng.standard_normal((4, 3, 3)).astype(np.float32),
                 "half": rng.standard_normal(6).astype(np.float16),
                 "count": np.array(int(rng.integers(0, 100)), np.int64)}, int(rng.integers(1, 500)))
               for _ in range(50)]
    # Execute
    stream = FedAvgStream(template)
    for w, n in updates:
        stream.add(w, n)
    got, want = stream.result(), fedavg(updates, template=template)
    # Assert: same values (float64 sums, rounded to the template dtype), int counters = max
    assert stream.count == 50 and stream.total == sum(n for _, n in updates)
    assert {k: v.dtype for k, v in got.items()} == {k: v.dtype for k, v in template.items()}
    np.testing.assert_allclose(got["conv"], want["conv"], rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(got["half"].astype(np.float32), want["half"].astype(np.float32), rtol=1e-3)
    assert int(got["count"]) == max(int(w["count"]) for w, _ in updates) == int(want["count"])
    # by hand: (1 * 1 + 3 * 5) / 4 = 4
    small = FedAvgStream({"w": np.zeros(2, np.float32)})
    small.add({"w": np.ones(2, np.float32)}, 1)
    small.add({"w": np.full(2, 5.0, np.float32)}, 3)
    np.testing.assert_array_equal(small.result()["w"], [4.0, 4.0])
    # a bad update changes nothing
    with pytest.raises(InvalidUpdate, match="shape"):
        small.add({"w": np.ones(3, np.float32)}, 1)
    with pytest.raises(InvalidUpdate, match="num_examples"):
        small.add({"w": np.ones(2, np.float32)}, 0)
    assert small.count == 2 and small.total == 4
    np.testing.assert_array_equal(small.result()["w"], [4.0, 4.0])
    with pytest.raises(InvalidUpdate, match="at least one"):
        FedAvgStream({"w": np.zeros(2, np.float32)}).result()


# ---------------------------------------------------------------------- the round runner
def _ok_replies(fake, factor=1.0):
    from test_rounds import const_like

    def reply(dev, task):
        n = {"a": 1, "b": 3, "c": 4}.get(dev, 2)
        return [fake[0].status(dev, "busy", task.round),
                fake[0].result(dev, task, const_like(task.weights, float(n) * factor, n), n),
                fake[0].status(dev, "idle", task.round)]

    return reply


def test_round_ends_when_the_last_device_answers(tmp_path):
    """Before #12 the runner waited for 0.2 s of silence after the last answer (fake clock: 0.2 s)."""
    from test_rounds import make_server

    holder = []
    server, fake, clock = make_server(tmp_path, _ok_replies(holder), ["a", "b", "c"], rounds=2)
    holder.append(fake)
    # Execute
    rows = server.run()
    # Assert: the fake clock moves only while the server waits on an empty inbox
    assert [r["round_wall_s"] for r in rows] == [0.0, 0.0]
    assert [r["devices_answered"] for r in rows] == [3, 3]


def test_fedavg_streams_results_and_the_robust_rules_keep_them(tmp_path):
    from test_rounds import make_server

    # Prepare / Execute: FedAvg (streaming) and coordinate median (needs every update)
    out = {}
    for rule in ("fedavg", "median"):
        holder = []
        server, fake, clock = make_server(tmp_path / rule, _ok_replies(holder), ["a", "b", "c"], rounds=1)
        holder.append(fake)
        server.cfg.schedule.aggregation = rule
        rows = server.run()
        out[rule] = (server, fake, rows)
    # Assert: FedAvg kept no update weights; the committed floats are (1*1 + 3*3 + 4*4) / 8 = 3.25
    server, fake, (row,) = out["fedavg"]
    ok = [p for p in server.runner.pending.values() if p.outcome == "ok"]
    assert len(ok) == 3 and all(p.result.weights == {} for p in ok)
    assert [d["num_examples"] for d in row["per_device"]] == [1, 3, 4]
    node = row["updated"][0]
    floats = [v for v in server.weights[node].values() if v.dtype.kind == "f"]
    assert all(np.all(v == np.float32(3.25)) for v in floats)
    ints = [v for v in server.weights[node].values() if v.dtype.kind != "f"]
    assert all(np.all(v == 4) for v in ints)  # integer counters: the maximum
    # the median keeps every update until it aggregates: median(1, 3, 4) = 3
    server, fake, (row,) = out["median"]
    assert all(p.result.weights for p in server.runner.pending.values())
    assert all(np.all(v == 3.0) for v in server.weights[row["updated"][0]].values() if v.dtype.kind == "f")
    # bytes of the tasks sent and the results received, counted by the runner
    sent = sum(len(wire.encode(t)) for _, t, _ in fake.published)
    assert abs(row["bytes_out"] - sent) <= 8 * len(fake.published) and row["bytes_in"] > 0


def test_metrics_rows_stay_small_at_1000_devices():
    from edgehmoe.server.rounds import DETAIL_LIMIT, Pending, metrics_row
    from tree9 import tree9

    def pending(n: int) -> list:
        w = {"w": np.zeros(1, np.float32)}
        out = []
        for i in range(n):
            t = wire.TrainTask("r", 2, f"r2-t{i}", 6, {}, np.zeros(3, np.int64), w, 1, 8, 0.1, 0.9, 0.0, 10.0, 0, {})
            p = Pending(t, f"dev-{i:04d}")
            if i % 10 == 9:
                p.settle("timeout", "no answer before the deadline")
            else:
                p.settle("ok", result=wire.TrainResult("r", 2, t.task_id, p.device_id, 6, w, 50 + i % 3,
                                                       100.0 + i, 1.5, 200.0, 0.5))
            out.append(p)
        return out

    # Execute
    small = metrics_row(2, "hmoe", tree9(), pending(10), [6], lr=0.05, aggregation_ms=1.0, round_wall_s=2.0,
                        time_unix=5.0)
    big = metrics_row(2, "hmoe", tree9(), pending(1000), [6], lr=0.05, aggregation_ms=1.0, round_wall_s=2.0,
                      time_unix=5.0)
    # Assert: a small round keeps every device's detail and adds the per-expert summary
    assert DETAIL_LIMIT < 1000
    assert len(small["per_device"]) == 9 and len(small["tasks"]) == 10 and "detail" not in small
    assert small["per_node"]["6"]["devices"] == 9
    assert small["per_node"]["6"]["round_time_ms"]["max"] == 108.0
    # 1,000 devices: same keys, per-device measurements summarised per expert
    assert set(big) == set(small) | {"detail"} and big["detail"] == "summary"
    assert big["per_device"] == [] and big["tasks"] == {} and big["nodes"] == [6]
    assert len(big["outcomes"]) == 1000 and sum(o == "ok" for o in big["outcomes"].values()) == 900
    assert len(big["reasons"]) == 100
    st = big["per_node"]["6"]
    assert st["devices"] == 900
    ok_i = [i for i in range(1000) if i % 10 != 9]
    assert st["num_examples"] == sum(50 + i % 3 for i in ok_i)
    times = np.array([100.0 + i for i in ok_i])
    assert st["round_time_ms"] == {"min": 100.0, "median": float(np.median(times)),
                                   "p95": float(np.percentile(times, 95)), "max": 1098.0, "sum": float(times.sum())}
    size_big, size_full = len(json.dumps(big)), len(json.dumps(small)) / 10 * 1000
    assert size_big < 40_000 < size_full  # ~200 KB per row before


def test_a_run_waits_for_its_devices_when_all_dropped(tmp_path):
    """Every device goes offline in round 1 (a broker restart fires their wills) and comes back 20
    fake seconds later. Before #12 the empty rounds counted as failures: RunError after 4."""
    from test_rounds import TIMEOUT, FakeTransport, const_like, make_server

    class Returning(FakeTransport):
        back_at = None

        def receive(self, timeout=None):
            if self.back_at is not None and self.clock.t >= self.back_at:
                self.back_at = None
                for dev in ("a", "b"):
                    self.inbox.put(self.hello(dev))
                    self.inbox.put(self.status(dev, "idle"))
            return super().receive(timeout)

    dropped = set()

    def reply(dev, task):
        if task.round == 1 and dev not in dropped:  # the first attempt of round 1 only
            dropped.add(dev)
            fake.back_at = fake.clock.t + 20.0
            return [fake.status(dev, "offline")]
        return [fake.result(dev, task, const_like(task.weights, 1.0, 1), 5)]

    server, fake, clock = make_server(tmp_path, reply, ["a", "b"], rounds=3)
    fake.__class__ = Returning
    # Execute
    rows = server.run()
    # Assert: round 1 was attempted again once the devices were back; nothing lost
    assert [r["round"] for r in rows] == [0, 1, 2]
    assert all(r["outcomes"] == {"a": "ok", "b": "ok"} for r in rows)
    assert TIMEOUT > 20.0


def test_unacked_publishes_are_counted_and_their_acks_kept_small(mosquitto):
    """Publishing a round's tasks without waiting: ``unacked()`` falls to 0 as the broker
    acknowledges them, and what is kept of each ack is a plain 0, not a ~1 KB paho object."""
    conn = mosquitto.client("edgehmoe-server")
    body = b"x" * 10_000
    # Execute
    for _ in range(300):
        conn.publish("edgehmoe/t/device/d/task", body, wait=False)
    queued = conn.unacked()
    import time

    end = time.monotonic() + 30
    while conn.unacked() and time.monotonic() < end:
        time.sleep(0.05)
    # Assert
    assert 0 < queued <= 300 and conn.unacked() == 0
    assert {type(reason) for _, reason in conn._acks.values()} == {int}
    conn.publish("edgehmoe/t/device/d/task", body, wait=True, timeout=10)  # waiting still works
