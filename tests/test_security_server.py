"""Issue #10, server side: one bad device must not be able to stop or poison a run.

Each ``test_issue10_row<N>_*`` replays a row of the issue (an attacker holding one device
credential) against the real :class:`~edgehmoe.server.app.AggregationServer` through the fake
transport and fake clock of ``tests/test_rounds.py`` (no broker). They fail on the server before
the fix (see docs/security.md, "Server side").

Dataset and tree as in ``tests/test_rounds.py``: 6 classes, ``0 root [1 super0, 2 super1]``,
every honest device holds 10 images of each class (60 samples; 30 under each super-class).
"""

from __future__ import annotations

import json
import re
import logging
import struct
from pathlib import Path

import numpy as np
import pytest
from test_rounds import COUNTS, T0, TIMEOUT, FakeClock, FakeTransport, make_cfg, rows_of

from edgehmoe.fl import wire


def nudge(weights: dict, delta: float) -> dict:
    """The task's weights with ``delta`` added to every float (a small, honest-looking change)."""
    return {k: (v + np.asarray(delta, v.dtype) if v.dtype.kind == "f" else v.copy()) for k, v in weights.items()}


def start(tmp_path, reply, devices, *, hellos=True, **cfg_kw):
    from edgehmoe.server.app import AggregationServer

    cfg = make_cfg(tmp_path, min_devices=len(devices), **cfg_kw)
    clock = FakeClock()
    fake = FakeTransport(clock, cfg.run.name, reply)
    if hellos:
        for dev in devices:
            fake.inbox.put(fake.hello(dev))
    return AggregationServer(cfg, transport=fake, clock=clock), fake, clock


def load_committed(out: Path) -> dict:
    from safetensors.numpy import load_file

    state = json.loads((out / "state.json").read_text())
    return {int(n): load_file(str(out / rel)) for n, rel in state["files"].items()}


def all_finite(weights: dict) -> bool:
    return all(np.isfinite(v).all() for w in weights.values() for v in w.values() if v.dtype.kind == "f")


def raw_result(fake: FakeTransport, dev: str, task: wire.TrainTask, weights: dict, n: int) -> tuple[str, bytes]:
    """A result the encoder would refuse (e.g. float64 1e300 is fine for it, 10**400 is not):
    built by hand like the attacker's own client would."""
    from safetensors.numpy import save

    fields = {"run": task.run, "round": task.round, "task_id": task.task_id, "device_id": dev, "node": task.node,
              "num_examples": n, "round_time_ms": 1.0, "round_mem_mb": 1.0, "peak_rss_mb": 1.0, "loss": 0.5}
    meta = {"type": "TrainResult", "protocol": str(wire.PROTOCOL_VERSION),
            "fields": json.dumps(fields, sort_keys=True, separators=(",", ":"))}
    return fake.topics.result(dev), save({f"w/{k}": np.asarray(v, order="C") for k, v in weights.items()},
                                         metadata=meta)


def list_dtype_hello(fake: FakeTransport, dev: str) -> tuple[str, bytes]:
    """The payload of row 1: a hello whose safetensors header gives ``"dtype": ["I64"]``."""
    _, ok = fake.hello(dev)
    (size,) = struct.unpack("<Q", ok[:8])
    header = json.loads(ok[8:8 + size])
    header["a/class_counts"]["dtype"] = ["I64"]
    h = json.dumps(header).encode()
    return fake.topics.hello(dev), struct.pack("<Q", len(h)) + h + ok[8 + size:]


# --------------------------------------------------------------------------------------------
# Row 1: malformed messages, retained or left in the session, at start, during a run, on resume
# --------------------------------------------------------------------------------------------


