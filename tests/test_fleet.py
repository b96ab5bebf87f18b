"""The device-fleet emulator (edgehmoe.fl.fleet, ``edgehmoe-fleet``) and the orchestration bench.

The emulator's updates must pass the server's real validation, its hellos must announce real
partition counts, its faults must show up in the server's rows exactly as scripted, and it must
run without torch. The bench's statistics are pure functions checked on rows worked out by hand.
"""

from __future__ import annotations

import json
import secrets
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from conftest import require_tool

from edgehmoe.fl import wire
from edgehmoe.fl.fleet import (
    DEFAULT_FAULTS,
    FaultPlan,
    class_counts_for,
    derive_update,
    device_ids,
    parse_faults,
)

REPO = Path(__file__).resolve().parents[1]
DATASET = "synthetic:coarse=2,fine=3,per_class=40,test_per_class=10,size=16,seed=3"


# ---------------------------------------------------------------------- pure parts
def test_device_ids_are_padded_and_sort_by_index():
    assert device_ids(3) == ["dev-0000", "dev-0001", "dev-0002"]
    ids = device_ids(12345, "pi-")
    assert ids[0] == "pi-00000" and ids[-1] == "pi-12344" and sorted(ids) == ids


def test_parse_faults():
    assert parse_faults("late=0.25, drop=0.5") == {"late": 0.25, "drop": 0.5}
    assert parse_faults("default") == DEFAULT_FAULTS and parse_faults("none") == {}
    for bad in ("slow=0.1", "late", "late=x", "late=1.5", "late=0.6,drop=0.6"):
        with pytest.raises(ValueError):
            parse_faults(bad)


def test_fault_plan_picks_churners_and_is_deterministic():
    plan = FaultPlan(num_devices=200, churn=0.1, rates={"late": 0.5, "drop": 0.5}, seed=7)
    churners = plan.churners
    assert len(churners) == 20
    assert FaultPlan(num_devices=200, churn=0.1, rates={"late": 0.5}, seed=7).churners == churners
    calm = next(i for i in range(200) if i not in churners)
    assert {plan.action(calm, f"r{k}-x") for k in range(50)} == {"ok"}
    wild = min(churners)
    actions = [plan.action(wild, f"r{k}-task") for k in range(400)]
    assert actions == [plan.action(wild, f"r{k}-task") for k in range(400)]  # same seed, same choices
    assert set(actions) == {"late", "drop"}  # rates add up to 1: never a normal answer
    assert 150 < actions.count("late") < 250
    half = FaultPlan(num_devices=10, churn=1.0, rates={"garbage": 0.3}, seed=1)
    share = np.mean([half.action(3, f"t{k}") == "garbage" for k in range(2000)])
    assert 0.26 < share < 0.34


def test_derive_update_is_a_small_perturbation_in_the_tasks_dtypes():
    from edgehmoe.fl.aggregation import validate_update

    rng = np.random.default_rng(0)
    w = {"conv.weight": rng.standard_normal((16, 3, 3, 3)).astype(np.float32),
         "fc.bias": np.zeros(5, np.float32),
         "half": rng.standard_normal(7).astype(np.float16),
         "bn.num_batches_tracked": np.array(12, np.int64)}
    u = derive_update(w, key=123, rel=1e-3)
    validate_update(u, w, 10)
    assert {k: v.dtype for k, v in u.items()} == {k: v.dtype for k, v in w.items()}
    rel = np.linalg.norm(u["conv.weight"] - w["conv.weight"]) / np.linalg.norm(w["conv.weight"])
    assert 0.8e-3 < rel < 1.2e-3
    assert np.array_equal(u["fc.bias"], w["fc.bias"])  # zero weights stay zero (rms 0)
    assert u["bn.num_batches_tracked"] == 12
    again, other = derive_update(w, key=123, rel=1e-3), derive_update(w, key=124, rel=1e-3)
    assert np.array_equal(again["conv.weight"], u["conv.weight"])
    assert not np.array_equal(other["conv.weight"], u["conv.weight"])
    big = {"w": rng.standard_normal(3_000_000).astype(np.float32)}  # larger than the noise buffer
    d = derive_update(big, key=2**20 - 5)["w"] - big["w"]
    assert 0.9e-3 < np.linalg.norm(d) / np.linalg.norm(big["w"]) < 1.1e-3


