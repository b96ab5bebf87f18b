"""Images and labels in one ``.npz`` file (``npz:PATH``), read with ``allow_pickle=False``.

Two layouts::

    data/                          # CIFAR-style labels
    ├── train.npz                  # x uint8 (N,H,W,3) | (N,H,W) | (N,3,H,W); fine, coarse ints
    ├── test.npz                   # optional, same arrays: the ``test`` split of train.npz
    └── meta.json                  # optional: fine_label_names, coarse_label_names[, fine_to_coarse]

    data/                          # one label per image + a tree
    ├── images.npz                 # x; label ints (class id); optional class_names (unicode)
    │                              #   and meta (JSON string with "tree": Hierarchy.to_dict())
    ├── classes.txt | wnids.txt    # optional class names, one per line (class id = line)
    └── tree.csv                   # passed as hierarchy=... : 'parent,child' edges whose
                                   #   leaves are the class names

With ``fine`` + ``coarse`` the tree is root → coarse → fine (names from ``meta.json``, else
``fine_0``..., ``coarse_0``...). With ``label`` the tree comes from, in order: the
``hierarchy=`` CSV, a ``meta`` array holding a tree (the shard files written by
:mod:`edgehmoe.data.partition` carry one), or a ``wnids.txt`` beside the file (WordNet tree).
A file with one set of arrays has no separate test set: ``test`` and ``all`` both return
the whole file (an info line says so), unless it is ``train.npz`` with a ``test.npz`` beside it.
"""

from __future__ import annotations

import json
import logging
import zipfile
from pathlib import Path

import numpy as np

from edgehmoe.core.hierarchy import Hierarchy, HierarchyError, read_edge_csv
from edgehmoe.data.base import (
    DatasetError,
    Pool,
    Source,
    resolve_hierarchy,
    to_rgb_uint8,
)
from edgehmoe.data.finecoarse import fine_coarse_source, read_meta_json

__all__ = ["open_npz", "read_fine_coarse_npz", "read_npz_arrays"]

logger = logging.getLogger(__name__)

_LAYOUTS = (
    "arrays x (uint8 (N,H,W,3), (N,H,W) or (N,3,H,W)) plus either fine and coarse (int, one per "
    "image) or label (int class id) with class names and a tree"
)


def read_npz_arrays(path: str | Path) -> dict[str, np.ndarray]:
    """All arrays of an ``.npz`` (no pickles); :class:`DatasetError` if unreadable."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise DatasetError(f"npz file {path} does not exist; expected {_LAYOUTS}")
    try:
        z = np.load(path, allow_pickle=False)
        if not isinstance(z, np.lib.npyio.NpzFile):
            raise DatasetError(f"{path} is a single .npy array, not an .npz archive; expected {_LAYOUTS}")
        with z:
            return {k: z[k] for k in z.files}
    except DatasetError:
        raise
    except ValueError as e:
        if "object arrays" in str(e).lower():
            raise DatasetError(
                f"{path} holds object (pickled) arrays, which are not loaded for safety; save plain "
                "numeric and unicode arrays (np.savez with dtype uint8/int64/str)"
            ) from None
        raise DatasetError(f"cannot read {path}: {e}; expected an .npz with {_LAYOUTS}") from None
    except (OSError, EOFError, zipfile.BadZipFile, KeyError) as e:
        raise DatasetError(f"cannot read {path} ({type(e).__name__}: {e}); expected an .npz with {_LAYOUTS}") from None


def _images(arrays: dict[str, np.ndarray], path: Path) -> np.ndarray:
    if "x" not in arrays:
        raise DatasetError(f"{path} lacks array 'x' (has {', '.join(sorted(arrays)) or 'none'}); expected {_LAYOUTS}")
    return to_rgb_uint8(arrays["x"], "x", str(path))


def _int_labels(arrays: dict[str, np.ndarray], key: str, n: int, path: Path) -> np.ndarray:
    a = arrays[key]
    if a.ndim != 1 or not np.issubdtype(a.dtype, np.integer):
        raise DatasetError(f"{path}: array {key!r} must be 1-D integers (one per image); got {a.dtype} {a.shape}")
    if len(a) != n:
        raise DatasetError(f"{path}: array {key!r} has {len(a)} entries but 'x' has {n} images; they must match")
    if len(a) and a.min() < 0:
        raise DatasetError(f"{path}: array {key!r} has negative class ids (min {a.min()})")
    return a.astype(np.int64)


def read_fine_coarse_npz(path: str | Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(x, fine, coarse)`` from an npz in the CIFAR-style layout, validated."""
    path = Path(path).expanduser()
    return _fine_coarse(read_npz_arrays(path), path)


