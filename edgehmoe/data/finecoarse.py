"""Datasets labelled with a fine and a coarse class per image (CIFAR-100 style).

Shared by the CIFAR-100 loader (pickles or npz) and the generic ``npz:`` loader: derive and
check the fine → coarse map, name the classes (from ``meta.json`` or ``fine_0``/``coarse_0``),
and build the root → coarse → fine tree.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from edgehmoe.core.hierarchy import Hierarchy, HierarchyError
from edgehmoe.data.base import DatasetError, Pool, Source
from edgehmoe.data.taxonomy import cifar100_hierarchy

__all__ = ["fine_coarse_check", "fine_coarse_source", "fine_to_coarse", "read_meta_json"]


def fine_to_coarse(fine: np.ndarray, coarse: np.ndarray, num_fine: int, num_coarse: int, where: str) -> np.ndarray:
    if len(fine) and (fine.min() < 0 or fine.max() >= num_fine):
        raise DatasetError(f"{where}: fine labels must be in 0..{num_fine - 1}; got {fine.min()}..{fine.max()}")
    if len(coarse) and (coarse.min() < 0 or coarse.max() >= num_coarse):
        raise DatasetError(f"{where}: coarse labels must be in 0..{num_coarse - 1}; got {coarse.min()}..{coarse.max()}")
    f2c = np.full(num_fine, -1, dtype=np.int64)
    f2c[fine] = coarse
    bad = np.flatnonzero(f2c[fine] != coarse)
    if len(bad):
        i = int(bad[0])
        raise DatasetError(
            f"{where}: fine class {int(fine[i])} appears with two coarse labels "
            f"({int(f2c[fine[i]])} and {int(coarse[i])}); each fine class needs one superclass"
        )
    if np.any(f2c < 0):
        missing = np.flatnonzero(f2c < 0)
        raise DatasetError(
            f"{where}: fine classes {missing[:10].tolist()} have no samples, so their superclass is "
            "unknown; add 'fine_to_coarse' to meta.json"
        )
    return f2c


def _tree(fine_names: list[str], coarse_names: list[str], f2c: np.ndarray, where: str) -> Hierarchy:
    try:
        return cifar100_hierarchy(fine_names, coarse_names, f2c.tolist())
    except HierarchyError as e:
        raise DatasetError(f"{where}: cannot build the coarse → fine tree: {e}") from None


def read_meta_json(path: Path) -> dict:
    """``meta.json`` beside an npz: ``fine_label_names``, ``coarse_label_names``, optional ``fine_to_coarse``."""
    try:
        meta = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DatasetError(
            f"cannot read {path}: {e}; expected JSON with fine_label_names and coarse_label_names"
        ) from None
    if not isinstance(meta, dict):
        raise DatasetError(f"{path} must hold a JSON object with fine_label_names and coarse_label_names")
    return meta


def fine_coarse_source(
    x: np.ndarray, fine: np.ndarray, coarse: np.ndarray, meta: dict | None, *, name: str, where: str,
    open_test, description: str,
) -> Source:
    """A source over fine/coarse labels, names from ``meta`` (or ``fine_0``, ``coarse_0``...)."""
    meta = meta or {}
    fine_names = meta.get("fine_label_names")
    coarse_names = meta.get("coarse_label_names")
    if fine_names is None:
        fine_names = [f"fine_{i}" for i in range(int(fine.max()) + 1 if len(fine) else 0)]
    if coarse_names is None:
        coarse_names = [f"coarse_{i}" for i in range(int(coarse.max()) + 1 if len(coarse) else 0)]
    fine_names, coarse_names = [str(n) for n in fine_names], [str(n) for n in coarse_names]
    if "fine_to_coarse" in meta:
        f2c = np.asarray(meta["fine_to_coarse"], dtype=np.int64)
        if f2c.shape != (len(fine_names),) or (len(f2c) and (f2c.min() < 0 or f2c.max() >= len(coarse_names))):
            raise DatasetError(
                f"{where}: meta fine_to_coarse must have {len(fine_names)} entries in 0..{len(coarse_names) - 1}"
            )
        fine_coarse_check(fine, coarse, f2c, where)
    else:
        f2c = fine_to_coarse(fine, coarse, len(fine_names), len(coarse_names), where)
    tree = _tree(fine_names, coarse_names, f2c, where)
    return Source(
        name=name,
        class_names=fine_names,
        hierarchy=tree,
        train=Pool.from_arrays(x, fine, description),
        open_test=open_test,
        info={"fine_to_coarse": f2c.tolist(), "coarse_label_names": coarse_names},
    )


def fine_coarse_check(fine: np.ndarray, coarse: np.ndarray, f2c: np.ndarray, where: str) -> None:
    if len(fine) and (fine.min() < 0 or fine.max() >= len(f2c)):
        raise DatasetError(f"{where}: fine labels must be in 0..{len(f2c) - 1}; got {fine.min()}..{fine.max()}")
    bad = np.flatnonzero(f2c[fine] != coarse)
    if len(bad):
        i = int(bad[0])
        raise DatasetError(
            f"{where}: sample {i} has fine {int(fine[i])} and coarse {int(coarse[i])}, but "
            f"fine_to_coarse maps it to {int(f2c[fine[i]])}"
        )