def test_class_counts_partition_the_train_labels():
    # Prepare: the server holds out val_fraction of every class; the devices split the rest
    from edgehmoe.data import load_dataset

    train = load_dataset(DATASET, "train", val_fraction=0.1, seed=0)
    # Execute
    counts = class_counts_for(4, dataset=DATASET, partition="iid", val_fraction=0.1, seed=0)
    skewed = class_counts_for(4, dataset=DATASET, partition="dirichlet:0.1", val_fraction=0.1, seed=0)
    synthetic = class_counts_for(3, classes=10, samples=25)
    # Assert
    assert counts.shape == (4, 6) and counts.dtype == np.int64
    assert np.array_equal(counts.sum(0), train.class_counts())  # 36 per class
    assert counts.sum(1).tolist() == [54, 54, 54, 54]
    assert np.array_equal(skewed.sum(0), train.class_counts()) and skewed.max() > 30
    assert synthetic.shape == (3, 10) and synthetic.sum() == 75 and synthetic.sum(1).tolist() == [25, 25, 25]


def test_round_stats_by_hand():
    from edgehmoe.server.bench import round_stats

    def row(t, times):
        return {"time_unix": t, "per_device": [{"round_time_ms": x} for x in times], "aggregation_ms": 2.0}

    # commits at 0, 1.0, 2.5, 4.0 and 10.0 s (the last one evaluates: left out)
    rows = [row(0.0, [50]), row(1.0, [50, 400]), row(2.5, [600]), row(4.0, [100]), row(10.0, [50])]
    st = round_stats(rows)
    # walls of rounds 1..3: 1000, 1500, 1500 ms; minus the slowest device: 600, 900, 1400
    assert st["round_samples"] == 3
    assert st["median_round_ms"] == pytest.approx(1500.0)
    assert st["p95_round_ms"] == pytest.approx(1500.0)
    assert st["overhead_ms"] == pytest.approx(900.0)
    assert st["overhead_p95_ms"] == pytest.approx(900 + 0.9 * 500)


def test_verify_soak_finds_double_counts_late_devices_and_missed_answers(tmp_path):
    from edgehmoe.server.bench import verify_soak

    # Prepare: round 0 attempted twice (deadlines 110 and 130, timeout 10): the second one committed
    ev = [
        {"t": 101, "device": "a", "round": 0, "task": "x1", "action": "ok", "n": 5, "deadline": 110, "sent": 101},
        {"t": 121, "device": "a", "round": 0, "task": "x2", "action": "ok", "n": 5, "deadline": 130, "sent": 121},
        {"t": 121, "device": "b", "round": 0, "task": "x3", "action": "dup", "n": 7, "deadline": 130, "sent": 121},
        {"t": 131, "device": "c", "round": 0, "task": "x4", "action": "late", "n": 9, "deadline": 130, "sent": 131},
        {"t": 122, "device": "d", "round": 0, "task": "x5", "action": "ok", "n": 3, "deadline": 130, "sent": 122},
    ]
    (tmp_path / "ev.jsonl").write_text("".join(json.dumps(e) + "\n" for e in ev))

    def row(outcomes, per):
        return {"round": 0, "time_unix": 131.0, "outcomes": outcomes, "devices_answered": len(per),
                "per_device": [{"device": d, "num_examples": n} for d, n in per]}

    good = row({"a": "ok", "b": "ok", "c": "timeout", "d": "ok"}, [("a", 5), ("b", 7), ("d", 3)])
    twice = row({"a": "ok", "b": "ok", "c": "timeout", "d": "ok"}, [("a", 5), ("b", 7), ("b", 7), ("d", 3)])
    late = row({"a": "ok", "b": "ok", "c": "ok", "d": "ok"}, [("a", 5), ("b", 7), ("c", 9), ("d", 3)])
    missed = row({"a": "ok", "b": "ok", "c": "timeout", "d": "timeout"}, [("a", 5), ("b", 7)])
    # Execute / Assert
    assert verify_soak([good], tmp_path / "ev.jsonl", timeout_s=10) == ([], 1, 0)
    assert any("counted twice" in p for p in verify_soak([twice], tmp_path / "ev.jsonl", timeout_s=10)[0])
    assert any("did not answer in time: ['c']" in p for p in verify_soak([late], tmp_path / "ev.jsonl", timeout_s=10)[0])
    probs = verify_soak([missed], tmp_path / "ev.jsonl", timeout_s=10)[0]
    assert probs == ["round 0: answered in time but not counted: {'d': 'timeout'}"]
    # a round next to a server kill is only checked one way
    assert verify_soak([missed], tmp_path / "ev.jsonl", timeout_s=10, disturbed=[125.0]) == ([], 0, 1)


