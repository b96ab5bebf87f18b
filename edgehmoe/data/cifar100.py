"""CIFAR-100 loader: the official Python pickles or a ``.npz`` copy (x / fine / coarse).

``cifar100:PATH`` accepts three layouts::

    PATH/                          # the folder torchvision downloads into (or PATH itself
    └── cifar-100-python/          #   being cifar-100-python/)
        ├── meta                   # pickle: fine_label_names, coarse_label_names
        ├── train                  # pickle: data (50000, 3072) uint8 CHW rows,
        └── test                   #   fine_labels, coarse_labels (10000 rows in test)

    shared/cifar100/               # PATH = .../train.npz
    ├── train.npz                  # x uint8 (N, 32, 32, 3), fine (N,), coarse (N,)
    ├── test.npz                   # optional, same arrays: the ``test`` split
    └── meta.json                  # optional: fine_label_names, coarse_label_names

The tree is root → 20 coarse superclasses → 100 fine classes (class id = fine label), built
by :func:`edgehmoe.data.taxonomy.cifar100_hierarchy` from the (fine, coarse) label pairs.

Integrity is checked before anything is unpickled: the files must exist, and a file as
large as the official one (it holds all 50,000 / 10,000 images) must have the official md5
(torchvision's checksums); smaller files are accepted unchecked, which is what lets tests
build a tiny fake copy. ``verify=True`` always checks md5s, ``verify=False`` never does.
The pickles are read with an unpickler that only builds numpy arrays, lists and strings.
:func:`download_cifar100` fetches the official archive (needs torchvision and internet).
"""

from __future__ import annotations

import hashlib
import logging
import pickle
from pathlib import Path

import numpy as np

from edgehmoe.data.base import DatasetError, Pool, Source
from edgehmoe.data.finecoarse import (
    fine_coarse_check,
    fine_coarse_source,
    read_meta_json,
)
from edgehmoe.data.npz import (
    read_fine_coarse_npz,  # the npz module owns array validation
)
from edgehmoe.errors import MissingDependency

__all__ = [
    "CIFAR100_FILES",
    "CIFAR100_URL",
    "check_integrity",
    "download_cifar100",
    "open_cifar100",
    "read_cifar_pickle",
]

logger = logging.getLogger(__name__)

BASE_FOLDER = "cifar-100-python"
CIFAR100_URL = "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"
CIFAR100_ARCHIVE = "cifar-100-python.tar.gz"
CIFAR100_ARCHIVE_MD5 = "eb9058c3a382ffc7106e4002c42a8d85"
# file -> (md5 as in torchvision.datasets.CIFAR100, number of images)
CIFAR100_FILES = {
    "train": ("16019d7e3df5f24257cddd939b257f8d", 50_000),
    "test": ("f0ef6b0ae62326f3e7ffdfab6717acfc", 10_000),
    "meta": ("7973b15100ade9c7d40fb424638fde48", 0),
}
_ROW = 3 * 32 * 32

_EXPECTED_TREE = (
    "expected PATH/cifar-100-python/{train,test,meta} (the official Python version, as "
    "torchvision downloads it), PATH being that folder's parent or the folder itself, or a "
    "train.npz with arrays x, fine, coarse (meta.json beside it for names)"
)


