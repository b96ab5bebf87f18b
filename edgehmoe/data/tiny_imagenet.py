"""Tiny ImageNet loader: the official ``tiny-imagenet-200/`` folder of 64×64 JPEGs.

``tinyimagenet:PATH`` expects::

    tiny-imagenet-200/
    ├── wnids.txt                      # one WordNet id per line; class id = line number
    ├── words.txt                      # optional: wnid<TAB>names
    ├── train/
    │   └── n01443537/
    │       ├── images/n01443537_0.JPEG ...
    │       └── n01443537_boxes.txt    # ignored
    └── val/                           # optional: the official validation set, which serves
        ├── images/val_0.JPEG ...      #   as our ``test`` split (the official test set has
        └── val_annotations.txt        #   no labels); file<TAB>wnid<TAB>bbox...

The tree is the packaged WordNet tree over the 200 official wnids
(:func:`edgehmoe.data.taxonomy.tiny_imagenet_hierarchy`); a folder with other wnids gets a
WordNet tree built on the fly (:func:`edgehmoe.data.taxonomy.wordnet_hierarchy`, needs nltk and
WordNet 3.0, e.g. Debian's ``wordnet-base``). Class names are the wnids (the tree's leaves);
:func:`read_words` gives the human-readable names.

Images are decoded with Pillow, converted to RGB (some are grayscale) and resized to 64×64
with a warning if they are not. Decoding 100,000 JPEGs takes a while, so the decoded arrays
are cached as an uncompressed ``.npz`` in ``$XDG_CACHE_HOME/edgehmoe/`` (default
``~/.cache/edgehmoe/``), keyed by the folder, the file list and every file's size and mtime:
changing, adding or removing an image invalidates the cache.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import re
import sys
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from edgehmoe.core.hierarchy import Hierarchy, HierarchyError
from edgehmoe.data.base import DatasetError, Pool, Source, resolve_hierarchy
from edgehmoe.data.taxonomy import tiny_imagenet_hierarchy, wordnet_hierarchy
from edgehmoe.errors import MissingDependency

__all__ = [
    "IMAGE_SIZE",
    "cache_dir",
    "decode_images",
    "list_train_images",
    "list_val_images",
    "open_tiny_imagenet",
    "read_wnids",
    "read_words",
    "wnid_hierarchy",
]

logger = logging.getLogger(__name__)

IMAGE_SIZE = 64
_IMAGE_SUFFIXES = {".jpeg", ".jpg", ".png"}
_CACHE_VERSION = 1
_EXPECTED_TREE = (
    "expected tiny-imagenet-200/ with wnids.txt and train/<wnid>/images/*.JPEG "
    "(optionally val/images/*.JPEG and val/val_annotations.txt)"
)


def cache_dir() -> Path:
    """``$XDG_CACHE_HOME/edgehmoe`` (``~/.cache/edgehmoe`` when the variable is unset)."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "edgehmoe"


def read_wnids(root: Path) -> list[str]:
    path = root / "wnids.txt"
    if not path.is_file():
        raise DatasetError(f"{path} is missing; {_EXPECTED_TREE}")
    wnids = [w.strip() for w in path.read_text().splitlines() if w.strip()]
    if not wnids:
        raise DatasetError(f"{path} lists no wnids; expected one WordNet id (like n01443537) per line")
    if len(set(wnids)) != len(wnids):
        dup = next(w for i, w in enumerate(wnids) if w in wnids[:i])
        raise DatasetError(f"{path} lists {dup} twice; each wnid must appear once")
    return wnids


def read_words(root: str | Path) -> dict[str, str]:
    """``wnid -> human-readable names`` from ``words.txt`` (empty if absent)."""
    path = Path(root) / "words.txt"
    if not path.is_file():
        return {}
    out = {}
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        wnid, _, words = line.partition("\t")
        if wnid.strip():
            out[wnid.strip()] = words.strip()
    return out


def wnid_hierarchy(wnids: Sequence[str], where: str = "") -> Hierarchy:
    """The packaged Tiny ImageNet tree if it covers exactly ``wnids``, else a WordNet tree."""
    try:
        return tiny_imagenet_hierarchy(list(wnids))
    except HierarchyError as e:
        logger.info(
            "packaged Tiny ImageNet tree does not fit %s (%s); building a WordNet tree", where or "the wnids", e
        )
    try:
        return _wordnet_tree(tuple(wnids))
    except (FileNotFoundError, ImportError) as e:
        raise DatasetError(
            f"{where or 'these wnids'}: the {len(wnids)} wnids are not the official Tiny ImageNet 200, "
            f"and building a WordNet tree for them failed: {e}. Install WordNet (apt-get install "
            "wordnet-base) or pass a 'parent,child' CSV tree with --hierarchy"
        ) from None
    except HierarchyError as e:
        raise DatasetError(f"{where or 'these wnids'}: cannot build a WordNet tree: {e}") from None
    except Exception as e:  # nltk's WordNetError for an id WordNet 3.0 does not know, etc.
        raise DatasetError(
            f"{where or 'these wnids'}: cannot build a WordNet tree ({type(e).__name__}: {e}); check the "
            "wnids or pass a 'parent,child' CSV tree with --hierarchy"
        ) from e


