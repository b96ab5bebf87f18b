"""Hierarchical mixture of experts (torch side) and the flat baseline.

:class:`HierarchicalModel` maps each internal node of the tree to its expert. Prediction is
top-down (greedy, beam or thresholded) through :mod:`edgehmoe.core.routing`, which groups the
samples at each node so every expert runs once per level on a batch.
"""

from __future__ import annotations

import logging

import numpy as np
import torch
from torch import nn

from edgehmoe.core import routing
from edgehmoe.core.checkpoint import ModelDir, read_model_dir
from edgehmoe.core.hierarchy import Hierarchy
from edgehmoe.core.metrics import evaluate
from edgehmoe.errors import UsageError
from edgehmoe.model.arch import ArchSpec, ModelError, build_model, count_params
from edgehmoe.model.training import load_state_arrays, predict_proba

__all__ = ["HierarchicalModel", "FlatModel", "load_models", "evaluate_models"]

logger = logging.getLogger(__name__)


class HierarchicalModel:
    """One expert (``nn.Module``) per internal node; outputs follow ``tree.children(node)``."""

    def __init__(self, tree: Hierarchy, experts: dict[int, nn.Module], mean, std, batch_size: int = 512):
        missing = [int(n) for n in tree.internal_nodes if int(n) not in experts]
        if missing:
            raise ModelError(f"no expert for internal nodes {missing[:10]}")
        for n, m in experts.items():
            spec = getattr(m, "spec", None)
            if isinstance(spec, ArchSpec) and spec.num_outputs != tree.num_children[n]:
                raise ModelError(
                    f"expert {n} ({tree.names[n]!r}) has {spec.num_outputs} outputs but the node has "
                    f"{tree.num_children[n]} children"
                )
        self.tree = tree
        self.experts = experts
        self.mean = np.asarray(mean, dtype=np.float32)
        self.std = np.asarray(std, dtype=np.float32)
        self.batch_size = batch_size

    def expert_probs(self, x: np.ndarray) -> routing.ExpertProbs:
        def fn(node: int, idx: np.ndarray) -> np.ndarray:
            return predict_proba(self.experts[node], x[idx], self.mean, self.std, self.batch_size)

        return fn

    @torch.no_grad()
    def predict_greedy(self, x: np.ndarray) -> np.ndarray:
        return routing.predict_greedy(self.tree, len(x), self.expert_probs(x))[0]

    @torch.no_grad()
    def predict_beam(self, x: np.ndarray, beam: int) -> np.ndarray:
        return routing.predict_beam(self.tree, len(x), self.expert_probs(x), beam)[0]

    @torch.no_grad()
    def predict_until(self, x: np.ndarray, threshold: float) -> np.ndarray:
        return routing.predict_until(self.tree, len(x), self.expert_probs(x), threshold)[0]

    def params(self) -> dict[int, int]:
        return {n: count_params(m) for n, m in self.experts.items()}


class FlatModel:
    """A softmax over all leaves; predictions are leaf nodes."""

    def __init__(self, tree: Hierarchy, model: nn.Module, mean, std, batch_size: int = 512):
        self.tree = tree
        self.model = model
        self.mean = np.asarray(mean, dtype=np.float32)
        self.std = np.asarray(std, dtype=np.float32)
        self.batch_size = batch_size

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        return predict_proba(self.model, x, self.mean, self.std, self.batch_size)

    def predict(self, x: np.ndarray) -> np.ndarray:
        return self.tree.class_to_node[self.predict_proba(x).argmax(axis=1)]

    def predict_until(self, x: np.ndarray, threshold: float) -> np.ndarray:
        """Deepest node on the argmax leaf's path whose summed leaf probability ≥ threshold."""
        p = self.predict_proba(x)
        tree = self.tree
        leaf = tree.class_to_node[p.argmax(axis=1)]
        out = np.zeros(len(x), dtype=np.int64)
        anc = tree.ancestor_matrix
        leaf_nodes = tree.class_to_node
        for d in range(1, tree.max_depth + 1):
            node_d = anc[leaf, np.minimum(d, tree.depths[leaf])]
            under = tree.is_ancestor_or_self(node_d[:, None], leaf_nodes[None, :])
            mass = (p * under).sum(axis=1)
            out = np.where(mass >= threshold, node_d, out)
        return out


def _build(md: ModelDir, entry) -> nn.Module:
    m = build_model(entry.arch)
    load_state_arrays(m, md.load_weights(entry))
    m.eval()
    return m


def load_models(path_or_dir) -> tuple[HierarchicalModel | None, FlatModel | None, ModelDir]:
    md = path_or_dir if isinstance(path_or_dir, ModelDir) else read_model_dir(path_or_dir)
    hm = fm = None
    if md.experts:
        hm = HierarchicalModel(md.hierarchy, {n: _build(md, e) for n, e in md.experts.items()}, md.mean, md.std)
    if md.flat is not None:
        fm = FlatModel(md.hierarchy, _build(md, md.flat), md.mean, md.std)
    return hm, fm, md


def evaluate_models(
    hm: HierarchicalModel | None,
    fm: FlatModel | None,
    x: np.ndarray,
    y: np.ndarray,
    which: str = "auto",
    beam: int = 1,
    threshold: float | None = None,
) -> dict:
    """Metrics of the chosen model (``hmoe``, ``flat`` or ``auto`` = hmoe when present)."""
    if which == "auto":
        which = "hmoe" if hm is not None else "flat"
    if which == "hmoe":
        if hm is None:
            raise UsageError("this model directory has no hierarchical model; use --model flat")
        tree = hm.tree
        if threshold is not None:
            pred = hm.predict_until(x, threshold)
        elif beam > 1:
            pred = hm.predict_beam(x, beam)
        else:
            pred = hm.predict_greedy(x)
    elif which == "flat":
        if fm is None:
            raise UsageError("this model directory has no flat model; use --model hmoe")
        tree = fm.tree
        pred = fm.predict_until(x, threshold) if threshold is not None else fm.predict(x)
    else:
        raise UsageError(f"unknown model {which!r}; valid: auto, hmoe, flat")
    out = evaluate(tree, y, pred)
    out["model"] = which
    out["beam"] = beam if which == "hmoe" else 1
    if threshold is not None:
        out["threshold"] = threshold
    return out
