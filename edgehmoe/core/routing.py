"""Decoding predictions from probabilities, shared by torch and ONNX Runtime.

:func:`decode` is the one place where the hierarchical model's decode mode is chosen
(greedy, beam-k, or thresholded descent) and its arguments are checked; :func:`flat_decode`
is its counterpart for the flat baseline (argmax leaf, or the deepest node on its path
whose summed leaf probability reaches the threshold). Backends (the torch models in
:mod:`edgehmoe.model.inference`, the ONNX Runtime predictors in :mod:`edgehmoe.edge.runtime`)
only supply probabilities, so both predict with one code path.

The hierarchical functions take ``expert_probs(node, idx) -> (len(idx), num_children(node))``,
the softmax of ``node``'s expert on samples ``idx``, and work batch-wise: at each level the
samples (or beam entries) sitting at the same node are grouped, so each expert runs at
most once per level. :func:`record_expert_probs` and :func:`explain_paths` give the
per-step probabilities of a decoded path (``edgehmoe predict`` prints them).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable

import numpy as np

from edgehmoe.core.hierarchy import Hierarchy
from edgehmoe.errors import UsageError

__all__ = [
    "ExpertProbs",
    "check_decode",
    "decode",
    "explain_paths",
    "flat_decode",
    "predict_beam",
    "predict_greedy",
    "predict_until",
    "record_expert_probs",
]

ExpertProbs = Callable[[int, np.ndarray], np.ndarray]


def _check_probs(node: int, probs: np.ndarray, n: int, k: int) -> np.ndarray:
    probs = np.asarray(probs)
    if probs.shape != (n, k):
        raise ValueError(f"expert {node} returned shape {probs.shape}, expected ({n}, {k})")
    return probs


def _descend_one(
    tree: Hierarchy, expert_probs: ExpertProbs, threshold: float | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """:func:`_descend` for one sample with Python scalars: the same arithmetic (float64
    products, the same comparison) without the batch bookkeeping, which costs ~15 µs per
    level and dominates a one-image prediction on a device."""
    node, path_p = 0, 1.0
    idx = np.zeros(1, dtype=np.int64)
    step_p = np.ones((1, tree.max_depth + 1), dtype=np.float64)
    while not tree.is_leaf[node]:
        kids = tree.children(node)
        probs = _check_probs(node, expert_probs(node, idx), 1, len(kids))[0]
        best = int(probs.argmax())
        p_best = probs[best]
        new_p = path_p * p_best
        if threshold is not None and not new_p >= threshold:
            break
        node, path_p = int(kids[best]), new_p
        step_p[0, tree.depths[node]] = p_best
    return np.array([node], dtype=np.int64), np.array([path_p], dtype=np.float64), step_p


def _descend(
    tree: Hierarchy, num_samples: int, expert_probs: ExpertProbs, threshold: float | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    if num_samples == 1:
        return _descend_one(tree, expert_probs, threshold)
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


# ---------------------------------------------------------------------- one decode path
def check_decode(beam: int = 1, threshold: float | None = None) -> None:
    """Raise :class:`~edgehmoe.errors.UsageError` unless ``beam``/``threshold`` is a valid
    decode mode: ``beam >= 1``, ``threshold >= 0``, and not a beam wider than 1 together
    with a threshold (thresholded descent is greedy)."""
    if isinstance(beam, bool) or int(beam) != beam or beam < 1:
        raise UsageError(f"beam width must be an integer >= 1, got {beam!r} (1 = greedy)")
    if threshold is not None:
        if beam > 1:
            raise UsageError("choose either --beam or --threshold, not both")
        if not float(threshold) >= 0.0:  # also rejects NaN
            raise UsageError(f"threshold must be >= 0, got {threshold}")


def decode(
    tree: Hierarchy,
    num_samples: int,
    expert_probs: ExpertProbs,
    beam: int = 1,
    threshold: float | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Predict top-down: thresholded descent if ``threshold`` is given, else beam search of
    width ``beam`` (greedy for ``beam == 1``).

    This is the only place the decode mode is chosen; every caller (torch and ONNX Runtime
    evaluation, ``edgehmoe predict``) goes through it. Returns ``(nodes, path_probability)``.
    """
    check_decode(beam, threshold)
    if threshold is not None:
        return predict_until(tree, num_samples, expert_probs, float(threshold))
    if beam > 1:
        return predict_beam(tree, num_samples, expert_probs, int(beam))
    return predict_greedy(tree, num_samples, expert_probs)


