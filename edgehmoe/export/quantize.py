"""Static int8 quantization of a bundle's networks (``edgehmoe export --quantize int8``).

Each network of a freshly exported float32 bundle is quantized with ONNX Runtime's
:func:`onnxruntime.quantization.quantize_static`, calibrated on training images the user
points to (``--calibration-data SPEC --calibration-size N``):

- **QDQ format, per-channel int8 weights, uint8 activations, MinMax calibration.** ONNX
  Runtime fuses the QuantizeLinear/DequantizeLinear pairs into ``QLinearConv`` at load time;
  the files run on any ONNX Runtime ≥ 1.17 (opset 18 ``DequantizeLinear`` with an axis).
- **The classifier keeps float logits.** The last ``Gemm`` takes int8 weights but its output
  is not re-quantized (``OpTypesToExcludeOutputQuantization``), and whatever follows it (the
  log-sum-exp grouping of a leaf-head expert) stays float32: quantized logits take only 256
  values, which would turn close calls into exact ties and change routing.
- **Each expert is calibrated on what reaches it**: the calibration images of classes under
  its node plus those the float32 chain routes to it (greedy), at most ``size`` of them;
  the flat model on all of them.
- Tensor and node names are shortened (``t0``, ``t1``, …; the graph's ``input`` and
  ``logits`` keep theirs), which removes about a quarter of a small int8 file.

:func:`quantize_bundle` rewrites the network files of a bundle folder in place and returns
the manifest's ``quantization`` record, with the agreement of every quantized network with
its float32 original on the calibration images (``argmax_agreement``, ``max_abs_diff``).
Needs ``onnx`` and ``onnxruntime`` (the ``train`` extra); the quantized bundle runs with
onnxruntime alone.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import numpy as np

from edgehmoe.core.hierarchy import Hierarchy
from edgehmoe.edge.manifest import BundleError
from edgehmoe.errors import MissingDependency

__all__ = ["QUANTIZE_CHOICES", "QuantizeError", "calibration_sets", "quantize_bundle", "quantize_network"]

logger = logging.getLogger(__name__)

QUANTIZE_CHOICES = ("int8",)
_BATCH = 32  # calibration batch
_CHUNK = 256  # images per inference call while routing and comparing


class QuantizeError(BundleError):
    """A network cannot be quantized, or its calibration data does not fit the bundle."""


def _quantization():
    try:
        import onnx  # noqa: F401
        from onnxruntime import quantization
    except ImportError:  # pragma: no cover - both are in the train extra
        raise MissingDependency("int8 export needs onnx and onnxruntime: pip install 'edgehmoe[train]'") from None
    return quantization


class _Reader:
    """``CalibrationDataReader`` over preprocessed images, in batches."""

    def __init__(self, x: np.ndarray, name: str):
        self._batches = iter([{name: x[i : i + _BATCH]} for i in range(0, len(x), _BATCH)])

    def get_next(self):
        return next(self._batches, None)

    def rewind(self):  # pragma: no cover - only some calibrators call it
        raise NotImplementedError


class _quiet_root_logger:
    """ONNX Runtime's quantizer logs advice ("consider pre-processing") to the root logger
    for every network; our log says what was done instead."""

    def __enter__(self):
        self._root = logging.getLogger()
        self._level = self._root.level
        self._root.setLevel(max(self._level, logging.ERROR))
        return self

    def __exit__(self, *exc):
        self._root.setLevel(self._level)
        return False


def _head_nodes(model) -> list[str]:
    """Names of the nodes after the classifier (the first ``Gemm``/``MatMul``): kept float."""
    nodes = list(model.graph.node)
    first = next((i for i, n in enumerate(nodes) if n.op_type in ("Gemm", "MatMul")), None)
    return [] if first is None else [n.name for n in nodes[first + 1 :]]


def _shorten_names(model) -> None:
    """Rename every tensor and node except the graph's input and output to ``t<i>``/empty."""
    keep = {v.name for v in model.graph.input} | {v.name for v in model.graph.output}
    names: dict[str, str] = {}

    def short(v: str) -> str:
        if not v or v in keep:
            return v
        if v not in names:
            names[v] = f"t{len(names)}"
        return names[v]

    for n in model.graph.node:
        n.name = ""
        n.input[:] = [short(v) for v in n.input]
        n.output[:] = [short(v) for v in n.output]
    for t in model.graph.initializer:
        t.name = short(t.name)
    del model.graph.value_info[:]


