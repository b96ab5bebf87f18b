"""Validation and aggregation of client updates, per expert: FedAvg and robust alternatives.

Pure functions over ``list[(arrays, num_examples)]`` in the style of Flower's
``server/strategy/aggregate.py``; the server only orchestrates (``server/rounds.py``
collects results, calls :func:`validate_update` (and :func:`check_update_norm`) on each one,
skips and logs the invalid ones, then calls :func:`aggregate_per_expert`).

Aggregation rules (``schedule.aggregation`` in the server's config):

- ``fedavg``: mean of the client weights weighted by their ``num_examples`` (McMahan et al.,
  "Communication-Efficient Learning of Deep Networks from Decentralized Data", AISTATS 2017).
  One client that lies about ``num_examples`` or sends scaled weights moves it anywhere.
- ``median``: coordinate-wise median of the client weights, unweighted (Yin et al.,
  "Byzantine-Robust Distributed Learning: Towards Optimal Statistical Rates", ICML 2018).
- ``trimmed_mean``: per coordinate, drop the ``floor(trim_fraction * n)`` largest and smallest
  values and average the rest, unweighted (same paper).

Any rule can be combined with **norm clipping** (:func:`clip_updates`): each client's change
``w_i - w_old`` is scaled down to at most ``clip_factor`` times the median change norm of the
round's updates for that expert, so one client's oversized step cannot dominate.

Everything is computed in float64 and the result is checked finite (:func:`check_finite`)
before it is returned, so a caller never receives weights it cannot load. Example counts are
Python ints (no overflow, whatever a client claims).

numpy only.
"""

from __future__ import annotations

import math
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from edgehmoe.errors import EdgeHmoeError

__all__ = [
    "AGGREGATIONS",
    "FedAvgStream",
    "InvalidUpdate",
    "Weights",
    "aggregate",
    "aggregate_per_expert",
    "check_finite",
    "check_update_norm",
    "clip_update",
    "clip_updates",
    "coordinate_median",
    "fedavg",
    "trimmed_mean",
    "update_norm",
    "validate_update",
    "weights_norm",
]

#: Parameter name -> array (a model's state dict as numpy arrays).
Weights = Dict[str, np.ndarray]

#: Aggregation rules by name (``schedule.aggregation``).
AGGREGATIONS = ("fedavg", "median", "trimmed_mean")

Update = Tuple[Mapping[str, np.ndarray], int]


class InvalidUpdate(EdgeHmoeError, ValueError):
    """A client result cannot be aggregated; ``str(err)`` names the first problem found."""


def _is_int(value: object) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def validate_update(result_weights: Mapping[str, np.ndarray], template: Mapping[str, np.ndarray],
                    num_examples: int, *, max_examples: Optional[int] = None) -> None:
    """Check one client update against the weights the server sent.

    Requirements: ``num_examples`` is an int > 0 and, when ``max_examples`` is given (what the
    device announced under the task's node in its hello), at most that; the same parameter
    names as ``template``; for each parameter the same shape and exactly the same dtype (no
    silent casts: a float64 update of a float32 expert is refused, its values might not fit);
    all floating-point values finite; BatchNorm ``running_var`` values >= 0 (a negative
    variance makes every prediction NaN).

    :raises InvalidUpdate: naming the first problem (checked in ``template`` order).
    """
    if not _is_int(num_examples):
        raise InvalidUpdate(f"num_examples must be an integer, got {type(num_examples).__name__}")
    if num_examples <= 0:
        raise InvalidUpdate(f"num_examples must be > 0, got {num_examples}")
    if max_examples is not None and int(num_examples) > int(max_examples):
        shown = num_examples if num_examples < 10**15 else f"about 1e{len(str(int(num_examples))) - 1}"
        raise InvalidUpdate(f"num_examples {shown} exceeds the {int(max_examples)} samples the device "
                            "announced under this node in its hello")
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
        if arr.dtype != ref.dtype:
            raise InvalidUpdate(f"parameter {name!r} has dtype {arr.dtype}, expected {ref.dtype} (the task's)")
        if arr.dtype.kind == "f":
            if not np.isfinite(arr).all():
                raise InvalidUpdate(f"parameter {name!r} contains NaN or inf")
            if name.endswith("running_var") and arr.size and float(arr.min()) < 0:
                raise InvalidUpdate(f"parameter {name!r} has a negative variance ({float(arr.min()):.3g})")
    extra = [name for name in result_weights if name not in template]
    if extra:
        raise InvalidUpdate(f"unexpected parameter {extra[0]!r}")


