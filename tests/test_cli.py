"""The `edgehmoe` command: JSON interfaces and one-line errors for bad input."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from edgehmoe.cli.main import main

TINY = "synthetic:coarse=2,fine=3,per_class=30,test_per_class=10,size=16,seed=1"


def run_cli(args, capsys):
    code = main(args)
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    out = tmp_path_factory.mktemp("fit") / "model"
    assert main(["-q", "fit", "--dataset", TINY, "--model", "both", "--epochs", "2", "--batch-size", "16",
                 "--threads", "1", "--out", str(out)]) == 0
    return out


def test_fit_and_evaluate_json_keys(fitted, capsys):
    code, out, _ = run_cli(["-q", "evaluate", "--model-dir", str(fitted), "--dataset", TINY, "--split", "test", "--json"], capsys)
    assert code == 0
    m = json.loads(out)
    for key in ("info_precision", "info_recall", "info_f1", "accuracy_per_level", "mistake_severity", "num_examples"):
        assert key in m
    assert m["num_examples"] == 60 and m["model"] == "hmoe"
    assert set(m["accuracy_per_level"]) == {"1", "2"}
    code, out, _ = run_cli(["-q", "evaluate", "--model-dir", str(fitted), "--dataset", TINY, "--split", "test",
                            "--json", "--model", "flat"], capsys)
    assert json.loads(out)["model"] == "flat"
    code, out, _ = run_cli(["-q", "evaluate", "--model-dir", str(fitted), "--dataset", TINY, "--split", "test",
                            "--json", "--beam", "2"], capsys)
    assert json.loads(out)["beam"] == 2
    code, out, _ = run_cli(["-q", "evaluate", "--model-dir", str(fitted), "--dataset", TINY, "--split", "test",
                            "--json", "--threshold", "0.99"], capsys)
    m = json.loads(out)
    assert m["leaf_prediction_rate"] < 1.0 and m["info_precision"] >= m["info_recall"]


def test_fit_refuses_to_overwrite(fitted, capsys):
    code, _, err = run_cli(["-q", "fit", "--dataset", TINY, "--epochs", "1", "--out", str(fitted)], capsys)
    assert code == 2 and "--force" in err


@pytest.mark.parametrize(
    "args, message",
    [
        (["evaluate", "--model-dir", "/nonexistent", "--dataset", TINY], "not an edgehmoe model directory"),
        (["evaluate", "--model-dir", "x", "--dataset", "imagenet:/x"], "imagenet"),
        # the model is checked before the data (it is cheaper), so these need a real one
        (["evaluate", "--model-dir", "FITTED", "--dataset", "cifar100:/nonexistent/dir"], "/nonexistent/dir"),
        (["evaluate", "--model-dir", "FITTED", "--dataset", "tinyimagenet:/nonexistent"], "/nonexistent"),
        (["hierarchy", "show", "--csv", "/nonexistent.csv"], "does not exist"),
        (["partition", "--dataset", TINY, "--num-devices", "2", "--scheme", "dirichlet:-1", "--out", "/tmp/x"], "alpha"),
        (["partition", "--dataset", TINY, "--num-devices", "2", "--scheme", "zipf", "--out", "/tmp/x"], "iid"),
    ],
)
def test_bad_input_is_one_clear_line(args, message, capsys, request):
    if "FITTED" in args:
        args = [str(request.getfixturevalue("fitted")) if a == "FITTED" else a for a in args]
    code, _, err = run_cli(["-q", *args], capsys)
    assert code == 2
    assert err.startswith("edgehmoe: error:") and message in err
    assert "Traceback" not in err and err.count("\n") == 1


def test_corrupt_csv_tree_names_the_row(tmp_path, capsys):
    p = tmp_path / "tree.csv"
    p.write_text("parent,child\nroot,a\nroot,b\na,x\nb,x\n")
    code, _, err = run_cli(["hierarchy", "show", "--csv", str(p)], capsys)
    assert code == 2 and "row 5" in err and "two parents" in err


def test_evaluate_rejects_data_with_other_classes(fitted, capsys):
    other = "synthetic:coarse=2,fine=4,per_class=5,test_per_class=2,size=16"
    code, _, err = run_cli(["-q", "evaluate", "--model-dir", str(fitted), "--dataset", other], capsys)
    assert code == 2 and "classes" in err


def test_partition_writes_shards(tmp_path, capsys):
    code, out, _ = run_cli(["-q", "partition", "--dataset", TINY, "--num-devices", "3", "--scheme", "dirichlet:0.5",
                            "--out", str(tmp_path / "shards")], capsys)
    assert code == 0 and "wrote 3 shards" in out
    from edgehmoe.data.partition import load_shard

    total = sum(len(load_shard(tmp_path / "shards" / f"device_{i:03d}.npz").label) for i in range(3))
    assert total == 162  # 180 training images minus the 10 % validation hold-out


def test_hierarchy_show_json(capsys):
    code, out, _ = run_cli(["hierarchy", "show", "--dataset", TINY, "--json"], capsys)
    d = json.loads(out)
    assert code == 0 and d["leaves"] == 6 and d["experts"] == 3 and d["parents"][0] == -1


def test_console_script_entry_point_runs():
    r = subprocess.run([sys.executable, "-m", "edgehmoe.cli", "--version"], capture_output=True, text=True)
    assert r.returncode == 0 and "edgehmoe" in r.stdout


def test_bundle_evaluation_matches_model_dir_and_rejects_other_classes(fitted, tmp_path, capsys):
    bundle = tmp_path / "bundle"
    assert main(["-q", "export", "--model-dir", str(fitted), "--out", str(bundle)]) == 0
    capsys.readouterr()
    args = ["--dataset", TINY, "--split", "test", "--json"]
    _, torch_out, _ = run_cli(["-q", "evaluate", "--model-dir", str(fitted), *args], capsys)
    code, ort_out, _ = run_cli(["-q", "evaluate", "--bundle", str(bundle), *args], capsys)
    assert code == 0
    assert json.loads(ort_out)["info_f1"] == pytest.approx(json.loads(torch_out)["info_f1"])
    other = "synthetic:coarse=2,fine=4,per_class=5,test_per_class=2,size=16"
    code, _, err = run_cli(["-q", "evaluate", "--bundle", str(bundle), "--dataset", other], capsys)
    assert code == 2 and "classes" in err


@pytest.fixture
def data_loads(monkeypatch):
    """Records every dataset load the CLI starts (then loads it as usual)."""
    import edgehmoe.cli.bundle as cli_bundle
    import edgehmoe.cli.main as cli_main

    calls = []
    real = cli_main.load_data

    def spy(args, split=None):
        calls.append(args.dataset)
        return real(args, split)

    monkeypatch.setattr(cli_main, "load_data", spy)
    monkeypatch.setattr(cli_bundle, "load_data", spy)
    return calls


@pytest.mark.parametrize("flag, message", [
    ("--model-dir", "not an edgehmoe model directory"),
    ("--bundle", "does not exist"),
])
def test_evaluate_checks_the_model_before_loading_data(flag, message, tmp_path, data_loads, capsys):
    # Execute: a model that is not there, a dataset that would be generated first
    code, _, err = run_cli(["-q", "evaluate", flag, str(tmp_path / "missing"), "--dataset", TINY], capsys)
    # Assert: the one-line error names the missing model, and no data was loaded for it
    assert code == 2 and message in err and str(tmp_path / "missing") in err
    assert data_loads == []


def test_evaluate_checks_an_unreadable_model_json_before_loading_data(tmp_path, data_loads, capsys):
    (tmp_path / "model.json").write_text("{not json")
    code, _, err = run_cli(["-q", "evaluate", "--model-dir", str(tmp_path), "--dataset", TINY], capsys)
    assert code == 2 and "not valid JSON" in err
    assert data_loads == []


def test_bundle_commands_check_the_model_before_loading_data(tmp_path, data_loads, capsys):
    from edgehmoe.cli.bundle import main as bundle_main

    missing = str(tmp_path / "missing")
    code = bundle_main(["evaluate", "--bundle", missing, "--dataset", TINY])
    assert code == 2 and "does not exist" in capsys.readouterr().err
    tree = tmp_path / "tree.csv"
    tree.write_text("parent,child\n")
    code = bundle_main(["extend", "--model-dir", missing, "--hierarchy", str(tree), "--dataset", TINY,
                        "--out", str(tmp_path / "new")])
    assert code == 2 and "not an edgehmoe model directory" in capsys.readouterr().err
    assert data_loads == []


# ---------------------------------------------------------------------- fit: issue #11 levers
def _fit_json(capsys, *args, quiet=True, batch_size=16):
    code, out, err = run_cli([*(["-q"] if quiet else []), "fit", "--dataset", TINY, "--batch-size", str(batch_size),
                              "--threads", "1", *args], capsys)
    assert code == 0, err
    return json.loads(out)


def test_fit_equal_compute_gives_the_hmoe_the_flat_training_macs(tmp_path, capsys, caplog):
    from edgehmoe.data import load_dataset
    from edgehmoe.model.arch import expert_label_map, expert_specs, flat_spec
    from edgehmoe.model.cost import equal_compute_epochs, train_macs

    # Prepare: what the cost model says for this data and tree
    train = load_dataset(TINY, "train")
    specs = expert_specs(train.hierarchy, 16, head="leaves", root_stem_stride=2, expert_stem_stride=2)  # fit's defaults
    flat = flat_spec(train.hierarchy, 16).to_dict()
    per_node = {n: (s.to_dict(), int((expert_label_map(train.hierarchy, n, s)[train.y] >= 0).sum())) for n, s in specs.items()}
    expected = equal_compute_epochs(flat, len(train), 3, per_node)
    caplog.set_level("INFO", logger="edgehmoe")
    # Execute
    r = _fit_json(capsys, "--model", "both", "--epochs", "3", "--equal-compute",
                  "--out", str(tmp_path / "m"), quiet=False, batch_size=9)
    # Assert: epochs from the cost model, MACs reported for both and equal up to the last batch
    # (batches of 9 divide the 162 images and each superclass's 81)
    assert r["hmoe"]["epochs"] == pytest.approx(expected, abs=1e-3) and expected > 3
    assert r["flat"]["train_gmacs"] == round(train_macs(flat, len(train) * 3) / 1e9, 2)
    assert r["hmoe"]["train_gmacs"] == pytest.approx(r["flat"]["train_gmacs"], rel=0.03)
    assert r["hmoe"]["expert_head"] == "leaves"
    # per-epoch validation, the last point equal to the final evaluation
    assert [p["epoch"] for p in r["flat"]["history"]] == [1, 2, 3]
    assert r["flat"]["history"][-1]["val_info_f1"] == r["flat"]["val_info_f1"]
    assert len(r["hmoe"]["history"]) == int(np.ceil(expected))
    assert r["hmoe"]["history"][-1]["val_info_f1"] == r["hmoe"]["val_info_f1"]
    lines = [rec.getMessage() for rec in caplog.records]
    assert any(m.startswith("flat epoch 3/3: loss") and "val info-F1" in m and "left" in m for m in lines)
    assert any(m.startswith(f"hmoe epoch 1/{int(np.ceil(expected))}") for m in lines)
    # the root's leaf head is in the model directory
    model = json.loads((tmp_path / "m" / "model.json").read_text())
    assert model["models"]["hmoe"]["experts"]["0"]["arch"]["leaf_groups"] == [0, 0, 0, 1, 1, 1]
    assert model["models"]["hmoe"]["experts"]["0"]["arch"]["stem_stride"] == 2
    # --expert-head children --root-stem-stride 1 --expert-stem-stride 1 give the plain networks
    r = _fit_json(capsys, "--model", "hmoe", "--epochs", "1", "--expert-head", "children", "--root-stem-stride", "1",
                  "--expert-stem-stride", "1", "--out", str(tmp_path / "plain"), batch_size=9)
    experts = json.loads((tmp_path / "plain" / "model.json").read_text())["models"]["hmoe"]["experts"]
    root = experts["0"]["arch"]
    assert "leaf_groups" not in root and root.get("stem_stride", 1) == 1 and r["hmoe"]["expert_head"] == "children"
    assert all(e["arch"].get("stem_stride", 1) == 1 for n, e in experts.items() if n != "0")
    assert r["hmoe"]["expert_stem_stride"] == 1
    assert model["models"]["hmoe"]["experts"]["1"]["arch"]["stem_stride"] == 2  # the default: 2


def test_fit_leaf_head_distilled_calibrated_bundle_predicts_as_torch(fitted, tmp_path, capsys):
    # Prepare: every lever at once, the teacher taken from another model directory
    out = tmp_path / "m"
    r = _fit_json(capsys, "--model", "hmoe", "--epochs", "3", "--expert-head", "leaves", "--distill-weight", "0.5",
                  "--teacher", str(fitted), "--calibrate-fraction", "0.2", "--root-stem-stride", "2",
                  "--out", str(out))
    assert r["teacher"]["source"] == str(fitted)
    assert r["hmoe"]["train_examples"] == 132  # 162 minus 30 (20 % of each class) for calibration
    assert set(r["hmoe"]["temperatures"]) == {"root", "super0", "super1"}
    assert all(t > 0 and t != 1.0 for t in r["hmoe"]["temperatures"].values())
    # Execute: export and evaluate both ways
    assert main(["-q", "export", "--model-dir", str(out), "--out", str(tmp_path / "b")]) == 0
    capsys.readouterr()
    for beam in ("1", "2"):
        args = ["--dataset", TINY, "--split", "test", "--json", "--beam", beam]
        _, torch_out, _ = run_cli(["-q", "evaluate", "--model-dir", str(out), *args], capsys)
        _, ort_out, _ = run_cli(["-q", "evaluate", "--bundle", str(tmp_path / "b"), *args], capsys)
        # Assert: the ONNX chain (torch-free) predicts exactly what torch predicts
        ort = json.loads(ort_out)
        assert ort.pop("bundle") == str(tmp_path / "b") and ort == json.loads(torch_out)


@pytest.mark.parametrize("args, message", [
    (["--model", "hmoe", "--distill-weight", "0.5"], "needs a teacher"),
    (["--model", "hmoe", "--equal-compute", "--hmoe-epochs", "3"], "not both"),
    (["--model", "flat", "--calibrate-fraction", "0.1"], "use --model hmoe or both"),
    (["--model", "hmoe", "--teacher", "/x"], "--distill-weight > 0"),
    (["--model", "hmoe", "--distill-weight", "2"], "[0, 1]"),
    (["--model", "hmoe", "--distill-weight", "0.5", "--teacher", "/nonexistent"], "not an edgehmoe model directory"),
])
def test_fit_rejects_bad_lever_combinations_before_loading_data(args, message, tmp_path, data_loads, capsys):
    code, _, err = run_cli(["-q", "fit", "--dataset", TINY, "--out", str(tmp_path / "m"), *args], capsys)
    assert code == 2 and message in err and err.count("\n") == 1
    assert data_loads == []


def test_fit_is_reproducible_and_train_seed_varies_only_training(tmp_path, capsys):
    from safetensors.numpy import load_file

    runs = {}
    for name, extra in (("a", []), ("b", []), ("c", ["--train-seed", "7"])):
        r = _fit_json(capsys, "--model", "flat", "--epochs", "1", "--out", str(tmp_path / name), *extra)
        runs[name] = (r, load_file(str(tmp_path / name / "flat.safetensors")))
    assert runs["a"][0]["val_examples"] == runs["c"][0]["val_examples"] == 18  # same validation split
    for k, v in runs["a"][1].items():
        np.testing.assert_array_equal(v, runs["b"][1][k])
    assert not np.array_equal(runs["a"][1]["classifier.weight"], runs["c"][1]["classifier.weight"])


def test_fit_tree_groups_routes_through_a_cut_and_scores_on_the_full_tree(fitted, tmp_path, capsys):
    import torch

    from edgehmoe.core.metrics import evaluate
    from edgehmoe.data import load_dataset
    from edgehmoe.core.evaluation import decode_batches
    from edgehmoe.model.inference import load_models

    # Prepare: groups of at most 2 of TINY's 3-class superclasses: every class under the root
    out = tmp_path / "m"
    r = _fit_json(capsys, "--model", "both", "--epochs", "2", "--tree-groups", "2", "--out", str(out))
    assert r["hmoe"]["tree_groups"] == 2 and r["hmoe"]["experts"] == 1
    model = json.loads((out / "model.json").read_text())
    assert model["hierarchy"]["metric_tree"]["names"] == json.loads(
        (fitted / "model.json").read_text())["hierarchy"]["names"]
    # Execute: evaluate from the model directory and from the ONNX bundle
    assert main(["-q", "export", "--model-dir", str(out), "--out", str(tmp_path / "b")]) == 0
    capsys.readouterr()
    args = ["--dataset", TINY, "--split", "test", "--json"]
    _, torch_out, _ = run_cli(["-q", "evaluate", "--model-dir", str(out), *args], capsys)
    _, ort_out, _ = run_cli(["-q", "evaluate", "--bundle", str(tmp_path / "b"), *args], capsys)
    # Assert: both agree, and the metric is the full (superclass) tree's: a mistake inside a
    # superclass still earns the superclass's information
    ort, torch_m = json.loads(ort_out), json.loads(torch_out)
    assert ort.pop("bundle") == str(tmp_path / "b") and ort == torch_m
    test = load_dataset(TINY, "test")
    hm, fm, md = load_models(out)
    with torch.no_grad():
        pred = decode_batches(hm.tree, test.x, "hmoe", hm.expert_probs)
    full = test.hierarchy
    leaves = md.hierarchy.leaf_class[pred]
    assert torch_m["info_f1"] == pytest.approx(evaluate(full, test.y, full.class_to_node[leaves])["info_f1"])
    assert set(torch_m["accuracy_per_level"]) == {"1", "2"}  # the full tree's levels
    # `hierarchy show --tree-groups` prints the routing tree fit trained
    code, shown, _ = run_cli(["-q", "hierarchy", "show", "--dataset", TINY, "--tree-groups", "2", "--json"], capsys)
    shown = json.loads(shown)
    assert code == 0 and shown["names"] == model["hierarchy"]["names"] and shown["experts"] == 1
