"""End-to-end federated rounds over a real Mosquitto with real ``edgehmoe-client`` processes.

Each test starts its own broker (auth + ACL) on a free loopback port, writes device shards of
a small synthetic dataset, launches client subprocesses and runs the aggregation server
(in-process, or as ``python -m server`` for the crash/resume test).
"""

from __future__ import annotations

import json
import logging
import secrets
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import require_tool

pytestmark = pytest.mark.slow

DATASET = "synthetic:coarse=2,fine=3,per_class=40,test_per_class=10,size=16,seed=3"


class Federation:
    def __init__(self, tmp: Path, n_clients: int, extra_users=()):
        require_tool("mosquitto")
        from edgehmoe.server.broker import MosquittoBroker

        from edgehmoe.data import load_dataset
        from edgehmoe.data.partition import IidPartitioner, write_shards

        self.tmp = tmp
        self.devices = [f"dev-{i}" for i in range(n_clients)]
        self.passwords = {u: secrets.token_urlsafe(10) for u in ["edgehmoe-server", *self.devices, *extra_users]}
        self.broker = MosquittoBroker(run_dir=tmp / "broker")
        for u, pw in self.passwords.items():
            self.broker.add_user(u, pw)
        self.broker.start()
        self.pwfiles = {}
        for u, pw in self.passwords.items():
            f = tmp / f"{u}.pw"
            f.write_text(pw)
            self.pwfiles[u] = f
        train = load_dataset(DATASET, "train")
        self.shards = write_shards(train, IidPartitioner(n_clients, seed=0), tmp / "shards")
        self.procs: dict[str, subprocess.Popen] = {}

    def config(self, run: str, kind: str = "hmoe", rounds: int = 3, **schedule):
        from edgehmoe.server.config import RunConfig

        cfg = RunConfig()
        cfg.run.name, cfg.run.out, cfg.run.dataset = run, str(self.tmp / run), DATASET
        cfg.broker.url, cfg.broker.username = self.broker.url, "edgehmoe-server"
        cfg.broker.password_file = str(self.pwfiles["edgehmoe-server"])
        cfg.model.kind = kind
        cfg.schedule.rounds = rounds
        cfg.schedule.min_devices = len(self.devices)
        cfg.schedule.round_timeout_s = schedule.pop("round_timeout_s", 60.0)
        cfg.schedule.wait_for_devices_s = 180.0  # a ceiling: client start-up (torch import) is slow on a loaded machine
        for k, v in schedule.items():
            setattr(cfg.schedule, k, v)
        cfg.train.batch_size = 16
        cfg.eval.every = 2
        return cfg.validate()

    def start_clients(self, run: str, devices=None, extra_args=()):
        for dev in devices or self.devices:
            shard = self.shards[self.devices.index(dev)]
            log = open(self.tmp / f"{dev}-{run}.log", "ab")
            cmd = [sys.executable, "-m", "edgehmoe.cli.client", "--broker", self.broker.url, "--device-id", dev,
                   "--data", str(shard), "--run", run, "--username", dev, "--password-file", str(self.pwfiles[dev]),
                   "--threads", "1", "--state-dir", str(self.tmp / "state" / dev), *extra_args]
            self.procs[dev] = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)

    def stop(self):
        for p in self.procs.values():
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in self.procs.values():
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()
        self.broker.close()


@pytest.fixture
def fed(tmp_path):
    feds = []

    def make(n, extra_users=()):
        f = Federation(tmp_path, n, extra_users)
        feds.append(f)
        return f

    yield make
    for f in feds:
        f.stop()


def rows_of(run_dir: Path) -> list[dict]:
    return [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines() if ln.strip()]


