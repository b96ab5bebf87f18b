"""int8 bundles (``edgehmoe export --quantize int8``): calibrated static quantization, what
the manifest records, agreement with float32, and every bundle command on them.

Model: synthetic data with 3 superclasses x 2 classes at 16x16 px, briefly trained::

    0 root ─ 1 super0 ─ 4 super0/disc (class 0), 5 super0/square (class 1)
           ├ 2 super1 ─ 6 super1/disc (class 2), 7 super1/square (class 3)
           └ 3 super2 ─ 8 super2/disc (class 4), 9 super2/square (class 5)

Experts w=8, flat w=16, calibrated on 200 training images of the same synthetic spec. The
tolerance for int8 against float32 on held-out images: at least 90 % of greedy predictions
equal and information F1 within 0.05 (on real data the docs report 0.005-level changes; 180
tiny images make each image worth 0.6 %).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from edgehmoe.cli.bundle import evaluate_bundle
from edgehmoe.cli.bundle import main as bundle_main
from edgehmoe.data.base import channel_stats
from edgehmoe.data.synthetic import make_synthetic
from edgehmoe.edge.manifest import read_manifest
from edgehmoe.edge.runtime import BundlePredictor, FlatPredictor
from edgehmoe.export.bundle import subset_bundle
from edgehmoe.export.fuse import check_fused
from edgehmoe.model.arch import expert_specs
from edgehmoe.model.central import fit_flat, fit_hmoe, new_model_dir
from edgehmoe.model.training import TrainConfig

SIZE = 16
SPEC = "synthetic:coarse=3,fine=2,per_class=80,size=16"
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bundles(tmp_path_factory):
    root = tmp_path_factory.mktemp("int8")
    torch.set_num_threads(1)
    x, y, _, tree = make_synthetic(coarse=3, fine=2, per_class=80, size=SIZE, seed=0)
    xt, yt, _, _ = make_synthetic(coarse=3, fine=2, per_class=30, size=SIZE, seed=0, stream=1)
    mean, std = channel_stats(x)
    md = new_model_dir(root / "model", tree, SIZE, mean, std, "synthetic")
    cfg = TrainConfig(epochs=4, batch_size=64, lr=0.05, schedule="onecycle")
    fit_hmoe(md, x, y, cfg, expert_specs(tree, SIZE, fixed_width=8))
    fit_flat(md, x, y, cfg, width=16)
    fp32, int8 = root / "fp32", root / "int8"
    assert bundle_main(["export", "--model-dir", str(md.path), "--out", str(fp32), "--json"]) == 0
    assert bundle_main(["export", "--model-dir", str(md.path), "--out", str(int8), "--quantize", "int8",
                        "--calibration-data", SPEC, "--calibration-size", "200", "--fused", "path,tree",
                        "--json"]) == 0
    return md, fp32, int8, xt, yt


def _bytes(bundle: Path) -> int:
    m = read_manifest(bundle)
    return sum(e["bytes"] for e in m["experts"].values()) + m["flat"]["bytes"]


def test_manifest_records_the_quantization_and_files_are_int8(bundles):
    # Prepare
    _, fp32, int8, _, _ = bundles
    # Execute
    m = read_manifest(int8)
    # Assert
    q = m["quantization"]
    assert m["precision"] == "int8" and read_manifest(fp32).get("precision", "float32") == "float32"
    assert (q["format"], q["per_channel"], q["weights"], q["activations"]) == ("QDQ", True, "int8", "uint8")
    assert q["calibration"] == {"dataset": SPEC, "split": "train", "seed": 0, "images": 200, "max_per_network": 200}
    assert sorted(q["networks"]) == ["0", "1", "2", "3", "flat"]
    # The root and the flat model calibrate on every image; an expert on what reaches it.
    assert q["networks"]["0"]["calibration_images"] == q["networks"]["flat"]["calibration_images"] == 200
    assert all(40 <= q["networks"][k]["calibration_images"] < 200 for k in ("1", "2", "3"))
    assert all(v["argmax_agreement"] >= 0.9 for v in q["networks"].values())
    for entry in list(m["experts"].values()) + [m["flat"]]:
        assert entry["precision"] == "int8"
        proto = onnx.load(str(int8 / entry["file"]))
        ops = {n.op_type for n in proto.graph.node}
        assert {"QuantizeLinear", "DequantizeLinear"} <= ops
        weights = [t for t in proto.graph.initializer if len(t.dims) == 4]
        assert weights and all(t.data_type == onnx.TensorProto.INT8 for t in weights)  # every conv weight
        # The classifier's output is not re-quantized: float logits, no 256-level ties.
        last = next(n for n in proto.graph.node if "logits" in n.output)
        assert last.op_type == "Gemm"
    assert _bytes(int8) < 0.6 * _bytes(fp32)
    assert q["bytes_int8"] == _bytes(int8) and q["bytes_float32"] == _bytes(fp32)


def test_int8_routing_agrees_with_float32_within_tolerance(bundles):
    # Prepare
    _, fp32, int8, xt, yt = bundles
    # Execute
    ref, got = BundlePredictor(fp32).predict_greedy(xt)[0], BundlePredictor(int8).predict_greedy(xt)[0]
    m32, m8 = evaluate_bundle(fp32, xt, yt), evaluate_bundle(int8, xt, yt)
    f32, f8 = FlatPredictor(fp32).predict(xt)[0], FlatPredictor(int8).predict(xt)[0]
    # Assert
    assert (ref == got).mean() >= 0.9 and (f32 == f8).mean() >= 0.9
    assert abs(m8["info_f1"] - m32["info_f1"]) <= 0.05
    assert m32["info_f1"] > 0.5  # a model that learned something, so agreement means something


def test_int8_fused_graphs_equal_the_int8_sessions(bundles):
    _, _, int8, xt, _ = bundles
    report = check_fused(int8, xt[:40])
    assert report["max_abs_diff"] == 0.0 and report["path_greedy_equal"] == report["tree_greedy_equal"] == 40
    ref, fused = BundlePredictor(int8, fused="off"), BundlePredictor(int8, fused="on")
    for tau in (None, 0.7):
        a, b = ref.predict(xt, threshold=tau), fused.predict(xt, threshold=tau)
        np.testing.assert_array_equal(a[0], b[0])
        np.testing.assert_array_equal(a[1], b[1])


def test_subset_and_evaluate_of_an_int8_bundle(bundles, tmp_path, capsys):
    # Prepare
    _, _, int8, xt, yt = bundles
    full = BundlePredictor(int8)
    # Execute
    assert bundle_main(["bundle", "subset", "--bundle", str(int8), "--keep", "super1", "--out", str(tmp_path / "s1"),
                        "--json"]) == 0
    capsys.readouterr()
    sub = BundlePredictor(tmp_path / "s1")
    # Assert: the int8 files are copied as they are, the manifest still says int8, and the
    # subset's root is super1's int8 expert.
    m = read_manifest(tmp_path / "s1")
    assert m["precision"] == "int8" and m["experts"]["0"]["sha256"] == read_manifest(int8)["experts"]["2"]["sha256"]
    xp = full.preprocess(xt)
    best = full.expert_logits(2, xp).argmax(1)
    np.testing.assert_array_equal(sub.predict_greedy(xt)[0], 1 + best)
    ev = evaluate_bundle(int8, xt, yt)
    assert ev["num_examples"] == len(xt) and 0 <= ev["info_f1"] <= 1


_BLOCK_TORCH = textwrap.dedent(
    """
    import importlib.abc, json, sys
    BLOCKED = {"torch", "torchvision", "onnx", "onnxscript"}

    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                raise ModuleNotFoundError(f"No module named {name!r} (blocked by the test)")
            return None

    sys.meta_path.insert(0, Block())
    """
)


def test_predict_runs_an_int8_bundle_without_torch(bundles, tmp_path):
    _, _, int8, xt, _ = bundles
    npz = tmp_path / "imgs.npz"
    np.savez(npz, x=xt[:5])
    script = _BLOCK_TORCH + textwrap.dedent(
        f"""
        from edgehmoe.cli.main import main
        rc = main(["predict", "--bundle", {str(int8)!r}, {str(npz)!r}, "--json"])
        loaded = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
        print(json.dumps({{"rc": rc, "blocked_modules_loaded": loaded}}))
        """
    )
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    lines = res.stdout.strip().splitlines()
    preds, final = json.loads(lines[0]), json.loads(lines[-1])
    assert final == {"rc": 0, "blocked_modules_loaded": []}
    assert [p["node"] for p in preds] == BundlePredictor(int8).predict_greedy(xt[:5])[0].tolist()


def test_int8_export_errors_are_one_line(bundles, tmp_path, capsys):
    md, _, _, _, _ = bundles
    base = ["export", "--model-dir", str(md.path), "--out", str(tmp_path / "b")]
    assert bundle_main(base + ["--quantize", "int8"]) == 2
    assert "--quantize int8 needs --calibration-data SPEC" in capsys.readouterr().err
    assert bundle_main(base + ["--calibration-data", SPEC]) == 2
    assert "--calibration-data is only used with --quantize int8" in capsys.readouterr().err
    other = "synthetic:coarse=2,fine=2,per_class=10,size=16"
    assert bundle_main(base + ["--quantize", "int8", "--calibration-data", other]) == 2
    assert "does not have the model's classes" in capsys.readouterr().err
    assert bundle_main(base + ["--fused", "path,ladder"]) == 2
    assert "--fused takes a comma-separated list of path, tree" in capsys.readouterr().err
    assert not (tmp_path / "b").exists()


def test_extend_then_export_int8(bundles, tmp_path, capsys):
    """``extend`` works on model directories; its output exports to int8 like any other. With
    the tree unchanged every expert (and the flat model) is reused byte for byte, so the int8
    bundle is the same as the original's."""
    # Prepare
    md, _, int8, xt, _ = bundles
    csv = tmp_path / "tree.csv"
    md.hierarchy.to_csv(csv)
    # Execute
    assert bundle_main(["extend", "--model-dir", str(md.path), "--hierarchy", str(csv), "--dataset", SPEC,
                        "--out", str(tmp_path / "ext"), "--epochs", "1", "--json"]) == 0
    assert bundle_main(["export", "--model-dir", str(tmp_path / "ext"), "--out", str(tmp_path / "ext8"),
                        "--quantize", "int8", "--calibration-data", SPEC, "--calibration-size", "200",
                        "--fused", "path,tree", "--json"]) == 0
    capsys.readouterr()
    # Assert
    a, b = read_manifest(int8), read_manifest(tmp_path / "ext8")
    assert {k: e["sha256"] for k, e in a["experts"].items()} == {k: e["sha256"] for k, e in b["experts"].items()}
    np.testing.assert_array_equal(BundlePredictor(tmp_path / "ext8").predict_greedy(xt)[0],
                                  BundlePredictor(int8).predict_greedy(xt)[0])