def _md5(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.md5(usedforsecurity=False)
    with path.open("rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def check_integrity(path: Path, name: str, verify: bool | None = None) -> None:
    """Raise :class:`DatasetError` if ``path`` (official file ``name``) is missing or corrupt.

    ``verify=None`` checks the md5 only when the file is big enough to hold all the official
    images (so it claims to be the official file); ``meta`` is then checked along with it.
    """
    if not path.is_file():
        raise DatasetError(f"CIFAR-100 file {path} is missing; {_EXPECTED_TREE}. "
                           "Download it with edgehmoe.data.download_cifar100(root)")
    md5, n_images = CIFAR100_FILES[name]
    if verify is None:
        if name == "meta":
            train = path.with_name("train")
            verify = train.is_file() and train.stat().st_size >= CIFAR100_FILES["train"][1] * _ROW
        else:
            verify = path.stat().st_size >= n_images * _ROW
    if verify and _md5(path) != md5:
        raise DatasetError(
            f"CIFAR-100 file {path} is corrupt (md5 differs from the official {md5}); "
            "delete the cifar-100-python folder and download it again"
        )


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles only what CIFAR's files hold: dicts, lists, strings and numpy arrays."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.numeric", "_frombuffer"),
        ("numpy._core.numeric", "_frombuffer"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str):
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a dataset pickle")
        if module.startswith("numpy.core.") and hasattr(np, "_core"):
            # Pickles written by numpy 1 name numpy.core, which numpy 2 renamed numpy._core.
            module = "numpy._core." + module.split(".", 2)[2]
        return super().find_class(module, name)


def read_cifar_pickle(path: Path) -> dict:
    """Load one official CIFAR pickle (latin1 strings, as the files were written by Python 2)."""
    try:
        with path.open("rb") as f:
            obj = _ArrayUnpickler(f, encoding="latin1").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, ImportError) as e:
        raise DatasetError(f"cannot read CIFAR-100 pickle {path}: {e}; {_EXPECTED_TREE}") from None
    if not isinstance(obj, dict):
        raise DatasetError(f"CIFAR-100 pickle {path} holds a {type(obj).__name__}, expected a dict")
    return obj


def _require(d: dict, path: Path, keys: tuple[str, ...]) -> None:
    missing = [k for k in keys if k not in d]
    if missing:
        raise DatasetError(
            f"CIFAR-100 pickle {path} lacks key(s) {', '.join(map(repr, missing))} "
            f"(has {', '.join(map(repr, sorted(map(str, d))))}); expected {', '.join(map(repr, keys))}"
        )


def _read_split_pickle(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    d = read_cifar_pickle(path)
    _require(d, path, ("data", "fine_labels", "coarse_labels"))
    data = np.asarray(d["data"])
    fine = np.asarray(d["fine_labels"])
    coarse = np.asarray(d["coarse_labels"])
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != _ROW:
        raise DatasetError(f"{path}: 'data' must be uint8 rows of {_ROW} CHW pixels; got {data.dtype} {data.shape}")
    for key, arr in (("fine_labels", fine), ("coarse_labels", coarse)):
        if arr.shape != (len(data),) or not np.issubdtype(arr.dtype, np.integer):
            raise DatasetError(
                f"{path}: {key!r} must be {len(data)} integers (one per row of 'data'); got {arr.dtype} {arr.shape}"
            )
    x = np.ascontiguousarray(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
    return x, fine.astype(np.int64), coarse.astype(np.int64)


def _base_folder(path: Path) -> Path | None:
    if (path / BASE_FOLDER).is_dir():
        return path / BASE_FOLDER
    if path.is_dir() and any((path / f).exists() for f in CIFAR100_FILES):
        return path
    return None


def download_cifar100(root: str | Path) -> Path:
    """Download and extract the official archive into ``root``; returns ``root/cifar-100-python``.

    Needs torchvision and internet access; does nothing if the files are already intact.
    """
    root = Path(root).expanduser()
    base = root / BASE_FOLDER
    try:
        for name in CIFAR100_FILES:
            check_integrity(base / name, name, verify=True)
        logger.info("CIFAR-100 already present in %s", base)
        return base
    except DatasetError:
        pass
    try:
        from torchvision.datasets.utils import download_and_extract_archive
    except ImportError as e:  # pragma: no cover - depends on install
        raise MissingDependency("downloading CIFAR-100 needs torchvision: pip install 'edgehmoe[train]'") from e
    download_and_extract_archive(CIFAR100_URL, str(root), filename=CIFAR100_ARCHIVE, md5=CIFAR100_ARCHIVE_MD5)
    return base


def open_cifar100(path: str | Path, *, verify: bool | None = None, download: bool = False) -> Source:
    """Open CIFAR-100 at ``path`` (see the module docstring for the layouts)."""
    path = Path(path).expanduser()
    if path.suffix == ".npz":
        return _open_npz(path)
    base = _base_folder(path)
    if base is None:
        if download:
            base = download_cifar100(path)
        else:
            raise DatasetError(
                f"no CIFAR-100 found at {path}: {_EXPECTED_TREE}. Download it with "
                "edgehmoe.data.download_cifar100(PATH) (or load_dataset(..., download=True))"
            )
    check_integrity(base / "meta", "meta", verify)
    check_integrity(base / "train", "train", verify)
    meta = read_cifar_pickle(base / "meta")
    _require(meta, base / "meta", ("fine_label_names", "coarse_label_names"))
    x, fine, coarse = _read_split_pickle(base / "train")
    names = {"fine_label_names": list(meta["fine_label_names"]), "coarse_label_names": list(meta["coarse_label_names"])}
    logger.info("loaded CIFAR-100 training pickle %s: %s images", base / "train", len(x))

    def open_test() -> Pool:
        test = base / "test"
        if not test.is_file():
            raise DatasetError(
                f"the CIFAR-100 test split needs {test}, which is missing; download the official "
                "files or use --split val (the held-out part of the training data)"
            )
        check_integrity(test, "test", verify)
        xt, ft, ct = _read_split_pickle(test)
        fine_coarse_check(ft, ct, np.asarray(source.info["fine_to_coarse"]), str(test))
        return Pool.from_arrays(xt, ft, str(test))

    source = fine_coarse_source(
        x, fine, coarse, names, name="cifar100", where=str(base / "train"), open_test=open_test,
        description=str(base / "train"),
    )
    return source


def _open_npz(path: Path) -> Source:
    x, fine, coarse = read_fine_coarse_npz(path)
    meta_path = path.with_name("meta.json")
    meta = read_meta_json(meta_path) if meta_path.is_file() else None
    if meta is None:
        logger.info("no meta.json beside %s: naming classes fine_0.. and coarse_0..", path)

    def open_test() -> Pool:
        test = path.with_name("test.npz")
        if test == path or not test.is_file():
            raise DatasetError(
                f"the CIFAR-100 test split needs {test} (arrays x, fine, coarse), which is missing; "
                "use --split val (the held-out part of the training data)"
            )
        xt, ft, ct = read_fine_coarse_npz(test)
        fine_coarse_check(ft, ct, np.asarray(source.info["fine_to_coarse"]), str(test))
        return Pool.from_arrays(xt, ft, str(test))

    source = fine_coarse_source(
        x, fine, coarse, meta, name="cifar100", where=str(path), open_test=open_test, description=str(path)
    )
    return source