# --------------------------------------------------------------------------------------------
# Norms and clipping (float parameters only; integer counters are not part of the norm)
# --------------------------------------------------------------------------------------------


def _float_names(ref: Mapping[str, np.ndarray]) -> List[str]:
    return [k for k, v in ref.items() if np.asarray(v).dtype.kind == "f"]


def _sum_of_squares(a: np.ndarray) -> float:
    # Not np.dot: a BLAS call wakes its thread pool, which spins for tens of milliseconds on a busy
    # machine (measured: 40-50 ms per 100k-parameter update with other jobs running, issue #12).
    a = np.asarray(a, dtype=np.float64).ravel()
    return float(np.einsum("i,i->", a, a))


def weights_norm(weights: Mapping[str, np.ndarray]) -> float:
    """L2 norm over every floating-point parameter, computed in float64."""
    total = 0.0
    for name in _float_names(weights):
        total += _sum_of_squares(weights[name])
    return math.sqrt(total)


def update_norm(weights: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray]) -> float:
    """L2 norm of ``weights - reference`` over the floating-point parameters (float64)."""
    total = 0.0
    for name in _float_names(reference):
        total += _sum_of_squares(np.asarray(weights[name], dtype=np.float64) - np.asarray(reference[name],
                                                                                          dtype=np.float64))
    return math.sqrt(total)


def check_update_norm(weights: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray],
                      max_ratio: float, *, reference_norm: Optional[float] = None) -> float:
    """Raise :class:`InvalidUpdate` if the change is larger than ``max_ratio`` times the weights' norm.

    The bound is ``max_ratio * max(||reference||, 1)`` (the floor keeps a bound for weights that
    start near zero). Returns the ratio ``||weights - reference|| / max(||reference||, 1)``.
    ``max_ratio <= 0`` disables the check (the ratio is still returned). ``reference_norm``:
    ``weights_norm(reference)`` if the caller has it (a round checks a thousand updates against
    the same weights).
    """
    scale = max(weights_norm(reference) if reference_norm is None else reference_norm, 1.0)
    ratio = update_norm(weights, reference) / scale
    if max_ratio > 0 and not ratio <= max_ratio:  # `not <=`: a NaN ratio is refused too
        raise InvalidUpdate(f"update norm is {ratio:.3g} x the weights' norm, above the bound of {max_ratio:g} "
                            "(schedule.max_update_norm)")
    return ratio


def clip_update(weights: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray],
                max_norm: float) -> Weights:
    """``reference + (weights - reference) * min(1, max_norm / ||weights - reference||)``.

    Floating-point parameters are clipped (computed in float64, returned in the dtype of
    ``weights``); integer parameters are kept as they are. Returns new arrays.
    """
    norm = update_norm(weights, reference)
    scale = 1.0 if norm <= max_norm or norm == 0 else max_norm / norm
    out: Weights = {}
    for name, arr in weights.items():
        arr = np.asarray(arr)
        if arr.dtype.kind == "f" and name in reference and scale != 1.0:
            ref = np.asarray(reference[name], dtype=np.float64)
            out[name] = np.asarray(ref + (arr.astype(np.float64) - ref) * scale).astype(arr.dtype)
        else:
            out[name] = arr.copy()
    return out


