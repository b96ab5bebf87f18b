"""The server's round logic through a fake transport: no broker, no subprocesses.

The fake transport's inbox is a queue; "devices" are scripted replies queued when the server
publishes their task. A fake clock moves only when the server waits on an empty inbox (by the
time it asked to wait) or when a script moves it, so deadlines pass in microseconds.

Dataset: synthetic, 2 superclasses x 3 shapes; tree (children in brackets)::

    0 root [1 super0, 2 super1]
    1 super0 [3 disc, 4 square, 5 triangle]     2 super1 [6 disc, 7 square, 8 triangle]

Every device holds 10 images of each of the 6 classes, so in paper mode round 0 trains the
root (the expert with the most data under it) on every device.
"""

from __future__ import annotations

import json
import logging
import queue
import struct
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from edgehmoe.fl import wire

DATASET = "synthetic:coarse=2,fine=3,per_class=20,test_per_class=2,size=8,seed=3"
COUNTS = np.full(6, 10, dtype=np.int64)
T0 = 1_000_000.0
TIMEOUT = 60.0


class FakeClock:
    def __init__(self, t: float = T0):
        self.t = t

    def __call__(self) -> float:
        return self.t


class FakeTransport:
    """publish/subscribe/receive/close like MqttConnection; ``reply(device, task)`` scripts devices.

    Inbox items are ``(topic, payload)`` or a callable run when it is reached (e.g. to move
    the clock past the deadline before the next message). :meth:`at` holds a message back until
    the clock reaches a time (a device that comes back later).
    """

    def __init__(self, clock: FakeClock, run: str, reply: Callable[[str, wire.TrainTask], list]):
        from edgehmoe.fl.mqtt import Topics

        self.clock = clock
        self.topics = Topics(run)
        self.reply = reply
        self.inbox: queue.Queue = queue.Queue()
        self.published: list[tuple[str, wire.TrainTask, float | None]] = []
        self.subscribed: list[str] = []
        self.closed = False
        self.later: list[tuple[float, tuple[str, bytes]]] = []

    def at(self, t: float, item: tuple[str, bytes]) -> None:
        """Deliver ``item`` once the clock reaches ``t``."""
        self.later.append((t, item))

    def publish(self, topic, payload, qos=1, retain=False, wait=True, timeout=30.0, expiry_s=None):
        task = wire.decode(payload, expect=wire.TrainTask)
        self.published.append((topic, task, expiry_s))
        dev = self.topics.device_from_topic(topic)
        for item in self.reply(dev, task):
            self.inbox.put(item)
        return len(self.published)

    def subscribe(self, topic_filter, qos=1, timeout=10.0):
        self.subscribed.append(topic_filter)

    def receive(self, timeout=None):
        while True:
            for t, item in [x for x in self.later if x[0] <= self.clock.t]:
                self.later.remove((t, item))
                self.inbox.put(item)
            try:
                item = self.inbox.get_nowait()
            except queue.Empty:
                self.clock.t += timeout or 0.0  # nothing arrived while the server waited
                raise TimeoutError from None
            if callable(item):
                item()
                continue
            return item

    def close(self):
        self.closed = True

    # messages a device would send
    def hello(self, dev: str, counts=COUNTS) -> tuple[str, bytes]:
        return self.topics.hello(dev), wire.encode(wire.Hello(dev, "0", wire.PROTOCOL_VERSION, 1000.0, 0.0, 1, "fake",
                                                              np.asarray(counts, dtype=np.int64)))

    def status(self, dev: str, state: str, rnd: int = -1, detail: str = "") -> tuple[str, bytes]:
        return self.topics.status(dev), wire.encode(wire.Status(dev, state, rnd, detail))

    def result(self, dev: str, task: wire.TrainTask, weights: dict, n: int, task_id: str | None = None,
               rnd: int | None = None) -> tuple[str, bytes]:
        r = wire.TrainResult(task.run, task.round if rnd is None else rnd, task_id or task.task_id, dev, task.node,
                             weights, n, 12.5, 3.0, 150.0, 0.75)
        return self.topics.result(dev), wire.encode(r)

    def nan_result(self, dev: str, task: wire.TrainTask, n: int) -> tuple[str, bytes]:
        """A well-formed result whose float weights are NaN (the encoder refuses NaN: rebuild it)."""
        from safetensors.numpy import save

        _, ok = self.result(dev, task, task.weights, n)
        (size,) = struct.unpack("<Q", ok[:8])
        meta = json.loads(ok[8 : 8 + size])["__metadata__"]
        bad = {f"w/{k}": (np.full_like(v, np.nan) if v.dtype.kind == "f" else v) for k, v in task.weights.items()}
        return self.topics.result(dev), save(bad, metadata=meta)