def evaluate_cli(run_dir: Path, cfg) -> dict:
    """``edgehmoe evaluate --model-dir RUN --split val --json`` on the run's dataset and val split."""
    r = subprocess.run([sys.executable, "-m", "edgehmoe.cli", "-q", "evaluate", "--model-dir", str(run_dir),
                        "--dataset", cfg.run.dataset, "--split", "val", "--val-fraction", str(cfg.run.val_fraction),
                        "--seed", str(cfg.run.seed), "--json"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout)


@pytest.mark.parametrize("kind, mode", [("hmoe", "paper"), ("hmoe", "parallel"), ("flat", "paper")])
def test_federated_rounds_end_to_end(fed, kind, mode):
    from edgehmoe.server.app import AggregationServer
    from edgehmoe.server.scheduler import Scheduler

    from edgehmoe.data.partition import load_shard

    # Prepare
    f = fed(3)
    cfg = f.config(f"t-{kind}-{mode}", kind=kind, rounds=4, mode=mode)
    counts = {dev: load_shard(shard).class_counts() for dev, shard in zip(f.devices, f.shards)}
    f.start_clients(cfg.run.name)
    # Execute
    server = AggregationServer(cfg)
    rows = server.run()
    # Assert
    out = Path(cfg.run.out)
    assert rows_of(out) == rows and [r["round"] for r in rows] == [0, 1, 2, 3]
    state = json.loads((out / "state.json").read_text())
    assert state["round"] == 4 and sorted(d["device_id"] for d in state["devices"]) == f.devices
    # every device trains on exactly its samples under the node (the FedAvg weight)
    under = Scheduler(server.tree, kind).samples_under
    for r in rows:
        assert r["devices_answered"] == r["devices_asked"] == 3
        assert r["outcomes"] == {dev: "ok" for dev in f.devices}
        for d in r["per_device"]:
            assert d["num_examples"] == under(d["node"], counts[d["device"]])
            assert d["round_time_ms"] > 0 and d["peak_rss_mb"] > 0
    if mode == "parallel":  # several experts advance in one round
        assert any(len(r["updated"]) > 1 for r in rows)
    # eval.every = 2: HMoE validates after rounds 2 and 4; a flat run this short (4 rounds, fewer
    # than evalplan.MIN_FLAT_POINTS) validates after every round
    expected = [True] * 4 if kind == "flat" else [False, True, False, True]
    assert ["val_info_f1" in r for r in rows] == expected
    # The last row scores the weights it committed: the run directory, evaluated from outside
    # on the same val split, gives the same info-F1 and top-1.
    m = evaluate_cli(out, cfg)
    assert m["model"] == kind and m["num_examples"] == len(server.val)
    assert rows[-1]["val_info_f1"] == pytest.approx(m["info_f1"], abs=1e-6)
    assert rows[-1]["val_top1"] == pytest.approx(m["top1"], abs=1e-6)


def _fake_device(url, user, password, run, class_counts, reply, stop: threading.Event, seen: list):
    """A device that announces itself and answers every task with ``reply(task)`` bytes."""
    from edgehmoe.fl import wire
    from edgehmoe.fl.mqtt import MqttConnection, Topics

    topics = Topics(run)
    conn = MqttConnection.from_url(url, client_id=user, username=user, password=password)
    conn.connect(timeout=10)
    conn.subscribe(topics.task(user))
    conn.publish(topics.hello(user), wire.encode(wire.Hello(user, "0", wire.PROTOCOL_VERSION, 1000.0, 0.0, 1, "fake",
                                                            class_counts)), retain=True)
    try:
        while not stop.is_set():
            try:
                _, payload = conn.receive(timeout=0.2)
            except TimeoutError:
                continue
            task = wire.decode(payload)
            seen.append((task.round, task.node, task.epochs))
            body = reply(task)
            if body is not None:
                conn.publish(topics.result(user), body)
    finally:
        conn.close()


def test_bad_updates_and_stragglers_are_dropped_and_the_run_goes_on(fed, caplog):
    from edgehmoe.server.app import AggregationServer

    from edgehmoe.data.partition import load_shard
    from edgehmoe.fl import wire

    # Prepare: 2 real clients, a device sending garbage, one sending NaN weights, one never answering
    f = fed(2, extra_users=("evil-garbage", "evil-nan", "zombie"))
    cfg = f.config("t-bad", rounds=2, round_timeout_s=6.0)
    cfg.schedule.min_devices = 5
    cfg.train.expert_epochs = 2  # non-root experts train 2 local epochs, the root 1
    counts = load_shard(f.shards[0]).class_counts()

    def nan_reply(task):
        # A well-formed result whose weights are NaN. The encoder refuses NaN, so encode finite
        # weights and rebuild the same payload (same metadata) with NaN tensors.
        import struct

        from safetensors.numpy import save

        ok = wire.encode(wire.TrainResult(task.run, task.round, task.task_id, "evil-nan", task.node,
                                          task.weights, 10, 1.0, 1.0, 1.0, 0.5))
        (n,) = struct.unpack("<Q", ok[:8])
        meta = json.loads(ok[8 : 8 + n])["__metadata__"]
        bad = {f"w/{k}": (np.full_like(v, np.nan) if v.dtype.kind == "f" else v) for k, v in task.weights.items()}
        return save(bad, metadata=meta)

    stop = threading.Event()
    seen = {k: [] for k in ("evil-garbage", "evil-nan", "zombie")}
    replies = {"evil-garbage": lambda t: b"\x00garbage" * 50, "evil-nan": nan_reply, "zombie": lambda t: None}
    threads = [threading.Thread(target=_fake_device, daemon=True,
                                args=(f.broker.url, u, f.passwords[u], cfg.run.name, counts, replies[u], stop, seen[u]))
               for u in replies]
    for t in threads:
        t.start()
    f.start_clients(cfg.run.name)
    # Execute
    caplog.set_level(logging.WARNING)
    t0 = time.monotonic()
    try:
        rows = AggregationServer(cfg).run()
    finally:
        stop.set()
    # Assert: both rounds completed at the deadline, with only the two honest updates
    assert [r["round"] for r in rows] == [0, 1]
    for r in rows:
        assert r["devices_asked"] == 5 and r["devices_answered"] == 2
        assert r["outcomes"] == {"dev-0": "ok", "dev-1": "ok", "evil-garbage": "invalid", "evil-nan": "invalid",
                                 "zombie": "timeout"}
        assert sorted(r["rejected"]) == ["evil-garbage", "evil-nan"]
        assert r["rejected"]["evil-nan"].startswith("undecodable result: TrainResult: tensor 'w/")
        assert r["rejected"]["evil-nan"].endswith("contains NaN or inf")
        assert r["rejected"]["evil-garbage"].startswith("undecodable result: ")
        assert sorted(d["device"] for d in r["per_device"]) == ["dev-0", "dev-1"]
    assert time.monotonic() - t0 >= 2 * 6.0  # each round waited for the straggler until its deadline
    # round 0 trains the root (1 epoch), round 1 a superclass expert (expert_epochs = 2)
    assert all([(r, n > 0, e) for r, n, e in seen[u]] == [(0, False, 1), (1, True, 2)] for u in seen), seen
    text = caplog.text
    assert "dropped bad result payload from evil-garbage" in text
    assert "dropped bad result payload from evil-nan" in text
    assert "zombie did not answer before the deadline" in text
    state = json.loads((Path(cfg.run.out) / "state.json").read_text())
    assert state["round"] == 2


def on_busy(f: Federation, run: str, device: str, rnd: int, action) -> threading.Thread:
    """Run ``action()`` (once, in a thread) as soon as ``device`` reports "busy" in round ``rnd``."""
    from edgehmoe.fl import wire
    from edgehmoe.fl.mqtt import MqttConnection, Topics

    # The read-only monitor account: a second login as the server would take over its
    # session (client ids are user names, issue #10).
    conn = MqttConnection.from_url(f.broker.url, client_id="watcher", username="edgehmoe-monitor",
                                   password=f.passwords["edgehmoe-monitor"])
    conn.connect(timeout=10)
    conn.subscribe(Topics(run).status(device))

    def watch():
        try:
            while True:
                try:
                    _, p = conn.receive(timeout=0.5)
                except TimeoutError:
                    continue
                s = wire.decode(p)
                if s.state == "busy" and s.round == rnd:
                    action()
                    return
        finally:
            conn.close()

    t = threading.Thread(target=watch, daemon=True)
    t.start()
    return t


def test_client_killed_mid_round_round_completes_without_it(fed):
    from edgehmoe.server.app import AggregationServer

    # Prepare
    f = fed(3, extra_users=("edgehmoe-monitor",))
    # the victim's will ends its task after the grace (it does not come back)
    cfg = f.config("t-kill", rounds=4, round_timeout_s=30.0, offline_grace_s=3.0)
    # Rounds end when the last device answers; with 1 epoch one took ~60 ms, shorter than the
    # watcher's reaction, so the kill landed in a later round. 40 epochs keep a round busy ~1 s.
    cfg.train.epochs = 40
    f.start_clients(cfg.run.name)
    victim = "dev-2"
    killed = threading.Event()

    def kill():
        f.procs[victim].kill()
        killed.set()

    on_busy(f, cfg.run.name, victim, 1, kill)
    # Execute
    rows = AggregationServer(cfg).run()
    # Assert
    assert killed.is_set()
    assert [r["round"] for r in rows] == [0, 1, 2, 3]
    # The victim's last round is 1 (killed while training) or, if its result left just before
    # the kill, the round after; from then on it is not asked, and its round still completes.
    last = max(r["round"] for r in rows if victim in r["outcomes"])
    assert last in (1, 2), [r["outcomes"] for r in rows]
    assert rows[last]["outcomes"][victim] == "offline" or (last == 1 and rows[1]["outcomes"][victim] == "ok")
    assert rows[last]["devices_answered"] >= 2
    for r in rows[last + 1:]:
        assert r["devices_asked"] == 2 and victim not in r["outcomes"], r
    assert any(victim not in r["outcomes"] for r in rows[2:])
    state = json.loads((Path(cfg.run.out) / "state.json").read_text())
    assert state["round"] == 4
    assert not [d for d in state["devices"] if d["device_id"] == victim][0]["online"]


def test_client_stopped_on_purpose_is_not_waited_for(fed, caplog):
    from edgehmoe.server.app import AggregationServer

    # Prepare: a generous grace; the victim's edgehmoe-client is stopped (SIGTERM) while it trains
    # round 1: it finishes that task, says it stopped, and exits. The server must not keep waiting
    # for it to reconnect (as it would for a lost connection).
    f = fed(3, extra_users=("edgehmoe-monitor",))
    cfg = f.config("t-stop", rounds=4, round_timeout_s=60.0, offline_grace_s=60.0)
    cfg.train.epochs = 40  # a round stays busy ~1 s, long enough for the signal to land inside it
    f.start_clients(cfg.run.name)
    victim = "dev-2"
    watcher = on_busy(f, cfg.run.name, victim, 1, lambda: f.procs[victim].send_signal(signal.SIGTERM))
    caplog.set_level(logging.INFO)
    # Execute
    rows = AggregationServer(cfg).run()
    # Assert: its last task was answered; later rounds went on without it and without a wait
    watcher.join(timeout=30)
    assert f.procs[victim].wait(timeout=30) == 0
    assert [r["round"] for r in rows] == [0, 1, 2, 3]
    last = max(r["round"] for r in rows if victim in r["outcomes"])
    assert last in (1, 2) and rows[last]["outcomes"][victim] == "ok", [r["outcomes"] for r in rows]
    assert all(victim not in r["outcomes"] and r["devices_answered"] == 2 for r in rows[last + 1:])
    assert "waiting for dev-2 to reconnect" not in caplog.text
    assert "device dev-2 stopped" in caplog.text and "device dev-2 went offline" not in caplog.text


def test_server_killed_and_resumed_loses_and_repeats_no_round(fed, tmp_path):
    from edgehmoe.server.config import dump_config

    # Prepare
    f = fed(2)
    cfg = f.config("t-resume", rounds=6)
    cfg_path = tmp_path / "run.toml"
    cfg_path.write_text(dump_config(cfg))
    f.start_clients(cfg.run.name)
    out = Path(cfg.run.out)
    server_log = open(tmp_path / "server.log", "ab")
    cmd = [sys.executable, "-m", "server", "-v", "run", "--config", str(cfg_path)]
    # Execute: kill -9 the server once round 2 is committed, then resume
    proc = subprocess.Popen(cmd, stdout=server_log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        st = out / "state.json"
        if st.exists() and json.loads(st.read_text())["round"] >= 2:
            break
        assert proc.poll() is None, (tmp_path / "server.log").read_text()[-3000:]
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = json.loads((out / "state.json").read_text())["round"]
    # a second start without --resume refuses to touch the run directory
    again = subprocess.run(cmd, capture_output=True, text=True)
    assert again.returncode == 2 and "--resume" in again.stderr
    resumed = subprocess.run(cmd + ["--resume"], stdout=server_log, stderr=subprocess.STDOUT, timeout=300)
    # Assert
    assert resumed.returncode == 0, (tmp_path / "server.log").read_text()[-3000:]
    rounds = [r["round"] for r in rows_of(out)]
    assert rounds == list(range(6)), rounds
    assert json.loads((out / "state.json").read_text())["round"] == 6
    assert 2 <= killed_at < 6
    # only the committed weight files remain
    files = set(json.loads((out / "state.json").read_text())["files"].values())
    assert {f"experts/{p.name}" for p in (out / "experts").glob("*.safetensors")} == files


def test_device_cannot_publish_on_another_devices_topic(fed):
    from edgehmoe.fl import wire
    from edgehmoe.fl.mqtt import MqttConnection, PublishRefused, Topics

    f = fed(2)
    topics = Topics("t-acl")
    server = MqttConnection.from_url(f.broker.url, client_id="srv", username="edgehmoe-server",
                                     password=f.passwords["edgehmoe-server"])
    server.connect(timeout=10)
    server.subscribe(topics.result_filter())
    dev = MqttConnection.from_url(f.broker.url, client_id="dev-0", username="dev-0", password=f.passwords["dev-0"])
    dev.connect(timeout=10)
    body = wire.encode(wire.Status("dev-1", "idle", -1, "spoof"))
    try:
        with pytest.raises(PublishRefused):
            dev.publish(topics.result("dev-1"), body, timeout=10)
        dev.publish(topics.result("dev-0"), wire.encode(wire.Status("dev-0", "idle", -1, "")), timeout=10)
        topic, _ = server.receive(timeout=10)
        assert topic == topics.result("dev-0")
        with pytest.raises(TimeoutError):
            server.receive(timeout=1.0)
    finally:
        dev.close()
        server.close()


def test_run_survives_a_broker_restart(fed):
    from edgehmoe.server.app import AggregationServer

    # Prepare
    f = fed(2)
    cfg = f.config("t-restart", rounds=4)
    f.start_clients(cfg.run.name)
    restarted = []

    def progress(r, total, row):
        if r == 2 and not restarted:  # between rounds 2 and 3 the broker goes away for a moment
            f.broker.restart(downtime=1.0)
            restarted.append(r)

    # Execute
    rows = AggregationServer(cfg, progress=progress).run()
    # Assert: clients and server reconnected by themselves; no round lost
    assert restarted == [2]
    assert [r["round"] for r in rows] == [0, 1, 2, 3]
    assert all(r["devices_answered"] == 2 for r in rows)
    assert all(p.poll() is None for p in f.procs.values())  # the clients kept running


def test_broker_restart_mid_round_loses_no_device(fed, caplog):
    from edgehmoe.server.app import AggregationServer

    # Prepare: the broker restarts while the devices train round 1 (no persistence: the broker
    # forgets every session and message). Each device's will arrives, each reconnects.
    f = fed(2, extra_users=("edgehmoe-monitor",))
    cfg = f.config("t-restart-mid", rounds=3, round_timeout_s=60.0)
    cfg.train.epochs = 40  # a round stays busy ~1 s, long enough to restart the broker inside it
    f.start_clients(cfg.run.name)
    restarted = threading.Event()

    def restart():
        f.broker.restart(downtime=1.0)
        restarted.set()

    watcher = on_busy(f, cfg.run.name, "dev-0", 1, restart)
    caplog.set_level(logging.INFO)
    # Execute
    rows = AggregationServer(cfg).run()
    # Assert: the round the broker went away in still has both devices' results
    watcher.join(timeout=30)
    assert restarted.is_set()
    assert [r["round"] for r in rows] == [0, 1, 2]
    assert [r["outcomes"] for r in rows] == [{"dev-0": "ok", "dev-1": "ok"}] * 3, [r["reasons"] for r in rows]
    assert "round repeated" not in caplog.text  # nobody's training was thrown away
    assert all(p.poll() is None for p in f.procs.values())


def test_client_refuses_a_task_over_its_memory_budget(fed):
    from edgehmoe.fl import wire
    from edgehmoe.fl.mqtt import MqttConnection, Topics
    from edgehmoe.model.arch import ArchSpec, build_model
    from edgehmoe.model.training import state_arrays

    # Prepare: a client with a 20 MB budget, and a task for a wide network
    f = fed(1)
    run = "t-budget"
    f.start_clients(run, extra_args=("--memory-budget-mb", "20"))
    topics = Topics(run)
    srv = MqttConnection.from_url(f.broker.url, client_id="srv-budget", username="edgehmoe-server",
                                  password=f.passwords["edgehmoe-server"])
    srv.connect(timeout=10)
    srv.subscribe(topics.status_filter())
    spec = ArchSpec(64, 6, input_size=16)
    task = wire.TrainTask(run=run, round=0, task_id="big-1", node=-1, arch=spec.to_dict(),
                          label_map=np.arange(6, dtype=np.int64), weights=state_arrays(build_model(spec)),
                          epochs=1, batch_size=256, lr=0.01, momentum=0.9, weight_decay=0.0,
                          deadline_unix=time.time() + 60, seed=0, preprocess={"mean": [0.5] * 3, "std": [0.25] * 3})
    # wait until the client is up (its retained "idle" status), then send the task
    deadline = time.monotonic() + 60
    states = []
    try:
        while time.monotonic() < deadline:
            try:
                _, p = srv.receive(timeout=1)
            except TimeoutError:
                continue
            s = wire.decode(p)
            states.append((s.state, s.detail))
            if s.state == "idle" and len(states) == 1:
                srv.publish(topics.task("dev-0"), wire.encode(task))
            if s.state == "refused":
                break
    finally:
        srv.close()
    # Assert
    assert states[-1][0] == "refused", states
    assert "memory budget is 20 MB" in states[-1][1]
    assert f.procs["dev-0"].poll() is None  # refused, not killed
