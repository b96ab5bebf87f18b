"""Export to ONNX bundles (torch vs onnxruntime parity) and personalised subset bundles.

The tree used here (node index, name, dataset class)::

    0 root
    ├── 1 s0
    │   ├── 4 a0      (class 0)
    │   └── 5 a1      (class 1)
    ├── 2 s1
    │   ├── 6 b0      (class 2)
    │   └── 7 B
    │       ├── 10 b1 (class 5)
    │       └── 11 b2 (class 6)
    └── 3 s2
        ├── 8 c0      (class 3)
        └── 9 c1      (class 4)

Experts: root (3-way), s0, s1, s2, B (2-way). Random-init weights: parity does not need
training.
"""

from __future__ import annotations

import hashlib
import json
import shutil

import numpy as np
import onnx
import pytest
import torch

from edgehmoe.core.checkpoint import CheckpointError
from edgehmoe.core.hierarchy import Hierarchy
from edgehmoe.edge.manifest import BundleError, read_manifest
from edgehmoe.edge.runtime import BundlePredictor, FlatPredictor
from edgehmoe.errors import UsageError
from edgehmoe.export.bundle import (
    ParityError,
    check_parity_dirs,
    export_bundle,
    load_torch_models,
    subset_bundle,
)
from edgehmoe.model.arch import ArchSpec, build_model, count_params, flat_spec
from edgehmoe.model.central import new_model_dir
from edgehmoe.model.inference import evaluate_models, load_models
from edgehmoe.model.training import predict_logits, state_arrays

SIZE = 16
PARENTS = [-1, 0, 0, 0, 1, 1, 2, 2, 3, 3, 7, 7]
NAMES = ["root", "s0", "s1", "s2", "a0", "a1", "b0", "B", "c0", "c1", "b1", "b2"]
LEAF_CLASS = [-1, -1, -1, -1, 0, 1, 2, -1, 3, 4, 5, 6]


def tree12() -> Hierarchy:
    return Hierarchy(PARENTS, NAMES, LEAF_CLASS)


def _random_model_dir(path, seed=0):
    tree = tree12()
    md = new_model_dir(path, tree, SIZE, [0.4, 0.5, 0.6], [0.2, 0.25, 0.3], "unit-test")
    torch.manual_seed(seed)
    for node in tree.internal_nodes.tolist():
        spec = ArchSpec(width=4 if node else 8, num_outputs=int(tree.num_children[node]), input_size=SIZE)
        m = build_model(spec)
        # Non-trivial BatchNorm statistics, so folding them into the convolutions is tested.
        for mod in m.modules():
            if isinstance(mod, torch.nn.BatchNorm2d):
                mod.running_mean.uniform_(-0.2, 0.2)
                mod.running_var.uniform_(0.5, 2.0)
        md.write_expert(node, spec.to_dict(), state_arrays(m), count_params(m))
    spec = flat_spec(tree, SIZE, 8)
    m = build_model(spec)
    md.write_flat(spec.to_dict(), state_arrays(m), count_params(m))
    md.save_json()
    return md


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    md = _random_model_dir(root / "model")
    manifest = export_bundle(root / "model", root / "bundle")
    return md, manifest.parent


def _images(n, seed=1):
    return np.random.default_rng(seed).integers(0, 256, size=(n, SIZE, SIZE, 3), dtype=np.uint8)


def test_export_writes_one_file_per_expert_with_hashes(exported):
    # Prepare
    md, bundle = exported
    # Execute
    m = read_manifest(bundle)
    # Assert
    assert m["format_version"] == 1
    assert sorted(int(k) for k in m["experts"]) == [0, 1, 2, 3, 7]
    assert Hierarchy.from_dict(m["hierarchy"]) == md.hierarchy
    assert m["class_names"] == md.hierarchy.class_names()
    assert m["class_ids"] == list(range(7))
    assert m["input"]["image_shape"] == [SIZE, SIZE, 3]
    np.testing.assert_allclose(m["preprocess"]["mean"], [0.4, 0.5, 0.6])
    np.testing.assert_allclose(m["preprocess"]["std"], [0.2, 0.25, 0.3])
    for entry in list(m["experts"].values()) + [m["flat"]]:
        data = (bundle / entry["file"]).read_bytes()
        assert hashlib.sha256(data).hexdigest() == entry["sha256"]
        assert len(data) == entry["bytes"]
        proto = onnx.load_from_string(data)
        dims = proto.graph.input[0].type.tensor_type.shape.dim
        assert dims[0].dim_param and not dims[0].dim_value  # dynamic batch axis
        assert [d.dim_value for d in dims[1:]] == [3, SIZE, SIZE]
        # Exporter debugging metadata (stack traces with local paths) is stripped.
        assert b"stack_trace" not in data and str(md.path).encode() not in data
    # The parity check ran and passed.
    assert m["parity"]["worst"] <= 1e-4
    assert m["parity"]["greedy_equal"] == m["parity"]["samples"]