def junk(fake: FakeTransport) -> list:
    """What the attacker ("evil") leaves retained on its own topics (and a few other things)."""
    absurd = np.full(6, 2**62, dtype=np.int64)
    return [
        list_dtype_hello(fake, "evil"),  # row 1's payload (the decoder refuses it)
        (fake.topics.hello("evil"), b"\x00" * 7),  # truncated
        (fake.topics.result("evil"), b"not safetensors at all"),
        (fake.topics.status("evil"), fake.hello("evil")[1]),  # a hello on the status topic
        (fake.topics.hello("evil"), wire.encode(wire.Hello("evil", "0", 1, 1.0, 0.0, 1, "x", absurd))),
        (fake.topics.hello("evil"), wire.encode(wire.Hello("evil", "0", 1, 1.0, 0.0, 1, "x", np.ones(7, np.int64)))),
        (fake.topics.hello("other"), fake.hello("evil")[1]),  # claims another device id
        ("edgehmoe/elsewhere/device/evil/hello", b"junk"),  # not a topic of this run
    ]


def test_issue10_row1_malformed_messages_are_dropped_at_start_during_a_run_and_on_resume(tmp_path, caplog):
    # Prepare: "a" is honest; "b" answers its task with a result that crashed the old server
    # (num_examples beyond any float); junk waits retained before the server starts.
    def reply(dev, task):
        if dev == "a":
            return [fake.result(dev, task, nudge(task.weights, 0.01), 60)]
        return [*junk(fake), raw_result(fake, dev, task, nudge(task.weights, 0.02), 10**400)]

    server, fake, clock = start(tmp_path, reply, ["a", "b"], hellos=False, max_update_norm=10.0)
    for item in junk(fake) + [fake.hello("a"), fake.hello("b")] + junk(fake):
        fake.inbox.put(item)
    caplog.set_level(logging.INFO)
    # Execute: a fresh start ...
    (row,) = server.run()
    # Assert: the round ran with "a"; "b"'s result was refused with a reason; nothing else counted
    assert row["outcomes"] == {"a": "ok", "b": "invalid"}
    assert "num_examples about 1e400 exceeds the 60 samples" in row["rejected"]["b"]
    assert "evil" not in server.devices and "other" not in server.devices
    text = caplog.text
    assert "dropped bad hello payload from evil" in text and "dtype ['I64'] not allowed" in text
    assert "dropped bad result payload from evil" in text
    assert "dropped Hello on status topic of evil" in text
    assert "device evil claims 4611686018427387904 samples of class 0" in text
    assert "dropped Hello on edgehmoe/t-rounds/device/other/hello: it claims device 'evil'" in text
    assert "ignoring message on unexpected topic edgehmoe/elsewhere/device/evil/hello" in text
    assert "Traceback" not in text and "server bug" not in text
    # Execute: ... and --resume with the same junk still retained (the broker re-delivers it)
    from edgehmoe.server.app import AggregationServer

    server.cfg.schedule.rounds = 2
    for item in junk(fake) + [fake.hello("a"), fake.hello("b")]:
        fake.inbox.put(item)
    resumed = AggregationServer(server.cfg, resume=True, transport=fake, clock=clock)
    rows = resumed.run()
    # Assert
    assert [r["round"] for r in rows] == [0, 1] and rows[1]["outcomes"] == {"a": "ok", "b": "invalid"}
    assert all_finite(load_committed(Path(server.cfg.run.out)))


def test_issue10_row1_a_handler_bug_drops_the_message_not_the_server(tmp_path, caplog, monkeypatch):
    from edgehmoe.server.registry import DeviceRegistry

    # Prepare: a message that makes a handler fail unexpectedly (here: a planted bug in the
    # registry for device "evil") must cost that message, not the run.
    orig = DeviceRegistry.on_hello

    def buggy(self, h):
        if h.device_id == "evil":
            raise KeyError("planted bug")
        return orig(self, h)

    monkeypatch.setattr(DeviceRegistry, "on_hello", buggy)

    def reply(dev, task):
        return [fake.result(dev, task, nudge(task.weights, 0.01), 60)]

    server, fake, _ = start(tmp_path, reply, ["a"])
    fake.inbox.put(fake.hello("evil"))
    caplog.set_level(logging.WARNING)
    # Execute
    (row,) = server.run()
    # Assert: logged once as a server bug (with its traceback), the round ran
    assert row["outcomes"] == {"a": "ok"}
    assert "server bug while handling a message on edgehmoe/t-rounds/device/evil/hello" in caplog.text
    assert "KeyError: 'planted bug'" in caplog.text