def const_like(weights: dict, f: float, i: int) -> dict:
    """Same names/shapes/dtypes; float arrays all ``f``, integer arrays all ``i``."""
    return {k: np.full_like(v, f if v.dtype.kind == "f" else i) for k, v in weights.items()}


def make_cfg(tmp_path: Path, kind: str = "hmoe", rounds: int = 1, min_devices: int = 1, eval_every: int = 1,
             eval_max: int = 5000, max_update_norm: float = 0.0, model: dict | None = None, **schedule):
    """A tiny run config; ``max_update_norm`` is off by default because the scripted updates
    are constants far from the initial weights (tests/test_security_server.py tests the bound)."""
    from edgehmoe.server.config import RunConfig

    cfg = RunConfig()
    cfg.schedule.max_update_norm = max_update_norm
    for k, v in schedule.items():
        setattr(cfg.schedule, k, v)
    cfg.run.name, cfg.run.out, cfg.run.dataset, cfg.run.val_fraction = "t-rounds", str(tmp_path / "run"), DATASET, 0.25
    cfg.model.kind, cfg.model.flat_width = kind, 8
    for k, v in (model or {}).items():
        setattr(cfg.model, k, v)
    cfg.schedule.rounds, cfg.schedule.min_devices = rounds, min_devices
    cfg.schedule.round_timeout_s, cfg.schedule.wait_for_devices_s = TIMEOUT, 5.0
    cfg.train.batch_size = 8
    cfg.eval.every, cfg.eval.max_examples = eval_every, eval_max
    return cfg.validate()


def make_server(tmp_path, reply, devices, **cfg_kw):
    from edgehmoe.server.app import AggregationServer

    cfg = make_cfg(tmp_path, min_devices=len(devices), **cfg_kw)
    clock = FakeClock()
    fake = FakeTransport(clock, cfg.run.name, reply)
    for dev in devices:
        fake.inbox.put(fake.hello(dev))
    server = AggregationServer(cfg, transport=fake, clock=clock)
    return server, fake, clock


def rows_of(out: Path) -> list[dict]:
    return [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]


# --------------------------------------------------------------------------------------------
# One round, every way a device can answer
# --------------------------------------------------------------------------------------------


