"""Extending a trained tree: only new experts and parents whose children changed are trained.

Synthetic data, 4 superclasses x 3 classes (16x16 px). The old model never saw
``super0/triangle`` (a new class under an existing superclass) nor ``super3`` (a new
superclass with its three classes)::

    old:  root ─ super0 ─ disc, square                new:  root ─ super0 ─ disc, square, triangle*
               ├ super1 ─ disc, square, triangle                 ├ super1 ─ (unchanged)
               └ super2 ─ disc, square, triangle                 ├ super2 ─ (unchanged)
                                                                 └ super3* ─ disc*, square*, triangle*

Expected: super1 and super2 copied byte for byte; root, super0 and super3 trained.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from edgehmoe.cli.bundle import main as bundle_main
from edgehmoe.core.checkpoint import read_model_dir
from edgehmoe.core.hierarchy import from_edge_list
from edgehmoe.data.base import channel_stats
from edgehmoe.data.synthetic import make_synthetic
from edgehmoe.export.bundle import load_torch_models
from edgehmoe.model.arch import expert_specs
from edgehmoe.model.central import fit_hmoe, new_model_dir
from edgehmoe.model.extend import extend_model, plan_extension
from edgehmoe.model.training import TrainConfig

SIZE = 16
SPEC = f"synthetic:coarse=4,fine=3,per_class=120,test_per_class=40,size={SIZE}"
NEW = {"super0/triangle", "super3/disc", "super3/square", "super3/triangle"}


def _old_tree(tree):
    names = tree.class_names()
    old_names = [c for c in names if c not in NEW]
    edges = [(p, c) for p, c in tree.edges() if c not in NEW and c != "super3"]
    return from_edge_list(edges, old_names), old_names


@pytest.fixture(scope="module")
def old_model(tmp_path_factory):
    torch.set_num_threads(1)  # tiny models: a second thread mostly spins (and CI shares the cores)
    root = tmp_path_factory.mktemp("extend")
    # The dataset the CLI will load: same spec, train split (val_fraction 0.1 held out).
    from edgehmoe.data import load_dataset

    train = load_dataset(SPEC, "train")
    test = load_dataset(SPEC, "test")
    old_tree, old_names = _old_tree(train.hierarchy)
    keep = np.isin(np.asarray(train.class_names)[train.y], old_names)
    to_old = {c: i for i, c in enumerate(old_names)}
    y_old = np.array([to_old[train.class_names[c]] for c in train.y[keep]])
    mean, std = channel_stats(train.x[keep])
    md = new_model_dir(root / "old", old_tree, SIZE, mean, std, "synthetic-old")
    cfg = TrainConfig(epochs=8, batch_size=64, lr=0.05, schedule="onecycle")
    fit_hmoe(md, train.x[keep], y_old, cfg, expert_specs(old_tree, SIZE, fixed_width=8))
    return root, md, train, test


def test_plan_reuses_unchanged_nodes_and_retrains_reordered_ones():
    _, _, _, tree = make_synthetic(coarse=3, fine=2, per_class=1, size=8)
    # New class under super0 only: the root keeps its children, so it is reused.
    edges = tree.edges() + [("super0", "super0/new")]
    new = from_edge_list(edges, tree.class_names() + ["super0/new"])
    plan = plan_extension(tree, new)
    assert plan[new.index("root")] == f"reuse:{tree.index('root')}"
    assert plan[new.index("super0")].startswith("children changed (added super0/new")
    assert plan[new.index("super1")].startswith("reuse:")
    # Ancestors can be retrained on request.
    assert plan_extension(tree, new, retrain_ancestors=True)[0].startswith("ancestor of changed node")
    # Swapping two children would permute the expert's outputs: retrain, never reuse.
    swapped = [e for e in tree.edges() if e[0] != "super1"] + [("super1", "super1/square"), ("super1", "super1/disc")]
    new2 = from_edge_list(swapped, tree.class_names())
    assert plan_extension(tree, new2)[new2.index("super1")].startswith("children reordered")


def test_extend_trains_only_affected_experts_and_keeps_old_accuracy(old_model, tmp_path):
    # Prepare
    root, old_md, train, test = old_model
    csv = tmp_path / "new_tree.csv"
    train.hierarchy.to_csv(csv)
    out = tmp_path / "new"
    # Execute: the CLI command a user runs.
    rc = bundle_main(["extend", "--model-dir", str(old_md.path), "--hierarchy", str(csv), "--dataset", SPEC,
                      "--out", str(out), "--epochs", "8", "--expert-width", "8", "--threads", "1", "--json"])
    assert rc == 0
    new_md = read_model_dir(out)
    new = new_md.hierarchy
    old = old_md.hierarchy
    # Assert: which experts were reused (byte for byte) and which were trained.
    reused = set(new_md.extra["extend"]["reused"])
    trained = set(new_md.extra["extend"]["trained"])
    assert reused == {"super1", "super2"}
    assert trained == {"root", "super0", "super3"}
    for name in reused:
        before = old_md.path / old_md.experts[old.index(name)].file
        after = out / new_md.experts[new.index(name)].file
        assert after.read_bytes() == before.read_bytes()
    assert new_md.mean == old_md.mean and new_md.std == old_md.std

    # Old classes: accuracy on held-out images does not drop by more than a small margin.
    hm_old, _ = load_torch_models(old_md.path)
    hm_new, _ = load_torch_models(out)
    names = np.asarray(test.class_names)[test.y]
    is_new = np.isin(names, list(NEW))
    x_old, x_new = test.x[~is_new], test.x[is_new]
    pred_old = np.asarray(old.names)[hm_old.predict_greedy(x_old)]
    pred_new_on_old = np.asarray(new.names)[hm_new.predict_greedy(x_old)]
    acc_before = float((pred_old == names[~is_new]).mean())
    acc_after = float((pred_new_on_old == names[~is_new]).mean())
    # New classes: learned well above chance (1/12 over all classes).
    acc_new = float((np.asarray(new.names)[hm_new.predict_greedy(x_new)] == names[is_new]).mean())
    print(json.dumps({"old_classes_before": acc_before, "old_classes_after": acc_after, "new_classes": acc_new}))
    assert acc_before > 0.5
    assert acc_after >= acc_before - 0.1
    assert acc_new > 0.4


def test_extend_refuses_bad_inputs(old_model, tmp_path):
    root, old_md, train, _ = old_model
    cfg = TrainConfig(epochs=1)
    with pytest.raises(ValueError, match=r"shape \(N, 16, 16, 3\)"):
        extend_model(old_md.path, train.hierarchy, train.x[:, :8, :8], train.y, tmp_path / "a", cfg)
    # Data without the new superclass cannot train its expert.
    sel = ~np.isin(np.asarray(train.class_names)[train.y], ["super3/disc", "super3/square", "super3/triangle"])
    with pytest.raises(ValueError, match="no samples"):
        extend_model(old_md.path, train.hierarchy, train.x[sel], train.y[sel], tmp_path / "b", cfg)
    with pytest.raises(FileExistsError, match="not empty"):
        extend_model(old_md.path, train.hierarchy, train.x, train.y, old_md.path.parent, cfg)