# ---------------------------------------------------------------------- with a broker
class Broker:
    def __init__(self, tmp: Path, users: list[str]):
        require_tool("mosquitto")
        from edgehmoe.server.broker import MosquittoBroker

        self.passwords = {u: secrets.token_urlsafe(10) for u in users}
        self.creds = tmp / "creds"
        self.creds.mkdir()
        self.broker = MosquittoBroker(run_dir=tmp / "broker", persistence=tmp / "db")
        for u, pw in self.passwords.items():
            self.broker.add_user(u, pw)
            (self.creds / f"{u}.password").write_text(pw)
        self.broker.start()


@pytest.fixture
def broker(tmp_path):
    made = []

    def make(users):
        b = Broker(tmp_path, users)
        made.append(b)
        return b

    yield make
    for b in made:
        b.broker.close()


_BLOCK_TORCH = textwrap.dedent(
    """
    import importlib.abc, json, sys
    BLOCKED = {"torch", "torchvision", "onnx", "onnxscript", "onnxruntime"}

    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                raise ModuleNotFoundError(f"No module named {name!r} (blocked by the test)")
            return None

    sys.meta_path.insert(0, Block())
    """
)


def test_fleet_cli_without_torch_answers_tasks_that_pass_validation(broker, tmp_path):
    """Three virtual devices from ``edgehmoe-fleet`` (torch unimportable) against a scripted server."""
    from edgehmoe.fl.aggregation import validate_update
    from edgehmoe.fl.mqtt import MqttConnection, Topics

    # Prepare
    ids = device_ids(3)
    b = broker(["edgehmoe-server", *ids])
    run = "t-fleet"
    stats = tmp_path / "stats.json"
    argv = ["--broker", b.broker.url, "--run", run, "--devices", "3", "--password-dir", str(b.creds),
            "--dataset", DATASET, "--train-ms", "300", "--stats", str(stats), "--duration", "60", "-q"]
    script = _BLOCK_TORCH + textwrap.dedent(f"""
        from edgehmoe.cli.fleet import main
        rc = main({argv!r})
        loaded = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
        print(json.dumps({{"rc": rc, "blocked_modules_loaded": loaded}}))
    """)
    counts = dict(zip(ids, class_counts_for(3, dataset=DATASET)))
    topics = Topics(run)
    srv = MqttConnection.from_url(b.broker.url, client_id="edgehmoe-server", username="edgehmoe-server",
                                  password=b.passwords["edgehmoe-server"])
    srv.connect(timeout=10)
    for f in topics.server_filters():
        srv.subscribe(f)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    rng = np.random.default_rng(1)
    weights = {"features.0.weight": rng.standard_normal((8, 3, 3, 3)).astype(np.float32),
               "features.0.bias": rng.standard_normal(8).astype(np.float32),
               "bn.num_batches_tracked": np.array(3, np.int64)}
    label_map = np.array([0, 1, 2, -1, -1, -1], np.int64)  # an expert over classes 0-2
    hellos, results, states = {}, {}, []
    try:
        # Execute: wait for the hellos, send one task to each device, collect the results
        deadline = time.monotonic() + 90
        sent = False
        while time.monotonic() < deadline and not (len(results) == 3 and sum(
                1 for d in ids if [s for dd, s in states if dd == d][-1:] == ["idle"]) == 3):
            try:
                topic, payload = srv.receive(timeout=1)
            except TimeoutError:
                assert proc.poll() is None, proc.communicate()
                continue
            dev, kind = topics.parse(topic)
            msg = wire.decode(payload)
            if kind == "hello":
                hellos[dev] = msg
            elif kind == "status":
                states.append((dev, msg.state))
            elif kind == "result":
                results[dev] = msg
                states.append((dev, "result"))
            if len(hellos) == 3 and not sent:
                for i, d in enumerate(ids):
                    task = wire.TrainTask(run, 0, f"r0-task{i}", 1, {"kind": "expert"}, label_map, weights, 1, 8,
                                          0.1, 0.9, 0.0, time.time() + 60, i, {})
                    srv.publish(topics.task(d), wire.encode(task))
                sent, t_sent = True, time.monotonic()
        elapsed = time.monotonic() - t_sent
    finally:
        srv.close()
        proc.terminate()
        out, err = proc.communicate(timeout=60)
    # Assert
    final = json.loads(out.strip().splitlines()[-1])
    assert final == {"rc": 0, "blocked_modules_loaded": []}, err[-2000:]
    assert sorted(hellos) == ids
    for d in ids:
        h = hellos[d]
        assert np.array_equal(h.class_counts, counts[d]) and h.platform == "edgehmoe-fleet virtual device"
        r = results[d]
        assert (r.run, r.round, r.node, r.device_id) == (run, 0, 1, d)
        assert r.num_examples == int(counts[d][:3].sum())  # its samples under the node
        validate_update(r.weights, weights, r.num_examples)
        assert r.weights["features.0.weight"].dtype == np.float32
        assert int(r.weights["bn.num_batches_tracked"]) == 3
        ratio = np.linalg.norm(r.weights["features.0.weight"] - weights["features.0.weight"]) / np.linalg.norm(
            weights["features.0.weight"])
        assert 0.5e-3 < ratio < 2e-3
        assert r.round_time_ms >= 300.0  # the emulated training time, measured from the task's arrival
        assert [s for dd, s in states if dd == d][-3:] == ["busy", "result", "idle"]
    assert elapsed >= 0.3
    st = json.loads(stats.read_text())
    assert st["tasks"] == 3 and st["action_ok"] == 3 and st["messages_in"] == 3
    # 3 hellos + 3 idle at connect, then busy, result, idle and the final offline per device
    assert st["messages_out"] == 3 * 6
    assert st["bytes_in"] > 3 * len(wire.encode(task)) - 100