def test_round_aggregates_valid_results_and_rejects_the_rest_with_reasons(tmp_path, caplog):
    # Prepare: device names sort in the order their replies reach the server.
    devices = ["a", "b", "c-nan", "d-shape", "e-names", "f-offline", "g-refused", "h-silent", "z-late"]
    sent = {}

    def reply(dev, task):
        w = task.weights
        sent[dev] = task
        if dev == "a":  # first a result for a task that does not exist, then its real one
            return [fake.result(dev, task, const_like(w, 9.0, 99), 50, task_id="r0-000000000000"),
                    fake.result(dev, task, const_like(w, 1.0, 7), 1)]
        if dev == "b":  # its result twice; the second (other values) must not count
            return [fake.result(dev, task, const_like(w, 5.0, 2), 3), fake.result(dev, task, const_like(w, -8.0, 0), 3)]
        if dev == "c-nan":
            return [fake.nan_result(dev, task, 10)]
        if dev == "d-shape":
            bad = dict(w, **{"classifier.bias": np.zeros(5, np.float32)})
            return [fake.result(dev, task, bad, 10)]
        if dev == "e-names":
            bad = {("head." + k if k.startswith("classifier.") else k): v for k, v in w.items()}
            return [fake.result(dev, task, bad, 10)]
        if dev == "f-offline":  # its last will
            return [fake.status(dev, "offline")]
        if dev == "g-refused":
            return [fake.status(dev, "refused", task.round, "needs 90 MB, memory budget is 20 MB")]
        if dev == "h-silent":
            return []

        def past_deadline():
            clock.t = task.deadline_unix + 0.5

        return [past_deadline, fake.result(dev, task, const_like(w, 100.0, 100), 100)]

    server, fake, clock = make_server(tmp_path, reply, devices)
    caplog.set_level(logging.INFO)
    # Execute
    rows = server.run()
    # Assert: every device was asked to train the root
    out = Path(server.cfg.run.out)
    assert [(fake.topics.device_from_topic(t), task.node, task.round, e) for t, task, e in fake.published] == \
        [(d, 0, 0, TIMEOUT) for d in devices]
    assert sorted(fake.subscribed) == sorted(fake.topics.server_filters()) and fake.closed
    (row,) = rows
    assert rows_of(out) == rows
    assert row["round"] == 0 and row["kind"] == "hmoe" and row["nodes"] == [0] and row["experts"] == ["0:root"]
    assert row["updated"] == [0] and row["devices_asked"] == 9 and row["devices_answered"] == 2
    assert row["outcomes"] == {"a": "ok", "b": "ok", "c-nan": "invalid", "d-shape": "invalid", "e-names": "invalid",
                               "f-offline": "offline", "g-refused": "refused", "h-silent": "timeout",
                               "z-late": "late"}
    assert row["rejected"] == {
        "c-nan": "undecodable result: TrainResult: tensor 'w/classifier.bias' contains NaN or inf",
        # the root's classifier: one logit per leaf below it (leaf head, the default): 6
        "d-shape": "parameter 'classifier.bias' has shape (5,), expected (6,)",
        "e-names": "missing parameter 'classifier.weight'",
        "z-late": "arrived 0.5 s after the deadline",
    }
    assert row["per_device"] == [
        {"device": d, "node": 0, "num_examples": n, "round_time_ms": 12.5, "round_mem_mb": 3.0, "peak_rss_mb": 150.0,
         "loss": 0.75} for d, n in (("a", 1), ("b", 3))]
    assert row["lr"] == server.cfg.train.lr  # cosine schedule, first round
    # FedAvg by hand: floats (1*1 + 3*5)/4 = 4; integer counters take the max, max(7, 2) = 7
    state = json.loads((out / "state.json").read_text())
    assert state["round"] == 1 and state["files"]["0"] == "experts/0.r1.safetensors"
    assert state["files"]["1"] == "experts/1.r0.safetensors" and state["visits"] == {"0": 1}
    from safetensors.numpy import load_file

    root = load_file(str(out / "experts/0.r1.safetensors"))
    assert set(root) == set(sent["a"].weights)
    for k, v in root.items():
        assert v.dtype == sent["a"].weights[k].dtype and v.shape == sent["a"].weights[k].shape
        np.testing.assert_array_equal(v, np.full_like(v, 4.0 if v.dtype.kind == "f" else 7), err_msg=k)
    # the previous root file is gone, the untouched experts keep theirs
    assert sorted(p.name for p in (out / "experts").iterdir()) == ["0.r1.safetensors", "1.r0.safetensors",
                                                                     "2.r0.safetensors"]
    # the registry: the device whose last will arrived is offline, the others online
    assert [d["device_id"] for d in state["devices"] if not d["online"]] == ["f-offline"]
    # logged reasons
    text = caplog.text
    assert "dropped bad result payload from c-nan" in text and "contains NaN or inf" in text
    assert "rejected update from d-shape for 0:root: parameter 'classifier.bias' has shape (5,)" in text
    assert "dropped result from a for task r0-000000000000 (round 0): not a task of this round" in text
    assert "duplicate result for task" in text and "from b ignored (already ok)" in text
    assert "dropped late result from z-late for round 0" in text
    assert "device g-refused refused round 0: needs 90 MB, memory budget is 20 MB" in text
    assert "round 0: h-silent did not answer before the deadline" in text
    assert "round 0: z-late did not answer" not in text