def test_ort_logits_match_torch_for_every_network_and_batch_size(exported):
    # Prepare
    md, bundle = exported
    hm, fm = load_torch_models(md.path)
    chain = BundlePredictor(bundle)
    flat = FlatPredictor(bundle)
    mean, std = np.asarray(md.mean, np.float32), np.asarray(md.std, np.float32)
    for n in (1, 5, 33):
        x = _images(n, seed=n)
        xp = chain.preprocess(x)
        # Execute / Assert
        for node, model in hm.experts.items():
            ref = predict_logits(model, x, mean, std)
            np.testing.assert_allclose(chain.expert_logits(node, xp), ref, rtol=0, atol=1e-4)
        np.testing.assert_allclose(flat.logits(x), predict_logits(fm.model, x, mean, std), rtol=0, atol=1e-4)


def test_preprocess_matches_training_bit_for_bit(exported):
    from edgehmoe.model.training import preprocess as torch_preprocess

    md, bundle = exported
    x = _images(4)
    ref = torch_preprocess(x, np.asarray(md.mean), np.asarray(md.std)).numpy()
    np.testing.assert_array_equal(BundlePredictor(bundle).preprocess(x), ref)


def test_greedy_beam_and_threshold_predictions_equal_torch(exported):
    # Prepare
    md, bundle = exported
    hm, fm = load_torch_models(md.path)
    chain = BundlePredictor(bundle)
    x = _images(64, seed=7)
    # Execute / Assert
    np.testing.assert_array_equal(chain.predict_greedy(x)[0], hm.predict_greedy(x))
    np.testing.assert_array_equal(chain.predict_beam(x, 3)[0], hm.predict_beam(x, 3))
    np.testing.assert_array_equal(chain.predict_until(x, 0.3)[0], hm.predict_until(x, 0.3))
    y = np.random.default_rng(0).integers(0, 7, size=len(x))
    from edgehmoe.cli.bundle import evaluate_bundle

    # Same predictions, so the metrics are identical (not merely close).
    for model, kw in [("hmoe", {}), ("hmoe", {"beam": 2}), ("hmoe", {"threshold": 0.3}), ("flat", {}),
                      ("flat", {"threshold": 0.3})]:
        got = evaluate_bundle(bundle, x, y, model=model, **kw)
        assert got.pop("bundle") == str(bundle)
        assert got == evaluate_models(hm, fm, x, y, which=model, **kw)


def test_parity_check_catches_an_unfaithful_network(exported, tmp_path):
    # Prepare: torch weights that differ from what the bundle holds.
    md, bundle = exported
    hm, fm = load_torch_models(md.path)
    with torch.no_grad():
        hm.experts[7].classifier.bias.add_(0.01)
    # Execute / Assert
    with pytest.raises(ParityError, match=r"expert 7 \('B'\).*differ from torch"):
        check_parity_dirs(md, bundle, hm.experts, fm.model, atol=1e-4, samples=8, seed=0)


def test_export_refuses_to_overwrite_and_rejects_non_model_dirs(exported, tmp_path):
    md, bundle = exported
    with pytest.raises(FileExistsError, match="--overwrite"):
        export_bundle(md.path, bundle)
    with pytest.raises(CheckpointError, match="model.json"):
        export_bundle(tmp_path / "nothing", tmp_path / "b")


def test_export_of_a_flat_only_model_dir_says_what_to_train(tmp_path):
    # Prepare: what `edgehmoe fit --model flat` writes (no experts)
    tree = tree12()
    md = new_model_dir(tmp_path / "flat-only", tree, SIZE, [0.4, 0.5, 0.6], [0.2, 0.25, 0.3], "unit-test")
    spec = flat_spec(tree, SIZE, 8)
    m = build_model(spec)
    md.write_flat(spec.to_dict(), state_arrays(m), count_params(m))
    md.save_json()
    # Execute / Assert: a clear error before anything is written
    with pytest.raises(CheckpointError, match=r"only the flat model: .*fit --model both"):
        export_bundle(md.path, tmp_path / "b")
    assert not (tmp_path / "b").exists()


