"""Fused graphs (edgehmoe.export.fuse): one ONNX Runtime call per batch, the same routing.

Model: synthetic data with 3 superclasses x 2 classes at 16x16 px, briefly trained (as in
test_runtime.py), plus a deeper tree so the path graph nests ``If`` nodes two levels down::

    0 root ─ 1 super0 ─ 4 super0/disc (class 0), 5 super0/square (class 1)
           ├ 2 super1 ─ 6 super1/disc (class 2), 7 super1/square (class 3)
           └ 3 super2 ─ 8 super2/disc (class 4), 9 super2/square (class 5)

The reference is the same bundle opened with ``fused="off"`` (one session per expert, the
chain as it ran before fused graphs existed).
"""

from __future__ import annotations

import json
import logging
import shutil

import numpy as np
import pytest
import torch

from edgehmoe.cli.bundle import evaluate_bundle
from edgehmoe.core.hierarchy import Hierarchy
from edgehmoe.data.base import channel_stats
from edgehmoe.data.synthetic import make_synthetic
from edgehmoe.edge.manifest import BundleError, read_manifest
from edgehmoe.edge.runtime import BundlePredictor
from edgehmoe.export.bundle import export_bundle, subset_bundle
from edgehmoe.export.fuse import check_fused
from edgehmoe.model.arch import ArchSpec, build_model, count_params, expert_specs
from edgehmoe.model.central import fit_flat, fit_hmoe, new_model_dir
from edgehmoe.model.training import TrainConfig, state_arrays

SIZE = 16


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("fused")
    torch.set_num_threads(1)
    x, y, _, tree = make_synthetic(coarse=3, fine=2, per_class=80, size=SIZE, seed=0)
    xt, yt, _, _ = make_synthetic(coarse=3, fine=2, per_class=30, size=SIZE, seed=0, stream=1)
    mean, std = channel_stats(x)
    md = new_model_dir(root / "model", tree, SIZE, mean, std, "synthetic")
    cfg = TrainConfig(epochs=3, batch_size=64, lr=0.05, schedule="onecycle")
    fit_hmoe(md, x, y, cfg, expert_specs(tree, SIZE, fixed_width=4))
    fit_flat(md, x, y, cfg, width=8)
    bundle = export_bundle(md.path, root / "bundle", fused=("path", "tree")).parent
    return md, bundle, xt, yt


def _same(a, b):
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])  # path probabilities bit for bit, not just close


def test_export_writes_checked_fused_graphs(trained):
    # Prepare
    _, bundle, _, _ = trained
    # Execute
    m = read_manifest(bundle)
    # Assert: both graphs, built from exactly these expert files, checked bit for bit.
    assert sorted(m["fused"]["graphs"]) == ["path", "tree"]
    assert m["fused"]["built_from"] == {k: {"sha256": e["sha256"], "outputs": None} for k, e in m["experts"].items()}
    assert m["fused"]["width"] == 3
    parity = m["fused"]["parity"]
    assert parity["max_abs_diff"] == 0.0 and parity["path_greedy_equal"] == parity["tree_greedy_equal"] == 64


def test_fused_predictions_equal_the_reference_chain(trained):
    # Prepare
    _, bundle, xt, _ = trained
    ref = BundlePredictor(bundle, fused="off")
    fused = BundlePredictor(bundle)
    assert fused.fused_kinds == ["path", "tree"]
    # Execute / Assert: whole batch (tree graph) and one image at a time (path graph).
    for xb in [xt] + [xt[i : i + 1] for i in range(0, len(xt), 9)]:
        _same(fused.predict_greedy(xb), ref.predict_greedy(xb))
        for tau in (0.0, 0.5, 0.8, 0.95):
            _same(fused.predict_until(xb, tau), ref.predict_until(xb, tau))
        _same(fused.predict_beam(xb, 2), ref.predict_beam(xb, 2))
    assert fused.explain(xt[:7], threshold=0.8) == ref.explain(xt[:7], threshold=0.8)
    assert fused.explain(xt[:1]) == ref.explain(xt[:1])


def test_one_onnxruntime_call_per_batch_and_no_expert_sessions(trained):
    # Prepare
    _, bundle, xt, _ = trained
    pred = BundlePredictor(bundle)
    # Execute
    pred.predict_greedy(xt[:1])
    pred.predict_greedy(xt)
    pred.predict_until(xt, 0.8)
    # Assert: three calls, the path graph then the tree graph; no expert session was created.
    assert pred.session_runs == 3 and pred.loaded_fused == ["path", "tree"]
    assert pred.loaded_experts == [] and pred.sessions_created == 2
    # Every sample ran the root, and each superclass expert ran on the samples routed to it.
    nodes, _ = BundlePredictor(bundle, fused="off").predict_greedy(xt)
    parents = pred.tree.parents[nodes]
    assert pred.expert_samples[0] == 1 + 2 * len(xt)
    for s in (1, 2, 3):
        assert pred.expert_samples[s] == 2 * int((parents == s).sum()) + int(parents[0] == s)
    # Beam search leaves the greedy path: it runs expert by expert.
    before = pred.session_runs
    pred.predict_beam(xt, 2)
    assert pred.loaded_experts and pred.session_runs - before == len(pred.loaded_experts)