@functools.lru_cache(maxsize=8)
def _wordnet_tree(wnids: tuple[str, ...]) -> Hierarchy:
    # Reading WordNet takes seconds; loading several splits of one folder builds the tree once.
    return wordnet_hierarchy(list(wnids))


def _natural_key(name: str) -> tuple:
    # n01443537_10.JPEG after n01443537_9.JPEG, as a person would number them.
    return tuple(int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name))


def _image_files(folder: Path) -> list[Path]:
    with os.scandir(folder) as it:
        names = [e.name for e in it if e.is_file() and Path(e.name).suffix.lower() in _IMAGE_SUFFIXES]
    return [folder / n for n in sorted(names, key=_natural_key)]


def list_train_images(root: str | Path, wnids: Sequence[str] | None = None) -> tuple[list[Path], np.ndarray]:
    """Training image files (class-major, natural order) and their class ids."""
    root = Path(root)
    wnids = list(wnids) if wnids is not None else read_wnids(root)
    files: list[Path] = []
    labels: list[int] = []
    for c, wnid in enumerate(wnids):
        folder = root / "train" / wnid / "images"
        if not folder.is_dir():
            raise DatasetError(f"{folder} is missing (class {c} of wnids.txt); {_EXPECTED_TREE}")
        found = _image_files(folder)
        if not found:
            raise DatasetError(f"{folder} holds no .JPEG images; {_EXPECTED_TREE}")
        files += found
        labels += [c] * len(found)
    return files, np.asarray(labels, dtype=np.int64)