def quantize_network(data: bytes, calibration: np.ndarray, *, input_name: str = "input") -> bytes:
    """int8 QDQ copy of one serialised float32 network, calibrated on preprocessed float32
    NCHW images ``calibration`` (see the module docstring for the settings)."""
    q = _quantization()
    import onnx

    if len(calibration) == 0:
        raise QuantizeError("no calibration images for this network; give more --calibration-size")
    model = onnx.load_from_string(data)
    with tempfile.TemporaryDirectory(prefix="edgehmoe-quant-") as tmp:
        src, dst = Path(tmp) / "fp32.onnx", Path(tmp) / "int8.onnx"
        src.write_bytes(data)
        with _quiet_root_logger():
            q.quantize_static(
                str(src), str(dst), _Reader(np.ascontiguousarray(calibration, dtype=np.float32), input_name),
                quant_format=q.QuantFormat.QDQ, per_channel=True,
                activation_type=q.QuantType.QUInt8, weight_type=q.QuantType.QInt8,
                calibrate_method=q.CalibrationMethod.MinMax,
                nodes_to_exclude=_head_nodes(model),
                # No CalibMaxIntermediateOutputs: ONNX Runtime's MinMax calibrator (1.2x) drops
                # the batches it flushes without merging their ranges (onnxruntime #18893), so
                # only the last few batches counted, and a multiple of the limit raised "No data
                # is collected". Memory is all intermediate outputs: ~0.25 MB per calibration
                # image for a CIFAR root, ~1 MB for a Tiny ImageNet root.
                extra_options={"OpTypesToExcludeOutputQuantization": ["Gemm", "MatMul"]},
            )
        out = onnx.load(str(dst))
    _shorten_names(out)
    out.producer_name, out.doc_string = model.producer_name, model.doc_string + " (int8 QDQ)"
    out.producer_version = model.producer_version
    onnx.checker.check_model(out)
    return out.SerializeToString()


def calibration_sets(tree: Hierarchy, y: np.ndarray, routed: dict[int, np.ndarray], size: int, seed: int = 0) -> dict[int, np.ndarray]:
    """Calibration image indices of every expert: images of classes under its node, plus
    those the float32 chain routed to it (``routed[node]``), at most ``size`` (a seeded
    random choice)."""
    rng = np.random.default_rng(seed)
    leaves = tree.class_to_node[np.asarray(y, dtype=np.int64)]
    out = {}
    for n in tree.internal_nodes.tolist():
        under = np.flatnonzero(tree.is_ancestor_or_self(np.full(len(leaves), n), leaves))
        idx = np.union1d(under, routed.get(n, np.zeros(0, dtype=np.int64)))
        if len(idx) > size:
            idx = np.sort(rng.choice(idx, size=size, replace=False))
        out[n] = idx
    return out