def clip_updates(updates: Sequence[Update], reference: Mapping[str, np.ndarray],
                 clip_factor: float) -> List[Update]:
    """Clip every update's change to ``clip_factor`` times the median change norm of ``updates``.

    With one update (or a median of 0) nothing is clipped. ``clip_factor <= 0`` returns the
    updates unchanged.
    """
    if clip_factor <= 0 or len(updates) < 2:
        return list(updates)
    norms = [update_norm(w, reference) for w, _ in updates]
    bound = clip_factor * float(np.median(norms))
    if bound <= 0:
        return list(updates)
    return [(clip_update(w, reference, bound) if nrm > bound else w, n) for (w, n), nrm in zip(updates, norms)]


# --------------------------------------------------------------------------------------------
# Aggregation rules
# --------------------------------------------------------------------------------------------


def _prepare(updates: Sequence[Update], template: Optional[Mapping[str, np.ndarray]]) -> Tuple[List[str], Mapping]:
    if not updates:
        raise InvalidUpdate("aggregation needs at least one update, got none")
    for _, n in updates:
        if not _is_int(n) or n <= 0:
            raise InvalidUpdate(f"num_examples must all be integers > 0, got {[n for _, n in updates]}")
    ref = template if template is not None else updates[0][0]
    names = list(ref)
    for i, (weights, _) in enumerate(updates):
        if set(weights) != set(names):
            raise InvalidUpdate(f"update {i} has parameters {sorted(weights)}, expected {sorted(names)}")
    return names, ref


def _stack(updates: Sequence[Update], name: str, shape: tuple, dtype: np.dtype) -> np.ndarray:
    arrays = [np.asarray(weights[name]) for weights, _ in updates]
    for i, arr in enumerate(arrays):
        if arr.shape != shape:
            raise InvalidUpdate(f"update {i}: parameter {name!r} has shape {arr.shape}, expected {shape}")
    return np.stack([a.astype(np.float64 if dtype.kind == "f" else a.dtype) for a in arrays])


def _finish(acc: np.ndarray, dtype: np.dtype, name: str) -> np.ndarray:
    # np.asarray: reductions of 0-d arrays yield numpy scalars; keep ndarrays of shape ().
    out = np.asarray(acc)
    if dtype.kind == "f":
        with np.errstate(over="ignore", invalid="ignore"):
            cast = out.astype(dtype)
        if not np.isfinite(cast).all():
            raise InvalidUpdate(f"aggregated parameter {name!r} is not finite in {dtype}")
        return cast
    return out.astype(dtype, copy=True)


def fedavg(updates: Sequence[Update], *, template: Optional[Mapping[str, np.ndarray]] = None) -> Weights:
    """Weighted mean of client weights, weighted by their ``num_examples``.

    Floating-point parameters: ``sum_i (n_i / N) * w_i`` with ``N = sum_i n_i``; the coefficients
    are exact Python-int quotients (no overflow for any count), the sum is float64, the result
    is returned in the template dtype. Integer and bool parameters (counters such as
    BatchNorm's ``num_batches_tracked``) are not averaged: the element-wise maximum is taken.

    :param updates: ``[(weights, num_examples), ...]``, already validated (same names and shapes).
    :param template: gives the output dtypes and name order; defaults to the first update.
    :returns: new arrays (never views of the inputs).
    :raises InvalidUpdate: on an empty list, non-positive example counts, mismatching
        names/shapes, or a result that is not finite in its dtype.
    """
    names, ref = _prepare(updates, template)
    total = sum(int(n) for _, n in updates)
    coef = [int(n) / total for _, n in updates]  # int / int: exact rounding, never OverflowError
    out: Weights = {}
    for name in names:
        shape, dtype = np.shape(ref[name]), np.asarray(ref[name]).dtype
        stacked = _stack(updates, name, shape, dtype)
        if dtype.kind == "f":
            acc = np.zeros(shape, dtype=np.float64)
            with np.errstate(over="ignore", invalid="ignore"):
                for arr, c in zip(stacked, coef):
                    acc += c * arr
            out[name] = _finish(acc, dtype, name)
        else:
            out[name] = _finish(np.maximum.reduce(list(stacked)), dtype, name)
    return out


