"""The ONNX bundle format: its manifest, and integrity checks of its files.

A *bundle* is a folder written by :func:`edgehmoe.export.bundle.export_bundle` (or reduced by
:func:`edgehmoe.export.bundle.subset_bundle`)::

    BUNDLE/
      manifest.json          # format version, tree, preprocessing, node -> file, sha256 of each file
      experts/<node>.onnx    # one expert per internal node: float32 (N, 3, H, W) -> logits (N, k)
      flat.onnx              # the flat baseline (optional): (N, 3, H, W) -> logits (N, classes)
      fused/path.onnx        # optional: the batch-1 greedy descent through every expert, one graph
      fused/tree.onnx        # optional: the same for any batch, level by level

Format version 1 grew two optional parts (readers that predate them ignore them and still
predict with the expert files): ``fused`` (the fused graphs, written by
:mod:`edgehmoe.export.fuse`, with the sha256 and used outputs of every expert they were built
from, so a stale one is never used) and ``precision`` / ``quantization`` (``"int8"`` bundles whose
networks were quantized by ``edgehmoe export --quantize int8``; absent means float32).

:func:`read_manifest` validates the manifest's structure against the tree it holds;
:func:`verify_bundle` checks every file's sha256, so a missing or tampered file fails with
:class:`BundleError` instead of producing silent garbage. The field list of the manifest is in
:mod:`edgehmoe.export.bundle`. Uses the standard library and :mod:`edgehmoe.core` only
(no onnxruntime, no torch).

A manifest comes from wherever the bundle was copied from, so every field is type-checked
before it is used: a malformed one (``file: 123``, ``sha256: null``, nesting 5,000 deep, ...)
is one :class:`BundleError`, never a traceback. Bundles may be signed (Ed25519 over the bytes
of ``manifest.json``, ``manifest.sig``): :func:`read_manifest` verifies the signature when
given a public key, before it parses anything. ONNX files with external data are refused
(:func:`check_onnx_bytes`). Both live in :mod:`edgehmoe.edge.integrity`.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from pathlib import Path

from edgehmoe.core.hierarchy import Hierarchy, HierarchyError
from edgehmoe.edge.integrity import IntegrityError, check_onnx_self_contained, verify_manifest_signature
from edgehmoe.errors import EdgeHmoeError

__all__ = [
    "BUNDLE_FORMAT",
    "BUNDLE_FORMAT_VERSION",
    "FUSED_KINDS",
    "FUSED_VERSION",
    "MANIFEST",
    "PRECISIONS",
    "BundleError",
    "bundle_entries",
    "check_file",
    "check_onnx_bytes",
    "file_sha256",
    "fused_fingerprint",
    "fused_graphs",
    "read_manifest",
    "verify_bundle",
]

BUNDLE_FORMAT = "edgehmoe-onnx-bundle"
BUNDLE_FORMAT_VERSION = 1
MANIFEST = "manifest.json"
#: A larger manifest.json is refused before it is read (today's are a few hundred kB at most).
MAX_MANIFEST_BYTES = 64 * 1024 * 1024
_SHA256 = re.compile(r"[0-9a-f]{64}")
_NODE_KEY = re.compile(r"-?[0-9]{1,9}")
# Fused graphs (see edgehmoe.export.fuse): "path" runs a batch of one, "tree" any batch.
FUSED_KINDS = ("path", "tree")
FUSED_VERSION = 1
PRECISIONS = ("float32", "int8")


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
def _check_types(m: dict, mpath: Path) -> None:
    """Raise :class:`BundleError` unless every field read later has the type it must have."""

    def bad(what: str) -> BundleError:
        return BundleError(f"{mpath}: {what}; re-export the bundle")

    def is_int(v: object) -> bool:
        return isinstance(v, int) and not isinstance(v, bool)

    def numbers(v: object) -> bool:
        return (isinstance(v, list) and len(v) >= 1 and all(
            (isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)) for x in v))

    def network(key: str, entry: object, outputs: bool = True) -> None:
        if not isinstance(entry, dict):
            raise bad(f"entry {key!r} must be an object")
        if not isinstance(entry.get("file"), str) or not entry["file"] or "\x00" in entry["file"]:
            raise bad(f"entry {key!r}: 'file' must be a relative path (a string), got {entry.get('file')!r}")
        if not isinstance(entry.get("sha256"), str) or not _SHA256.fullmatch(entry["sha256"]):
            raise bad(f"entry {key!r}: 'sha256' must be 64 lowercase hex digits, got {entry.get('sha256')!r}")
        if outputs:
            if "num_outputs" in entry and not (is_int(entry["num_outputs"]) and 1 <= entry["num_outputs"] <= 10**6):
                raise bad(f"entry {key!r}: 'num_outputs' must be a positive integer")
            out = entry.get("outputs")
            if out is not None and not (isinstance(out, list) and all(is_int(o) and o >= 0 for o in out)):
                raise bad(f"entry {key!r}: 'outputs' must be a list of column indices")

    if not isinstance(m["hierarchy"], dict):
        raise bad("'hierarchy' must be an object")
    if not isinstance(m["class_names"], list) or not all(isinstance(c, str) for c in m["class_names"]):
        raise bad("'class_names' must be a list of strings")
    if not isinstance(m["class_ids"], list) or not all(is_int(c) for c in m["class_ids"]):
        raise bad("'class_ids' must be a list of integers")
    if not isinstance(m["experts"], dict):
        raise bad("'experts' must map node ids to files")
    for key, entry in m["experts"].items():
        if not _NODE_KEY.fullmatch(key):
            raise bad(f"expert key {key!r} is not a node index")
        network(f"expert {key}", entry)
    if m.get("flat") is not None:
        network("flat", m["flat"])
    fused = m.get("fused")
    if isinstance(fused, dict) and isinstance(fused.get("graphs"), dict):
        for kind, entry in fused["graphs"].items():
            network(f"fused {kind} graph", entry, outputs=False)
    inp = m["input"]
    shape = inp.get("image_shape") if isinstance(inp, dict) else None
    if not (isinstance(shape, list) and len(shape) == 3 and all(is_int(v) and 1 <= v <= 65536 for v in shape)):
        raise bad("'input' must give image_shape [H, W, C] (three positive integers)")
    if not isinstance(inp.get("name", "input"), str):
        raise bad("'input.name' must be a string")
    pp = m["preprocess"]
    if not isinstance(pp, dict) or not numbers(pp.get("mean")) or not numbers(pp.get("std")):
        raise bad("'preprocess' must give mean and std as lists of numbers")
    if any(v <= 0 for v in pp["std"]):
        raise bad("'preprocess.std' values must be > 0")


def read_manifest(bundle_dir: str | Path, *, verify_key: str | Path | None = None) -> dict:
    """Read and validate ``manifest.json`` (structure only; see :func:`verify_bundle` for files).

    :param verify_key: a public key (PEM, ``edgehmoe bundle keygen``); when given, the bundle's
        ``manifest.sig`` must be a valid signature of the manifest's bytes by it, checked before
        those bytes are parsed.
    """
    bundle_dir = Path(bundle_dir)
    mpath = bundle_dir / MANIFEST
    if not bundle_dir.is_dir():
        raise BundleError(f"bundle folder {bundle_dir} does not exist; create one with `edgehmoe export`")
    if not mpath.is_file():
        raise BundleError(
            f"{bundle_dir} is not an edgehmoe ONNX bundle ({MANIFEST} missing); create one with "
            "`edgehmoe export --model-dir DIR --out BUNDLE`"
        )
    if mpath.stat().st_size > MAX_MANIFEST_BYTES:
        raise BundleError(f"{mpath} is larger than {MAX_MANIFEST_BYTES >> 20} MiB; not a manifest edgehmoe wrote")
    data = mpath.read_bytes()
    if verify_key is not None:
        try:
            verify_manifest_signature(bundle_dir, data, verify_key)
        except IntegrityError as e:
            raise BundleError(str(e)) from None
    try:
        m = json.loads(data.decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BundleError(f"{mpath} is not valid JSON ({e}); re-export the bundle") from None
    except RecursionError:
        raise BundleError(f"{mpath} nests JSON too deeply to be a manifest; re-export the bundle") from None
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
    _check_types(m, mpath)
    try:
        tree = Hierarchy.from_dict(m["hierarchy"])
    except (HierarchyError, TypeError, ValueError, KeyError, OverflowError) as e:
        raise BundleError(f"{mpath}: invalid tree: {e}; re-export the bundle") from None
    if len(m["class_names"]) != tree.num_classes or len(m["class_ids"]) != tree.num_classes:
        raise BundleError(
            f"{mpath}: {len(m['class_names'])} class names and {len(m['class_ids'])} class ids "
            f"for {tree.num_classes} leaves"
        )
    fused = m.get("fused")
    if fused is not None:
        if not isinstance(fused, dict) or not isinstance(fused.get("graphs"), dict) or "built_from" not in fused:
            raise BundleError(f"{mpath}: 'fused' must give 'graphs' and 'built_from'; re-export the bundle")
        unknown = sorted(set(fused["graphs"]) - set(FUSED_KINDS))
        if unknown:
            raise BundleError(f"{mpath}: unknown fused graph(s) {unknown}; valid: {', '.join(FUSED_KINDS)}")
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
        for field in ("file", "sha256") if key.startswith("fused") else ("file", "sha256", "num_outputs"):
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
    if m.get("precision", "float32") not in PRECISIONS:
        raise BundleError(f"{mpath}: unknown precision {m.get('precision')!r}; valid: {', '.join(PRECISIONS)}")
    return m


def fused_fingerprint(m: dict) -> dict:
    """What fused graphs are built from: each expert's file hash and the logit columns used."""
    return {k: {"sha256": e.get("sha256"), "outputs": e.get("outputs")} for k, e in m["experts"].items()}