def test_offline_device_ends_its_part_of_the_round_before_the_deadline(tmp_path):
    # Prepare: "a" answers, "b" dies (last will) before answering; no one is left to wait for.
    def reply(dev, task):
        if dev == "a":
            return [fake.result(dev, task, const_like(task.weights, 2.0, 1), 4)]
        return [fake.status(dev, "busy", task.round), fake.status(dev, "offline")]

    server, fake, clock = make_server(tmp_path, reply, ["a", "b"], rounds=2, eval_every=0)
    # Execute
    rows = server.run()
    # Assert: round 0 ended without waiting for its deadline; round 1 asked only "a"
    assert [r["outcomes"] for r in rows] == [{"a": "ok", "b": "offline"}, {"a": "ok"}]
    assert clock.t < T0 + TIMEOUT
    assert [r["rejected"] for r in rows] == [{}, {}]
    assert not server.devices["b"].online and server.devices["a"].online
    # eval.every = 0: validation only after the last round
    assert ["val_info_f1" in r for r in rows] == [False, True]


def test_device_that_reconnects_within_the_grace_gets_its_task_again_and_counts(tmp_path, caplog):
    # Prepare: "b"'s connection drops while it trains (its will arrives), it says hello again 3 s
    # later (a broker restart, say) and, the task having been lost with the old broker, answers
    # only the copy the server sends again.
    asked = []

    def reply(dev, task):
        asked.append((dev, task.task_id))
        w = task.weights
        if dev == "a" or asked.count((dev, task.task_id)) == 2:
            return [fake.result(dev, task, const_like(w, 2.0, 1), 4)]

        def later():
            clock.t += 3.0

        return [fake.status(dev, "busy", task.round), fake.status(dev, "offline"), later, fake.hello(dev),
                fake.status(dev, "idle")]

    server, fake, clock = make_server(tmp_path, reply, ["a", "b"], rounds=1, offline_grace_s=10.0)
    caplog.set_level(logging.INFO)
    # Execute
    (row,) = server.run()
    # Assert: the same task went to "b" twice, and its answer to the copy counted
    (tid_b,) = {t for d, t in asked if d == "b"}
    assert asked.count(("b", tid_b)) == 2 and asked.count(("a", asked[0][1])) == 1
    assert row["outcomes"] == {"a": "ok", "b": "ok"} and row["devices_answered"] == 2
    assert clock.t < T0 + 10.0  # the round did not wait for the grace or the deadline
    assert "device b lost its connection during round 0" in caplog.text
    assert f"device b connected again during round 0; its task {tid_b} was sent again" in caplog.text