class FedAvgStream:
    """FedAvg one update at a time: memory O(model), not O(updates x model).

    :meth:`add` folds ``n_i * w_i`` into a float64 running sum (integer parameters into a running
    element-wise maximum) and keeps nothing of the update, so a server collecting a thousand
    results holds one expert's worth of sums instead of a thousand copies of it; :meth:`result`
    divides by ``N = sum_i n_i`` once. It equals :func:`fedavg` up to float64 rounding (which
    scales each update by ``n_i / N`` first). Only FedAvg streams: the coordinate-wise median and
    the trimmed mean, and clipping to the round's median change, need every update at once.

    :param template: the weights the server sent (names, shapes and output dtypes).
    """

    def __init__(self, template: Mapping[str, np.ndarray]):
        self.template = {k: np.asarray(v) for k, v in template.items()}
        self._acc: Dict[str, np.ndarray] = {}
        self.total = 0  # sum of num_examples
        self.count = 0  # updates added

    def add(self, weights: Mapping[str, np.ndarray], num_examples: int) -> None:
        """Fold one validated update in; raises :class:`InvalidUpdate` (leaving the sums as they were)."""
        if not _is_int(num_examples) or num_examples <= 0:
            raise InvalidUpdate(f"num_examples must be an integer > 0, got {num_examples!r}")
        if set(weights) != set(self.template):
            raise InvalidUpdate(f"update has parameters {sorted(weights)}, expected {sorted(self.template)}")
        arrays = {}
        for name, ref in self.template.items():
            arr = np.asarray(weights[name])
            if arr.shape != ref.shape:
                raise InvalidUpdate(f"parameter {name!r} has shape {arr.shape}, expected {ref.shape}")
            arrays[name] = arr
        n = float(int(num_examples))
        with np.errstate(over="ignore", invalid="ignore"):
            for name, arr in arrays.items():
                acc = self._acc.get(name)
                if self.template[name].dtype.kind == "f":
                    term = np.multiply(arr, n, dtype=np.float64)
                    if acc is None:
                        self._acc[name] = term
                    else:
                        np.add(acc, term, out=acc)
                elif acc is None:
                    self._acc[name] = arr.copy()
                else:
                    np.maximum(acc, arr, out=acc)
        self.total += int(num_examples)
        self.count += 1

    def result(self) -> Weights:
        """The average in the template's dtypes and name order; :class:`InvalidUpdate` if nothing was
        added or the average is not finite in its dtype."""
        if not self.count:
            raise InvalidUpdate("aggregation needs at least one update, got none")
        out: Weights = {}
        for name, ref in self.template.items():
            acc = self._acc[name]
            out[name] = _finish(acc / float(self.total) if ref.dtype.kind == "f" else acc, ref.dtype, name)
        return out