def fused_graphs(m: dict) -> dict[str, dict]:
    """The fused graphs of a manifest that match its expert files (kind -> entry); empty when
    the bundle has none or they were built from other expert files (e.g. an edited bundle)."""
    fused = m.get("fused")
    if not fused or fused.get("version") != FUSED_VERSION:
        return {}
    if fused.get("built_from") != fused_fingerprint(m):
        return {}
    return dict(fused["graphs"])


def bundle_entries(m: dict) -> list[tuple[str, dict]]:
    """``(what, entry)`` for every network file of a manifest: the experts, the flat model,
    then the fused graphs."""
    out = [(f"expert {k}", v) for k, v in m["experts"].items()]
    if m.get("flat"):
        out.append(("flat", m["flat"]))
    for kind, entry in ((m.get("fused") or {}).get("graphs") or {}).items():
        out.append((f"fused {kind} graph", entry))
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


def verify_bundle(bundle_dir: str | Path, manifest: dict | None = None, *,
                  verify_key: str | Path | None = None) -> dict:
    """Check that every file of the bundle exists, matches its sha256 and is a self-contained
    ONNX file (:func:`check_onnx_bytes`); returns the manifest (read with ``verify_key``)."""
    bundle_dir = Path(bundle_dir)
    m = manifest if manifest is not None else read_manifest(bundle_dir, verify_key=verify_key)
    for what, entry in bundle_entries(m):
        check_file(bundle_dir, entry, what)
        if str(entry["file"]).endswith(".onnx"):
            check_onnx_bytes((bundle_dir / entry["file"]).read_bytes(), f"{bundle_dir / entry['file']} ({what})")
    return m


def check_onnx_bytes(data: bytes, what: str) -> None:
    """Raise :class:`BundleError` if the ONNX model ``data`` keeps tensor data in external files
    (ONNX Runtime would read them relative to the working directory; see
    :func:`edgehmoe.edge.integrity.check_onnx_self_contained`)."""
    try:
        check_onnx_self_contained(data, what)
    except IntegrityError as e:
        raise BundleError(str(e)) from None
