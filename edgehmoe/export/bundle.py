"""Export a model directory to an ONNX bundle, check its parity, and cut personalised bundles.

:func:`export_bundle` writes every expert (and the flat baseline) of a model directory
(``edgehmoe fit --out DIR`` or a federated run directory, which has the same ``model.json``)
to its own ``.onnx`` file with a dynamic batch axis, plus ``manifest.json``::

    {
      "format": "edgehmoe-onnx-bundle", "format_version": 1,
      "hierarchy": {"parents": [...], "names": [...], "leaf_class": [...]},
      "class_names": [...],           # name of each leaf class id of this tree
      "class_ids": [...],             # original dataset class id of each leaf class id
      "input": {"name": "input", "image_shape": [H, W, 3], "dtype": "uint8", "layout": "NHWC",
                "model_input_shape": ["batch", 3, H, W]},
      "preprocess": {"mean": [...], "std": [...], "scale": 255.0},
      "experts": {"<node>": {"name", "file", "sha256", "bytes", "arch", "params", "num_outputs",
                             "outputs"}},  # outputs: null, or the logit columns used (subsets)
      "flat": {... same fields ...} | null,
      "exporter": {...}, "parity": {...}, "source": {...}
    }

Export runs the models in torch and in ONNX Runtime on the same random images and refuses to
write the bundle unless every network's logits agree within ``atol`` (max abs) and greedy
predictions are equal (ties closer than ``atol`` excepted).

:func:`subset_bundle` keeps only the sub-trees a device needs (a camera that only sees
vehicles) without retraining: the kept sub-trees are copied byte for byte, the ancestors
needed to route between them keep their experts but use only the logits of the kept
children (a softmax restricted to them), and single-branch ancestors are dropped. With one
kept node that node becomes the root. Leaf class ids keep pointing at the original dataset
classes through ``class_ids``.

Needs torch, onnx and onnxscript (the ``train`` extra); the runtime side needs none of them.
"""

from __future__ import annotations

import io
import logging
import os
import shutil
import tempfile
import warnings
from pathlib import Path

import numpy as np

from edgehmoe.core.checkpoint import (
    CheckpointError,
    ModelDir,
    atomic_write_json,
    read_model_dir,
)
from edgehmoe.core.hierarchy import Hierarchy
from edgehmoe.edge.manifest import (
    BUNDLE_FORMAT,
    BUNDLE_FORMAT_VERSION,
    FUSED_KINDS,
    MANIFEST,
    BundleError,
    file_sha256,
    fused_graphs,
    read_manifest,
    verify_bundle,
)
from edgehmoe.edge.runtime import BundlePredictor, FlatPredictor, softmax_rows
from edgehmoe.errors import UsageError
from edgehmoe.export.quantize import QUANTIZE_CHOICES  # onnx is imported only when quantizing

__all__ = ["ParityError", "export_bundle", "export_network", "check_parity", "subset_bundle", "resolve_nodes", "bundle_summary", "load_torch_models"]

logger = logging.getLogger(__name__)

DEFAULT_OPSET = 18
# Opset 18 needs IR version 8; writing the lowest IR version that holds the graph keeps the
# files loadable by older ONNX Runtime builds found on Raspberry Pi OS (1.17 reads IR ≤ 9).
_IR_VERSION = 8


class ParityError(BundleError):
    """ONNX Runtime and torch disagree on an exported network beyond the tolerance."""


# ---------------------------------------------------------------------- export
def _clean_model(model, description: str):
    """Drop exporter debugging metadata (stack traces with local paths, FX node names).

    It does not change the computation, makes the file smaller, and makes the bytes (hence
    the sha256) independent of where the exporting machine keeps its code.
    """
    def strip(msg) -> None:
        del msg.metadata_props[:]

    strip(model)
    g = model.graph
    strip(g)
    for coll in (g.node, g.input, g.output, g.value_info, g.initializer):
        for item in coll:
            if hasattr(item, "metadata_props"):
                strip(item)
            if hasattr(item, "doc_string"):
                item.doc_string = ""
    model.doc_string = description
    model.producer_name = "edgehmoe"
    from edgehmoe import __version__

    model.producer_version = __version__
    opset = max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    if opset <= 18 and not any(o.domain not in ("", "ai.onnx") for o in model.opset_import):
        model.ir_version = _IR_VERSION
    return model


