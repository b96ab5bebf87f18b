"""Hierarchical evaluation metrics, vectorised over examples.

Information precision / recall / F1 follow Valmadre, "Hierarchical classification at
multiple operating points" (NeurIPS 2022): the information of node ``n`` is
``I(n) = -log2(leaves(n) / leaves(root))``; for ground truth ``g`` and prediction ``p``
with lowest common ancestor ``a``, precision is ``I(a) / I(p)`` and recall ``I(a) / I(g)``
(both 1 when the denominator is 0, i.e. the root). F1 is computed per example and the
reported value is the mean over examples. Predictions may be internal nodes
(non-mandatory leaf prediction).

Each function takes ``(tree, gt_nodes, pred_nodes)`` and returns one value per example;
averaging happens outside (see :func:`evaluate`). Mistake severity is the height of the
LCA of a wrong prediction (Bertinetto et al., "Making better mistakes", CVPR 2020).
"""

from __future__ import annotations

import numpy as np

from edgehmoe.core.hierarchy import Hierarchy
from edgehmoe.errors import UsageError

__all__ = [
    "information",
    "info_precision",
    "info_recall",
    "info_f1",
    "correct_at_depth",
    "lca_height",
    "evaluate",
]


def information(tree: Hierarchy) -> np.ndarray:
    """``I(n) = -log2(leaves(n) / #leaves)`` for every node."""
    return -np.log2(tree.leaves_under / tree.num_leaves)


class _InfoMetric:
    """Shared precomputation (node information) for the three information metrics."""

    def __init__(self, tree: Hierarchy):
        self.tree = tree
        self.info = information(tree)

    def pr(self, gt: np.ndarray, pred: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        gt = np.asarray(gt, dtype=np.int64)
        pred = np.asarray(pred, dtype=np.int64)
        a = self.info[self.tree.lca(gt, pred)]
        ip, ig = self.info[pred], self.info[gt]
        with np.errstate(divide="ignore", invalid="ignore"):
            precision = np.where(ip > 0, a / np.where(ip > 0, ip, 1), 1.0)
            recall = np.where(ig > 0, a / np.where(ig > 0, ig, 1), 1.0)
        return precision, recall


def info_precision(tree: Hierarchy, gt: np.ndarray, pred: np.ndarray) -> np.ndarray:
    return _InfoMetric(tree).pr(gt, pred)[0]


def info_recall(tree: Hierarchy, gt: np.ndarray, pred: np.ndarray) -> np.ndarray:
    return _InfoMetric(tree).pr(gt, pred)[1]


def _f1(p: np.ndarray, r: np.ndarray) -> np.ndarray:
    s = p + r
    return np.where(s > 0, 2 * p * r / np.where(s > 0, s, 1), 0.0)


def info_f1(tree: Hierarchy, gt: np.ndarray, pred: np.ndarray) -> np.ndarray:
    p, r = _InfoMetric(tree).pr(gt, pred)
    return _f1(p, r)


def correct_at_depth(tree: Hierarchy, gt: np.ndarray, pred: np.ndarray, depth: int) -> np.ndarray:
    """Is the ground truth's ancestor at ``depth`` (or the leaf itself if shallower) on the
    prediction's root path? A prediction that stops above that depth counts as wrong."""
    gt = np.asarray(gt, dtype=np.int64)
    pred = np.asarray(pred, dtype=np.int64)
    d = np.minimum(depth, tree.depths[gt])
    target = tree.ancestor_matrix[gt, d]
    return tree.is_ancestor_or_self(target, pred)


def lca_height(tree: Hierarchy, gt: np.ndarray, pred: np.ndarray) -> np.ndarray:
    """Height of the LCA of ground truth and prediction (0 when the prediction is the leaf)."""
    return tree.heights[tree.lca(gt, pred)]


def evaluate(tree: Hierarchy, gt_classes: np.ndarray, pred_nodes: np.ndarray) -> dict:
    """All metrics, averaged: the dict the CLI prints with ``--json``.

    Args:
        gt_classes: dataset class ids of the ground truth.
        pred_nodes: predicted node indices (leaves, or internal nodes for non-mandatory
            prediction).
    """
    pred = np.asarray(pred_nodes, dtype=np.int64)
    if tree.metric_tree is not None:  # a routing tree (group_leaves): score on the full tree
        pred = tree.metric_node[pred]
        tree = tree.metric_tree
    gt = tree.class_to_node[np.asarray(gt_classes, dtype=np.int64)]
    if gt.shape != pred.shape:
        raise UsageError(f"{len(gt)} labels but {len(pred)} predictions")
    n = len(gt)
    if n == 0:
        raise UsageError("cannot evaluate on zero examples")
    p, r = _InfoMetric(tree).pr(gt, pred)
    f1 = _f1(p, r)
    wrong = gt != pred
    heights = lca_height(tree, gt, pred)
    per_level = {
        str(d): float(correct_at_depth(tree, gt, pred, d).mean()) for d in range(1, tree.max_depth + 1)
    }
    return {
        "num_examples": int(n),
        "info_precision": float(p.mean()),
        "info_recall": float(r.mean()),
        "info_f1": float(f1.mean()),
        "top1": float((~wrong).mean()),
        "accuracy_per_level": per_level,
        # Mean LCA height over the mistakes only (0.0 when there are none).
        "mistake_severity": float(heights[wrong].mean()) if wrong.any() else 0.0,
        "mean_lca_height": float(heights.mean()),
        "leaf_prediction_rate": float(tree.is_leaf[pred].mean()),
    }
