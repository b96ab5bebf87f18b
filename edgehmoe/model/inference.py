"""Hierarchical mixture of experts (torch side) and the flat baseline.

:class:`HierarchicalModel` maps each internal node of the tree to its expert;
:class:`FlatModel` wraps the flat softmax. Both only supply probabilities: prediction goes
through :func:`edgehmoe.core.routing.decode` (greedy, beam or thresholded, top-down, grouping
the samples at each node so every expert runs once per level on a batch) and
:func:`edgehmoe.core.routing.flat_decode`, the same functions the ONNX Runtime predictors use.
:func:`load_models` is the one loader of torch networks from a model directory.
"""

from __future__ import annotations

import logging

import numpy as np
import torch
from torch import nn

from edgehmoe.core import routing
from edgehmoe.core.checkpoint import ModelDir, NetworkEntry, read_model_dir
from edgehmoe.core.evaluation import evaluate_decoded, resolve_model
from edgehmoe.core.hierarchy import Hierarchy
from edgehmoe.model.arch import ArchSpec, ModelError, build_model, count_params
from edgehmoe.model.training import load_state_arrays, predict_proba

__all__ = ["FlatModel", "HierarchicalModel", "build_network", "evaluate_models", "load_models"]

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
        """The ``expert_probs(node, idx)`` callable of :mod:`edgehmoe.core.routing` over uint8 ``x``."""

        def fn(node: int, idx: np.ndarray) -> np.ndarray:
            return predict_proba(self.experts[node], x[idx], self.mean, self.std, self.batch_size)

        return fn

    @torch.no_grad()
    def predict(self, x: np.ndarray, *, beam: int = 1, threshold: float | None = None) -> np.ndarray:
        """Predicted nodes through :func:`edgehmoe.core.routing.decode` (greedy by default)."""
        return routing.decode(self.tree, len(x), self.expert_probs(x), beam=beam, threshold=threshold)[0]

    def predict_greedy(self, x: np.ndarray) -> np.ndarray:
        return self.predict(x)

    def predict_beam(self, x: np.ndarray, beam: int) -> np.ndarray:
        return self.predict(x, beam=beam)

    def predict_until(self, x: np.ndarray, threshold: float) -> np.ndarray:
        return self.predict(x, threshold=threshold)

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

    def predict(self, x: np.ndarray, *, threshold: float | None = None) -> np.ndarray:
        """Argmax leaf, or with ``threshold`` the deepest node on its path whose summed leaf
        probability is >= threshold (:func:`edgehmoe.core.routing.flat_decode`)."""
        return routing.flat_decode(self.tree, self.predict_proba(x), threshold)[0]

    def predict_until(self, x: np.ndarray, threshold: float) -> np.ndarray:
        """Deepest node on the argmax leaf's path whose summed leaf probability ≥ threshold."""
        return self.predict(x, threshold=threshold)


def build_network(md: ModelDir, entry: NetworkEntry) -> nn.Module:
    """The torch network of one model-directory entry, weights loaded, in eval mode."""
    m = build_model(entry.arch)
    arrays = md.load_weights(entry)
    # Model directories written before checkpoint.contiguous_arrays kept 0-d shapes store
    # BatchNorm's num_batches_tracked as shape (1,); accept that one-element form.
    expected = {k: tuple(v.shape) for k, v in m.state_dict().items()}
    arrays = {k: (a.reshape(()) if expected.get(k) == () and a.shape == (1,) else a) for k, a in arrays.items()}
    load_state_arrays(m, arrays)
    m.eval()
    return m


def load_models(path_or_dir) -> tuple[HierarchicalModel | None, FlatModel | None, ModelDir]:
    """``(HierarchicalModel | None, FlatModel | None, ModelDir)`` of a model (or run) directory."""
    md = path_or_dir if isinstance(path_or_dir, ModelDir) else read_model_dir(path_or_dir)
    hm = fm = None
    if md.experts:
        hm = HierarchicalModel(md.hierarchy, {n: build_network(md, e) for n, e in md.experts.items()}, md.mean, md.std)
    if md.flat is not None:
        fm = FlatModel(md.hierarchy, build_network(md, md.flat), md.mean, md.std)
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
    """Metrics of the chosen model (``hmoe``, ``flat`` or ``auto`` = hmoe when present):
    :func:`edgehmoe.core.evaluation.evaluate_decoded`'s dict."""
    which = resolve_model(which, has_hmoe=hm is not None, has_flat=fm is not None)
    with torch.no_grad():
        if which == "hmoe":
            return evaluate_decoded(hm.tree, x, y, "hmoe", hm.expert_probs, beam=beam, threshold=threshold)
        return evaluate_decoded(fm.tree, x, y, "flat", fm.predict_proba, beam=beam, threshold=threshold)