def test_calibration_ranges_come_from_every_batch():
    """Regression: with ONNX Runtime's CalibMaxIntermediateOutputs the MinMax calibrator threw
    flushed batches away, so the ranges came from the last batches only (and 4, 8, ... batches
    raised "No data is collected"). One batch of bright images first, then dim ones: the int8
    network must still represent the bright images."""
    from edgehmoe.export.bundle import export_network
    from edgehmoe.export.quantize import _BATCH, quantize_network
    from edgehmoe.model.arch import ArchSpec, build_model

    torch.manual_seed(0)
    net = build_model(ArchSpec(width=4, num_outputs=3, input_size=8)).eval()
    data = export_network(net, 8)
    rng = np.random.default_rng(0)
    bright = rng.uniform(4.0, 8.0, size=(_BATCH, 3, 8, 8)).astype(np.float32)
    dim = rng.uniform(-0.1, 0.1, size=(3 * _BATCH, 3, 8, 8)).astype(np.float32)
    q = quantize_network(data, np.concatenate([bright, dim]))  # 4 batches
    import onnxruntime as ort

    def run(model: bytes, x):
        return ort.InferenceSession(model, providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]

    ref, got = run(data, bright), run(q, bright)
    # int8 error on the bright images is a small fraction of their logit range (clipped to the
    # dim images' range it would be of the order of the range itself)
    assert np.abs(got - ref).max() < 0.1 * (ref.max() - ref.min()), (np.abs(got - ref).max(), ref.max() - ref.min())
