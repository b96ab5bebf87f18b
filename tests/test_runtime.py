"""The torch-free runtime: lazy LRU sessions, batch-wise routing, integrity checks, the CLI.

Model: synthetic data with 3 superclasses x 2 classes at 16x16 px, briefly trained::

    0 root ─ 1 super0 ─ 4 super0/disc (class 0), 5 super0/square (class 1)
           ├ 2 super1 ─ 6 super1/disc (class 2), 7 super1/square (class 3)
           └ 3 super2 ─ 8 super2/disc (class 4), 9 super2/square (class 5)
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from edgehmoe.cli.bundle import evaluate_bundle
from edgehmoe.cli.bundle import main as bundle_main
from edgehmoe.data.base import channel_stats
from edgehmoe.data.synthetic import make_synthetic
from edgehmoe.edge.manifest import BundleError
from edgehmoe.edge.runtime import BundlePredictor, FlatPredictor, make_session_options
from edgehmoe.export.bundle import export_bundle, load_torch_models
from edgehmoe.model.arch import expert_specs
from edgehmoe.model.central import fit_flat, fit_hmoe, new_model_dir
from edgehmoe.model.inference import evaluate_models
from edgehmoe.model.training import TrainConfig

SIZE = 16
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("runtime")
    torch.set_num_threads(1)  # tiny models: a second thread mostly spins
    x, y, _, tree = make_synthetic(coarse=3, fine=2, per_class=80, size=SIZE, seed=0)
    xt, yt, _, _ = make_synthetic(coarse=3, fine=2, per_class=30, size=SIZE, seed=0, stream=1)
    mean, std = channel_stats(x)
    md = new_model_dir(root / "model", tree, SIZE, mean, std, "synthetic")
    cfg = TrainConfig(epochs=3, batch_size=64, lr=0.05, schedule="onecycle")
    fit_hmoe(md, x, y, cfg, expert_specs(tree, SIZE, fixed_width=4))
    fit_flat(md, x, y, cfg, width=8)
    # With fused graphs, so the default predictor (fused="auto") runs them; fused="off" is the reference chain.
    bundle = export_bundle(md.path, root / "bundle", fused=("path", "tree")).parent
    return md, bundle, xt, yt


def test_torch_and_onnxruntime_evaluations_agree(trained):
    # Prepare
    md, bundle, xt, yt = trained
    hm, fm = load_torch_models(md.path)
    # Execute / Assert: same predictions, hence identical metrics.
    for model, kw in [("hmoe", {}), ("hmoe", {"beam": 3}), ("hmoe", {"threshold": 0.6}), ("flat", {}),
                      ("flat", {"threshold": 0.6})]:
        ort_metrics = evaluate_bundle(bundle, xt, yt, model=model, batch_size=50, **kw)
        torch_metrics = evaluate_models(hm, fm, xt, yt, which=model, **kw)
        ort_metrics.pop("bundle")
        assert ort_metrics == torch_metrics, (model, kw)
    # The model learned something (the data are easy at the superclass level).
    assert torch_metrics["accuracy_per_level"]["1"] > 0.6


def test_greedy_runs_each_expert_once_per_level_and_loads_lazily(trained):
    # Prepare
    _, bundle, xt, _ = trained
    pred = BundlePredictor(bundle, fused="off")  # the reference chain: one session per expert
    calls: Counter = Counter()
    sizes: list[tuple[int, int]] = []
    original = pred.expert_logits

    def counting(node, xp):
        calls[node] += 1
        sizes.append((node, len(xp)))
        return original(node, xp)

    pred.expert_logits = counting
    # Execute: one image loads only the experts on its path.
    nodes1, _ = pred.predict_greedy(xt[:1])
    assert pred.loaded_experts == pred.tree.path(int(nodes1[0]))[:-1]
    calls.clear()
    nodes, p = pred.predict_greedy(xt)
    # Assert: one session run per node per level; each batch holds all samples at that node.
    assert max(calls.values()) == 1
    assert sum(n for node, n in sizes[-len(calls):] if node != 0) == len(xt)
    assert dict(sizes)[0] == len(xt)
    assert pred.tree.is_leaf[nodes].all()
    assert ((p > 0) & (p <= 1)).all()


def test_lru_keeps_at_most_max_sessions_alive(trained):
    _, bundle, xt, _ = trained
    unlimited = BundlePredictor(bundle, max_sessions=0, fused="off")
    one = BundlePredictor(bundle, max_sessions=1, fused="off")
    ref = unlimited.predict_greedy(xt)
    got = one.predict_greedy(xt)
    np.testing.assert_array_equal(got[0], ref[0])
    np.testing.assert_allclose(got[1], ref[1])
    assert len(one.loaded_experts) == 1
    assert len(unlimited.loaded_experts) == 4
    # Small batches re-use the cache: predicting twice the same image creates no new session.
    two = BundlePredictor(bundle, max_sessions=2, fused="off")
    two.predict_greedy(xt[:1])
    created = two.sessions_created
    two.predict_greedy(xt[:1])
    assert two.sessions_created == created == 2


def test_beam_threshold_and_explain(trained):
    _, bundle, xt, _ = trained
    pred = BundlePredictor(bundle)
    g_nodes, g_p = pred.predict_greedy(xt)
    b_nodes, b_p = pred.predict_beam(xt, 6)
    assert (b_p >= g_p - 1e-12).all()  # exhaustive beam finds the most probable path
    u0, _ = pred.predict_until(xt, 0.0)
    np.testing.assert_array_equal(u0, g_nodes)
    u, up = pred.predict_until(xt, 0.8)
    assert (up >= 0.8).all() or (u[up < 0.8] == 0).all()
    assert not pred.tree.is_leaf[u].all()  # some predictions stop at an internal node
    assert (pred.predict_until(xt, 1.5)[0] == 0).all()
    # explain(): the path's step probabilities multiply to the path probability.
    ex = pred.explain(xt[:5])
    for d, n, p in zip(ex, g_nodes, g_p):
        assert d["node"] == n and d["is_leaf"] and d["class_id"] == pred.tree.leaf_class[n]
        assert [s["node"] for s in d["path"]] == pred.tree.path(int(n))
        assert np.prod([s["probability"] for s in d["path"]]) == pytest.approx(p)
        assert d["alternatives"][0]["node"] == n
        assert d["class_name"] == pred.tree.names[n]
    ex_u = pred.explain(xt[:20], threshold=0.8)
    assert [d["node"] for d in ex_u] == u[:20].tolist()


def test_flat_predictor(trained):
    md, bundle, xt, _ = trained
    _, fm = load_torch_models(md.path)
    flat = FlatPredictor(bundle)
    np.testing.assert_array_equal(flat.predict(xt)[0], fm.predict(xt))
    np.testing.assert_array_equal(flat.predict_until(xt, 0.7)[0], fm.predict_until(xt, 0.7))
    # The probability of a thresholded prediction is the softmax mass under the predicted node.
    # With the median top probability as threshold, half the images keep their argmax leaf.
    p = flat.predict_proba(xt)
    tau = float(np.median(p.max(axis=1)))
    nodes, probs = flat.predict(xt, threshold=tau)
    leaves = flat.tree.class_to_node
    mass = np.array([p[i, flat.tree.is_ancestor_or_self(np.full(len(leaves), n), leaves)].sum()
                     for i, n in enumerate(nodes)])
    np.testing.assert_allclose(probs[nodes != 0], mass[nodes != 0])
    assert (probs[nodes != 0] >= tau).all() and (probs[nodes == 0] == 1.0).all()
    np.testing.assert_array_equal(flat.tree.is_leaf[nodes], p.max(axis=1) >= tau)


def _copy(bundle: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "copy"
    shutil.copytree(bundle, dst)
    return dst


def test_tampered_and_missing_files_fail_clearly(trained, tmp_path):
    _, bundle, xt, _ = trained
    b = _copy(bundle, tmp_path)
    # One flipped byte in an expert.
    f = b / "experts" / "2.onnx"
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0xFF
    f.write_bytes(bytes(data))
    with pytest.raises(BundleError, match=r"2\.onnx.*does not match its sha256.*modified or corrupted"):
        BundlePredictor(b)
    # A file swapped after opening is caught when its session is created: an expert's...
    f.write_bytes((bundle / "experts" / "2.onnx").read_bytes())
    pred = BundlePredictor(b, fused="off")
    f.write_bytes((bundle / "experts" / "3.onnx").read_bytes())
    with pytest.raises(BundleError, match="sha256"):
        pred.predict_greedy(xt)
    # ... or a fused graph's.
    f.write_bytes((bundle / "experts" / "2.onnx").read_bytes())
    pred = BundlePredictor(b)
    g = b / "fused" / "tree.onnx"
    g.write_bytes(g.read_bytes() + b"\0")
    with pytest.raises(BundleError, match=r"tree\.onnx \(fused tree graph\) does not match its sha256"):
        pred.predict_greedy(xt)
    g.write_bytes((bundle / "fused" / "tree.onnx").read_bytes())
    # A missing file.
    f.unlink()
    with pytest.raises(BundleError, match=r"2\.onnx is missing.*incomplete"):
        BundlePredictor(b)
    with pytest.raises(BundleError, match="missing"):
        BundlePredictor(b, verify=False)
    # A missing, unreadable or foreign manifest.
    (b / "manifest.json").unlink()
    with pytest.raises(BundleError, match="manifest.json missing"):
        BundlePredictor(b)
    (b / "manifest.json").write_text("{not json")
    with pytest.raises(BundleError, match="not valid JSON"):
        BundlePredictor(b)
    m = json.loads((bundle / "manifest.json").read_text())
    m["format_version"] = 99
    (b / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(BundleError, match="format_version 99"):
        BundlePredictor(b)
    with pytest.raises(BundleError, match="does not exist"):
        BundlePredictor(tmp_path / "nowhere")


def test_wrong_inputs_fail_clearly(trained):
    _, bundle, xt, _ = trained
    pred = BundlePredictor(bundle)
    with pytest.raises(BundleError, match=r"uint8 images of shape \(N, 16, 16, 3\).*input size is 16x16"):
        pred.predict_greedy(np.zeros((2, 32, 32, 3), np.uint8))
    with pytest.raises(BundleError, match=r"\(N, 16, 16, 3\).*got dtype float32"):
        pred.predict_greedy(xt.astype(np.float32))
    with pytest.raises(BundleError, match=r"add a batch axis"):
        pred.predict_greedy(xt[0])
    with pytest.raises(BundleError, match=r"\(N, 16, 16, 3\)"):
        pred.predict_greedy(xt.transpose(0, 3, 1, 2))
    with pytest.raises(BundleError, match=r"\(N, 16, 16, 3\)"):
        FlatPredictor(bundle).predict(np.zeros((1, 8, 8, 3), np.uint8))


def test_session_options_for_small_devices():
    so = make_session_options(1)
    assert so.intra_op_num_threads == 1 and so.inter_op_num_threads == 1
    assert not so.enable_cpu_mem_arena and not so.enable_mem_pattern
    with pytest.raises(ValueError, match="valid: disable, basic, extended, all"):
        make_session_options(1, optimization="max")


def test_cli_predict_text_json_and_errors(trained, tmp_path, capsys):
    _, bundle, xt, _ = trained
    npz = tmp_path / "imgs.npz"
    np.savez(npz, x=xt[:3])
    assert bundle_main(["predict", "--bundle", str(bundle), str(npz), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    ref = BundlePredictor(bundle).explain(xt[:3])
    assert [r["node"] for r in out] == [r["node"] for r in ref]
    assert out[0]["input"] == f"{npz}[0]" and out[0]["path"][0]["name"] == "root"
    assert bundle_main(["predict", "--bundle", str(bundle), str(npz), "--threshold", "0.9"]) == 0
    text = capsys.readouterr().out.strip().splitlines()
    assert len(text) == 3 and "path: root (1.00)" in text[0]
    # User errors: one line on stderr, exit status 2.
    assert bundle_main(["predict", "--bundle", str(tmp_path / "none"), str(npz)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("edgehmoe: error:") and "\n" not in err
    np.savez(tmp_path / "big.npz", x=np.zeros((1, 20, 20, 3), np.uint8))
    assert bundle_main(["predict", "--bundle", str(bundle), str(tmp_path / "big.npz")]) == 2
    assert "(N, 16, 16, 3)" in capsys.readouterr().err


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
    try:
        import torch  # noqa: F401
    except ImportError:
        pass
    else:
        raise SystemExit("torch was importable")
    """
)


