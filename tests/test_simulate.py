"""`edgehmoe-server simulate`: the one-command local federation (real Mosquitto, real clients)."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from conftest import require_tool

pytestmark = pytest.mark.slow


def test_simulate_writes_table_summary_plots_and_bundle(tmp_path):
    require_tool("mosquitto")
    out = tmp_path / "runs" / "sim"
    cmd = [sys.executable, "-m", "server", "simulate", "--dataset",
           "synthetic:coarse=2,fine=3,per_class=30,test_per_class=10,size=16", "--clients", "3", "--rounds", "3",
           "--model", "both", "--eval-every", "1", "--out", str(out)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    # Table 1 on stdout
    assert "Table 1" in r.stdout and "Flat softmax" in r.stdout and "HMoE max" in r.stdout
    # the flat phase's server (same broker user, so the same client id) does not inherit the
    # hmoe phase's broker session: no messages of the other run reach it
    assert "unexpected topic" not in r.stdout + r.stderr
    s = json.loads((out / "summary.json").read_text())
    assert s["dataset"].startswith("synthetic") and s["rounds"] == 3 and s["clients"] == 3
    for key in ("info_f1", "round_time_ms", "round_mem_mb"):
        assert key in s["flat"]
    assert 0 <= s["flat"]["info_f1"] <= 1 and s["flat"]["round_time_ms"] > 0
    assert 0 <= s["hmoe"]["info_f1"] <= 1
    experts = s["hmoe"]["experts"]
    assert len(experts) == 3  # root + 2 superclasses
    for e in experts:
        assert {"node", "name", "round_time_ms", "round_mem_mb", "params"} <= set(e)
    trained = [e for e in experts if e["round_time_ms"] is not None]
    assert trained and all(e["round_time_ms"] > 0 for e in trained)
    assert (out / "plots" / "info_f1_per_round.png").read_bytes()[:4] == b"\x89PNG"
    assert (out / "plots" / "info_f1_per_client_compute.png").read_bytes()[:4] == b"\x89PNG"
    assert (out / "bundle" / "manifest.json").exists()
    # the run directory is a model directory for `edgehmoe evaluate`
    ev = subprocess.run([sys.executable, "-m", "edgehmoe.cli", "-q", "evaluate", "--model-dir", str(out), "--dataset",
                         "synthetic:coarse=2,fine=3,per_class=30,test_per_class=10,size=16", "--split", "test", "--json"],
                        capture_output=True, text=True)
    assert ev.returncode == 0, ev.stderr
    assert json.loads(ev.stdout)["info_f1"] == pytest.approx(s["hmoe"]["info_f1"])
    # a second run into the same folder is refused without --force
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert again.returncode == 2 and "--force" in again.stderr


def test_flat_only_simulate_exports_nothing_says_so_and_evaluates_every_round(tmp_path):
    require_tool("mosquitto")
    out = tmp_path / "flat"
    # Execute: 3 flat rounds with --eval-every 2 (rounds 2 and 3 only, before the flat schedule)
    r = subprocess.run([sys.executable, "-m", "edgehmoe.server", "simulate", "--dataset",
                        "synthetic:coarse=2,fine=3,per_class=30,test_per_class=10,size=16", "--clients", "2",
                        "--rounds", "3", "--model", "flat", "--eval-every", "2", "--out", str(out)],
                       capture_output=True, text=True, timeout=600)
    # Assert: no error about a bundle the user did not ask for; a plain line instead
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert "ERROR" not in r.stderr and "export failed" not in r.stdout + r.stderr
    assert "no ONNX bundle exported" in r.stdout and "--model flat" in r.stdout
    s = json.loads((out / "summary.json").read_text())
    assert s["bundle"] is None and not (out / "bundle").exists()
    # the header names the evaluated split and how it was made
    header = next(ln for ln in r.stdout.splitlines() if ln.startswith("Table 1"))
    assert header.endswith("held-out split: test (generated on another random stream of the spec's seed)")
    assert s["heldout_split"] == "test"
    # a short flat run is evaluated after every round, and plotted against client compute
    rows = [json.loads(ln) for ln in (out / "flat" / "metrics.jsonl").read_text().splitlines()]
    assert [("val_info_f1" in row) for row in rows] == [True, True, True]
    assert [c[0] for c in s["flat"]["val_curve"]] == [1, 2, 3]
    assert (out / "plots" / "info_f1_per_client_compute.png").read_bytes()[:4] == b"\x89PNG"


def test_describe_heldout_says_how_each_split_was_made():
    from edgehmoe.server.simulate import describe_heldout

    assert describe_heldout("npz:/x/train.npz", "val", 0.1, 0) == "10% of train held out per class, seed 0"
    assert describe_heldout("cifar100:/data/cifar100", "val", 0.25, 3) == "25% of train held out per class, seed 3"
    assert describe_heldout("cifar100:/data/cifar100", "test", 0.1, 0) == "the official CIFAR-100 test set"
    assert "val/" in describe_heldout("tinyimagenet:/data/tiny-imagenet-200", "test", 0.1, 0)


def test_equal_compute_interpolates_flat_curve():
    from edgehmoe.server.report import build_summary
    from tree9 import tree9

    def rows(costs, evals):
        return [{"round": i, "per_device": [{"node": n, "round_time_ms": c, "round_mem_mb": 1.0, "peak_rss_mb": 2.0,
                                            "num_examples": 5}], **({"val_info_f1": evals[i]} if i in evals else {})}
                for i, (n, c) in enumerate(costs)]

    metrics = {"info_f1": 0.5, "top1": 0.5}
    flat = {"rows": rows([(-1, 100.0)] * 4, {1: 0.2, 3: 0.6}), "metrics": metrics, "params": 10}
    hmoe = {"rows": rows([(0, 50.0), (1, 50.0), (2, 50.0), (6, 50.0), (0, 50.0)], {4: 0.3}), "metrics": metrics,
            "params": {0: 1, 1: 1, 2: 1, 6: 1}, "tree": tree9()}
    s = build_summary("x", 4, 1, hmoe, flat)
    # HMoE spent 250 ms; flat reached 0.2 at 200 ms and 0.6 at 400 ms -> 0.3 at 250 ms
    assert s["equal_compute"]["flat_val_info_f1"] == pytest.approx(0.3)
    assert s["equal_compute"]["hmoe_val_info_f1"] == pytest.approx(0.3)
    assert s["flat"]["round_time_ms"] == 100.0 and s["hmoe"]["experts"][0]["round_time_ms"] == 50.0
    assert "equal_compute_macs" not in s  # no cost model given: clocks only


def test_equal_compute_on_the_cost_model_counts_examples_times_macs():
    from edgehmoe.server.report import build_summary, format_table, gmacs_per_example
    from tree9 import tree9

    from edgehmoe.model.cost import train_macs

    def rows(nodes, evals, examples=5):
        return [{"round": i, "per_device": [{"node": n, "round_time_ms": 1.0, "round_mem_mb": 1.0, "peak_rss_mb": 2.0,
                                            "num_examples": examples}], **({"val_info_f1": evals[i]} if i in evals else {})}
                for i, n in enumerate(nodes)]

    arch = {"width": 4, "num_outputs": 3, "input_size": 8, "in_channels": 3, "kind": "cnn3"}
    flat_arch = dict(arch, width=8, num_outputs=5)
    # epochs 2 for the root and flat, 1 for the other experts
    hg = gmacs_per_example({0: arch, 1: arch, 2: arch, 6: arch}, epochs=2, expert_epochs=1)
    fg = gmacs_per_example({-1: flat_arch}, epochs=2)
    assert hg[0] == pytest.approx(train_macs(arch, 2) / 1e9) and hg[1] == pytest.approx(train_macs(arch, 1) / 1e9)
    assert fg[-1] == pytest.approx(train_macs(flat_arch, 2) / 1e9)
    metrics = {"info_f1": 0.5, "top1": 0.5}
    flat = {"rows": rows([-1] * 4, {1: 0.2, 3: 0.6}), "metrics": metrics, "params": 10, "gmacs_per_example": fg}
    hmoe = {"rows": rows([0, 1, 2, 6, 0], {4: 0.45}), "metrics": metrics, "params": {0: 1, 1: 1, 2: 1, 6: 1},
            "tree": tree9(), "gmacs_per_example": hg}
    s = build_summary("x", 4, 1, hmoe, flat)
    spent = 5 * (2 * hg[0] + 3 * hg[1])
    assert s["hmoe"]["total_client_gmacs"] == pytest.approx(spent)
    assert s["flat"]["total_client_gmacs"] == pytest.approx(4 * 5 * fg[-1])
    eq = s["equal_compute_macs"]
    # flat: 0.2 after 2 rounds, 0.6 after 4; linear from (0, 0) through those points
    per_round = 5 * fg[-1]
    expected = np.interp(spent, [0, 2 * per_round, 4 * per_round], [0, 0.2, 0.6])
    assert eq["flat_val_info_f1"] == pytest.approx(expected) and eq["hmoe_val_info_f1"] == 0.45
    assert "Equal client training MACs" in format_table(s)


def test_simulate_with_tree_groups_routes_through_the_cut_and_scores_on_the_full_tree(tmp_path):
    """--tree-groups 2 over 3-class superclasses: one expert (the root over all 6 classes) trains
    on the devices; the run's tree carries the full tree, and the summary, the bundle and a
    by-hand score on the full tree agree."""
    require_tool("mosquitto")
    data = "synthetic:coarse=2,fine=3,per_class=30,test_per_class=10,size=16"
    out = tmp_path / "grouped"
    r = subprocess.run([sys.executable, "-m", "edgehmoe.server", "simulate", "--dataset", data, "--clients", "2",
                        "--rounds", "3", "--model", "hmoe", "--tree-groups", "2", "--eval-every", "0",
                        "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    model = json.loads((out / "hmoe" / "model.json").read_text())
    assert list(model["models"]["hmoe"]["experts"]) == ["0"]
    assert len(model["hierarchy"]["names"]) == 7 and len(model["hierarchy"]["metric_tree"]["names"]) == 9
    assert "tree_groups = 2" in (out / "hmoe" / "config.toml").read_text()
    s = json.loads((out / "summary.json").read_text())
    ev = subprocess.run([sys.executable, "-m", "edgehmoe.cli", "-q", "evaluate", "--bundle", str(out / "bundle"),
                         "--dataset", data, "--split", "test", "--json"], capture_output=True, text=True)
    assert ev.returncode == 0, ev.stderr
    m = json.loads(ev.stdout)
    assert m["info_f1"] == pytest.approx(s["hmoe"]["info_f1"])
    assert set(m["accuracy_per_level"]) == {"1", "2"}  # the full tree's two levels


def test_simulate_with_leaf_heads_and_a_strided_root_trains_exports_and_agrees(tmp_path):
    """--expert-head leaves --root-stem-stride 2 --expert-stem-stride 2 reach the devices through
    the task's arch and label map; the run directory, the bundle and the torch evaluation agree."""
    require_tool("mosquitto")
    data = "synthetic:coarse=2,fine=3,per_class=30,test_per_class=10,size=16"
    out = tmp_path / "leaves"
    # Execute
    r = subprocess.run([sys.executable, "-m", "edgehmoe.server", "simulate", "--dataset", data, "--clients", "2",
                        "--rounds", "4", "--model", "hmoe", "--expert-head", "leaves", "--root-stem-stride", "2",
                        "--expert-stem-stride", "2",
                        "--eval-every", "1", "--out", str(out)], capture_output=True, text=True, timeout=600)
    # Assert
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    model = json.loads((out / "hmoe" / "model.json").read_text())
    experts = model["models"]["hmoe"]["experts"]
    root = experts["0"]["arch"]
    # the root has 2 children over 6 leaves: a leaf head (one logit per leaf, child of each leaf)
    assert root["stem_stride"] == 2 and root["leaf_groups"] == [0, 0, 0, 1, 1, 1]
    assert all("leaf_groups" not in e["arch"] and e["arch"]["stem_stride"] == 2
               for n, e in experts.items() if n != "0")  # their children are leaves: plain heads; strided stems
    rows = [json.loads(ln) for ln in (out / "hmoe" / "metrics.jsonl").read_text().splitlines()]
    root_rounds = [row for row in rows if row["nodes"] == [0]]
    assert root_rounds and all(row["devices_answered"] == 2 for row in root_rounds)
    s = json.loads((out / "summary.json").read_text())
    ev = subprocess.run([sys.executable, "-m", "edgehmoe.cli", "-q", "evaluate", "--bundle", str(out / "bundle"),
                         "--dataset", data, "--split", "test", "--json"], capture_output=True, text=True)
    assert ev.returncode == 0, ev.stderr
    assert json.loads(ev.stdout)["info_f1"] == pytest.approx(s["hmoe"]["info_f1"])
    manifest = json.loads((out / "bundle" / "manifest.json").read_text())
    parity = manifest["parity"]  # torch vs ONNX Runtime, checked at export
    assert max(parity["max_abs_diff"].values()) < 1e-4 and parity["greedy_equal"] == parity["samples"], parity