def coordinate_median(updates: Sequence[Update], *, template: Optional[Mapping[str, np.ndarray]] = None
                      ) -> Weights:
    """Coordinate-wise median of the client weights (unweighted; ``num_examples`` is ignored).

    With an even number of updates the float median is the mean of the two middle values;
    integer parameters take the lower middle value (an actual client's value).
    """
    names, ref = _prepare(updates, template)
    out: Weights = {}
    for name in names:
        shape, dtype = np.shape(ref[name]), np.asarray(ref[name]).dtype
        stacked = _stack(updates, name, shape, dtype)
        if dtype.kind == "f":
            out[name] = _finish(np.median(stacked, axis=0), dtype, name)
        else:
            out[name] = _finish(np.sort(stacked, axis=0)[(len(stacked) - 1) // 2], dtype, name)
    return out


def trimmed_mean(updates: Sequence[Update], *, trim_fraction: float = 0.2,
                 template: Optional[Mapping[str, np.ndarray]] = None) -> Weights:
    """Coordinate-wise trimmed mean: drop the ``k = floor(trim_fraction * n)`` largest and
    smallest values of each coordinate, average the remaining ``n - 2k`` (unweighted).

    ``trim_fraction`` must be in ``[0, 0.5)``; with ``k = 0`` (few updates) this is the plain
    mean. Integer parameters take the coordinate-wise lower median.
    """
    if not 0 <= trim_fraction < 0.5:
        raise InvalidUpdate(f"trim_fraction must be in [0, 0.5), got {trim_fraction}")
    names, ref = _prepare(updates, template)
    n = len(updates)
    k = int(math.floor(trim_fraction * n))
    out: Weights = {}
    for name in names:
        shape, dtype = np.shape(ref[name]), np.asarray(ref[name]).dtype
        stacked = np.sort(_stack(updates, name, shape, dtype), axis=0)
        if dtype.kind == "f":
            out[name] = _finish(stacked[k:n - k].mean(axis=0), dtype, name)
        else:
            out[name] = _finish(stacked[(n - 1) // 2], dtype, name)
    return out


def check_finite(weights: Mapping[str, np.ndarray], what: str = "weights") -> None:
    """Raise :class:`InvalidUpdate` if any floating-point array of ``weights`` holds NaN or inf."""
    for name, arr in weights.items():
        arr = np.asarray(arr)
        if arr.dtype.kind == "f" and not np.isfinite(arr).all():
            raise InvalidUpdate(f"{what}: parameter {name!r} contains NaN or inf")


def aggregate(updates: Sequence[Update], *, method: str = "fedavg", trim_fraction: float = 0.2,
              template: Optional[Mapping[str, np.ndarray]] = None,
              reference: Optional[Mapping[str, np.ndarray]] = None, clip_factor: float = 0.0) -> Weights:
    """Aggregate one expert's updates with ``method`` (one of :data:`AGGREGATIONS`).

    :param reference: the weights the clients started from; needed for ``clip_factor > 0``
        (:func:`clip_updates` before aggregating).
    :raises InvalidUpdate: as the rules do, and if the result is not finite.
    """
    if method not in AGGREGATIONS:
        raise InvalidUpdate(f"unknown aggregation {method!r}; valid: {', '.join(AGGREGATIONS)}")
    if clip_factor > 0:
        if reference is None:
            raise InvalidUpdate("clipping needs the reference weights the clients started from")
        updates = clip_updates(updates, reference, clip_factor)
    if method == "fedavg":
        out = fedavg(updates, template=template)
    elif method == "median":
        out = coordinate_median(updates, template=template)
    else:
        out = trimmed_mean(updates, trim_fraction=trim_fraction, template=template)
    check_finite(out, f"{method} result")
    return out


def aggregate_per_expert(updates_by_node: Mapping[int, List[Update]],
                         templates: Optional[Mapping[int, Mapping[str, np.ndarray]]] = None, *,
                         method: str = "fedavg", trim_fraction: float = 0.2, clip_factor: float = 0.0,
                         ) -> Dict[int, Weights]:
    """Aggregate separately for each expert node (:func:`aggregate`).

    Nodes with an empty update list are left out of the result (the caller keeps their previous
    weights), so in parallel mode an expert nobody trained this round is simply not updated.

    :param templates: optional ``{node: weights}`` giving each node's output dtypes and name
        order (the weights the server sent; also the clipping reference); without one a node
        follows its first update, so a float16 update listed first would make the average float16.
    """
    templates = templates or {}
    return {node: aggregate(updates, method=method, trim_fraction=trim_fraction, template=templates.get(node),
                            reference=templates.get(node), clip_factor=clip_factor)
            for node, updates in updates_by_node.items() if updates}
