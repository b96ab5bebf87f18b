"""Image datasets with class trees: CIFAR-100, Tiny ImageNet, ``.npz`` files and synthetic data.

A dataset is named by a *spec* string::

    synthetic                                   # 4 superclasses × 5 classes, 300 images each
    synthetic:coarse=4,fine=5,per_class=300,size=32,seed=0
    synthetic:levels=3,coarse=2,mid=3,fine=4    # root → groups → superclasses → classes
    cifar100:PATH        # PATH/cifar-100-python/, that folder itself, or a train.npz (x, fine, coarse)
    tinyimagenet:PATH    # PATH = tiny-imagenet-200/
    npz:PATH             # x + (fine, coarse) or x + label (+ a tree)

and :func:`load_dataset` returns one *split* of it as an :class:`ImageDataset`:

- ``train``: the source's training data minus a deterministic, stratified held-out
  ``val_fraction`` (:func:`train_val_split` with ``seed``);
- ``val``: that held-out part;
- ``test``: the official test split (CIFAR-100 ``test``; Tiny ImageNet's official ``val/``
  folder, since the official test set has no labels; for synthetic data a set generated on
  another random stream of the same seed; for a single ``.npz`` the whole file);
- ``all``: all the training data.

``limit_per_class`` keeps the first k samples of each class of the chosen split (in file
order), which makes quick runs and tests cheap (only those JPEGs are decoded).

Data layouts and directory trees are in the docstrings of :mod:`.cifar100`,
:mod:`.tiny_imagenet`, :mod:`.npz` and :mod:`.synthetic`. Numpy only at import time; Pillow,
tqdm, nltk and torchvision are imported when a loader needs them.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from edgehmoe.core.hierarchy import Hierarchy
from edgehmoe.data.base import (
    DatasetError,
    ImageDataset,
    Source,
    channel_stats,
    limit_per_class_indices,
    resolve_hierarchy,
    train_val_split,
)
from edgehmoe.data.cifar100 import download_cifar100
from edgehmoe.data.synthetic import make_synthetic, synthetic_options

__all__ = [
    "DATASET_KINDS",
    "SPLITS",
    "DatasetError",
    "ImageDataset",
    "channel_stats",
    "download_cifar100",
    "load_dataset",
    "make_synthetic",
    "open_source",
    "parse_spec",
    "train_val_split",
]

logger = logging.getLogger(__name__)

DATASET_KINDS = {
    "synthetic": (
        "synthetic[:key=value,...] (generated; options coarse, mid, fine, levels, per_class, "
        "test_per_class, size, seed)"
    ),
    "cifar100": "cifar100:PATH (folder with cifar-100-python/, or a train.npz with x, fine, coarse)",
    "tinyimagenet": "tinyimagenet:PATH (the tiny-imagenet-200/ folder)",
    "npz": "npz:PATH (x + fine/coarse, or x + label with a tree)",
}
SPLITS = ("train", "val", "test", "all")


def _valid_specs() -> str:
    return "; ".join(DATASET_KINDS.values())


def parse_spec(spec: str) -> tuple[str, Path | dict[str, int]]:
    """Split ``kind:argument``: a path for file datasets, validated options for ``synthetic``.

    Raises :class:`DatasetError` for an unknown kind (listing the valid ones) or a missing path.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise DatasetError(f"empty dataset spec; valid specs: {_valid_specs()}")
    kind, sep, arg = spec.strip().partition(":")
    kind = kind.strip().lower().replace("-", "").replace("_", "")
    if kind not in DATASET_KINDS:
        hint = ""
        if not sep and spec.strip().endswith(".npz"):
            hint = f" (did you mean npz:{spec.strip()}?)"
        raise DatasetError(f"unknown dataset kind {spec.split(':')[0]!r}{hint}; valid specs: {_valid_specs()}")
    arg = arg.strip()
    if kind == "synthetic":
        opts: dict[str, str] = {}
        for item in filter(None, (a.strip() for a in arg.split(","))):
            key, eq, value = item.partition("=")
            if not eq or not key.strip():
                raise DatasetError(
                    f"synthetic option {item!r} must look like key=value (e.g. synthetic:coarse=4,fine=5)"
                )
            if key.strip() in opts:
                raise DatasetError(f"synthetic option {key.strip()!r} is given twice")
            opts[key.strip()] = value.strip()
        return kind, synthetic_options(opts)
    if not arg:
        raise DatasetError(f"dataset spec {spec!r} needs a path: {DATASET_KINDS[kind]}")
    return kind, Path(arg).expanduser()