def quantize_bundle(bundle_dir: str | Path, manifest: dict, x: np.ndarray, y: np.ndarray, *, size: int,
                    source: dict | None = None, seed: int = 0) -> dict:
    """Quantize every network of the float32 bundle folder ``bundle_dir`` (described by
    ``manifest``) in place, calibrated on uint8 images ``x`` with bundle class ids ``y``.

    Updates the manifest entries (``sha256``, ``bytes``, ``precision``) and returns the
    ``quantization`` record (settings, calibration, agreement with float32).
    """
    import hashlib

    from edgehmoe.core import routing
    from edgehmoe.edge.runtime import BundlePredictor, FlatPredictor

    bundle_dir = Path(bundle_dir)
    tree = Hierarchy.from_dict(manifest["hierarchy"])
    chain = BundlePredictor(bundle_dir, max_sessions=0, fused="off", verify=False)
    if tuple(x.shape[1:]) != chain.image_shape:
        raise QuantizeError(f"calibration images are {x.shape[1:]} but the bundle takes {chain.image_shape}; "
                            "give the dataset the model was trained on")
    xp = chain.preprocess(x)
    # Where the float32 chain sends each calibration image (greedy), in chunks of _CHUNK.
    routed: dict[int, list[np.ndarray]] = {}
    for i in range(0, len(xp), _CHUNK):
        record: dict[int, np.ndarray] = {}
        routing.decode(tree, len(xp[i : i + _CHUNK]), chain.expert_probs_fn(xp[i : i + _CHUNK], record, kind=None))
        for n, p in record.items():
            routed.setdefault(n, []).append(i + np.flatnonzero(np.isfinite(p[:, 0])))
    routed = {n: np.concatenate(v) for n, v in routed.items()}
    sets = calibration_sets(tree, y, routed, size, seed)
    report: dict = {"networks": {}}
    for key, entry in list(manifest["experts"].items()):
        node = int(key)
        idx = sets[node]
        path = bundle_dir / entry["file"]
        fp32 = path.read_bytes()
        data = quantize_network(fp32, xp[idx], input_name=chain.input_name)
        path.write_bytes(data)
        # the float32 session (created before the file changed)
        ref = _chunked(lambda a: chain.expert_logits(node, a), xp[idx])
        got = _logits(data, xp[idx], chain.input_name, entry.get("outputs"))
        report["networks"][key] = _agreement(ref, got, len(fp32), len(data), len(idx))
        entry.update(sha256=hashlib.sha256(data).hexdigest(), bytes=len(data), precision="int8")
        logger.info("quantized expert %s (%s): %d -> %d bytes, calibrated on %d images, argmax agreement %.3f",
                    key, tree.names[node], len(fp32), len(data), len(idx),
                    report["networks"][key]["argmax_agreement"])
    if manifest.get("flat"):
        entry = manifest["flat"]
        path = bundle_dir / entry["file"]
        fp32 = path.read_bytes()
        ref = _chunked(FlatPredictor(bundle_dir, verify=False).logits, x)
        data = quantize_network(fp32, xp, input_name=chain.input_name)
        path.write_bytes(data)
        got = _logits(data, xp, chain.input_name, entry.get("outputs"))
        report["networks"]["flat"] = _agreement(ref, got, len(fp32), len(data), len(x))
        entry.update(sha256=hashlib.sha256(data).hexdigest(), bytes=len(data), precision="int8")
        logger.info("quantized the flat model: %d -> %d bytes, argmax agreement %.3f", len(fp32), len(data),
                    report["networks"]["flat"]["argmax_agreement"])
    nets = report["networks"].values()
    report.update(
        dtype="int8", format="QDQ", per_channel=True, activations="uint8", weights="int8", calibration_method="MinMax",
        float_logits=True,
        calibration={**(source or {}), "images": int(len(x)), "max_per_network": int(size), "seed": int(seed)},
        bytes_float32=int(sum(v["bytes_float32"] for v in nets)), bytes_int8=int(sum(v["bytes_int8"] for v in nets)),
    )
    return report


def _logits(data: bytes, xp: np.ndarray, input_name: str, outputs) -> np.ndarray:
    import onnxruntime as ort

    from edgehmoe.edge.runtime import make_session_options

    sess = ort.InferenceSession(data, make_session_options(1), providers=["CPUExecutionProvider"])
    out = _chunked(lambda a: sess.run(None, {input_name: a})[0], xp)
    return out[:, outputs] if outputs is not None else out


def _chunked(fn, x: np.ndarray) -> np.ndarray:
    """``fn`` over ``x`` in chunks (bounded activation memory for large calibration sets)."""
    return np.concatenate([fn(x[i : i + _CHUNK]) for i in range(0, len(x), _CHUNK)])


def _agreement(ref: np.ndarray, got: np.ndarray, b32: int, b8: int, n: int) -> dict:
    return {"argmax_agreement": float((ref.argmax(1) == got.argmax(1)).mean()) if len(ref) else 1.0,
            "max_abs_diff": float(np.abs(ref - got).max()) if len(ref) else 0.0,
            "calibration_images": int(n), "bytes_float32": int(b32), "bytes_int8": int(b8)}
