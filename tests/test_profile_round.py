"""Tests of the per-round profiler (:mod:`edgehmoe.measure.profile`, ``edgehmoe-profile``,
``tools/profile_round.py``): a real (tiny) profile on synthetic data, plus its helpers and the
memory-limited child runner (:mod:`edgehmoe.measure.limits`).

The smoke run uses ``synthetic:coarse=4,fine=5,per_class=20``: 20 classes under 4
superclasses, so 5 experts (root: 4-way; super0..super3: 5-way each). With 100 samples per
client drawn class-balanced, every class has 5 samples: the flat model and the root train on
100, each superclass expert on 25.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from edgehmoe.cli.profile import main as profile_main
from edgehmoe.measure import limits
from edgehmoe.measure import profile as pr

ROOT = Path(__file__).resolve().parents[1]
SPEC = "synthetic:coarse=4,fine=5,per_class=20"

FLAT_KEYS = {"round_time_ms", "round_mem_mb", "peak_rss_mb", "params"}
EXPERT_KEYS = {"node", "name", "depth", "children", "samples", "round_time_ms", "round_mem_mb", "peak_rss_mb", "params"}
TOP_KEYS = {
    "dataset", "samples_per_client", "batch_size", "epochs", "threads", "repeats", "flat", "experts",
    "hmoe_summary", "memory_limit", "machine", "info_f1", "first_round_overhead",
}


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """One real profile run (fresh child processes) shared by the checks below (~30 s)."""
    # Prepare
    tmp = tmp_path_factory.mktemp("profile")
    run = tmp / "runs" / "done"
    run.mkdir(parents=True)
    (run / "summary.json").write_text(json.dumps({"flat": {"info_f1": 0.5}, "hmoe": {"info_f1": 0.25, "experts": []}}))
    out_json, out_png = tmp / "prof.json", tmp / "plots" / "prof.png"
    argv = [
        "--dataset", SPEC, "--samples-per-client", "100", "--repeats", "1", "--epochs", "1",
        "--batch-size", "32", "--threads", "1", "--run", str(run), "--json", str(out_json),
        "--plot", str(out_png), "--memory-limit-mb", "50", "--limit-mechanism", "watchdog", "--quiet",
    ]
    # Execute
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = profile_main(argv)
    return {"rc": rc, "stdout": buf.getvalue(), "json": out_json, "png": out_png}


@pytest.fixture(scope="module")
def tree():
    from edgehmoe.data import load_dataset

    return load_dataset(SPEC, split="train", limit_per_class=1).hierarchy


def _numbers(d: dict, keys) -> list[float]:
    return [d[k] for k in keys]


@pytest.mark.slow
def test_smoke_json_keys_and_positive_numbers(smoke, tree):
    # Assert
    assert smoke["rc"] == 0
    res = json.loads(smoke["json"].read_text())
    assert TOP_KEYS <= set(res)
    assert FLAT_KEYS <= set(res["flat"])
    assert len(res["experts"]) == len(tree.internal_nodes)
    assert [e["node"] for e in res["experts"]] == tree.internal_nodes.tolist()
    for e in [res["flat"], *res["experts"]]:
        for v in _numbers(e, FLAT_KEYS):
            assert isinstance(v, (int, float)) and math.isfinite(v) and v > 0, e
        assert e["peak_rss_mb"] > e["round_mem_mb"] and e["round_cpu_ms"] > 0
        for k in ("round_time_ms", "round_mem_mb", "peak_rss_mb"):
            lo, hi = e[k + "_spread"]
            assert lo <= e[k] <= hi
    for e in res["experts"]:
        assert EXPERT_KEYS <= set(e)
        assert e["depth"] == tree.depths[e["node"]] and e["children"] == tree.num_children[e["node"]]
        assert e["name"] == tree.names[e["node"]]
    assert res["samples_per_client"] == 100 and res["repeats"] == 1 and res["threads"] == 1
    assert res["first_round_overhead"]["round_time_ms"] > 0
    assert res["machine"]["cpu_count"] >= 1 and res["machine"]["torch"]


@pytest.mark.slow
def test_smoke_samples_follow_the_tree(smoke, tree):
    res = json.loads(smoke["json"].read_text())
    by_node = {e["node"]: e for e in res["experts"]}
    assert res["flat"]["samples"] == 100
    assert by_node[0]["samples"] == 100  # the root expert sees every sample
    kids = [int(c) for c in tree.children(0) if not tree.is_leaf[c]]
    assert sum(by_node[c]["samples"] for c in kids) <= by_node[0]["samples"]
    # Balanced draw: 5 per class, so an expert gets 5 x (leaves under it).
    for node, e in by_node.items():
        assert e["samples"] == 5 * tree.leaves_under[node]


@pytest.mark.slow
def test_smoke_params_match_the_specs(smoke, tree):
    from edgehmoe.model.arch import count_params, expert_specs, flat_spec

    res = json.loads(smoke["json"].read_text())
    specs = expert_specs(tree, input_size=32, flat_width=32, head="leaves", root_stem_stride=2)  # the defaults
    assert (res["expert_head"], res["root_stem_stride"]) == ("leaves", 2)
    for e in res["experts"]:
        assert e["params"] == count_params(specs[e["node"]])
        assert e["width"] == specs[e["node"]].width
    assert res["flat"]["params"] == count_params(flat_spec(tree, input_size=32, width=32))
    assert res["flat"]["params"] > max(e["params"] for e in res["experts"])


@pytest.mark.slow
def test_smoke_summary_table_and_info_f1(smoke):
    res = json.loads(smoke["json"].read_text())
    hs, flat = res["hmoe_summary"], res["flat"]
    assert set(hs) == {"max", "min", "median", "root"}
    times = [e["round_time_ms"] for e in res["experts"]]
    assert hs["max"]["round_time_ms"] == max(times) and hs["min"]["round_time_ms"] == min(times)
    assert hs["min"]["round_mem_mb"] <= hs["median"]["round_mem_mb"] <= hs["max"]["round_mem_mb"]
    assert hs["root"]["time_node"] == 0
    for row in hs.values():
        assert row["round_time_pct_of_flat"] == pytest.approx(100 * row["round_time_ms"] / flat["round_time_ms"])
        assert row["round_mem_pct_of_flat"] == pytest.approx(100 * row["round_mem_mb"] / flat["round_mem_mb"])
    assert res["info_f1"]["flat"] == 0.5 and res["info_f1"]["hmoe"] == 0.25
    out = smoke["stdout"]
    for label in ("Flat Softmax", "HMoE max", "HMoE min", "HMoE median", "HMoE root", "0.500", "0.250"):
        assert label in out
    for name in ("root", "super0", "super3"):
        assert name in out  # per-expert table


@pytest.mark.slow
def test_smoke_memory_limit_reports_flat_as_not_fitting(smoke):
    res = json.loads(smoke["json"].read_text())
    lim = res["memory_limit"]
    assert lim["limit_mb"] == 50 and lim["mechanism"] == "watchdog" and lim["description"]
    assert set(lim["results"]) == {"flat", *(str(e["node"]) for e in res["experts"])}
    # 50 MB is below what python + torch alone occupy: nothing trains, and the run still completes.
    assert lim["results"]["flat"]["status"] == "killed"
    assert lim["results"]["flat"]["killed_at_mb"] > 50
    assert all(r["status"] in ("fits", "killed", "error") for r in lim["results"].values())
    assert "killed at ~" in smoke["stdout"]


@pytest.mark.slow
def test_smoke_plot_is_a_png(smoke):
    data = smoke["png"].read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000


def test_watchdog_kills_a_greedy_child_and_lets_a_small_one_finish():
    # Prepare
    mech = limits.limit_mechanism("watchdog")
    greedy = [sys.executable, "-c", "import time; b = b'x' * (400 * 2**20); time.sleep(5)"]
    small = [sys.executable, "-c", f"print({limits.RESULT_TAG!r} + '{{\"ok\": true}}')"]
    # Execute
    killed = limits.run_child(greedy, limit_mb=200, mechanism=mech, timeout_s=60)
    fine = limits.run_child(small, limit_mb=200, mechanism=mech, timeout_s=60)
    # Assert
    assert killed.killed and 200 < killed.killed_at_mb < 450 and killed.result is None
    assert not fine.killed and fine.returncode == 0 and fine.result == {"ok": True}


def test_limit_mechanism_auto_is_available():
    assert limits.limit_mechanism("auto").kind in ("cgroup", "systemd", "watchdog")


def test_client_sample_is_balanced_seeded_and_bounded():
    y = np.repeat(np.arange(4), [10, 10, 10, 2])  # class 3 has only 2 samples
    a = pr.client_sample(y, 4, 14, seed=1)
    assert np.array_equal(a, pr.client_sample(y, 4, 14, seed=1))
    counts = np.bincount(y[a], minlength=4)
    assert counts[3] == 2 and set(counts[:3].tolist()) <= {3, 4} and counts.sum() == 13
    assert len(np.unique(a)) == len(a)


def test_read_info_f1_missing_and_partial(tmp_path):
    assert pr.read_info_f1(None)["flat"] is None
    r = pr.read_info_f1(tmp_path / "nope")
    assert r["flat"] is None and "not found" in r["note"]
    (tmp_path / "summary.json").write_text(json.dumps({"flat": {"info_f1": 0.54}, "hmoe": {}}))
    r = pr.read_info_f1(tmp_path)
    assert r["flat"] == 0.54 and r["hmoe"] is None and "hmoe.info_f1" in r["note"]


@pytest.mark.parametrize("spec", ["nope:x", "cifar100:/does/not/exist", "synthetic:foo=1"])
def test_bad_dataset_is_one_line_error(spec, capsys):
    rc = profile_main(["--dataset", spec, "--repeats", "1"])
    err = capsys.readouterr().err
    assert rc != 0
    assert err.count("\n") == 1 and "error" in err and "Traceback" not in err


@pytest.mark.parametrize("entry", [[str(ROOT / "tools" / "profile_round.py")], ["-m", "edgehmoe.cli.profile"]])
def test_entry_points_give_the_same_one_line_error_and_exit_code(entry):
    # The thin tools/ script and the module entry run the installed profiler: same error line
    # (prefixed with the command's name) and exit status 1 for a dataset that cannot load.
    # Execute
    p = subprocess.run([sys.executable, *entry, "--dataset", "nope:x"], capture_output=True, text=True, timeout=120)
    # Assert
    prog = "profile_round.py" if entry[0].endswith(".py") else "python -m edgehmoe.cli.profile"
    assert p.returncode == 1 and p.stdout == ""
    assert p.stderr.startswith(f"{prog}: error: cannot load dataset 'nope:x': unknown dataset kind 'nope'")
    assert p.stderr.count("\n") == 1


def test_profile_errors_are_edgehmoe_errors_with_exit_status_1():
    from edgehmoe.errors import EdgeHmoeError

    with pytest.raises(pr.ProfileError) as e:
        pr._call_loader(lambda *a, **k: (_ for _ in ()).throw(ValueError("bad")), "x:y", 1)
    assert isinstance(e.value, EdgeHmoeError) and e.value.exit_code == 1
    assert str(e.value) == "cannot load dataset 'x:y': bad"
    if limits._cgroup2_parent() is None:
        unavailable = "cgroup"
    elif not Path("/run/systemd/system").is_dir():
        unavailable = "systemd"
    else:
        pytest.skip("every limit mechanism is available here")
    with pytest.raises(limits.LimitError, match="use --limit-mechanism watchdog") as e:
        limits.limit_mechanism(unavailable)
    assert isinstance(e.value, EdgeHmoeError) and e.value.exit_code == 1


def test_worker_reports_a_failed_job_as_one_tagged_line():
    # Prepare: a train-round job whose data file does not exist
    from edgehmoe.measure.worker import worker_command, worker_env

    cmd = worker_command("train-round", {"data": "/does/not/exist.npz", "arch": {}, "label_map": [], "threads": 1,
                                         "train": {}})
    # Execute
    o = limits.run_child(cmd, env=worker_env(), timeout_s=300)
    # Assert
    assert cmd[1:3] == ["-m", "edgehmoe.measure.worker"]
    assert o.returncode == 1 and o.result["ok"] is False
    assert o.result["error"].startswith("FileNotFoundError") and "/does/not/exist.npz" in o.result["error"]


@pytest.mark.slow
def test_profile_measures_the_architecture_a_run_trains(tmp_path, tree):
    """--expert-head children --root-stem-stride 1 profile the networks a run with those options
    trains (the defaults, leaves and 2, are the smoke run's): a plain root (one logit per child,
    full resolution) that still trains on every client sample."""
    from edgehmoe.model.arch import count_params, expert_specs

    out = tmp_path / "prof.json"
    argv = ["--dataset", SPEC, "--samples-per-client", "100", "--repeats", "1", "--batch-size", "32", "--quiet",
            "--expert-head", "children", "--root-stem-stride", "1", "--json", str(out)]
    import contextlib
    import io

    with contextlib.redirect_stdout(io.StringIO()) as buf:
        assert profile_main(argv) == 0
    res = json.loads(out.read_text())
    assert (res["expert_head"], res["root_stem_stride"]) == ("children", 1)
    specs = expert_specs(tree, 32, head="children", root_stem_stride=1)
    leafy = expert_specs(tree, 32, head="leaves", root_stem_stride=2)
    root = next(e for e in res["experts"] if e["node"] == 0)
    assert specs[0].leaf_groups is None and count_params(specs[0]) < count_params(leafy[0])  # 4 vs 20 logits
    assert root["params"] == count_params(specs[0]) and root["samples"] == 100 and root["round_time_ms"] > 0
    assert "experts on children, root stem stride 1" in buf.getvalue()


def test_profile_tree_groups_lists_the_experts_of_the_routing_tree():
    """--tree-groups K profiles the networks a run with --tree-groups K trains: the root over the
    groups and one expert per group of several classes, each with its own classes' samples."""
    from edgehmoe.core.hierarchy import group_leaves
    from edgehmoe.data import load_dataset

    ds = load_dataset(SPEC, "train")
    y = ds.y
    # groups of at most 3 of the 5-class superclasses: every class straight under the root
    models = pr._models(ds, y, 32, "leaves", 2, 1, tree_groups=3)
    assert [m.key for m in models] == ["flat", "0"] and models[1].children == 20
    # groups of 5: the superclasses themselves, as in the dataset's tree
    grouped = pr._models(ds, y, 32, "leaves", 2, 1, tree_groups=5)
    plain = pr._models(ds, y, 32, "leaves", 2, 1)
    assert group_leaves(ds.hierarchy, 5).names == ds.hierarchy.names
    assert [(m.name, m.samples, m.arch) for m in grouped] == [(m.name, m.samples, m.arch) for m in plain]
