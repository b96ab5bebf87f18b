"""In-memory image datasets, the dataset error type and split helpers shared by all loaders.

An :class:`ImageDataset` is a set of uint8 RGB images ``x`` (N, H, W, 3) with dataset class
ids ``y`` that are the ``leaf_class`` ids of a :class:`~edgehmoe.core.hierarchy.Hierarchy`.
Loaders (``cifar100``, ``tiny_imagenet``, ``npz``, ``synthetic``) each return a
:class:`Source`: the class names, the tree and one or two *pools* of samples (the source's
training data and, when it has one, its official test data). A pool knows its labels up
front and decodes images only for the indices asked for, so a held-out split or a
``limit_per_class`` subset of Tiny ImageNet does not decode every JPEG.

Numpy only: nothing here imports torch or Pillow.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edgehmoe.core.hierarchy import Hierarchy, HierarchyError, read_edge_csv
from edgehmoe.errors import EdgeHmoeError

__all__ = [
    "DatasetError",
    "ImageDataset",
    "Pool",
    "Source",
    "channel_stats",
    "limit_per_class_indices",
    "resolve_hierarchy",
    "to_rgb_uint8",
    "train_val_split",
]

logger = logging.getLogger(__name__)


class DatasetError(EdgeHmoeError, ValueError):
    """A dataset is missing, incomplete or malformed; the message says what and how to fix it."""


@dataclass
class ImageDataset:
    """Images with hierarchical labels, all in memory.

    Attributes:
        x: uint8 images, shape ``(N, H, W, 3)``, RGB.
        y: int64 dataset class ids (``hierarchy.leaf_class`` ids), shape ``(N,)``.
        class_names: one name per class id; equal to ``hierarchy.class_names()``.
        hierarchy: the class tree (root → ... → one leaf per class).
        name: where the data came from: ``synthetic``, ``cifar100``, ``tinyimagenet`` or ``npz``.
        split: ``train``, ``val``, ``test`` or ``all`` (or a subset label such as ``shard3``).
    """

    x: np.ndarray
    y: np.ndarray
    class_names: list[str]
    hierarchy: Hierarchy
    name: str
    split: str

    def __post_init__(self) -> None:
        if not isinstance(self.x, np.ndarray) or self.x.dtype != np.uint8 or self.x.ndim != 4 or self.x.shape[-1] != 3:
            shape = getattr(self.x, "shape", None)
            dtype = getattr(self.x, "dtype", type(self.x).__name__)
            raise DatasetError(f"x must be a uint8 array of shape (N, H, W, 3); got {dtype} {shape}")
        self.y = np.asarray(self.y, dtype=np.int64)
        if self.y.shape != (len(self.x),):
            raise DatasetError(f"y must have shape ({len(self.x)},) to match x; got {self.y.shape}")
        self.class_names = [str(c) for c in self.class_names]
        if len(self.class_names) != self.hierarchy.num_classes:
            raise DatasetError(
                f"{len(self.class_names)} class names but the hierarchy has {self.hierarchy.num_classes} leaves"
            )
        if len(self.y) and (self.y.min() < 0 or self.y.max() >= len(self.class_names)):
            raise DatasetError(
                f"labels must be in 0..{len(self.class_names) - 1}; got {self.y.min()}..{self.y.max()}"
            )

    def __len__(self) -> int:
        return len(self.y)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def image_size(self) -> int:
        """Image height in pixels (images are square for every built-in source)."""
        return int(self.x.shape[1])

    def subset(self, idx: np.ndarray | Sequence[int], split: str | None = None) -> "ImageDataset":
        """The samples at ``idx`` (indices or a boolean mask), sharing names and tree."""
        idx = np.asarray(idx)
        if idx.dtype != bool:
            idx = idx.astype(np.int64, copy=False)
        return ImageDataset(
            x=self.x[idx],
            y=self.y[idx],
            class_names=list(self.class_names),
            hierarchy=self.hierarchy,
            name=self.name,
            split=self.split if split is None else split,
        )

    def class_counts(self) -> np.ndarray:
        """Number of samples per class id, int64 ``(num_classes,)``."""
        return np.bincount(self.y, minlength=self.num_classes).astype(np.int64)

    def __repr__(self) -> str:
        return (
            f"ImageDataset(name={self.name!r}, split={self.split!r}, n={len(self)}, "
            f"image_size={self.image_size}, classes={self.num_classes}, hierarchy={self.hierarchy!r})"
        )


# ---------------------------------------------------------------------- sources and pools
@dataclass
class Pool:
    """One set of samples of a source: labels known up front, images decoded on demand.

    ``fetch(idx)`` returns the uint8 images ``(len(idx), H, W, 3)`` for sorted indices.
    """

    y: np.ndarray
    fetch: Callable[[np.ndarray], np.ndarray]
    description: str = ""

    @classmethod
    def from_arrays(cls, x: np.ndarray, y: np.ndarray, description: str = "") -> "Pool":
        return cls(y=np.asarray(y, dtype=np.int64), fetch=lambda idx: x[idx], description=description)


@dataclass
class Source:
    """What a loader found: names, tree, the training pool and (optionally) a test pool.

    ``open_test`` is called only when the ``test`` split is asked for; it raises
    :class:`DatasetError` saying which file it expected when the source has none.
    """

    name: str
    class_names: list[str]
    hierarchy: Hierarchy
    train: Pool
    open_test: Callable[[], Pool]
    info: dict = field(default_factory=dict)


# ---------------------------------------------------------------------- helpers
def train_val_split(y: np.ndarray | Sequence[int], val_fraction: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic stratified hold-out: ``(train_idx, val_idx)``, sorted, disjoint, covering.

    Each class ``c`` with ``n_c`` samples gives ``round(n_c * val_fraction)`` of them to
    validation, chosen by a generator seeded with ``(seed, c)``; so a class's split depends
    only on the positions of its own samples (adding a class does not reshuffle the others).
    A class with at least 2 samples keeps at least one sample on each side when
    ``0 < val_fraction < 1``.
    """
    y = np.asarray(y)
    if y.ndim != 1:
        raise DatasetError(f"labels must be 1-D; got shape {y.shape}")
    val_fraction = float(val_fraction)
    if not 0.0 <= val_fraction < 1.0:
        raise DatasetError(f"val_fraction must be in [0, 1); got {val_fraction}")
    y = y.astype(np.int64, copy=False)
    if len(y) and y.min() < 0:
        raise DatasetError("labels must be non-negative class ids")
    is_val = np.zeros(len(y), dtype=bool)
    if val_fraction > 0 and len(y):
        order = np.argsort(y, kind="stable")
        classes, starts, counts = np.unique(y[order], return_index=True, return_counts=True)
        for c, s, n in zip(classes.tolist(), starts.tolist(), counts.tolist()):
            n_val = int(np.floor(n * val_fraction + 0.5))
            if n >= 2:
                n_val = min(max(n_val, 1), n - 1)
            if n_val == 0:
                continue
            members = order[s : s + n]
            pick = np.random.default_rng([int(seed), int(c)]).permutation(n)[:n_val]
            is_val[members[pick]] = True
    return np.flatnonzero(~is_val), np.flatnonzero(is_val)