@pytest.mark.parametrize("grace", [10.0, 0.0, 2 * TIMEOUT])
def test_device_that_does_not_come_back_ends_offline_after_the_grace(tmp_path, grace):
    def reply(dev, task):
        if dev == "a":
            return [fake.result(dev, task, const_like(task.weights, 2.0, 1), 4)]
        return [fake.status(dev, "busy", task.round), fake.status(dev, "offline")]

    server, fake, clock = make_server(tmp_path, reply, ["a", "b"], rounds=1, offline_grace_s=grace)
    t0 = clock.t
    (row,) = server.run()
    assert row["outcomes"] == {"a": "ok", "b": "offline"}
    if grace > TIMEOUT:  # the deadline came first: still offline (its will arrived), not a missed deadline
        assert row["reasons"]["b"] == "went offline (not back before the deadline)"
        assert TIMEOUT <= clock.t - t0 < TIMEOUT + 2.0
        return
    assert row["reasons"]["b"] == (f"went offline (not back within {grace:g} s)" if grace else "went offline")
    # the round waited the grace (not the deadline) for "b", or not at all without one
    assert (grace <= clock.t - t0 < grace + 2.0) if grace else (clock.t - t0 < 2.0)


@pytest.mark.parametrize("grace", [10.0, 0.0])
def test_next_round_waits_for_devices_whose_will_arrived_between_rounds(tmp_path, caplog, grace):
    # Prepare: after round 0 every device's will arrives (the broker restarted); "a" is back at
    # once, "b" 4 s later. The next round must not be planned without "b".
    def reply(dev, task):
        items = [fake.result(dev, task, const_like(task.weights, 2.0, 1), 4)]
        if task.round == 0 and dev == "b":
            items += [fake.status("a", "offline"), fake.status("b", "offline"), fake.hello("a")]
            fake.at(clock.t + 4.0, fake.hello("b"))
        return items

    server, fake, clock = make_server(tmp_path, reply, ["a", "b"], rounds=2, eval_every=0, offline_grace_s=grace)
    caplog.set_level(logging.INFO)
    # Execute
    rows = server.run()
    # Assert: with the grace both devices train round 1; without it only the one back first
    assert rows[0]["outcomes"] == {"a": "ok", "b": "ok"}
    assert rows[1]["outcomes"] == ({"a": "ok", "b": "ok"} if grace else {"a": "ok"})
    assert ("round 1: waiting for b to reconnect" in caplog.text) == bool(grace)
    assert (fake.later == []) == bool(grace)  # without the grace the run ended before "b" was back


def test_device_that_stops_on_purpose_is_not_waited_for(tmp_path, caplog):
    # Prepare: in round 0 "b" stops mid-task (edgehmoe-client stopped: its offline status says so);
    # after round 0 "c" stops too. Neither is coming back, so no grace applies to them.
    def reply(dev, task):
        if dev == "b":
            return [fake.status(dev, "busy", task.round), fake.status(dev, "offline", -1, wire.STOPPED_DETAIL)]
        items = [fake.result(dev, task, const_like(task.weights, 2.0, 1), 4)]
        if task.round == 0 and dev == "c":
            items.append(fake.status("c", "offline", -1, wire.STOPPED_DETAIL))
        return items

    server, fake, clock = make_server(tmp_path, reply, ["a", "b", "c"], rounds=2, eval_every=0,
                                      offline_grace_s=10.0)
    caplog.set_level(logging.INFO)
    t0 = clock.t
    # Execute
    rows = server.run()
    # Assert: "b"'s task ended when it stopped; round 1 was planned at once with "a" alone
    assert rows[0]["outcomes"] == {"a": "ok", "b": "offline", "c": "ok"}
    assert rows[0]["reasons"]["b"] == "the device stopped"
    assert rows[1]["outcomes"] == {"a": "ok"}
    assert clock.t - t0 < 5.0  # neither the grace (10 s) nor a deadline was waited for
    assert "waiting for" not in caplog.text and "lost its connection" not in caplog.text
    assert "device b stopped" in caplog.text and "device c stopped" in caplog.text
    assert server.registry.went_offline == {}


