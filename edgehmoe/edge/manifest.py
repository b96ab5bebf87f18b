"""The ONNX bundle format: its manifest, and integrity checks of its files.

A *bundle* is a folder written by :func:`edgehmoe.export.bundle.export_bundle` (or reduced by
:func:`edgehmoe.export.bundle.subset_bundle`)::

    BUNDLE/
      manifest.json          # format version, tree, preprocessing, node -> file, sha256 of each file
      experts/<node>.onnx    # one expert per internal node: float32 (N, 3, H, W) -> logits (N, k)
      flat.onnx              # the flat baseline (optional): (N, 3, H, W) -> logits (N, classes)

:func:`read_manifest` validates the manifest's structure against the tree it holds;
:func:`verify_bundle` checks every file's sha256, so a missing or tampered file fails with
:class:`BundleError` instead of producing silent garbage. The field list of the manifest is in
:mod:`edgehmoe.export.bundle`. Uses the standard library and :mod:`edgehmoe.core` only
(no onnxruntime, no torch).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from edgehmoe.core.hierarchy import Hierarchy, HierarchyError
from edgehmoe.errors import EdgeHmoeError

__all__ = [
    "BUNDLE_FORMAT",
    "BUNDLE_FORMAT_VERSION",
    "MANIFEST",
    "BundleError",
    "bundle_entries",
    "check_file",
    "file_sha256",
    "read_manifest",
    "verify_bundle",
]

BUNDLE_FORMAT = "edgehmoe-onnx-bundle"
BUNDLE_FORMAT_VERSION = 1
MANIFEST = "manifest.json"


class BundleError(EdgeHmoeError, ValueError):
    """A bundle is missing, incomplete, tampered with, or given input it cannot take."""


def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(chunk)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


# ---------------------------------------------------------------------- manifest
def read_manifest(bundle_dir: str | Path) -> dict:
    """Read and validate ``manifest.json`` (structure only; see :func:`verify_bundle` for files)."""
    bundle_dir = Path(bundle_dir)
    mpath = bundle_dir / MANIFEST
    if not bundle_dir.is_dir():
        raise BundleError(f"bundle folder {bundle_dir} does not exist; create one with `edgehmoe export`")
    if not mpath.is_file():
        raise BundleError(
            f"{bundle_dir} is not an edgehmoe ONNX bundle ({MANIFEST} missing); create one with "
            "`edgehmoe export --model-dir DIR --out BUNDLE`"
        )
    try:
        m = json.loads(mpath.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BundleError(f"{mpath} is not valid JSON ({e}); re-export the bundle") from None
    if not isinstance(m, dict) or m.get("format") != BUNDLE_FORMAT:
        fmt = m.get("format") if isinstance(m, dict) else type(m).__name__
        raise BundleError(f"{mpath} is not an edgehmoe bundle manifest (format={fmt!r})")
    if m.get("format_version") != BUNDLE_FORMAT_VERSION:
        raise BundleError(
            f"{mpath} has format_version {m.get('format_version')!r}; this edgehmoe reads version "
            f"{BUNDLE_FORMAT_VERSION} (re-export the bundle with this version)"
        )
    for key in ("hierarchy", "class_names", "class_ids", "input", "preprocess", "experts"):
        if key not in m:
            raise BundleError(f"{mpath} lacks the key {key!r}; re-export the bundle")
    try:
        tree = Hierarchy.from_dict(m["hierarchy"])
    except HierarchyError as e:
        raise BundleError(f"{mpath}: invalid tree: {e}") from None
    if len(m["class_names"]) != tree.num_classes or len(m["class_ids"]) != tree.num_classes:
        raise BundleError(
            f"{mpath}: {len(m['class_names'])} class names and {len(m['class_ids'])} class ids "
            f"for {tree.num_classes} leaves"
        )
    experts = m["experts"]
    if not isinstance(experts, dict):
        raise BundleError(f"{mpath}: 'experts' must map node ids to files")
    missing = [int(n) for n in tree.internal_nodes if str(int(n)) not in experts]
    if missing:
        raise BundleError(
            f"{mpath}: no expert for internal node(s) {missing[:10]} ({tree.names[missing[0]]!r}, ...); "
            "the bundle is incomplete"
        )
    for key, entry in bundle_entries(m):
        for field in ("file", "sha256", "num_outputs"):
            if field not in entry:
                raise BundleError(f"{mpath}: entry {key!r} lacks {field!r}")
        f = Path(entry["file"])
        if f.is_absolute() or ".." in f.parts:
            raise BundleError(f"{mpath}: entry {key!r} points outside the bundle ({entry['file']!r})")
    for key, entry in experts.items():
        node = int(key)
        k = len(entry.get("outputs") or range(int(entry["num_outputs"])))
        if node >= tree.num_nodes or tree.is_leaf[node]:
            raise BundleError(f"{mpath}: expert {key} is not an internal node of the tree")
        if k != tree.num_children[node]:
            raise BundleError(
                f"{mpath}: expert {node} ({tree.names[node]!r}) gives {k} outputs but the node has "
                f"{tree.num_children[node]} children"
            )
    inp = m["input"]
    if not isinstance(inp, dict) or len(inp.get("image_shape", [])) != 3:
        raise BundleError(f"{mpath}: 'input' must give image_shape [H, W, C]")
    return m


def bundle_entries(m: dict) -> list[tuple[str, dict]]:
    """``(what, entry)`` for every network file of a manifest: the experts, then the flat model."""
    out = [(f"expert {k}", v) for k, v in m["experts"].items()]
    if m.get("flat"):
        out.append(("flat", m["flat"]))
    return out


def check_file(bundle_dir: Path, entry: dict, what: str, data: bytes | None = None) -> None:
    """Raise :class:`BundleError` unless the file of ``entry`` (or ``data``, the bytes already
    read from it) matches the manifest's sha256."""
    path = bundle_dir / entry["file"]
    if data is None:
        if not path.is_file():
            raise BundleError(f"{path} is missing ({what}); the bundle is incomplete: re-export or re-copy it")
        digest = file_sha256(path)
    else:
        digest = hashlib.sha256(data).hexdigest()
    if digest != entry["sha256"]:
        raise BundleError(
            f"{path} ({what}) does not match its sha256 in {MANIFEST} "
            f"(expected {entry['sha256'][:16]}…, got {digest[:16]}…): the file was modified or "
            "corrupted; re-export or re-copy the bundle"
        )


def verify_bundle(bundle_dir: str | Path, manifest: dict | None = None) -> dict:
    """Check that every file of the bundle exists and matches its sha256; returns the manifest."""
    bundle_dir = Path(bundle_dir)
    m = manifest if manifest is not None else read_manifest(bundle_dir)
    for what, entry in bundle_entries(m):
        check_file(bundle_dir, entry, what)
    return m