def limit_per_class_indices(y: np.ndarray, idx: np.ndarray, limit: int | None) -> np.ndarray:
    """The first ``limit`` entries of ``idx`` of each class (in ``idx`` order), sorted."""
    idx = np.asarray(idx, dtype=np.int64)
    if limit is None:
        return idx
    if int(limit) < 1:
        raise DatasetError(f"limit_per_class must be a positive integer; got {limit}")
    labels = np.asarray(y)[idx]
    order = np.argsort(labels, kind="stable")
    sorted_labels = labels[order]
    first = np.searchsorted(sorted_labels, sorted_labels, side="left")
    rank = np.arange(len(order)) - first
    return np.sort(idx[order[rank < int(limit)]])


def channel_stats(x: np.ndarray, chunk: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and standard deviation of uint8 RGB images, in [0, 1] units (float32).

    Computed in float64 over chunks, so 50,000 CIFAR images need no float copy of the data.
    """
    x = np.asarray(x)
    if x.ndim != 4 or x.shape[-1] != 3:
        raise DatasetError(f"expected images of shape (N, H, W, 3); got {x.shape}")
    if len(x) == 0:
        raise DatasetError("cannot compute channel statistics of an empty image set")
    s = np.zeros(3, dtype=np.float64)
    s2 = np.zeros(3, dtype=np.float64)
    for i in range(0, len(x), chunk):
        part = x[i : i + chunk].reshape(-1, 3).astype(np.float64)
        s += part.sum(axis=0)
        s2 += np.square(part).sum(axis=0)
    n = x.shape[0] * x.shape[1] * x.shape[2]
    mean = s / n
    var = np.maximum(s2 / n - mean**2, 0.0)
    return (mean / 255.0).astype(np.float32), (np.sqrt(var) / 255.0).astype(np.float32)


def to_rgb_uint8(x: np.ndarray, key: str = "x", where: str = "") -> np.ndarray:
    """Accept ``(N,H,W,3)``, ``(N,H,W,1)``, ``(N,H,W)`` grayscale or ``(N,3,H,W)`` uint8 images.

    Returns ``(N, H, W, 3)`` uint8; raises :class:`DatasetError` naming ``key`` otherwise.
    """
    expected = "uint8 (N, H, W, 3) RGB, (N, H, W) grayscale or (N, 3, H, W)"
    prefix = f"{where}: " if where else ""
    if x.dtype != np.uint8:
        raise DatasetError(
            f"{prefix}array {key!r} has dtype {x.dtype}; expected {expected} "
            "(convert with x.clip(0, 255).astype(np.uint8) if values are 0..255)"
        )
    if x.ndim == 3:
        return np.repeat(x[..., None], 3, axis=-1)
    if x.ndim == 4 and x.shape[-1] == 3:
        return x
    if x.ndim == 4 and x.shape[-1] == 1:
        return np.repeat(x, 3, axis=-1)
    if x.ndim == 4 and x.shape[1] == 3:
        return np.ascontiguousarray(x.transpose(0, 2, 3, 1))
    raise DatasetError(f"{prefix}array {key!r} has shape {x.shape}; expected {expected}")


def resolve_hierarchy(spec: str | Path | Hierarchy, class_names: Sequence[str]) -> Hierarchy:
    """A tree from a ``parent,child`` CSV path (leaves = ``class_names``) or a ready Hierarchy."""
    if isinstance(spec, Hierarchy):
        if spec.class_names() != list(class_names):
            raise DatasetError(
                "the given hierarchy's leaves do not match the dataset's class names "
                f"(first leaves {spec.class_names()[:3]}, first classes {list(class_names)[:3]})"
            )
        return spec
    path = Path(spec).expanduser()
    if not path.is_file():
        raise DatasetError(f"hierarchy file {path} does not exist; pass a 'parent,child' CSV edge list")
    try:
        return read_edge_csv(path, list(class_names))
    except HierarchyError as e:
        raise DatasetError(
            f"{e}. The CSV's leaves must be exactly the dataset's class names "
            f"({len(class_names)} classes, e.g. {', '.join(map(str, list(class_names)[:3]))})"
        ) from None
