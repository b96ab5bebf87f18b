"""Split a dataset across devices and write one shard file per device (numpy only).

Partitioners follow flwr-datasets (``partitioner/iid_partitioner.py``,
``dirichlet_partitioner.py``): a class with ``num_partitions``, seeded in ``__init__``,
validating its parameters, with ``partition(labels)`` returning one index array per device
and ``load_partition(i)`` afterwards. ``partition`` re-seeds on every call, so the same
labels always give the same split.

:func:`write_shards` writes the partitions of an :class:`~edgehmoe.data.ImageDataset`::

    shards/
    ├── partition.json      # dataset, partitioner, seed, class names, per-shard class counts
    ├── device_000.npz      # x uint8 (n, H, W, 3); label int64 (n,); class_names unicode (C,);
    ├── device_001.npz      #   meta: JSON string (format, version, dataset, split, tree as
    └── ...                 #   Hierarchy.to_dict(), shard index, num_shards, seed, partitioner)

Shards are plain ``np.savez`` archives (no pickles) read back with :func:`load_shard`, which
validates the layout and raises :class:`ShardError` for anything unexpected.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgehmoe.core.hierarchy import Hierarchy, HierarchyError
from edgehmoe.errors import EdgeHmoeError, UsageError

__all__ = [
    "PARTITIONERS",
    "SHARD_FORMAT",
    "SHARD_VERSION",
    "DirichletPartitioner",
    "IidPartitioner",
    "Partitioner",
    "Shard",
    "ShardError",
    "load_shard",
    "make_partitioner",
    "shard_path",
    "write_shards",
]

logger = logging.getLogger(__name__)

SHARD_FORMAT = "edgehmoe-shard"
SHARD_VERSION = 1


class ShardError(EdgeHmoeError, ValueError):
    """A shard file is missing, corrupt or not in the expected layout."""


# ---------------------------------------------------------------------- partitioners
class Partitioner:
    """Base class: ``partition(labels)`` → disjoint index arrays covering every sample."""

    def __init__(self, num_partitions: int, seed: int = 0):
        if isinstance(num_partitions, bool) or not isinstance(num_partitions, (int, np.integer)) or num_partitions < 1:
            raise UsageError(f"num_partitions must be a positive integer; got {num_partitions!r}")
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
            raise UsageError(f"seed must be a non-negative integer; got {seed!r}")
        self._num_partitions = int(num_partitions)
        self.seed = int(seed)
        self._partitions: list[np.ndarray] | None = None

    @property
    def num_partitions(self) -> int:
        return self._num_partitions

    def partition(self, labels: np.ndarray | Sequence[int]) -> list[np.ndarray]:
        labels = np.asarray(labels)
        if labels.ndim != 1:
            raise UsageError(f"labels must be 1-D; got shape {labels.shape}")
        if len(labels) < self.num_partitions:
            raise UsageError(
                f"cannot split {len(labels)} samples into {self.num_partitions} non-empty partitions"
            )
        parts = self._partition(labels.astype(np.int64, copy=False), np.random.default_rng(self.seed))
        self._partitions = [np.sort(p).astype(np.int64) for p in parts]
        return self._partitions

    def _partition(self, labels: np.ndarray, rng: np.random.Generator) -> list[np.ndarray]:
        raise NotImplementedError

    def load_partition(self, partition_id: int) -> np.ndarray:
        """Indices of partition ``partition_id`` (after :meth:`partition`)."""
        if self._partitions is None:
            raise RuntimeError(f"{type(self).__name__}: call partition(labels) before load_partition()")
        if not 0 <= int(partition_id) < self.num_partitions:
            raise IndexError(f"partition_id must be in 0..{self.num_partitions - 1}; got {partition_id}")
        return self._partitions[int(partition_id)]

    def describe(self) -> dict:
        return {"name": type(self).__name__, "num_partitions": self.num_partitions, "seed": self.seed}


class IidPartitioner(Partitioner):
    """Shuffle, then cut into ``num_partitions`` nearly equal parts (sizes differ by at most 1)."""

    def _partition(self, labels: np.ndarray, rng: np.random.Generator) -> list[np.ndarray]:
        return list(np.array_split(rng.permutation(len(labels)), self.num_partitions))

    def __repr__(self) -> str:
        return f"IidPartitioner(num_partitions={self.num_partitions}, seed={self.seed})"


class DirichletPartitioner(Partitioner):
    """Label skew: each class is spread over partitions in Dirichlet(alpha) proportions.

    Small ``alpha`` (e.g. 0.1) gives devices few classes each; large ``alpha`` (e.g. 100)
    approaches IID. As in flwr-datasets, proportions are redrawn (up to ``max_retries``
    times) until every partition has at least ``min_partition_size`` samples; with
    ``self_balancing`` a partition already holding more than the average stops receiving
    samples of later classes.

    Args:
        num_partitions: number of devices.
        alpha: concentration, > 0: a number or one value per partition.
        seed: random seed.
        min_partition_size: smallest acceptable partition.
        self_balancing: cap partitions at the average size while drawing.
        max_retries: draws to try before giving up with a ValueError.
    """

    def __init__(
        self,
        num_partitions: int,
        alpha: float | Sequence[float],
        seed: int = 0,
        min_partition_size: int = 10,
        self_balancing: bool = False,
        max_retries: int = 10,
    ):
        super().__init__(num_partitions, seed)
        a = np.asarray(alpha, dtype=np.float64)
        if a.ndim == 0:
            a = np.full(self.num_partitions, float(a))
        if a.shape != (self.num_partitions,):
            raise UsageError(f"alpha must be a number or {self.num_partitions} numbers; got shape {a.shape}")
        if not np.all(np.isfinite(a)) or np.any(a <= 0):
            raise UsageError(f"alpha must be > 0 (smaller = more skewed, e.g. 0.1 to 100); got {alpha!r}")
        if int(min_partition_size) < 0:
            raise UsageError(f"min_partition_size must be >= 0; got {min_partition_size}")
        if int(max_retries) < 1:
            raise UsageError(f"max_retries must be >= 1; got {max_retries}")
        self.alpha = a
        self.min_partition_size = int(min_partition_size)
        self.self_balancing = bool(self_balancing)
        self.max_retries = int(max_retries)

    def _partition(self, labels: np.ndarray, rng: np.random.Generator) -> list[np.ndarray]:
        n, k = len(labels), self.num_partitions
        if self.min_partition_size * k > n:
            raise UsageError(
                f"{n} samples cannot give {k} partitions of at least {self.min_partition_size}; "
                "lower min_partition_size or num_partitions"
            )
        classes = np.unique(labels)
        sizes = np.zeros(k, dtype=np.int64)
        for attempt in range(1, self.max_retries + 1):
            parts: list[list[np.ndarray]] = [[] for _ in range(k)]
            sizes[:] = 0
            for c in classes:
                members = rng.permutation(np.flatnonzero(labels == c))
                p = rng.dirichlet(self.alpha)
                if self.self_balancing:
                    p = np.where(sizes < n / k, p, 0.0)
                    p = p / p.sum() if p.sum() > 0 else np.full(k, 1.0 / k)
                cuts = (np.cumsum(p)[:-1] * len(members)).astype(np.int64)
                for i, chunk in enumerate(np.split(members, cuts)):
                    parts[i].append(chunk)
                    sizes[i] += len(chunk)
            if sizes.min() >= max(self.min_partition_size, 1):
                return [np.concatenate(p) for p in parts]
            logger.debug(
                "Dirichlet draw %s: smallest partition %s < %s; redrawing", attempt, sizes.min(), self.min_partition_size
            )
        raise UsageError(
            f"no Dirichlet(alpha={self.alpha.min():g}..{self.alpha.max():g}) split in {self.max_retries} draws gave "
            f"every one of {k} partitions at least {max(self.min_partition_size, 1)} samples (smallest: "
            f"{int(sizes.min())}); raise alpha, lower min_partition_size, or use self_balancing=True"
        )

    def describe(self) -> dict:
        alpha = float(self.alpha[0]) if np.all(self.alpha == self.alpha[0]) else self.alpha.tolist()
        return {**super().describe(), "alpha": alpha, "min_partition_size": self.min_partition_size,
                "self_balancing": self.self_balancing}

    def __repr__(self) -> str:
        return (
            f"DirichletPartitioner(num_partitions={self.num_partitions}, alpha={self.describe()['alpha']}, "
            f"seed={self.seed}, min_partition_size={self.min_partition_size})"
        )


PARTITIONERS = {
    "iid": "iid (shuffled, equal sizes)",
    "dirichlet": "dirichlet:ALPHA (label skew, ALPHA > 0; e.g. dirichlet:0.5)",
}


def make_partitioner(spec: str, num_partitions: int, seed: int = 0, **kwargs) -> Partitioner:
    """``"iid"`` or ``"dirichlet:ALPHA"`` → a partitioner; errors list the valid choices."""
    name, _, arg = str(spec).strip().partition(":")
    name = name.strip().lower()
    valid = "; ".join(PARTITIONERS.values())
    if name == "iid":
        if arg:
            raise UsageError(f"partitioner 'iid' takes no argument (got {spec!r}); valid: {valid}")
        return IidPartitioner(num_partitions, seed=seed, **kwargs)
    if name == "dirichlet":
        try:
            alpha = float(arg)
        except ValueError:
            raise UsageError(
                f"partitioner {spec!r} needs a number: dirichlet:ALPHA with ALPHA > 0, e.g. dirichlet:0.5"
            ) from None
        return DirichletPartitioner(num_partitions, alpha, seed=seed, **kwargs)
    raise UsageError(f"unknown partitioner {spec!r}; valid: {valid}")


# ---------------------------------------------------------------------- shards
def shard_path(out_dir: str | Path, index: int) -> Path:
    return Path(out_dir) / f"device_{index:03d}.npz"


def _atomic_write(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with tmp.open("wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_shards(dataset, partitioner: Partitioner, out_dir: str | Path, *, overwrite: bool = False) -> list[Path]:
    """Partition ``dataset`` (an ImageDataset) by label and write one ``.npz`` per device.

    Refuses (FileExistsError) to replace existing shards or ``partition.json`` unless
    ``overwrite=True``, in which case stale ``device_*.npz`` files beyond the new count are
    removed too. Returns the shard paths in device order.
    """
    out = Path(out_dir)
    existing = sorted(out.glob("device_*.npz"))
    if (out / "partition.json").exists():
        existing.append(out / "partition.json")
    if existing and not overwrite:
        raise FileExistsError(
            f"{out} already holds shards ({', '.join(p.name for p in existing[:3])}...); "
            "choose another folder or pass overwrite=True (--overwrite)"
        )
    out.mkdir(parents=True, exist_ok=True)
    parts = partitioner.partition(dataset.y)
    tree = dataset.hierarchy.to_dict()
    class_names = np.asarray(list(dataset.class_names), dtype=str)
    paths: list[Path] = []
    summary = []
    for i, idx in enumerate(parts):
        label = np.asarray(dataset.y[idx], dtype=np.int64)
        meta = {
            "format": SHARD_FORMAT,
            "version": SHARD_VERSION,
            "dataset": dataset.name,
            "split": dataset.split,
            "shard": i,
            "num_shards": len(parts),
            "seed": partitioner.seed,
            "partitioner": partitioner.describe(),
            "num_examples": int(len(idx)),
            "tree": tree,
        }
        path = shard_path(out, i)
        arrays = {"x": np.ascontiguousarray(dataset.x[idx]), "label": label, "class_names": class_names,
                  "meta": np.asarray(json.dumps(meta))}
        _atomic_write(path, lambda f, a=arrays: np.savez(f, **a))
        paths.append(path)
        counts = np.bincount(label, minlength=len(class_names))
        summary.append({"file": path.name, "num_examples": int(len(idx)), "class_counts": counts.tolist()})
    for stale in sorted(out.glob("device_*.npz")):
        if stale not in paths:
            stale.unlink()
            logger.info("removed stale shard %s", stale)
    info = {
        "format": SHARD_FORMAT,
        "version": SHARD_VERSION,
        "dataset": dataset.name,
        "split": dataset.split,
        "num_shards": len(parts),
        "seed": partitioner.seed,
        "partitioner": partitioner.describe(),
        "class_names": class_names.tolist(),
        "shards": summary,
    }
    _atomic_write(out / "partition.json", lambda f: f.write((json.dumps(info, indent=1) + "\n").encode()))
    logger.info("wrote %s shards of %s (%s images) to %s", len(parts), dataset.name, len(dataset), out)
    return paths


@dataclass
class Shard:
    """One device's data, as written by :func:`write_shards`.

    Attributes:
        x: uint8 images ``(n, H, W, 3)``.
        label: int64 dataset class ids ``(n,)``.
        class_names: names of all classes (by class id), not only those present.
        meta: the shard's metadata (dataset, split, shard, num_shards, seed, partitioner, tree).
        path: file the shard was read from.
    """

    x: np.ndarray
    label: np.ndarray
    class_names: list[str]
    meta: dict
    path: Path | None = None

    def __len__(self) -> int:
        return len(self.label)

    @property
    def hierarchy(self) -> Hierarchy:
        return Hierarchy.from_dict(self.meta["tree"])

    def class_counts(self) -> np.ndarray:
        """Samples per class id, int64 ``(num_classes,)``."""
        return np.bincount(self.label, minlength=len(self.class_names)).astype(np.int64)

    def to_dataset(self):
        """This shard as an :class:`~edgehmoe.data.ImageDataset` (split ``shard<i>``)."""
        from edgehmoe.data import ImageDataset

        return ImageDataset(
            x=self.x, y=self.label, class_names=list(self.class_names), hierarchy=self.hierarchy,
            name=str(self.meta.get("dataset", "npz")), split=f"shard{self.meta.get('shard', '')}",
        )


_SHARD_LAYOUT = "x uint8 (n,H,W,3), label int64 (n,), class_names unicode (C,), meta JSON string"


def load_shard(path: str | Path) -> Shard:
    """Read and validate a shard written by :func:`write_shards` (never unpickles)."""
    from edgehmoe.data import DatasetError
    from edgehmoe.data.npz import read_npz_arrays

    path = Path(path)
    if not path.is_file():
        raise ShardError(f"shard {path} does not exist")
    try:
        arrays = read_npz_arrays(path)
    except DatasetError as e:
        raise ShardError(f"cannot read shard {path}: {e}; a shard holds {_SHARD_LAYOUT} (rewrite it with write_shards)") from None
    missing = [k for k in ("x", "label", "class_names", "meta") if k not in arrays]
    if missing:
        raise ShardError(f"shard {path} lacks array(s) {', '.join(missing)}; expected {_SHARD_LAYOUT}")
    x, label, names, meta_arr = arrays["x"], arrays["label"], arrays["class_names"], arrays["meta"]
    if x.dtype != np.uint8 or x.ndim != 4 or x.shape[-1] != 3:
        raise ShardError(f"shard {path}: 'x' must be uint8 (n, H, W, 3); got {x.dtype} {x.shape}")
    if label.dtype != np.int64 or label.shape != (len(x),):
        raise ShardError(f"shard {path}: 'label' must be int64 ({len(x)},); got {label.dtype} {label.shape}")
    if names.ndim != 1 or names.dtype.kind != "U":
        raise ShardError(f"shard {path}: 'class_names' must be a 1-D unicode array; got {names.dtype} {names.shape}")
    if meta_arr.ndim != 0 or meta_arr.dtype.kind != "U":
        raise ShardError(f"shard {path}: 'meta' must be a JSON string; got {meta_arr.dtype} {meta_arr.shape}")
    try:
        meta = json.loads(str(meta_arr))
    except json.JSONDecodeError as e:
        raise ShardError(f"shard {path}: 'meta' is not valid JSON ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != SHARD_FORMAT:
        raise ShardError(f"shard {path}: 'meta' is not an {SHARD_FORMAT} header")
    if meta.get("version") != SHARD_VERSION:
        raise ShardError(
            f"shard {path} has format version {meta.get('version')}; this edgehmoe reads version {SHARD_VERSION}. "
            "Rewrite the shards with the same edgehmoe version as the client"
        )
    class_names = [str(n) for n in names.tolist()]
    if len(label) and (label.min() < 0 or label.max() >= len(class_names)):
        raise ShardError(f"shard {path}: labels must be in 0..{len(class_names) - 1}; got {label.min()}..{label.max()}")
    try:
        tree = Hierarchy.from_dict(meta["tree"])
    except (KeyError, TypeError, HierarchyError) as e:
        raise ShardError(f"shard {path}: 'meta' has no valid tree ({e})") from None
    if tree.class_names() != class_names:
        raise ShardError(f"shard {path}: the tree's leaves do not match 'class_names'")
    return Shard(x=x, label=label, class_names=class_names, meta=meta, path=path)