# --------------------------------------------------------------------------------------------
# Rows 2 and 3: float64 1e300 weights; num_examples beyond float
# --------------------------------------------------------------------------------------------


def test_issue10_row2_float64_1e300_is_refused_and_nothing_unloadable_is_committed(tmp_path):
    # Prepare: "evil" answers in float64 with values float32 cannot hold (the old server cast
    # the FedAvg to float32 inf and committed it; --resume then failed too)
    def reply(dev, task):
        if dev == "a":
            return [fake.result(dev, task, nudge(task.weights, 0.01), 60)]
        huge = {k: (np.full(v.shape, 1e300, np.float64) if v.dtype.kind == "f" else v) for k, v in task.weights.items()}
        return [fake.result(dev, task, huge, 60)]

    server, fake, clock = start(tmp_path, reply, ["a", "evil"])
    # Execute
    (row,) = server.run()
    # Assert: refused with the reason; the committed root is exactly "a"'s update
    assert row["outcomes"] == {"a": "ok", "evil": "invalid"}
    assert row["rejected"]["evil"].endswith("has dtype float64, expected float32 (the task's)")
    committed = load_committed(Path(server.cfg.run.out))
    assert all_finite(committed)
    sent = fake.published[0][1].weights
    for k, v in committed[0].items():
        np.testing.assert_array_equal(v, nudge(sent, 0.01)[k], err_msg=k)
    # ... and the run resumes
    from edgehmoe.server.app import AggregationServer

    server.cfg.schedule.rounds = 2
    fake.inbox.put(fake.hello("a"))
    fake.inbox.put(fake.hello("evil"))
    assert len(AggregationServer(server.cfg, resume=True, transport=fake, clock=clock).run()) == 2


@pytest.mark.parametrize("n", [10**400, 10**308, 2**64], ids=["1e400", "1e308", "2^64"])
def test_issue10_row3_num_examples_beyond_float_is_refused(tmp_path, n):
    # Prepare: 10**400 made fedavg raise OverflowError (server down); >= 1e308 gave inf weights
    def reply(dev, task):
        delta = 0.01 if dev == "a" else 0.02
        return [raw_result(fake, dev, task, nudge(task.weights, delta), 60 if dev == "a" else n)]

    server, fake, _ = start(tmp_path, reply, ["a", "evil"])
    # Execute
    (row,) = server.run()
    # Assert
    assert row["outcomes"] == {"a": "ok", "evil": "invalid"}
    assert "exceeds the 60 samples the device announced under this node" in row["rejected"]["evil"]
    committed = load_committed(Path(server.cfg.run.out))
    assert all_finite(committed)
    sent = fake.published[0][1].weights
    np.testing.assert_array_equal(committed[0]["classifier.bias"], nudge(sent, 0.01)["classifier.bias"])


# --------------------------------------------------------------------------------------------
# Row 4: scaled weights; noise with an inflated num_examples
# --------------------------------------------------------------------------------------------