def test_evaluate_bundle_with_fused_graphs_equals_the_reference(trained, tmp_path):
    # Prepare: the same bundle without its fused graphs (what an older export wrote).
    _, bundle, xt, yt = trained
    old = tmp_path / "old"
    shutil.copytree(bundle, old)
    m = json.loads((old / "manifest.json").read_text())
    del m["fused"]
    (old / "manifest.json").write_text(json.dumps(m))
    shutil.rmtree(old / "fused")
    # Execute / Assert: identical metrics in every decode mode.
    assert BundlePredictor(old).fused_kinds == []
    for kw in ({}, {"threshold": 0.7}, {"beam": 3}):
        a, b = evaluate_bundle(bundle, xt, yt, **kw), evaluate_bundle(old, xt, yt, **kw)
        a.pop("bundle"), b.pop("bundle")
        assert a == b, kw


def test_stale_fused_graphs_are_never_used(trained, tmp_path, caplog):
    # Prepare: swap two experts' files (and their manifest entries) after the fused graphs were built.
    _, bundle, xt, _ = trained
    b = tmp_path / "edited"
    shutil.copytree(bundle, b)
    m = json.loads((b / "manifest.json").read_text())
    e1, e2 = m["experts"]["1"], m["experts"]["2"]
    m["experts"]["1"], m["experts"]["2"] = {**e1, "file": e2["file"], "sha256": e2["sha256"]}, \
        {**e2, "file": e1["file"], "sha256": e1["sha256"]}
    (b / "manifest.json").write_text(json.dumps(m))
    # Execute
    with caplog.at_level(logging.WARNING, logger="edgehmoe.edge.runtime"):
        pred = BundlePredictor(b)
    # Assert: the fused graphs (which still hold the old experts) are ignored.
    assert pred.fused_kinds == [] and "built from other expert files" in caplog.text
    _same(pred.predict_greedy(xt), BundlePredictor(b, fused="off").predict_greedy(xt))
    with pytest.raises(BundleError, match="no up-to-date fused graphs; re-export"):
        BundlePredictor(b, fused="on")
    with pytest.raises(ValueError, match="valid: auto, on, off"):
        BundlePredictor(bundle, fused="yes")


def test_fused_graphs_of_a_deeper_tree_with_restricted_outputs(tmp_path):
    """Random weights over a 3-level tree, then a subset whose root keeps 2 of 3 branches."""
    # Prepare: 0 root -> 1 s0 (-> 4 a0, 5 A -> 10 a1, 11 a2), 2 s1 (-> 6 b0, 7 b1), 3 s2 (-> 8 c0, 9 c1)
    tree = Hierarchy([-1, 0, 0, 0, 1, 1, 2, 2, 3, 3, 5, 5],
                     ["root", "s0", "s1", "s2", "a0", "A", "b0", "b1", "c0", "c1", "a1", "a2"],
                     [-1, -1, -1, -1, 0, -1, 2, 3, 4, 5, 1, 6])
    md = new_model_dir(tmp_path / "model", tree, SIZE, [0.5] * 3, [0.25] * 3, "unit-test")
    torch.manual_seed(0)
    for node in tree.internal_nodes.tolist():
        spec = ArchSpec(width=8 if node == 0 else 4, num_outputs=int(tree.num_children[node]), input_size=SIZE)
        m = build_model(spec)
        md.write_expert(node, spec.to_dict(), state_arrays(m), count_params(m))
    md.save_json()
    bundle = export_bundle(md.path, tmp_path / "bundle", fused=("path", "tree")).parent
    x = np.random.default_rng(3).integers(0, 256, size=(40, SIZE, SIZE, 3), dtype=np.uint8)
    # Execute
    sub = subset_bundle(bundle, ["s0", "s2"], tmp_path / "sub").parent
    # Assert: the subset's rebuilt fused graphs apply the root's restricted outputs.
    assert read_manifest(sub)["experts"]["0"]["outputs"] == [0, 2]
    for b in (bundle, sub):
        report = check_fused(b, x)
        assert report["max_abs_diff"] == 0.0 and report["path_greedy_equal"] == 40
        ref, fused = BundlePredictor(b, fused="off"), BundlePredictor(b)
        _same(fused.predict_greedy(x), ref.predict_greedy(x))
        for i in range(0, 40, 5):
            _same(fused.predict_until(x[i : i + 1], 0.6), ref.predict_until(x[i : i + 1], 0.6))