def test_result_of_a_finished_round_is_dropped_in_the_next(tmp_path, caplog):
    # Prepare: in round 1 "a" first re-sends its round-0 result (stale), then the real one.
    first = {}

    def reply(dev, task):
        if task.round == 0:
            first["task"] = task
            return [fake.result(dev, task, const_like(task.weights, 3.0, 1), 5)]
        return [fake.result(dev, first["task"], const_like(first["task"].weights, 50.0, 1), 5),
                fake.result(dev, task, const_like(task.weights, 1.0, 1), 5)]

    server, fake, _ = make_server(tmp_path, reply, ["a"], rounds=2, eval_every=0)
    caplog.set_level(logging.WARNING)
    # Execute
    rows = server.run()
    # Assert: round 1 (the expert after the root) got only the real result
    assert [r["outcomes"] for r in rows] == [{"a": "ok"}, {"a": "ok"}]
    node1 = rows[1]["nodes"][0]
    assert node1 in (1, 2)
    for v in server.weights[node1].values():
        if v.dtype.kind == "f":
            np.testing.assert_array_equal(v, np.ones_like(v))
    assert "(round 0): not a task of this round (late or stale)" in caplog.text


# --------------------------------------------------------------------------------------------
# The new weights are scored, and the commit order survives a crash at each step
# --------------------------------------------------------------------------------------------


def _one_class_flat(weights: dict, cls: int) -> dict:
    """Flat weights that predict class ``cls`` for every input: zero classifier, one-hot bias."""
    w = {k: v.copy() for k, v in weights.items()}
    w["classifier.weight"][:] = 0.0
    w["classifier.bias"][:] = 0.0
    w["classifier.bias"][cls] = 10.0
    return w


def test_metrics_row_scores_the_weights_it_commits(tmp_path):
    from edgehmoe.model.inference import evaluate_models, load_models

    # Prepare: the only device returns a flat model that always says class 2. The server scores
    # 16 of the 30 validation images (eval.max_examples), drawn so that classes 0-5 have
    # 3, 3, 4, 2, 1, 3 images: no other constant prediction scores 4/16.
    def reply(dev, task):
        return [fake.result(dev, task, _one_class_flat(task.weights, 2), 10)]

    server, fake, _ = make_server(tmp_path, reply, ["a"], kind="flat", eval_max=16)
    # Execute
    (row,) = server.run()
    # Assert: top-1 = share of class 2 among the scored images
    y = server.val.y
    assert np.bincount(y, minlength=6).tolist() == [3, 3, 4, 2, 1, 3]
    assert row["val_top1"] == 4 / 16
    # ... and the run directory, read back from disk, scores exactly what the row says
    hm, fm, md = load_models(server.out)
    assert md.flat.file == "experts/flat.r1.safetensors" and md.extra["rounds_completed"] == 1
    m = evaluate_models(hm, fm, server.val.x, y)
    assert row["val_info_f1"] == pytest.approx(m["info_f1"], abs=1e-9) and row["val_top1"] == m["top1"]