def test_issue10_row4_scaled_weights_and_inflated_counts_are_refused_with_a_warning(tmp_path, caplog):
    # Prepare: three honest devices; "scaled" sends its weights x 1e6, "noisy" sends noise
    # with num_examples = 1e9 although its hello announced 60 samples (30 under each super-class).
    rng = np.random.default_rng(0)

    def reply(dev, task):
        w = nudge(task.weights, 0.01)
        if dev == "scaled":
            w = {k: (v * np.float32(1e6) if v.dtype.kind == "f" else v) for k, v in w.items()}
            return [fake.result(dev, task, w, 60)]
        if dev == "noisy":
            noise = {k: (rng.normal(0, 1, v.shape).astype(v.dtype) if v.dtype.kind == "f" else v) for k, v in w.items()}
            return [fake.result(dev, task, noise, 10**9)]
        return [fake.result(dev, task, w, 60)]

    devices = ["h1", "h2", "h3", "noisy", "scaled"]
    server, fake, _ = start(tmp_path, reply, devices, max_update_norm=10.0)  # the default bound
    caplog.set_level(logging.WARNING)
    # Execute
    (row,) = server.run()
    # Assert: both refused with their reasons, logged as warnings
    assert row["outcomes"] == {"h1": "ok", "h2": "ok", "h3": "ok", "noisy": "invalid", "scaled": "invalid"}
    assert row["rejected"]["noisy"] == ("num_examples 1000000000 exceeds the 60 samples the device announced "
                                       "under this node in its hello")
    assert re.match(r"update norm is 1.0\d*e\+06 x the weights' norm, above the bound of 10", row["rejected"]["scaled"])
    assert "rejected update from scaled for 0:root: update norm is 1.01e+06" in caplog.text
    assert "rejected update from noisy for 0:root: num_examples 1000000000 exceeds" in caplog.text
    # the committed root is the honest average (all three sent the same nudge)
    sent = fake.published[0][1].weights
    np.testing.assert_array_equal(load_committed(Path(server.cfg.run.out))[0]["classifier.weight"],
                                  nudge(sent, 0.01)["classifier.weight"])


def test_update_norm_clip_action_scales_the_change_down(tmp_path, caplog):
    # update_norm_action = "clip": the oversized change is kept but scaled to the bound
    from edgehmoe.fl.aggregation import update_norm, weights_norm

    def reply(dev, task):
        return [fake.result(dev, task, {k: (v * np.float32(100.0) if v.dtype.kind == "f" else v)
                                        for k, v in task.weights.items()}, 60)]

    server, fake, _ = start(tmp_path, reply, ["a"], max_update_norm=2.0, update_norm_action="clip")
    caplog.set_level(logging.WARNING)
    (row,) = server.run()
    assert row["outcomes"] == {"a": "ok"}
    sent = fake.published[0][1].weights
    root = load_committed(Path(server.cfg.run.out))[0]
    assert update_norm(root, sent) == pytest.approx(2.0 * weights_norm(sent), rel=1e-5)
    assert "clipped update from a for 0:root: its norm was 99 x the weights' norm, above 2" in caplog.text


# --------------------------------------------------------------------------------------------
# Row 6: absurd class counts in a hello
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("claim", ["1e12", "2^62"])
def test_issue10_row6_absurd_hello_is_refused_and_every_expert_is_trained(tmp_path, caplog, claim):
    # Prepare: "evil" claims 10**12 samples of class 0 (under super0), or 2**62 of every class
    # (the int64 sum wrapped around: logged as "0 samples"); the data-weighted scheduler then
    # gave super0 every other round and super1 none.
    counts = (np.array([10**12, 0, 0, 0, 0, 0], np.int64) if claim == "1e12"
              else np.full(6, 2**62, np.int64))

    def reply(dev, task):
        return [fake.result(dev, task, nudge(task.weights, 0.01), 60 if task.node == 0 else 30)]

    server, fake, _ = start(tmp_path, reply, ["a", "b", "evil"], hellos=False, rounds=6, eval_every=0)
    for dev in ("a", "b"):
        fake.inbox.put(fake.hello(dev))
    fake.inbox.put(fake.hello("evil", counts))
    fake.inbox.put(fake.hello("evil2", COUNTS))  # a third honest device, so min_devices (3) is met
    caplog.set_level(logging.INFO)
    # Execute
    rows = server.run()
    # Assert: refused with the number it claimed; visits follow the honest data (root 180,
    # super0 90, super1 90 samples: 2:1:1 over 6 rounds... root, super0, super1, root, ...)
    assert "evil" not in server.devices
    assert f"device evil claims {int(counts[0])} samples of class 0, more than the 10000000" in caplog.text
    assert [r["nodes"] for r in rows] == [[0], [1], [2], [0], [0], [1]]
    assert all("evil" not in r["outcomes"] for r in rows)