def test_predict_and_evaluate_work_without_torch(trained, tmp_path):
    """A Pi has numpy + onnxruntime + Pillow only: run the real CLI with torch unimportable."""
    from PIL import Image

    # Prepare
    md, bundle, xt, yt = trained
    npz = tmp_path / "imgs.npz"
    np.savez(npz, x=xt[:4])
    png = tmp_path / "one.png"
    Image.fromarray(xt[5]).resize((48, 48), Image.NEAREST).save(png)  # resized back to 16x16
    np.savez(tmp_path / "eval.npz", x=xt, y=yt)
    script = _BLOCK_TORCH + textwrap.dedent(
        f"""
        import numpy as np
        from edgehmoe.cli.main import main
        rc = main(["predict", "--bundle", {str(bundle)!r}, {str(npz)!r}, {str(png)!r}, "--json"])
        assert rc == 0, rc
        from edgehmoe.cli.bundle import evaluate_bundle
        d = np.load({str(tmp_path / "eval.npz")!r})
        m = evaluate_bundle({str(bundle)!r}, d["x"], d["y"])
        loaded = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
        print(json.dumps({{"metrics": m, "blocked_modules_loaded": loaded}}))
        """
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    # Execute
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    # Assert
    assert res.returncode == 0, res.stderr[-2000:]
    lines = res.stdout.strip().splitlines()
    preds, final = json.loads(lines[0]), json.loads(lines[-1])
    assert final["blocked_modules_loaded"] == []
    assert len(preds) == 5 and preds[4]["input"] == str(png)
    ref = BundlePredictor(bundle).explain(xt[:4])
    assert [p["node"] for p in preds[:4]] == [r["node"] for r in ref]
    hm, fm = load_torch_models(md.path)
    torch_metrics = evaluate_models(hm, fm, xt, yt, which="hmoe")
    assert final["metrics"]["info_f1"] == torch_metrics["info_f1"]
    assert final["metrics"]["top1"] == torch_metrics["top1"]