@dataclass(frozen=True)
class Scripted(FaultPlan):
    """Device i does ``script[i]`` in round 0 and answers normally afterwards."""

    script: tuple = ()

    def action(self, index: int, task_id: str) -> str:
        return self.script[index] if task_id.startswith("r0-") else "ok"


@pytest.mark.slow
def test_faults_show_up_in_the_servers_rows(broker, tmp_path):
    from edgehmoe.server.app import AggregationServer
    from edgehmoe.server.config import RunConfig

    from edgehmoe.fl.fleet import DeviceSpec, Fleet

    # Prepare: six virtual devices, one per behaviour, against the real server
    script = ("ok", "dup", "garbage", "late", "drop", "leave")
    ids = device_ids(len(script))
    b = broker(["edgehmoe-server", *ids])
    counts = class_counts_for(len(ids), dataset=DATASET)
    specs = [DeviceSpec(i, d, b.passwords[d], counts[i]) for i, d in enumerate(ids)]
    events = tmp_path / "events.jsonl"
    fleet = Fleet(b.broker.url, "t-faults", specs, train_ms=100, events=events,
                  faults=Scripted(num_devices=6, seed=0, late_s=0.5, away_s=0.5, script=script))
    cfg = RunConfig()
    cfg.run.name, cfg.run.out, cfg.run.dataset = "t-faults", str(tmp_path / "run"), DATASET
    cfg.broker.url, cfg.broker.username = b.broker.url, "edgehmoe-server"
    cfg.broker.password_file = str(b.creds / "edgehmoe-server.password")
    cfg.model.kind = "flat"
    cfg.schedule.rounds, cfg.schedule.min_devices = 2, 6
    cfg.schedule.round_timeout_s, cfg.schedule.wait_for_devices_s = 6.0, 60.0
    cfg.eval.every = 0
    fleet.start()
    # Execute
    try:
        rows = AggregationServer(cfg.validate()).run()
    finally:
        fleet.close()
    # Assert: round 0 as scripted; in round 1 the dropped and departed devices are back
    r0, r1 = rows
    # The dropped device came back within schedule.offline_grace_s: the server sent it its task
    # again, and as it did not answer (the emulated fault), it missed the deadline. The departed
    # device stopped on purpose (like a stopped edgehmoe-client): its task ended at once.
    assert r0["outcomes"] == {"dev-0000": "ok", "dev-0001": "ok", "dev-0002": "invalid", "dev-0003": "timeout",
                              "dev-0004": "timeout", "dev-0005": "offline"}
    assert r0["reasons"]["dev-0005"] == "the device stopped"
    assert [d["device"] for d in r0["per_device"]] == ["dev-0000", "dev-0001"]  # the duplicate counted once
    assert [d["num_examples"] for d in r0["per_device"]] == counts[:2].sum(1).tolist()
    assert r0["rejected"]["dev-0002"].startswith("undecodable result")
    assert r1["outcomes"] == {d: "ok" for d in ids}
    actions = [json.loads(ln) for ln in events.read_text().splitlines()]
    assert {e["device"] for e in actions if e["action"] == "rejoin"} == {"dev-0005"}
    assert {e["device"] for e in actions if e["action"] == "redelivered" and e["round"] == 0} == {"dev-0004"}
    # the dropped device reconnected by itself (a second "connected"), the others once
    connects = {d: sum(1 for e in actions if e["device"] == d and e["action"] == "connected") for d in ids}
    assert connects["dev-0004"] == 2 and connects["dev-0005"] == 2 and connects["dev-0000"] == 1