def test_commit_writes_weights_then_metrics_then_state_then_model_json(tmp_path, monkeypatch):
    from edgehmoe.server.store import RunStore

    # Prepare: record what is on disk at every step of the commit
    def reply(dev, task):
        return [fake.result(dev, task, const_like(task.weights, 2.0, 3), 6)]

    server, fake, _ = make_server(tmp_path, reply, ["a"])
    out = Path(server.cfg.run.out)
    steps = []

    def on_disk():
        st = json.loads((out / "state.json").read_text())
        md = json.loads((out / "model.json").read_text())
        rows = (out / "metrics.jsonl").read_text().splitlines() if (out / "metrics.jsonl").exists() else []
        return {"state_round": st["round"], "state_root": st["files"]["0"],
                "model_root": md["models"]["hmoe"]["experts"]["0"]["file"], "rows": len(rows),
                "files": sorted(p.name for p in (out / "experts").glob("0.*"))}

    for name in ("write_weights", "append_metrics", "write_state", "write_model_json"):
        orig = getattr(RunStore, name)

        def wrapped(self, *a, _orig=orig, _name=name):
            result = _orig(self, *a)
            if (out / "experts/0.r1.safetensors").exists():  # the commit of round 0, not the run's creation
                steps.append((_name, on_disk()))
            return result

        monkeypatch.setattr(RunStore, name, wrapped)
    # Execute
    server.run()
    # Assert
    old, new = "experts/0.r0.safetensors", "experts/0.r1.safetensors"
    assert steps == [
        ("write_weights", {"state_round": 0, "state_root": old, "model_root": old, "rows": 0,
                           "files": ["0.r0.safetensors", "0.r1.safetensors"]}),
        ("append_metrics", {"state_round": 0, "state_root": old, "model_root": old, "rows": 1,
                            "files": ["0.r0.safetensors", "0.r1.safetensors"]}),
        ("write_state", {"state_round": 1, "state_root": new, "model_root": old, "rows": 1,
                         "files": ["0.r0.safetensors", "0.r1.safetensors"]}),
        ("write_model_json", {"state_round": 1, "state_root": new, "model_root": new, "rows": 1,
                              "files": ["0.r0.safetensors", "0.r1.safetensors"]}),
    ]
    assert sorted(p.name for p in (out / "experts").glob("0.*")) == ["0.r1.safetensors"]


class Crash(Exception):
    pass


@pytest.mark.parametrize("crash_after, committed", [
    ("write_weights", 0),  # a new weight file on disk, nothing else
    ("append_metrics", 0),  # ... and a metrics row, but state.json still says round 0
    ("write_state", 1),  # committed, but model.json still names the previous root file
    ("write_model_json", 1),  # committed, the previous root file not yet removed
])
def test_resume_after_a_crash_in_the_commit_loses_and_repeats_no_round(tmp_path, monkeypatch, crash_after,
                                                                        committed):
    from edgehmoe.server.app import AggregationServer
    from edgehmoe.server.store import RunDirError, RunStore

    # Prepare: round 0 dies right after one step of its commit
    def reply(dev, task):
        return [fake.result(dev, task, const_like(task.weights, float(task.round + 2), 1), 6)]

    server, fake, clock = make_server(tmp_path, reply, ["a"], rounds=2)
    out = Path(server.cfg.run.out)
    orig = getattr(RunStore, crash_after)

    def crashing(self, *a):
        result = orig(self, *a)
        if (out / "experts/0.r1.safetensors").exists():  # in the commit of round 0
            raise Crash(crash_after)
        return result

    monkeypatch.setattr(RunStore, crash_after, crashing)
    with pytest.raises(Crash):
        server.run()
    monkeypatch.undo()
    # a new start refuses the directory; --resume continues after the last commit
    with pytest.raises(RunDirError, match="--resume"):
        AggregationServer(server.cfg, transport=fake, clock=clock).prepare()
    fake.inbox.put(fake.hello("a"))
    resumed = AggregationServer(server.cfg, resume=True, transport=fake, clock=clock)
    resumed.prepare()
    # Assert: nothing of the interrupted round survives unless it was committed
    assert resumed.round == committed
    assert [r["round"] for r in resumed.history] == list(range(committed))
    md = json.loads((out / "model.json").read_text())
    state = json.loads((out / "state.json").read_text())
    assert md["models"]["hmoe"]["experts"]["0"]["file"] == state["files"]["0"] == f"experts/0.r{committed}.safetensors"
    assert {f"experts/{p.name}" for p in (out / "experts").iterdir()} == set(state["files"].values())
    # Execute: finish the run
    resumed.run()
    rows = rows_of(out)
    assert [r["round"] for r in rows] == [0, 1]
    assert json.loads((out / "state.json").read_text())["round"] == 2


# --------------------------------------------------------------------------------------------
# Pure pieces
# --------------------------------------------------------------------------------------------