def _leaf_membership(tree: Hierarchy) -> np.ndarray:
    """``M[c, j] = 1`` when leaf class ``c`` lies under node ``j`` (itself included)."""
    anc = tree.ancestor_matrix[tree.class_to_node]  # (classes, max_depth + 1), -1 past the leaf
    m = np.zeros((tree.num_classes, tree.num_nodes), dtype=np.float64)
    c, d = np.nonzero(anc >= 0)
    m[c, anc[c, d]] = 1.0
    return m


def flat_decode(
    tree: Hierarchy, leaf_probs: np.ndarray, threshold: float | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Decode the flat baseline's softmax ``leaf_probs`` ``(N, num_classes)``.

    Without ``threshold``: the argmax leaf and its probability. With ``threshold``: the
    deepest node on the argmax leaf's root path whose summed leaf probability is
    ``>= threshold`` (the root, with probability 1, when no deeper node reaches it) and that
    summed probability. Returns ``(nodes, probability)``.
    """
    if threshold is not None:
        check_decode(1, threshold)
    p = np.asarray(leaf_probs, dtype=np.float64)
    if p.ndim != 2 or p.shape[1] != tree.num_classes:
        raise ValueError(f"leaf probabilities have shape {p.shape}, expected (N, {tree.num_classes})")
    rows = np.arange(len(p))
    best = p.argmax(axis=1)
    leaf = tree.class_to_node[best]
    if threshold is None:
        return leaf, p[rows, best]
    nodes = np.zeros(len(p), dtype=np.int64)  # the root, when no deeper node reaches the threshold
    probs = np.ones(len(p))
    if tree.max_depth == 0:
        return nodes, probs
    # Root path of each argmax leaf at depths 1..max_depth (the leaf repeated below its depth)
    # and the summed leaf probability under each of those nodes.
    depth = np.arange(1, tree.max_depth + 1)
    path = tree.ancestor_matrix[leaf[:, None], np.minimum(depth[None, :], tree.depths[leaf][:, None])]
    mass = np.take_along_axis(p @ _leaf_membership(tree), path, axis=1)
    ok = mass >= threshold
    # The deepest passing depth (the mass only shrinks going down, up to rounding).
    last = tree.max_depth - 1 - np.argmax(ok[:, ::-1], axis=1)
    hit = ok.any(axis=1)
    nodes[hit] = path[rows[hit], last[hit]]
    probs[hit] = mass[rows[hit], last[hit]]
    return nodes, probs


# ---------------------------------------------------------------------- explanations
def record_expert_probs(expert_probs: ExpertProbs, num_samples: int, record: dict[int, np.ndarray]) -> ExpertProbs:
    """Wrap ``expert_probs`` so each node's probabilities are also kept in ``record``:
    ``record[node]`` is a ``(num_samples, k)`` array, NaN where the node did not run."""

    def fn(node: int, idx: np.ndarray) -> np.ndarray:
        p = np.asarray(expert_probs(node, idx))
        if node not in record:
            record[node] = np.full((num_samples, p.shape[1]), np.nan)
        record[node][idx] = p
        return p

    return fn


def explain_paths(
    tree: Hierarchy, nodes: np.ndarray, record: dict[int, np.ndarray], top: int = 3
) -> list[tuple[list[dict], list[dict]]]:
    """Per-step probabilities of decoded predictions, from a :func:`record_expert_probs` record.

    For each sample ``i`` with prediction ``nodes[i]``, returns ``(path, alternatives)``:
    ``path`` lists ``{node, name, probability, path_probability}`` from the root (whose
    probability is 1) to the prediction; ``alternatives`` are the ``top`` most probable
    children ``{node, name, probability}`` at the last expert that ran for the sample (the
    predicted node itself when a thresholded descent stopped there, else the leaf's parent).
    """
    out = []
    for i, node in enumerate(np.asarray(nodes).tolist()):
        path = tree.path(node)
        steps = [{"node": 0, "name": tree.names[0], "probability": 1.0, "path_probability": 1.0}]
        cum = 1.0
        for parent, child in itertools.pairwise(path):
            p = float(record[parent][i, tree.child_index[child]])
            cum *= p
            steps.append({"node": child, "name": tree.names[child], "probability": p, "path_probability": cum})
        last = node if not tree.is_leaf[node] else int(tree.parents[node])
        alts = []
        if last >= 0 and last in record and np.isfinite(record[last][i]).all():
            probs = record[last][i]
            kids = tree.children(last)
            for j in np.argsort(-probs, kind="stable")[:top]:
                alts.append({"node": int(kids[j]), "name": tree.names[kids[j]], "probability": float(probs[j])})
        out.append((steps, alts))
    return out
