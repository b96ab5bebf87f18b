"""Metrics of a model on a labelled set, whatever runs it (torch or ONNX Runtime).

:func:`evaluate_decoded` turns "model, beam, threshold" into the metrics dict that
``edgehmoe evaluate --json`` prints: the keys of :func:`edgehmoe.core.metrics.evaluate` plus
``model``, ``beam`` and (when given) ``threshold``. The backend only supplies probabilities
(a callable per batch); predictions go through :func:`edgehmoe.core.routing.decode` or
:func:`edgehmoe.core.routing.flat_decode`. :func:`edgehmoe.model.inference.evaluate_models`
(torch) and :func:`edgehmoe.cli.bundle.evaluate_bundle` (ONNX bundle) both call it, so the
two report identical dicts for identical predictions. Numpy only.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from edgehmoe.core import routing
from edgehmoe.core.hierarchy import Hierarchy
from edgehmoe.core.kinds import FLAT, HMOE
from edgehmoe.core.metrics import evaluate
from edgehmoe.errors import UsageError

__all__ = ["MODEL_CHOICES", "decode_batches", "evaluate_decoded", "resolve_model"]

MODEL_CHOICES = ("auto", HMOE, FLAT)

# probs(x_batch) -> routing.ExpertProbs for "hmoe", (len(x_batch), num_classes) for "flat".
ProbsFn = Callable[[np.ndarray], Any]


def resolve_model(which: str, *, has_hmoe: bool = True, has_flat: bool = True, source: str = "model directory") -> str:
    """``hmoe`` or ``flat`` for a ``--model`` choice (``auto`` = hmoe when present).

    Raises :class:`~edgehmoe.errors.UsageError` for an unknown choice or a model ``source``
    does not hold.
    """
    if which not in MODEL_CHOICES:
        raise UsageError(f"unknown model {which!r}; valid: {', '.join(MODEL_CHOICES)}")
    if which == "auto":
        which = HMOE if has_hmoe else FLAT
    if which == HMOE and not has_hmoe:
        raise UsageError(f"this {source} has no hierarchical model; use --model flat")
    if which == FLAT and not has_flat:
        raise UsageError(f"this {source} has no flat model; use --model hmoe")
    return which


def decode_batches(
    tree: Hierarchy,
    x: np.ndarray,
    model: str,
    probs: ProbsFn,
    *,
    beam: int = 1,
    threshold: float | None = None,
    batch_size: int | None = None,
) -> np.ndarray:
    """Predicted nodes of ``x``, ``batch_size`` samples at a time (all at once for ``None``).

    ``model`` is ``hmoe`` (``probs(xb)`` returns the ``expert_probs(node, idx)`` callable of
    :mod:`edgehmoe.core.routing` over ``xb``) or ``flat`` (``probs(xb)`` returns the leaf
    softmax ``(len(xb), num_classes)``; ``beam`` does not apply).
    """
    if model not in (HMOE, FLAT):
        raise UsageError(f"unknown model {model!r}; valid: hmoe, flat")
    routing.check_decode(beam, threshold)
    step = len(x) if batch_size is None else int(batch_size)
    preds = []
    for i in range(0, len(x), max(step, 1)):
        xb = x[i : i + step]
        if model == HMOE:
            nodes, _ = routing.decode(tree, len(xb), probs(xb), beam=beam, threshold=threshold)
        else:
            nodes, _ = routing.flat_decode(tree, probs(xb), threshold)
        preds.append(nodes)
    return np.concatenate(preds) if preds else np.zeros(0, dtype=np.int64)


def evaluate_decoded(
    tree: Hierarchy,
    x: np.ndarray,
    y: np.ndarray,
    model: str,
    probs: ProbsFn,
    *,
    beam: int = 1,
    threshold: float | None = None,
    batch_size: int | None = None,
) -> dict:
    """Metrics of ``model`` (``hmoe`` or ``flat``) on ``x`` with class ids ``y`` of ``tree``.

    Returns :func:`edgehmoe.core.metrics.evaluate`'s dict plus ``model``, ``beam`` (1 for the
    flat model) and ``threshold`` (only when given).
    """
    pred = decode_batches(tree, x, model, probs, beam=beam, threshold=threshold, batch_size=batch_size)
    out = evaluate(tree, y, pred)
    out["model"] = model
    out["beam"] = beam if model == HMOE else 1
    if threshold is not None:
        out["threshold"] = threshold
    return out