@pytest.mark.slow
def test_bench_cli_prints_the_table_and_writes_json(tmp_path):
    require_tool("mosquitto")
    out = tmp_path / "out.json"
    # Execute: the real server and broker against 3 emulated devices, 4 rounds
    r = subprocess.run([sys.executable, str(REPO / "tools" / "bench_orchestration.py"), "--devices", "3",
                        "--real-max", "0", "--rounds", "4", "--train-ms", "100", "--json", str(out)],
                       capture_output=True, text=True, timeout=600)
    # Assert
    assert r.returncode == 0, r.stderr[-3000:]
    assert "median ms" in r.stdout and "overhead" in r.stdout
    (run,) = json.loads(out.read_text())["runs"]
    assert (run["devices"], run["clients"], run["model"], run["rounds"], run["round_samples"]) == (3, "fleet", "flat", 4, 2)
    # the flat network of width 32 on 32x32 images, 100 classes (106,372 parameters, docs/design.md)
    from edgehmoe.model.arch import ArchSpec, build_model, count_params

    assert run["params"] == count_params(build_model(ArchSpec(width=32, num_outputs=100, input_size=32)))
    assert 100 < run["median_round_ms"] < 60_000
    assert run["overhead_ms"] < run["median_round_ms"]
    assert run["server_peak_rss_mb"] > 50 and run["broker_peak_rss_mb"] > 1
    # per round each device gets one task and sends one result of ~4 bytes per parameter
    assert 2 * 3 * 4 * 106_404 < run["bytes_per_round"] < 1.3 * 2 * 3 * 4 * 106_404
    assert run["flower_median_round_ms"] is None and len(run["loadavg_after"]) == 3


def test_fleet_help_says_it_measures_orchestration_not_learning(capsys):
    from edgehmoe.cli.fleet import main

    with pytest.raises(SystemExit) as e:
        main(["--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert e.value.code == 0
    assert "It measures ORCHESTRATION" in out and "NOT LEARNING: no training happens" in out
    assert main(["--broker", "mqtt://127.0.0.1:1", "--devices", "0"]) == 2  # bad input: exit 2
    assert "--devices must be >= 1" in capsys.readouterr().err