def list_val_images(root: str | Path, wnids: Sequence[str]) -> tuple[list[Path], np.ndarray]:
    """Official validation images (our ``test`` split) and class ids from ``val_annotations.txt``."""
    root = Path(root)
    ann = root / "val" / "val_annotations.txt"
    if not ann.is_file():
        raise DatasetError(
            f"the Tiny ImageNet test split needs {ann} and {root / 'val' / 'images'} (the official "
            "validation set; the official test set has no labels), which are missing; "
            "use --split val (the held-out part of the training data)"
        )
    index = {w: i for i, w in enumerate(wnids)}
    files: list[Path] = []
    labels: list[int] = []
    for r, line in enumerate(ann.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        parts = line.split("\t")
        if len(parts) < 2:
            raise DatasetError(f"{ann}: line {r}: expected 'file<TAB>wnid<TAB>bbox...', got {line!r}")
        name, wnid = parts[0].strip(), parts[1].strip()
        if wnid not in index:
            raise DatasetError(f"{ann}: line {r}: wnid {wnid} is not in wnids.txt")
        path = root / "val" / "images" / name
        if not path.is_file():
            raise DatasetError(f"{ann}: line {r}: image {path} is missing")
        files.append(path)
        labels.append(index[wnid])
    if not files:
        raise DatasetError(f"{ann} lists no images")
    return files, np.asarray(labels, dtype=np.int64)


def _decode_one(path: Path) -> tuple[np.ndarray, bool]:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im.load()
            rgb = im.convert("RGB")
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as e:
        raise DatasetError(f"cannot decode image {path}: {e}; replace or delete the file") from None
    resized = rgb.size != (IMAGE_SIZE, IMAGE_SIZE)
    if resized:
        rgb = rgb.resize((IMAGE_SIZE, IMAGE_SIZE), Image.BILINEAR)
    return np.asarray(rgb, dtype=np.uint8), resized


def _progress(total: int, desc: str):
    try:
        from tqdm import tqdm
    except ImportError:  # progress bars are a nicety; decoding works without tqdm
        return None
    # disable=None: no bar when stderr is not a terminal (logs, CI).
    return tqdm(total=total, desc=desc, unit="img", disable=None, file=sys.stderr, leave=False)


def decode_images(files: Sequence[Path], desc: str = "decoding", workers: int | None = None) -> np.ndarray:
    """Decode image files to uint8 ``(N, 64, 64, 3)`` RGB with a thread pool and a progress bar.

    Pillow releases the GIL while decoding, so threads help. Raises :class:`DatasetError`
    naming the first file that cannot be decoded.
    """
    try:
        import PIL  # noqa: F401  (fail early with an install hint, not inside a worker thread)
    except ImportError as e:  # pragma: no cover - depends on install
        raise MissingDependency("reading Tiny ImageNet JPEGs needs Pillow: pip install 'edgehmoe[edge]'") from e
    out = np.empty((len(files), IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    resized: list[Path] = []
    bar = _progress(len(files), desc)
    workers = workers or min(8, os.cpu_count() or 1)
    batch = 512  # submit in batches, so a corrupt file stops the work early
    try:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            for start in range(0, len(files), batch):
                chunk = files[start : start + batch]
                for i, (img, was_resized) in enumerate(pool.map(_decode_one, chunk), start=start):
                    out[i] = img
                    if was_resized:
                        resized.append(files[i])
                if bar is not None:
                    bar.update(len(chunk))
    finally:
        if bar is not None:
            bar.close()
    if resized:
        logger.warning(
            "resized %s image(s) to %sx%s (first: %s)", len(resized), IMAGE_SIZE, IMAGE_SIZE, resized[0]
        )
    return out


def _cache_key(root: Path, files: Sequence[Path]) -> str:
    h = hashlib.sha1()
    h.update(json.dumps([_CACHE_VERSION, str(root.resolve()), len(files)]).encode())
    for f in files:
        st = f.stat()
        h.update(f"{f.relative_to(root)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:20]


def _cache_path(root: Path, files: Sequence[Path], pool_name: str) -> Path:
    return cache_dir() / f"tinyimagenet-{pool_name}-{len(files)}-{_cache_key(root, files)}.npz"


def _load_cached(files: Sequence[Path], root: Path, pool_name: str, use_cache: bool) -> np.ndarray:
    """Decoded images of ``files``, from the cache when it matches, else decoded (and cached)."""
    if not use_cache:
        return decode_images(files, desc=f"tinyimagenet {pool_name}")
    path = _cache_path(root, files, pool_name)
    if path.is_file():
        try:
            with np.load(path, allow_pickle=False) as z:
                x = z["x"]
            if x.shape == (len(files), IMAGE_SIZE, IMAGE_SIZE, 3) and x.dtype == np.uint8:
                logger.info("loaded %s decoded images from cache %s", len(x), path)
                return x
            logger.warning("ignoring cache %s with unexpected shape %s", path, x.shape)
        except (OSError, ValueError, KeyError, EOFError) as e:
            logger.warning("ignoring unreadable cache %s (%s); decoding again", path, e)
    x = decode_images(files, desc=f"tinyimagenet {pool_name}")
    tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tmp.open("wb") as f:
            np.savez(f, x=x)
        os.replace(tmp, path)
        logger.info("cached %s decoded images in %s", len(x), path)
    except OSError as e:
        logger.warning("could not write cache %s (%s); the next load decodes again", path, e)
        tmp.unlink(missing_ok=True)
    return x


def _pool(root: Path, files: list[Path], labels: np.ndarray, pool_name: str, use_cache: bool) -> Pool:
    def fetch(idx: np.ndarray) -> np.ndarray:
        idx = np.asarray(idx, dtype=np.int64)
        if len(idx) == len(files) and np.array_equal(idx, np.arange(len(files))):
            return _load_cached(files, root, pool_name, use_cache)
        # train / val / all share one cache of the whole pool; a small subset (such as a
        # limit_per_class sample) is decoded and cached on its own unless that cache exists.
        if use_cache and (2 * len(idx) >= len(files) or _cache_path(root, files, pool_name).is_file()):
            return _load_cached(files, root, pool_name, use_cache)[idx]
        return _load_cached([files[i] for i in idx], root, pool_name, use_cache)

    return Pool(y=labels, fetch=fetch, description=f"{root} {pool_name}")


def open_tiny_imagenet(
    path: str | Path, *, cache: bool = True, hierarchy: str | Path | Hierarchy | None = None
) -> Source:
    """Open a ``tiny-imagenet-200/`` folder (see the module docstring); decodes lazily.

    ``hierarchy`` (a ``parent,child`` CSV whose leaves are the wnids) replaces the WordNet tree.
    """
    root = Path(path).expanduser()
    if not root.is_dir():
        raise DatasetError(f"Tiny ImageNet folder {root} does not exist; {_EXPECTED_TREE}")
    wnids = read_wnids(root)
    files, labels = list_train_images(root, wnids)
    if hierarchy is not None:
        tree = resolve_hierarchy(hierarchy, wnids)
    else:
        tree = wnid_hierarchy(wnids, str(root / "wnids.txt"))
    logger.info("found %s Tiny ImageNet training images in %s classes under %s", len(files), len(wnids), root)

    def open_test() -> Pool:
        vfiles, vlabels = list_val_images(root, wnids)
        return _pool(root, vfiles, vlabels, "officialval", cache)

    return Source(
        name="tinyimagenet",
        class_names=list(wnids),
        hierarchy=tree,
        train=_pool(root, files, labels, "train", cache),
        open_test=open_test,
    )