def test_hello_sanity_bound_is_a_config_knob(caplog):
    from edgehmoe.server.registry import DeviceRegistry

    reg = DeviceRegistry(6, clock=lambda: 0.0, max_class_count=100)
    assert reg.on_hello(wire.Hello("a", "0", 1, 1.0, 0.0, 1, "x", np.full(6, 100, np.int64)))
    assert not reg.on_hello(wire.Hello("a", "0", 1, 1.0, 0.0, 1, "x", np.full(6, 101, np.int64)))
    # a refused hello of a known device takes it out of scheduling until a plausible one
    assert reg.views() == [] and not reg.devices["a"].online
    assert reg.samples_under("a", np.array([0, -1, 1, -1, -1, -1])) == 200


# --------------------------------------------------------------------------------------------
# Row 8: a device that stays online and never answers; hello floods
# --------------------------------------------------------------------------------------------


def test_issue10_row8_silent_device_is_dropped_after_k_missed_deadlines_and_readmitted_by_hello(tmp_path, caplog):
    # Prepare: "silent" stays online and never answers; max_missed_rounds = 2
    def reply(dev, task):
        if dev == "silent":
            return []
        return [fake.result(dev, task, nudge(task.weights, 0.01), 60 if task.node == 0 else 30)]

    server, fake, clock = start(tmp_path, reply, ["a", "silent"], rounds=5, eval_every=0, max_missed_rounds=2)
    caplog.set_level(logging.INFO)
    # Execute
    rows = server.run()
    # Assert: only the first two rounds waited for it (the old server waited in all five)
    assert [sorted(r["outcomes"].items()) for r in rows] == (
        [[("a", "ok"), ("silent", "timeout")]] * 2 + [[("a", "ok")]] * 3)
    assert T0 + 2 * TIMEOUT < clock.t < T0 + 3 * TIMEOUT
    assert "device silent missed 2 deadlines in a row; not asked again until it says hello or answers" in caplog.text
    assert server.devices["silent"].online and server.devices["silent"].missed == 2
    # a hello re-admits it: the next round asks it again
    from edgehmoe.server.app import AggregationServer

    server.cfg.schedule.rounds = 6
    fake.inbox.put(fake.hello("a"))
    fake.inbox.put(fake.hello("silent"))
    again = AggregationServer(server.cfg, resume=True, transport=fake, clock=clock)
    assert again.run()[-1]["outcomes"] == {"a": "ok", "silent": "timeout"}


def test_issue10_row8_hello_flood_logs_one_line_per_device_per_minute(caplog):
    from edgehmoe.server.registry import DeviceRegistry
    from edgehmoe.server.rounds import RoundRunner

    from edgehmoe.core.hierarchy import Hierarchy
    from edgehmoe.fl.mqtt import Topics

    # Prepare: 1,000 hellos from one device over 100 s (one every 0.1 s), through the handler
    clock = FakeClock()
    fake = FakeTransport(clock, "t-rounds", lambda d, t: [])
    reg = DeviceRegistry(6, clock)
    tree = Hierarchy([-1, 0, 0, 1, 1, 1, 2, 2, 2], [str(i) for i in range(9)], [-1, -1, -1, 0, 1, 2, 3, 4, 5])
    runner = RoundRunner(fake, Topics("t-rounds"), reg, tree, clock=clock)
    caplog.set_level(logging.INFO, logger="edgehmoe.server")
    # Execute
    for i in range(1000):
        clock.t = T0 + i * 0.1
        runner.handle(*fake.hello("chatty"))
    # Assert: one line at t = 0 s and one at t = 60 s saying how many were not logged
    lines = [r.getMessage() for r in caplog.records]
    assert lines == ["device chatty joined: 60 samples, budget 0 MB, fake",
                     "device chatty re-announced: 60 samples, budget 0 MB, fake "
                     "(599 more hello(s) from it in the last 60 s not logged)"]
    assert reg.devices["chatty"].last_seen == pytest.approx(T0 + 99.9)