def export_network(torch_model, input_size: int, *, opset: int = DEFAULT_OPSET, description: str = "", in_channels: int = 3) -> bytes:
    """Serialised ONNX of one network: ``input`` float32 (batch, C, H, W) → ``logits`` (batch, k).

    Uses the torch.export-based exporter (``dynamo=True``, the default since torch 2.9) with
    a dynamic batch dimension; falls back to the TorchScript exporter (``dynamic_axes``) on a
    torch that lacks it. BatchNorm is folded into the convolutions by the exporter.
    """
    import onnx
    import torch

    torch_model.eval()
    example = torch.zeros(2, in_channels, input_size, input_size)
    proto = None
    try:
        batch = torch.export.Dim("batch", min=1)
        with warnings.catch_warnings(), _quiet_stdout():
            warnings.simplefilter("ignore")
            prog = torch.onnx.export(
                torch_model, (example,), None, dynamo=True, input_names=["input"], output_names=["logits"],
                dynamic_shapes=({0: batch},), opset_version=opset, external_data=False, verbose=False,
            )
        proto = prog.model_proto
    except TypeError:  # torch < 2.5 has no dynamo= argument
        logger.info("torch %s lacks the dynamo ONNX exporter; using the TorchScript exporter", torch.__version__)
    if proto is None:
        buf = io.BytesIO()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                torch_model, (example,), buf, input_names=["input"], output_names=["logits"],
                dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}}, opset_version=min(opset, 17),
                dynamo=False,
            )
        proto = onnx.load_from_string(buf.getvalue())
    proto = _clean_model(proto, description)
    onnx.checker.check_model(proto)
    return proto.SerializeToString()


class _quiet_stdout:
    """Silence the exporter's progress prints (stdout) and its INFO logging during export.

    Library code must not print, and a user running with ``--verbose`` wants our log lines,
    not dozens of optimiser-pass messages per expert.
    """

    _LOGGERS = ("onnxscript", "onnx_ir", "torch.onnx", "torch.export", "torch._export", "torch.fx")

    def __enter__(self):
        import contextlib

        self._buf = io.StringIO()
        self._cm = contextlib.redirect_stdout(self._buf)
        self._cm.__enter__()
        self._levels = {}
        for name in self._LOGGERS:
            lg = logging.getLogger(name)
            self._levels[name] = lg.level
            lg.setLevel(max(lg.getEffectiveLevel(), logging.WARNING))
        return self

    def __exit__(self, *exc):
        self._cm.__exit__(*exc)
        for name, level in self._levels.items():
            logging.getLogger(name).setLevel(level)
        for line in self._buf.getvalue().splitlines():
            if line.strip():
                logger.debug("exporter: %s", line.strip())
        return False


def _entry(file: str, data: bytes, name: str, arch: dict, params: int) -> dict:
    import hashlib

    return {
        "name": name,
        "file": file,
        "sha256": hashlib.sha256(data).hexdigest(),
        "bytes": len(data),
        "arch": arch,
        "params": int(params),
        "num_outputs": int(arch["num_outputs"]),
        "outputs": None,
    }


def _prepare_out(out: Path, overwrite: bool) -> Path:
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        if not overwrite:
            raise FileExistsError(f"{out} already exists and is not empty; choose another --out or pass --overwrite")
        if not (out / MANIFEST).is_file():
            raise FileExistsError(f"{out} exists and is not an edgehmoe bundle; refusing to overwrite it")
    out.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))


def _commit(tmp: Path, out: Path) -> None:
    """Replace ``out`` by the finished temporary folder (never leaves half a bundle behind)."""
    if out.exists():
        old = out.with_name(f".{out.name}.old")
        if old.exists():
            shutil.rmtree(old)
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old)
    else:
        os.replace(tmp, out)


