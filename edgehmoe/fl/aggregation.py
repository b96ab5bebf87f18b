"""Federated averaging (FedAvg) of client updates, per expert.

Pure functions over ``list[(arrays, num_examples)]`` in the style of Flower's
``server/strategy/aggregate.py``; the server only orchestrates (``server/rounds.py``
collects results, calls :func:`validate_update` on each one, skips and logs the invalid ones,
then calls :func:`aggregate_per_expert`).

Reference: McMahan et al., "Communication-Efficient Learning of Deep Networks from Decentralized
Data", AISTATS 2017 (FedAvg: mean of client weights weighted by their number of examples).

numpy only.
"""

from __future__ import annotations

from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from edgehmoe.errors import EdgeHmoeError

__all__ = ["InvalidUpdate", "Weights", "validate_update", "fedavg", "aggregate_per_expert"]

#: Parameter name -> array (a model's state dict as numpy arrays).
Weights = Dict[str, np.ndarray]


class InvalidUpdate(EdgeHmoeError, ValueError):
    """A client result cannot be aggregated; ``str(err)`` names the first problem found."""


def validate_update(result_weights: Mapping[str, np.ndarray], template: Mapping[str, np.ndarray],
                    num_examples: int) -> None:
    """Check one client update against the weights the server sent.

    Requirements: ``num_examples`` is an int > 0; the same parameter names as ``template``; for
    each parameter the same shape; the same dtype, except that floating-point parameters may come
    back in another float precision (FedAvg casts them); all floating-point values finite.

    :raises InvalidUpdate: naming the first problem (checked in ``template`` order).
    """
    if isinstance(num_examples, (bool, np.bool_)) or not isinstance(num_examples, (int, np.integer)):
        raise InvalidUpdate(f"num_examples must be an integer, got {type(num_examples).__name__}")
    if num_examples <= 0:
        raise InvalidUpdate(f"num_examples must be > 0, got {num_examples}")
    if not isinstance(result_weights, Mapping):
        raise InvalidUpdate(f"weights must be a mapping of name -> array, got {type(result_weights).__name__}")
    for name, ref in template.items():
        if name not in result_weights:
            raise InvalidUpdate(f"missing parameter {name!r}")
        arr = result_weights[name]
        if not isinstance(arr, np.ndarray):
            raise InvalidUpdate(f"parameter {name!r} is a {type(arr).__name__}, not a numpy array")
        if arr.shape != ref.shape:
            raise InvalidUpdate(f"parameter {name!r} has shape {arr.shape}, expected {ref.shape}")
        if ref.dtype.kind == "f":
            if arr.dtype.kind != "f":
                raise InvalidUpdate(f"parameter {name!r} has dtype {arr.dtype}, expected a float dtype like {ref.dtype}")
            if not np.isfinite(arr).all():
                raise InvalidUpdate(f"parameter {name!r} contains NaN or inf")
        elif arr.dtype != ref.dtype:
            raise InvalidUpdate(f"parameter {name!r} has dtype {arr.dtype}, expected {ref.dtype}")
    extra = [name for name in result_weights if name not in template]
    if extra:
        raise InvalidUpdate(f"unexpected parameter {extra[0]!r}")


def fedavg(updates: Sequence[Tuple[Mapping[str, np.ndarray], int]], *,
           template: Optional[Mapping[str, np.ndarray]] = None) -> Weights:
    """Weighted mean of client weights, weighted by their ``num_examples``.

    Floating-point parameters: ``sum_i n_i * w_i / sum_i n_i``, computed in float64 and returned in
    the template dtype.  Integer and bool parameters (counters such as BatchNorm's
    ``num_batches_tracked``) are not averaged: the element-wise maximum is taken.

    :param updates: ``[(weights, num_examples), ...]``, already validated (same names and shapes).
    :param template: gives the output dtypes and name order; defaults to the first update.
    :returns: new arrays (never views of the inputs).
    :raises ValueError: on an empty list, non-positive example counts, or mismatching names/shapes.
    """
    if not updates:
        raise InvalidUpdate("fedavg needs at least one update, got none")
    counts = [int(n) for _, n in updates]
    if any(n <= 0 for n in counts):
        raise InvalidUpdate(f"num_examples must all be > 0, got {counts}")
    ref = template if template is not None else updates[0][0]
    names = list(ref)
    for i, (weights, _) in enumerate(updates):
        if set(weights) != set(names):
            raise InvalidUpdate(f"update {i} has parameters {sorted(weights)}, expected {sorted(names)}")
    total = float(sum(counts))
    out: Weights = {}
    for name in names:
        shape = np.shape(ref[name])
        dtype = np.asarray(ref[name]).dtype
        arrays = [np.asarray(weights[name]) for weights, _ in updates]
        for i, arr in enumerate(arrays):
            if arr.shape != shape:
                raise InvalidUpdate(f"update {i}: parameter {name!r} has shape {arr.shape}, expected {shape}")
        if dtype.kind == "f":
            acc = np.zeros(shape, dtype=np.float64)
            for arr, n in zip(arrays, counts):
                acc += n * arr.astype(np.float64)
            # np.asarray: arithmetic on 0-d arrays yields numpy scalars; keep ndarrays of shape ().
            out[name] = np.asarray(acc / total).astype(dtype)
        else:
            out[name] = np.asarray(np.maximum.reduce(arrays)).astype(dtype, copy=True)
    return out


def aggregate_per_expert(updates_by_node: Mapping[int, List[Tuple[Mapping[str, np.ndarray], int]]],
                         templates: Optional[Mapping[int, Mapping[str, np.ndarray]]] = None,
                         ) -> Dict[int, Weights]:
    """FedAvg separately for each expert node.

    Nodes with an empty update list are left out of the result (the caller keeps their previous
    weights), so in parallel mode an expert nobody trained this round is simply not updated.

    :param templates: optional ``{node: weights}`` giving each node's output dtypes and name
        order (the weights the server sent); without one a node follows its first update, so a
        float16 update listed first would make the average float16.
    """
    templates = templates or {}
    return {node: fedavg(updates, template=templates.get(node))
            for node, updates in updates_by_node.items() if updates}