def _route_from(chain: BundlePredictor, x: np.ndarray, start: int, nodes: list[int] | None = None):
    """Greedy descent in the full bundle starting at ``start`` (reference for subsets)."""
    tree = chain.tree
    xp = chain.preprocess(x)
    node = np.full(len(x), start)
    while (~tree.is_leaf[node]).any():
        for n in np.unique(node[~tree.is_leaf[node]]):
            idx = np.flatnonzero(node == n)
            best = chain.expert_logits(int(n), xp[idx]).argmax(1)
            node[idx] = tree.children(int(n))[best]
    return node


def test_subset_single_node_becomes_root_and_copies_files_byte_for_byte(exported, tmp_path):
    # Prepare
    _, bundle = exported
    full = BundlePredictor(bundle)
    x = _images(40, seed=3)
    # Execute
    manifest = subset_bundle(bundle, ["s1"], tmp_path / "s1")
    sub = BundlePredictor(manifest.parent)
    # Assert: tree s1 -> b0, B -> b1, b2; class ids point at the original dataset classes.
    assert sub.tree.names == ["s1", "b0", "B", "b1", "b2"]
    assert sub.class_ids.tolist() == [2, 5, 6]
    assert sub.class_names == ["b0", "b1", "b2"]
    kept = sorted(p.relative_to(manifest.parent).as_posix() for p in manifest.parent.rglob("*.onnx"))
    assert kept == ["experts/2.onnx", "experts/7.onnx", "flat.onnx"]
    for f in kept:
        assert (manifest.parent / f).read_bytes() == (bundle / f).read_bytes()
    # Predictions equal the full chain's descent from s1.
    ref = _route_from(full, x, full.tree.index("s1"))
    got = sub.predict_greedy(x)[0]
    assert [sub.tree.names[n] for n in got] == [full.tree.names[n] for n in ref]
    # The flat model is restricted to the kept classes.
    flat_full, flat_sub = FlatPredictor(bundle), FlatPredictor(manifest.parent)
    np.testing.assert_allclose(flat_sub.logits(x), flat_full.logits(x)[:, [2, 5, 6]], atol=0)


def test_subset_of_two_branches_restricts_the_root_softmax(exported, tmp_path):
    # Prepare
    _, bundle = exported
    full = BundlePredictor(bundle)
    x = _images(30, seed=4)
    # Execute: keep s0 and s2 (vehicles and animals, say); s1's branch is gone.
    manifest = subset_bundle(bundle, ["s0", "s2"], tmp_path / "s02")
    sub = BundlePredictor(manifest.parent)
    m = read_manifest(manifest.parent)
    # Assert: the root keeps its expert but only the logits of s0 and s2.
    assert sub.tree.names == ["root", "s0", "s2", "a0", "a1", "c0", "c1"]
    assert m["experts"]["0"]["outputs"] == [0, 2]
    assert sub.class_ids.tolist() == [0, 1, 3, 4]
    logits = full.expert_logits(0, full.preprocess(x))
    e = np.exp(logits[:, [0, 2]] - logits[:, [0, 2]].max(1, keepdims=True))
    expected = e / e.sum(1, keepdims=True)
    got = sub.expert_probs_fn(sub.preprocess(x))(0, np.arange(len(x)))
    np.testing.assert_allclose(got, expected, atol=1e-6)
    # Each prediction is a leaf under s0 or s2, reached by the restricted root.
    nodes, _ = sub.predict_greedy(x)
    first = np.where(expected[:, 0] >= expected[:, 1], full.tree.index("s0"), full.tree.index("s2"))
    ref = np.array([_route_from(full, x[i : i + 1], int(first[i]))[0] for i in range(len(x))])
    assert [sub.tree.names[n] for n in nodes] == [full.tree.names[n] for n in ref]


def test_subset_collapses_single_branch_ancestors_and_nests(exported, tmp_path):
    _, bundle = exported
    # b1 lies under s1/B; a0 under s0. Root routes s0 vs s1; s1 is kept (routes b0 vs B) only
    # if it has two kept branches -- here it has one (B), so it is skipped.
    manifest = subset_bundle(bundle, ["a0", "b1", "b2"], tmp_path / "mix")
    sub = BundlePredictor(manifest.parent)
    assert sub.tree.names == ["root", "a0", "B", "b1", "b2"]
    assert read_manifest(manifest.parent)["experts"]["0"]["outputs"] == [0, 1]
    assert sub.class_ids.tolist() == [0, 5, 6]
    # A subset of a subset composes the output restrictions.
    m2 = subset_bundle(manifest.parent, ["a0", "b2"], tmp_path / "mix2")
    sub2 = BundlePredictor(m2.parent)
    assert sub2.tree.names == ["root", "a0", "b2"]
    assert sub2.class_ids.tolist() == [0, 6]
    x = _images(16, seed=5)
    assert set(sub2.predict_greedy(x)[0].tolist()) <= {1, 2}