def _task(weights, **kw):
    fields = dict(run="r", round=3, task_id="t1", node=1, arch={}, label_map=np.arange(2, dtype=np.int64),
                  weights=weights, epochs=1, batch_size=1, lr=0.1, momentum=0.0, weight_decay=0.0,
                  deadline_unix=0.0, seed=0)
    fields.update(kw)
    return wire.TrainTask(**fields)


@pytest.mark.parametrize("change, message", [
    (dict(run="other"), "run 'other' round 3, task was run 'r' round 3"),
    (dict(round=2), "run 'r' round 2, task was run 'r' round 3"),
    (dict(node=2), "node 2 from d, task was node 1 for d"),
    (dict(device_id="e"), "node 1 from e, task was node 1 for d"),
    (dict(num_examples=0), "num_examples must be > 0"),
])
def test_validate_result_names_the_mismatch(change, message):
    from edgehmoe.server.rounds import validate_result

    from edgehmoe.fl.aggregation import InvalidUpdate

    w = {"w": np.zeros(2, np.float32)}
    fields = dict(run="r", round=3, task_id="t1", device_id="d", node=1, weights=w, num_examples=4,
                  round_time_ms=1.0, round_mem_mb=1.0, peak_rss_mb=1.0, loss=0.0)
    validate_result(wire.TrainResult(**fields), _task(w), "d")
    fields.update(change)
    with pytest.raises(InvalidUpdate, match=message):
        validate_result(wire.TrainResult(**fields), _task(w), "d")


def test_aggregate_uses_only_ok_results_and_the_task_dtypes():
    from edgehmoe.server.rounds import Pending, aggregate

    # Prepare: node 1 answered in float16 first, then float32; node 2 only by an invalid result
    t1 = _task({"w": np.zeros(1, np.float32)})
    t2 = _task({"w": np.zeros(1, np.float32)}, node=2, task_id="t2")

    def result(task, dev, value, n, dtype):
        return wire.TrainResult("r", 3, task.task_id, dev, task.node, {"w": np.array([value], dtype)}, n, 1.0, 1.0,
                                1.0, 0.0)

    p = [Pending(t1, "a"), Pending(t1, "b"), Pending(t2, "c")]
    p[0].settle("ok", result=result(t1, "a", 2049.0, 1, np.float16))  # float16 holds 2048
    p[1].settle("ok", result=result(t1, "b", 4.0, 3, np.float32))
    p[2].settle("invalid", "shape", result(t2, "c", 1.0, 1, np.float32))
    # Execute
    new = aggregate(p)
    # Assert: (1*2048 + 3*4)/4 = 515 in float32; node 2 not updated
    assert list(new) == [1] and new[1]["w"].dtype == np.float32
    np.testing.assert_array_equal(new[1]["w"], [515.0])


def test_registry_ignores_a_shard_of_another_dataset_and_tracks_offline(caplog):
    from edgehmoe.server.registry import DeviceRegistry

    reg = DeviceRegistry(6, clock=lambda: 5.0)
    h = wire.Hello("a", "0", wire.PROTOCOL_VERSION, 1000.0, 50.0, 4, "pi", COUNTS)
    assert reg.on_hello(h) and reg.on_hello(wire.Hello("x", "0", wire.PROTOCOL_VERSION, 1.0, 0.0, 1, "pi",
                                                      np.ones(7, np.int64))) is False
    assert "device x reports 7 classes but the run has 6" in caplog.text
    assert [v.device_id for v in reg.views()] == ["a"] and reg.views()[0].memory_budget_mb == 50.0
    reg.on_status(wire.Status("a", "busy", 0, ""))
    assert reg.devices["a"].busy and reg.devices["a"].last_seen == 5.0
    reg.on_status(wire.Status("a", "offline", -1, ""))
    assert reg.views() == [] and not reg.devices["a"].online
    saved = reg.to_json()
    again = DeviceRegistry.from_json(6, saved)
    assert again.to_json() == saved and again.devices["a"].class_counts.tolist() == COUNTS.tolist()