def export_bundle(
    model_dir: str | Path | ModelDir,
    out: str | Path,
    *,
    include_flat: bool = True,
    opset: int = DEFAULT_OPSET,
    check_parity: bool = True,
    atol: float = 1e-4,
    parity_samples: int = 64,
    seed: int = 0,
    overwrite: bool = False,
    fused: tuple[str, ...] | list[str] = (),
    quantize: str | None = None,
    calibration: tuple[np.ndarray, np.ndarray] | None = None,
    calibration_size: int = 512,
    calibration_source: dict | None = None,
) -> Path:
    """Export every expert (and the flat model) of ``model_dir`` to a bundle at ``out``.

    Args:
        model_dir: a model directory (``model.json`` + safetensors) or a federated run
            directory (same layout).
        out: bundle folder to create; must be absent or empty unless ``overwrite``.
        include_flat: also export the flat baseline when the directory has one.
        opset: ONNX opset (18 by default; the dynamo exporter cannot write lower opsets for
            these models).
        check_parity: compare torch and ONNX Runtime on ``parity_samples`` random images.
        atol: largest allowed max-abs difference of logits.
        overwrite: replace an existing bundle at ``out``.
        fused: fused graphs to add (:mod:`edgehmoe.export.fuse`: ``path`` for one image,
            ``tree`` for a batch); none by default (they measured slower and bigger than
            separate sessions on x86, see docs/inference.md). They are checked against the
            expert sessions (equal logits, equal routing) before the bundle is committed.
        quantize: ``"int8"`` quantizes every network after the float32 parity check
            (:mod:`edgehmoe.export.quantize`), calibrated on ``calibration``.
        calibration: ``(uint8 images (N, H, W, 3), dataset class ids)`` of training images
            of the model's dataset (needed with ``quantize``).
        calibration_size: at most this many calibration images per network.
        calibration_source: where the images came from (dataset spec, split), recorded in
            the manifest.

    Returns the path of ``manifest.json``. Raises :class:`ParityError` when parity fails (the
    bundle is then not written), :class:`~edgehmoe.core.checkpoint.CheckpointError` for a bad
    model directory.
    """
    import torch

    from edgehmoe.model.inference import load_models

    if quantize is not None and quantize not in QUANTIZE_CHOICES:
        raise UsageError(f"unknown --quantize {quantize!r}; valid: {', '.join(QUANTIZE_CHOICES)}")
    if quantize is not None and calibration is None:
        raise UsageError("--quantize int8 needs calibration images: give --calibration-data SPEC (training images "
                         "of the model's dataset)")
    if quantize is not None and int(calibration_size) < 1:
        raise UsageError(f"--calibration-size must be >= 1, got {calibration_size}")
    bad = [k for k in fused if k not in FUSED_KINDS]
    if bad:
        raise UsageError(f"unknown fused graph kind(s) {bad}; valid: {', '.join(FUSED_KINDS)}")
    md = model_dir if isinstance(model_dir, ModelDir) else read_model_dir(model_dir)
    if not md.experts:  # a bundle is the chain of experts, with the flat model beside it
        raise CheckpointError(
            f"{md.path} holds no hierarchical model to export"
            + (" (only the flat model: a bundle carries the chain of experts, with the flat model as its baseline; "
               "train with edgehmoe fit --model both)" if md.flat is not None else ""))
    out = Path(out)
    tree = md.hierarchy
    hm, fm, _ = load_models(md)
    torch_experts = hm.experts if hm is not None else {}
    tmp = _prepare_out(out, overwrite)
    try:
        experts: dict[str, dict] = {}
        for node in sorted(torch_experts):
            e = md.experts[node]
            model = torch_experts[node]
            data = export_network(model, md.input_size, opset=opset, description=f"edgehmoe expert {node} {tree.names[node]}")
            rel = f"experts/{node}.onnx"
            (tmp / "experts").mkdir(exist_ok=True)
            (tmp / rel).write_bytes(data)
            experts[str(node)] = _entry(rel, data, tree.names[node], e.arch, e.params)
            logger.info("exported expert %s (%s): %d bytes", node, tree.names[node], len(data))
        flat = None
        torch_flat = None
        if include_flat and fm is not None:
            torch_flat = fm.model
            data = export_network(torch_flat, md.input_size, opset=opset, description="edgehmoe flat model")
            (tmp / "flat.onnx").write_bytes(data)
            flat = _entry("flat.onnx", data, "flat", md.flat.arch, md.flat.params)
            logger.info("exported flat model: %d bytes", len(data))
        manifest = {
            "format": BUNDLE_FORMAT,
            "format_version": BUNDLE_FORMAT_VERSION,
            "dataset": md.dataset,
            "hierarchy": tree.to_dict(),
            "class_names": tree.class_names(),
            "class_ids": list(range(tree.num_classes)),
            "input": {
                "name": "input",
                "image_shape": [md.input_size, md.input_size, 3],
                "dtype": "uint8",
                "layout": "NHWC",
                "model_input_shape": ["batch", 3, md.input_size, md.input_size],
                "model_input_dtype": "float32",
            },
            "preprocess": {
                "mean": [float(v) for v in md.mean],
                "std": [float(v) for v in md.std],
                "scale": 255.0,
                "formula": "(x / 255 - mean) / std, per channel, NHWC -> NCHW",
            },
            "experts": experts,
            "flat": flat,
            "exporter": {"torch": torch.__version__, "opset": opset},
            "source": {"model_dir": str(md.path)},
        }
        atomic_write_json(tmp / MANIFEST, manifest)
        if check_parity:
            report = check_parity_dirs(md, tmp, torch_experts, torch_flat, atol=atol, samples=parity_samples, seed=seed)
            manifest["parity"] = report
            atomic_write_json(tmp / MANIFEST, manifest)
        if quantize is not None:
            from edgehmoe.export.quantize import quantize_bundle

            x_cal, y_cal = calibration
            manifest["quantization"] = quantize_bundle(tmp, manifest, x_cal, y_cal, size=calibration_size,
                                                       source=calibration_source, seed=seed)
            manifest["precision"] = quantize
            atomic_write_json(tmp / MANIFEST, manifest)
        _add_fused(tmp, manifest, fused, samples=parity_samples, seed=seed)
        _commit(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("bundle written to %s (%d experts%s)", out, len(experts), ", flat" if flat else "")
    return out / MANIFEST


def _add_fused(bundle: Path, manifest: dict, kinds, *, samples: int, seed: int) -> None:
    """Build the fused graphs of a bundle folder, check them against its expert sessions on
    ``samples`` random images, and record them in its manifest."""
    if not kinds or not manifest["experts"]:
        return
    from edgehmoe.export.fuse import build_fused, check_fused

    manifest["fused"] = build_fused(bundle, manifest, kinds)
    atomic_write_json(bundle / MANIFEST, manifest)
    h, w, c = manifest["input"]["image_shape"]
    x = np.random.default_rng(seed + 1).integers(0, 256, size=(samples, h, w, c), dtype=np.uint8)
    manifest["fused"]["parity"] = check_fused(bundle, x)
    atomic_write_json(bundle / MANIFEST, manifest)


# ---------------------------------------------------------------------- parity
def check_parity_dirs(md: ModelDir, bundle: Path, torch_experts: dict, torch_flat, *, atol: float, samples: int, seed: int) -> dict:
    """Compare torch and ONNX Runtime on ``samples`` random images (and on a batch of one)."""
    from edgehmoe.core import routing
    from edgehmoe.model.training import predict_logits

    rng = np.random.default_rng(seed)
    s = md.input_size
    x = rng.integers(0, 256, size=(samples, s, s, 3), dtype=np.uint8)
    mean, std = np.asarray(md.mean, np.float32), np.asarray(md.std, np.float32)
    report: dict = {"samples": int(samples), "atol": atol, "max_abs_diff": {}}
    worst = 0.0
    if torch_experts:
        pred = BundlePredictor(bundle, max_sessions=0, threads=1)
        xp = pred.preprocess(x)
        for node, model in torch_experts.items():
            ref = predict_logits(model, x, mean, std)
            got = pred.expert_logits(node, xp)
            one = pred.expert_logits(node, xp[:1])  # the batch axis really is dynamic
            d = float(max(np.abs(ref - got).max(), np.abs(ref[:1] - one).max()))
            report["max_abs_diff"][str(node)] = d
            worst = max(worst, d)
            if not d <= atol:
                raise ParityError(
                    f"expert {node} ({md.hierarchy.names[node]!r}): ONNX Runtime logits differ from torch by {d:.3g} "
                    f"(> {atol:g}); the export is not faithful"
                )
        # Greedy predictions through the shared routing code, torch probabilities vs ORT.
        torch_probs = {n: softmax_rows(predict_logits(m, x, mean, std)) for n, m in torch_experts.items()}
        tree = md.hierarchy
        ref_nodes, _ = routing.decode(tree, samples, lambda n, idx: torch_probs[n][idx])
        got_nodes, _ = pred.predict_greedy(x)
        bad = np.flatnonzero(ref_nodes != got_nodes)
        ties = [i for i in bad if _near_tie(tree, torch_probs, i, ref_nodes[i], got_nodes[i], atol)]
        if len(bad) > len(ties):
            raise ParityError(
                f"greedy predictions differ on {len(bad) - len(ties)} of {samples} random images "
                "between torch and ONNX Runtime; the export is not faithful"
            )
        report["greedy_equal"] = int(samples - len(bad))
        report["greedy_ties"] = len(ties)
    if torch_flat is not None:
        fp = FlatPredictor(bundle, threads=1)
        ref = predict_logits(torch_flat, x, mean, std)
        got = fp.logits(x)
        d = float(np.abs(ref - got).max())
        report["max_abs_diff"]["flat"] = d
        worst = max(worst, d)
        if not d <= atol:
            raise ParityError(f"flat model: ONNX Runtime logits differ from torch by {d:.3g} (> {atol:g})")
        report["flat_argmax_equal"] = int((ref.argmax(1) == got.argmax(1)).sum())
    report["worst"] = worst
    logger.info("parity: max |torch - ORT| = %.2e over %d images", worst, samples)
    return report


def _near_tie(tree: Hierarchy, probs: dict, i: int, a: int, b: int, atol: float) -> bool:
    """Did greedy paths ``a`` and ``b`` of sample ``i`` split at a node whose two choices
    are within ``atol`` in torch's probabilities (a tie that rounding may break either way)?"""
    lca = int(tree.lca(a, b))
    d = tree.depths[lca] + 1
    ca, cb = tree.ancestor_matrix[a, d], tree.ancestor_matrix[b, d]
    if ca < 0 or cb < 0:
        return False
    p = probs[lca][i]
    return abs(p[tree.child_index[ca]] - p[tree.child_index[cb]]) <= atol


def check_parity(model_dir: str | Path, bundle: str | Path, *, atol: float = 1e-4, samples: int = 64, seed: int = 0) -> dict:
    """Re-run the export's parity check between a model directory and an existing bundle."""
    from edgehmoe.model.inference import load_models

    hm, fm, md = load_models(model_dir)
    experts = hm.experts if hm is not None else {}
    flat = fm.model if fm is not None and read_manifest(bundle).get("flat") else None
    return check_parity_dirs(md, Path(bundle), experts, flat, atol=atol, samples=samples, seed=seed)


# ---------------------------------------------------------------------- subsets
def resolve_nodes(tree: Hierarchy, keep: list[str | int]) -> list[int]:
    """Node indices of ``keep`` (names, or integer indices of ``tree``), with clear errors."""
    out = []
    for k in keep:
        if isinstance(k, (int, np.integer)) and not isinstance(k, bool):
            idx = int(k)
        elif isinstance(k, str) and k in tree.names:
            idx = tree.index(k)
        elif isinstance(k, str) and k.strip().lstrip("-").isdigit():
            idx = int(k)
        else:
            internal = ", ".join(tree.names[n] for n in tree.internal_nodes[:8])
            raise BundleError(f"no node named {k!r} in the bundle's tree (internal nodes: {internal}, ...)")
        if not 0 <= idx < tree.num_nodes:
            raise BundleError(f"node index {idx} is out of range (the tree has {tree.num_nodes} nodes)")
        out.append(idx)
    if not out:
        raise BundleError("give at least one node to keep")
    return out


def subset_bundle(bundle: str | Path, keep: list[str | int], out: str | Path, *, overwrite: bool = False) -> Path:
    """A bundle holding only the sub-trees of ``keep`` (and what routes to them); no retraining.

    Rules (documented in ``docs/inference.md``):

    - the new root is the lowest common ancestor of the kept nodes; with one kept node, that
      node itself (its ancestors' experts are not needed: the device only sees its classes);
    - every kept node's full sub-tree is kept with its experts unchanged;
    - between the new root and the kept nodes, an ancestor with two or more kept branches
      keeps its expert, restricted to the logits of those branches (softmax over them, i.e.
      probabilities conditional on the sample belonging to the kept classes); an ancestor
      with a single kept branch is skipped (its restricted softmax would be 1);
    - leaves are renumbered ``0..m-1`` in original class-id order; ``class_ids`` maps them
      back to the original dataset class ids and ``class_names`` keeps their names;
    - the flat model, when present, is kept restricted to the kept classes.

    Every expert and flat ``.onnx`` file is copied byte for byte and re-hashed; fused graphs
    (which compose the whole tree) are rebuilt for the subset when ``onnx`` is installed and
    left out otherwise. Returns the new manifest path.
    """
    bundle, out = Path(bundle), Path(out)
    m = verify_bundle(bundle)
    tree = Hierarchy.from_dict(m["hierarchy"])
    nodes = resolve_nodes(tree, keep)
    # Drop kept nodes lying under another kept node: their sub-tree is already in.
    nodes = sorted(set(nodes))
    nodes = [n for n in nodes if not any(o != n and tree.is_ancestor_or_self(o, n) for o in nodes)]
    if len(nodes) == 1 and tree.is_leaf[nodes[0]]:
        raise BundleError(
            f"keeping only the leaf {tree.names[nodes[0]]!r} leaves nothing to predict; keep an internal node "
            "or several nodes"
        )
    root = nodes[0]
    for n in nodes[1:]:
        root = int(tree.lca(root, n))
    n_all = tree.num_nodes
    in_kept = np.zeros(n_all, dtype=bool)
    for n in nodes:
        in_kept |= tree.is_ancestor_or_self(np.full(n_all, n), np.arange(n_all))
    marked = in_kept.copy()
    for n in nodes:
        for a in tree.path(n):
            marked[a] = True
    marked &= tree.is_ancestor_or_self(np.full(n_all, root), np.arange(n_all))
    # Branch count of routing-only ancestors: collapse those with a single marked child.
    kids_marked = np.bincount(tree.parents[1:][marked[1:]], minlength=n_all)
    reduced = [j for j in range(n_all) if marked[j] and (j == root or in_kept[j] or kids_marked[j] >= 2)]
    new_index = {old: new for new, old in enumerate(reduced)}

    def reduced_parent(j: int) -> int:
        p = int(tree.parents[j])
        while p not in new_index:
            p = int(tree.parents[p])
        return new_index[p]

    parents = [-1] + [reduced_parent(j) for j in reduced[1:]]
    leaves = [j for j in reduced if tree.is_leaf[j]]
    old_classes = sorted(int(tree.leaf_class[j]) for j in leaves)
    new_class = {c: i for i, c in enumerate(old_classes)}
    leaf_class = [new_class[int(tree.leaf_class[j])] if tree.is_leaf[j] else -1 for j in reduced]
    names = [tree.names[j] for j in reduced]
    new_tree = Hierarchy(parents, names, leaf_class)

    experts = {}
    for j in reduced:
        if tree.is_leaf[j]:
            continue
        e = dict(m["experts"][str(j)])
        kids_new = [reduced[c] for c in new_tree.children(new_index[j])]
        d = tree.depths[j] + 1
        idx = [int(tree.child_index[tree.ancestor_matrix[c, d]]) for c in kids_new]
        prev = e.get("outputs")
        cols = [prev[i] for i in idx] if prev is not None else idx
        e["outputs"] = None if cols == list(range(int(e["num_outputs"]))) else cols
        e["name"] = tree.names[j]
        experts[str(new_index[j])] = e
    flat = None
    if m.get("flat"):
        flat = dict(m["flat"])
        prev = flat.get("outputs")
        cols = [prev[c] for c in old_classes] if prev is not None else old_classes
        flat["outputs"] = None if cols == list(range(int(flat["num_outputs"]))) else cols
    old_ids = m["class_ids"]
    manifest = dict(m)
    manifest.update(
        hierarchy=new_tree.to_dict(),
        class_names=[m["class_names"][c] for c in old_classes],
        class_ids=[int(old_ids[c]) for c in old_classes],
        experts=experts,
        flat=flat,
        source={
            **m.get("source", {}),
            "subset_of": str(bundle),
            "keep": [tree.names[n] for n in nodes],
            "original_nodes": {str(new_index[j]): j for j in reduced},
        },
    )
    manifest.pop("parity", None)  # parity was measured on the full bundle; the files are unchanged
    # Fused graphs compose the whole tree: rebuild them for the subset (needs onnx), else drop them.
    manifest.pop("fused", None)
    kinds = [k for k in FUSED_KINDS if k in fused_graphs(m)]
    tmp = _prepare_out(out, overwrite)
    try:
        for what, entry in [(f"expert {k}", v) for k, v in experts.items()] + ([("flat", flat)] if flat else []):
            dst = tmp / entry["file"]
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(bundle / entry["file"], dst)
            if file_sha256(dst) != entry["sha256"]:
                raise BundleError(f"{bundle / entry['file']} changed while it was copied ({what}); try again")
        atomic_write_json(tmp / MANIFEST, manifest)
        read_manifest(tmp)
        if kinds:
            try:
                import onnx  # noqa: F401
            except ImportError:
                logger.info("subset written without fused graphs: rebuilding them needs onnx (pip install onnx); "
                            "the runtime then runs one session per expert")
            else:
                _add_fused(tmp, manifest, kinds, samples=16, seed=0)
        _commit(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info(
        "subset bundle %s: kept %s; %d of %d experts, %d of %d classes",
        out, ", ".join(tree.names[n] for n in nodes), len(experts), len(m["experts"]),
        new_tree.num_classes, tree.num_classes,
    )
    return out / MANIFEST


def bundle_summary(bundle: str | Path) -> dict:
    """Short description of a bundle (for the CLI)."""
    m = read_manifest(bundle)
    tree = Hierarchy.from_dict(m["hierarchy"])
    size = sum(int(e.get("bytes", 0)) for e in m["experts"].values())
    return {
        "bundle": str(bundle),
        "experts": len(m["experts"]),
        "expert_bytes": size,
        "flat_bytes": int(m["flat"]["bytes"]) if m.get("flat") else None,
        "classes": tree.num_classes,
        "root": tree.names[0],
        "input": m["input"]["image_shape"],
    }


def load_torch_models(model_dir: str | Path | ModelDir):
    """``(HierarchicalModel | None, FlatModel | None)`` of a model directory: the torch models
    the bundle was exported from (:func:`edgehmoe.model.inference.load_models`)."""
    from edgehmoe.model.inference import load_models

    hm, fm, _ = load_models(model_dir)
    return hm, fm