def test_subset_errors_are_clear(exported, tmp_path):
    _, bundle = exported
    with pytest.raises(BundleError, match="no node named 'vehicles'"):
        subset_bundle(bundle, ["vehicles"], tmp_path / "x")
    with pytest.raises(BundleError, match="only the leaf"):
        subset_bundle(bundle, ["a0"], tmp_path / "y")
    broken = tmp_path / "broken"
    shutil.copytree(bundle, broken)
    (broken / "experts" / "2.onnx").write_bytes(b"not onnx")
    with pytest.raises(BundleError, match="sha256"):
        subset_bundle(broken, ["s1"], tmp_path / "z")


def test_run_directory_exports_like_a_model_directory(tmp_path):
    # A federated run directory has the same model.json layout (plus its own files).
    run = tmp_path / "runs" / "demo"
    tree = Hierarchy([-1, 0, 0], ["root", "x", "y"], [-1, 0, 1])
    md = new_model_dir(run, tree, 8, [0.5] * 3, [0.25] * 3, "unit-test")
    spec = ArchSpec(width=4, num_outputs=2, input_size=8)
    m = build_model(spec)
    md.write_expert(0, spec.to_dict(), state_arrays(m), count_params(m))
    md.save_json()
    (run / "metrics.jsonl").write_text(json.dumps({"round": 1}) + "\n")
    from edgehmoe.cli.bundle import main

    assert main(["export", "--run", str(run), "--out", str(tmp_path / "b"), "--no-flat", "--json"]) == 0
    m = read_manifest(tmp_path / "b")
    assert m["flat"] is None and len(m["experts"]) == 1
    assert m["parity"]["worst"] <= 1e-4


def test_beam_together_with_a_threshold_is_rejected_by_every_caller(exported):
    # Prepare
    from edgehmoe.cli.bundle import evaluate_bundle

    md, bundle = exported
    hm, fm = load_torch_models(md.path)
    chain = BundlePredictor(bundle)
    x = _images(4)
    y = np.zeros(4, dtype=np.int64)
    calls = {
        "evaluate_models": lambda: evaluate_models(hm, fm, x, y, which="hmoe", beam=2, threshold=0.3),
        "evaluate_models flat": lambda: evaluate_models(hm, fm, x, y, which="flat", beam=2, threshold=0.3),
        "evaluate_bundle": lambda: evaluate_bundle(bundle, x, y, model="hmoe", beam=2, threshold=0.3),
        "HierarchicalModel.predict": lambda: hm.predict(x, beam=2, threshold=0.3),
        "BundlePredictor.predict": lambda: chain.predict(x, beam=2, threshold=0.3),
        "BundlePredictor.explain": lambda: chain.explain(x, beam=2, threshold=0.3),
    }
    # Execute / Assert: one message from the one decode path.
    for what, call in calls.items():
        with pytest.raises(UsageError, match="choose either --beam or --threshold, not both"):
            call()
            pytest.fail(what)


def test_model_dirs_with_one_element_batchnorm_counters_load_and_export(tmp_path):
    # Prepare: model directories written before checkpoint.contiguous_arrays stored
    # BatchNorm's 0-d num_batches_tracked as shape (1,).
    tree = Hierarchy([-1, 0, 0], ["root", "x", "y"], [-1, 0, 1])
    md = new_model_dir(tmp_path / "old", tree, 8, [0.5] * 3, [0.25] * 3, "unit-test")
    spec = ArchSpec(width=4, num_outputs=2, input_size=8)
    torch.manual_seed(0)
    m = build_model(spec)
    arrays = {k: (v.reshape(1) if v.ndim == 0 else v) for k, v in state_arrays(m).items()}
    assert sum(v.shape == (1,) for v in arrays.values()) == 3
    md.write_expert(0, spec.to_dict(), arrays, count_params(m))
    md.save_json()
    x = np.random.default_rng(0).integers(0, 256, size=(5, 8, 8, 3), dtype=np.uint8)
    # Execute: the one loader serves evaluation and export.
    hm, fm, _ = load_models(md.path)
    manifest = export_bundle(md.path, tmp_path / "b")
    # Assert
    assert fm is None
    np.testing.assert_array_equal(
        predict_logits(hm.experts[0], x, md.mean, md.std), predict_logits(m.eval(), x, md.mean, md.std)
    )
    np.testing.assert_array_equal(BundlePredictor(manifest.parent).predict(x)[0], hm.predict(x))