def _fine_coarse(arrays: dict[str, np.ndarray], path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    x = _images(arrays, path)
    missing = [k for k in ("fine", "coarse") if k not in arrays]
    if missing:
        raise DatasetError(
            f"{path} lacks array(s) {', '.join(map(repr, missing))} (has {', '.join(sorted(arrays))}); "
            "a CIFAR-style npz needs x, fine and coarse"
        )
    return x, _int_labels(arrays, "fine", len(x), path), _int_labels(arrays, "coarse", len(x), path)


def _read_lines(path: Path) -> list[str]:
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


def _label_source(arrays: dict[str, np.ndarray], path: Path, hierarchy, open_test) -> Source:
    x = _images(arrays, path)
    label = _int_labels(arrays, "label", len(x), path)

    class_names: list[str] | None = None
    if "class_names" in arrays:
        cn = arrays["class_names"]
        if cn.ndim != 1 or cn.dtype.kind not in "US":
            raise DatasetError(f"{path}: array 'class_names' must be a 1-D unicode array; got {cn.dtype} {cn.shape}")
        class_names = [str(c) for c in cn.tolist()]
    else:
        for fname in ("classes.txt", "wnids.txt"):
            if (path.parent / fname).is_file():
                class_names = _read_lines(path.parent / fname)
                logger.info("class names of %s from %s", path, path.parent / fname)
                break

    tree: Hierarchy | None = None
    if hierarchy is not None:
        if class_names is None and not isinstance(hierarchy, Hierarchy):
            try:
                tree = read_edge_csv(Path(hierarchy).expanduser())
            except HierarchyError as e:
                raise DatasetError(str(e)) from None
            class_names = tree.class_names()
            logger.info("%s has no class names: class id k is the k-th leaf of %s in sorted order", path, hierarchy)
        else:
            tree = resolve_hierarchy(hierarchy, class_names if class_names is not None else hierarchy.class_names())
    elif "meta" in arrays:
        tree = _tree_from_meta(arrays["meta"], path)
    elif (path.parent / "wnids.txt").is_file() and class_names is not None:
        from edgehmoe.data.tiny_imagenet import wnid_hierarchy

        tree = wnid_hierarchy(class_names, str(path.parent / "wnids.txt"))
    if tree is None:
        raise DatasetError(
            f"{path} has a 'label' array but no tree: pass hierarchy=TREE.csv (--hierarchy, a "
            "'parent,child' edge list whose leaves are the class names), or put wnids.txt beside it"
        )
    if class_names is None:
        class_names = tree.class_names()
    if tree.class_names() != class_names:
        raise DatasetError(
            f"{path}: the class names ({', '.join(class_names[:3])}...) do not match the tree's leaves "
            f"({', '.join(tree.class_names()[:3])}...) in class-id order"
        )
    if len(label) and label.max() >= len(class_names):
        raise DatasetError(
            f"{path}: array 'label' has class id {int(label.max())} but there are only "
            f"{len(class_names)} classes (ids 0..{len(class_names) - 1})"
        )
    return Source(
        name="npz",
        class_names=class_names,
        hierarchy=tree,
        train=Pool.from_arrays(x, label, str(path)),
        open_test=open_test,
    )


def _tree_from_meta(meta: np.ndarray, path: Path) -> Hierarchy:
    if meta.ndim != 0 or meta.dtype.kind not in "US":
        raise DatasetError(f"{path}: array 'meta' must be a JSON string (0-d unicode array)")
    try:
        d = json.loads(str(meta))
        return Hierarchy.from_dict(d["tree"])
    except (json.JSONDecodeError, KeyError, TypeError, HierarchyError) as e:
        raise DatasetError(f"{path}: array 'meta' must be JSON with a 'tree' (Hierarchy.to_dict()); {e}") from None


def open_npz(path: str | Path, *, hierarchy: str | Path | Hierarchy | None = None) -> Source:
    """Open an ``.npz`` in either layout (see the module docstring)."""
    path = Path(path).expanduser()
    arrays = read_npz_arrays(path)
    test_path = path.with_name("test.npz")
    has_test_file = path.name == "train.npz" and test_path.is_file()

    def whole_file() -> Pool:
        if has_test_file:
            test = open_npz(test_path, hierarchy=hierarchy)
            if test.class_names != source.class_names:
                raise DatasetError(f"{test_path} has other classes than {path}")
            return test.train
        logger.info(
            "%s has a single set of arrays: the 'test' split is the whole file (%s images)", path, len(source.train.y)
        )
        return source.train

    if "fine" in arrays and "coarse" in arrays:
        x, fine, coarse = _fine_coarse(arrays, path)
        meta_path = path.with_name("meta.json")
        meta = read_meta_json(meta_path) if meta_path.is_file() else None
        source = fine_coarse_source(
            x, fine, coarse, meta, name="npz", where=str(path), open_test=whole_file, description=str(path)
        )
        if hierarchy is not None:
            source.hierarchy = resolve_hierarchy(hierarchy, source.class_names)
        return source
    if "label" in arrays:
        source = _label_source(arrays, path, hierarchy, whole_file)
        return source
    raise DatasetError(f"{path} has arrays {', '.join(sorted(arrays)) or '(none)'}; expected {_LAYOUTS}")