def open_source(
    spec: str,
    *,
    hierarchy: str | Path | Hierarchy | None = None,
    download: bool = False,
    cache: bool = True,
    verify: bool | None = None,
) -> Source:
    """Open the data behind ``spec`` without choosing a split (labels known, images lazy)."""
    kind, arg = parse_spec(spec)
    if kind == "synthetic":
        from edgehmoe.data.synthetic import open_synthetic

        source = open_synthetic(arg)  # type: ignore[arg-type]
    elif kind == "cifar100":
        from edgehmoe.data.cifar100 import open_cifar100

        source = open_cifar100(arg, verify=verify, download=download)  # type: ignore[arg-type]
    elif kind == "tinyimagenet":
        from edgehmoe.data.tiny_imagenet import open_tiny_imagenet

        return open_tiny_imagenet(arg, cache=cache, hierarchy=hierarchy)  # type: ignore[arg-type]
    else:
        from edgehmoe.data.npz import open_npz

        return open_npz(arg, hierarchy=hierarchy)  # type: ignore[arg-type]
    if hierarchy is not None:
        source.hierarchy = resolve_hierarchy(hierarchy, source.class_names)
    return source


def load_dataset(
    spec: str,
    split: str = "train",
    *,
    hierarchy: str | Path | Hierarchy | None = None,
    val_fraction: float = 0.1,
    seed: int = 0,
    limit_per_class: int | None = None,
    download: bool = False,
    cache: bool = True,
    verify: bool | None = None,
) -> ImageDataset:
    """Load one split of a dataset (see the module docstring for specs and splits).

    Args:
        spec: dataset spec such as ``cifar100:../shared/data/cifar100/train.npz``.
        split: ``train``, ``val``, ``test`` or ``all``.
        hierarchy: a ``parent,child`` CSV (leaves = class names) replacing the built-in tree;
            required for an ``.npz`` with ``label`` and no tree of its own.
        val_fraction: share of each class held out as ``val`` (0 ≤ f < 1).
        seed: seed of the train/val hold-out (synthetic images use the spec's own ``seed``).
        limit_per_class: keep at most this many samples per class of the split.
        download: CIFAR-100 only: download the official files if PATH has none.
        cache: Tiny ImageNet only: read/write decoded images in ``$XDG_CACHE_HOME/edgehmoe``.
        verify: CIFAR-100 only: md5 check (None: only for full-size files; True: always; False: never).
    """
    if split not in SPLITS:
        raise DatasetError(f"unknown split {split!r}; valid splits: {', '.join(SPLITS)}")
    if not 0.0 <= float(val_fraction) < 1.0:
        raise DatasetError(f"val_fraction must be in [0, 1); got {val_fraction}")
    if split == "val" and float(val_fraction) == 0.0:
        raise DatasetError("split 'val' is empty because val_fraction is 0; pass val_fraction > 0")
    if limit_per_class is not None and int(limit_per_class) < 1:
        raise DatasetError(f"limit_per_class must be a positive integer; got {limit_per_class}")
    source = open_source(spec, hierarchy=hierarchy, download=download, cache=cache, verify=verify)
    if split == "test":
        pool = source.open_test()
        idx = np.arange(len(pool.y), dtype=np.int64)
    else:
        pool = source.train
        if split == "all":
            idx = np.arange(len(pool.y), dtype=np.int64)
        else:
            train_idx, val_idx = train_val_split(pool.y, val_fraction, seed)
            idx = train_idx if split == "train" else val_idx
    idx = limit_per_class_indices(pool.y, idx, limit_per_class)
    x = pool.fetch(idx)
    ds = ImageDataset(
        x=x,
        y=pool.y[idx],
        class_names=source.class_names,
        hierarchy=source.hierarchy,
        name=source.name,
        split=split,
    )
    logger.info(
        "loaded %s split %r: %s images of %sx%s, %s classes",
        spec, split, len(ds), ds.image_size, ds.image_size, ds.num_classes,
    )
    return ds
