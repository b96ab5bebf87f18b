"""Top-down routing through the tree of experts, shared by torch and ONNX Runtime.

Every function takes ``expert_probs(node, idx) -> (len(idx), num_children(node))``, the
softmax of ``node``'s expert on samples ``idx``, and works batch-wise: at each level the
samples (or beam entries) sitting at the same node are grouped, so each expert runs at
most once per level. Because both the torch model and the ONNX Runtime chain plug into the
same functions, both predict with one code path.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from edgehmoe.core.hierarchy import Hierarchy
from edgehmoe.errors import UsageError

__all__ = ["ExpertProbs", "predict_greedy", "predict_beam", "predict_until"]

ExpertProbs = Callable[[int, np.ndarray], np.ndarray]


def _check_probs(node: int, probs: np.ndarray, n: int, k: int) -> np.ndarray:
    probs = np.asarray(probs)
    if probs.shape != (n, k):
        raise ValueError(f"expert {node} returned shape {probs.shape}, expected ({n}, {k})")
    return probs


def _descend(
    tree: Hierarchy, num_samples: int, expert_probs: ExpertProbs, threshold: float | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    node = np.zeros(num_samples, dtype=np.int64)
    path_p = np.ones(num_samples, dtype=np.float64)
    active = ~tree.is_leaf[node]
    # Per-sample record of (node, prob) along the path is cheap to rebuild from the tree;
    # keep the probability of each step for explanations.
    step_p = np.ones((num_samples, tree.max_depth + 1), dtype=np.float64)
    while active.any():
        idx_active = np.flatnonzero(active)
        for n in np.unique(node[idx_active]):
            idx = idx_active[node[idx_active] == n]
            kids = tree.children(int(n))
            probs = _check_probs(int(n), expert_probs(int(n), idx), len(idx), len(kids))
            best = probs.argmax(axis=1)
            p_best = probs[np.arange(len(idx)), best]
            new_p = path_p[idx] * p_best
            if threshold is not None:
                go = new_p >= threshold
                idx_go = idx[go]
                active[idx[~go]] = False
                node[idx_go] = kids[best[go]]
                path_p[idx_go] = new_p[go]
                step_p[idx_go, tree.depths[kids[best[go]]]] = p_best[go]
            else:
                node[idx] = kids[best]
                path_p[idx] = new_p
                step_p[idx, tree.depths[kids[best]]] = p_best
        active &= ~tree.is_leaf[node]
    return node, path_p, step_p


def predict_greedy(tree: Hierarchy, num_samples: int, expert_probs: ExpertProbs) -> tuple[np.ndarray, np.ndarray]:
    """Greedy top-down: at each node take the most probable child until a leaf.

    Returns ``(nodes, path_probability)``.
    """
    node, p, _ = _descend(tree, num_samples, expert_probs, None)
    return node, p


def predict_until(
    tree: Hierarchy, num_samples: int, expert_probs: ExpertProbs, threshold: float
) -> tuple[np.ndarray, np.ndarray]:
    """Greedy descent that stops at an internal node when the path probability of the best
    child would fall below ``threshold`` (non-mandatory leaf prediction).

    ``threshold = 0`` is greedy; ``threshold > 1`` always predicts the root.
    """
    if not 0.0 <= threshold:
        raise UsageError(f"threshold must be >= 0, got {threshold}")
    node, p, _ = _descend(tree, num_samples, expert_probs, threshold)
    return node, p


def predict_beam(
    tree: Hierarchy, num_samples: int, expert_probs: ExpertProbs, beam: int
) -> tuple[np.ndarray, np.ndarray]:
    """Beam search over root-to-leaf paths; the score of a path is its probability.

    Each level expands every unfinished beam entry; entries at the same node are batched
    into one expert call. Returns the best leaf and its path probability.
    """
    if beam < 1:
        raise UsageError(f"beam width must be >= 1, got {beam}")
    if beam == 1:
        return predict_greedy(tree, num_samples, expert_probs)
    # Beam state: (num_samples, beam) nodes and log-probabilities; -inf marks empty slots.
    nodes = np.zeros((num_samples, beam), dtype=np.int64)
    logp = np.full((num_samples, beam), -np.inf)
    logp[:, 0] = 0.0
    max_kids = int(tree.num_children.max())
    while True:
        live = np.isfinite(logp) & ~tree.is_leaf[nodes]
        if not live.any():
            break
        # Candidates: each slot either stays (if finished) or expands into its children.
        cand_nodes = np.full((num_samples, beam, max(max_kids, 1)), -1, dtype=np.int64)
        cand_logp = np.full((num_samples, beam, max(max_kids, 1)), -np.inf)
        done = np.isfinite(logp) & tree.is_leaf[nodes]
        cand_nodes[done, 0] = nodes[done]
        cand_logp[done, 0] = logp[done]
        s_idx, b_idx = np.nonzero(live)
        at = nodes[s_idx, b_idx]
        for n in np.unique(at):
            sel = at == n
            ss, bb = s_idx[sel], b_idx[sel]
            kids = tree.children(int(n))
            probs = _check_probs(int(n), expert_probs(int(n), ss), len(ss), len(kids))
            with np.errstate(divide="ignore"):
                lp = np.log(np.clip(probs, 0.0, 1.0))
            cand_nodes[ss, bb, : len(kids)] = kids
            cand_logp[ss, bb, : len(kids)] = logp[ss, bb, None] + lp
        flat_nodes = cand_nodes.reshape(num_samples, -1)
        flat_logp = cand_logp.reshape(num_samples, -1)
        # Stable sort keeps ties in expansion order (deterministic).
        order = np.argsort(-flat_logp, axis=1, kind="stable")[:, :beam]
        nodes = np.take_along_axis(flat_nodes, order, axis=1)
        logp = np.take_along_axis(flat_logp, order, axis=1)
        nodes[~np.isfinite(logp)] = 0
    best = logp.argmax(axis=1)
    rows = np.arange(num_samples)
    return nodes[rows, best], np.exp(logp[rows, best])
