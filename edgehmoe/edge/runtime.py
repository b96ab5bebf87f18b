"""Torch-free prediction over an ONNX bundle: what a Raspberry Pi runs.

The bundle format (``manifest.json`` and its checks) is :mod:`edgehmoe.edge.manifest`. This
module holds the ONNX Runtime sessions and the predictors, which only supply probabilities:
:class:`BundlePredictor` gives each expert's softmax to :func:`edgehmoe.core.routing.decode`
(the same decode path as the torch model), creating ONNX Runtime sessions lazily and keeping
at most ``max_sessions`` of them alive (least recently used is dropped), so a device only
holds the experts its samples' paths need; :class:`FlatPredictor` gives the flat softmax to
:func:`edgehmoe.core.routing.flat_decode`. Every file's sha256 is checked against the
manifest before it is used, so a missing or tampered file fails with
:class:`~edgehmoe.edge.manifest.BundleError` instead of producing silent garbage.

This module imports numpy and onnxruntime only (plus the numpy core of edgehmoe): it works on
a device without torch. Session defaults (one intra-op thread, sequential execution, CPU
memory arena and memory pattern off, all graph optimisations) were chosen by measurement for
these small convolutional models; see ``docs/inference.md``.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from edgehmoe.core import routing
from edgehmoe.core.hierarchy import Hierarchy
from edgehmoe.edge.manifest import (
    BundleError,
    bundle_entries,
    check_file,
    check_onnx_bytes,
    read_manifest,
    verify_bundle,
)
from edgehmoe.edge.integrity import bundle_verify_key
from edgehmoe.errors import MissingDependency, UsageError

try:  # an optional dependency: fail at use with an install hint, not at import
    import onnxruntime as _ort
except ImportError:  # pragma: no cover - exercised only on installs without onnxruntime
    _ort = None

__all__ = [
    "BundlePredictor",
    "FlatPredictor",
    "make_session_options",
    "preprocess",
]

logger = logging.getLogger(__name__)

# ---------------------------------------------------------------------- helpers
def _require_ort():
    if _ort is None:
        raise MissingDependency(
            "onnxruntime is not installed; install it with `pip install onnxruntime` "
            "(or `pip install 'edgehmoe[edge]'`)"
        )
    return _ort


def preprocess(x: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """uint8 NHWC → float32 NCHW in [0, 1], normalised per channel.

    Performs the same float32 operations in the same order as
    :func:`edgehmoe.model.training.preprocess` (divide by 255, subtract mean, divide by std), so the
    two agree bit for bit.
    """
    t = np.ascontiguousarray(x).transpose(0, 3, 1, 2).astype(np.float32)
    t /= np.float32(255.0)
    m = np.asarray(mean, dtype=np.float32).reshape(1, -1, 1, 1)
    s = np.asarray(std, dtype=np.float32).reshape(1, -1, 1, 1)
    return np.ascontiguousarray((t - m) / s)


def _softmax(z: np.ndarray) -> np.ndarray:
    z = np.asarray(z, dtype=np.float64)
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def make_session_options(
    threads: int = 1,
    *,
    mem_arena: bool = False,
    mem_pattern: bool = False,
    optimization: str = "all",
    inter_threads: int = 1,
):
    """Session options for small devices.

    Args:
        threads: intra-op threads (``0`` lets ONNX Runtime use every physical core). One
            thread means the calling thread does all the work and no thread pool is created.
        mem_arena: keep ONNX Runtime's CPU memory arena. Off by default: with it, each
            session keeps its largest batch's activations reserved after the run; the
            measured latency cost of turning it off is within noise for these models.
        mem_pattern: pre-plan one block for all activations per input shape. Off by default
            (same memory reason, no measurable latency gain with a varying batch size).
        optimization: graph optimisation level: ``disable``, ``basic``, ``extended`` or ``all``.
        inter_threads: threads across graph nodes; our models are a single chain, so
            sequential execution with one inter-op thread is right.
    """
    ort = _require_ort()
    levels = {
        "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }
    if optimization not in levels:
        raise UsageError(f"unknown optimisation level {optimization!r}; valid: {', '.join(levels)}")
    if threads < 0 or inter_threads < 0:
        raise UsageError(f"thread counts must be >= 0, got threads={threads}, inter_threads={inter_threads}")
    so = ort.SessionOptions()
    so.intra_op_num_threads = int(threads)
    so.inter_op_num_threads = int(inter_threads)
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = levels[optimization]
    so.enable_cpu_mem_arena = bool(mem_arena)
    so.enable_mem_pattern = bool(mem_pattern)
    so.log_severity_level = 3  # errors only; ORT's warnings go to stderr, not our logger
    if threads == 1:
        # With one thread there is nobody to spin for; spinning only burns a Pi core.
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return so


# ---------------------------------------------------------------------- predictors
class _BundleBase:
    """Manifest, input checks and session creation shared by the chain and the flat model."""

    def __init__(self, bundle_dir: str | Path, *, threads: int = 1, verify: bool = True, session_options=None):
        _require_ort()
        self.bundle_dir = Path(bundle_dir)
        # $EDGEHMOE_BUNDLE_PUBKEY (set by --verify-key): the manifest must carry a valid signature
        # by that key, and then every file is hashed (the signature vouches for them only so).
        key = bundle_verify_key()
        self.manifest = read_manifest(self.bundle_dir, verify_key=key)
        self.verify = verify or key is not None
        if self.verify:
            verify_bundle(self.bundle_dir, self.manifest)
        else:
            for what, entry in bundle_entries(self.manifest):
                if not (self.bundle_dir / entry["file"]).is_file():
                    raise BundleError(f"{self.bundle_dir / entry['file']} is missing ({what}); the bundle is incomplete")
        self.tree = Hierarchy.from_dict(self.manifest["hierarchy"])
        self.class_names: list[str] = list(self.manifest["class_names"])
        # Dataset class id (of the data the model was trained on) of each leaf class of this
        # bundle's tree; the identity except in subset bundles.
        self.class_ids = np.asarray(self.manifest["class_ids"], dtype=np.int64)
        self.image_shape = tuple(int(v) for v in self.manifest["input"]["image_shape"])
        self.input_name = self.manifest["input"].get("name", "input")
        pp = self.manifest["preprocess"]
        self.mean = np.asarray(pp["mean"], dtype=np.float32)
        self.std = np.asarray(pp["std"], dtype=np.float32)
        self.threads = threads
        self._session_options = session_options if session_options is not None else make_session_options(threads)
        self.sessions_created = 0

    @property
    def input_size(self) -> int:
        return self.image_shape[0]

    def check_input(self, x: np.ndarray) -> np.ndarray:
        """Raise :class:`BundleError` unless ``x`` is uint8 ``(N, H, W, 3)`` of this bundle's size."""
        h, w, c = self.image_shape
        expected = f"uint8 images of shape (N, {h}, {w}, {c})"
        if not isinstance(x, np.ndarray):
            raise BundleError(f"expected a numpy array of {expected}; got {type(x).__name__}")
        if x.ndim == 3 and x.shape == (h, w, c):
            raise BundleError(f"expected {expected}; got one image of shape {x.shape}: add a batch axis (x[None])")
        if x.ndim != 4 or x.shape[1:] != (h, w, c):
            raise BundleError(
                f"expected {expected} (this bundle's input size is {h}x{w}); got {x.dtype} array of shape "
                f"{x.shape}; resize the images to {h}x{w} RGB first"
            )
        if x.dtype != np.uint8:
            raise BundleError(f"expected {expected}; got dtype {x.dtype} (convert 0..255 values with x.astype(np.uint8))")
        return x

    def preprocess(self, x: np.ndarray) -> np.ndarray:
        return preprocess(self.check_input(x), self.mean, self.std)

    def _new_session(self, entry: dict, what: str):
        path = self.bundle_dir / entry["file"]
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise BundleError(f"{path} is missing ({what}); the bundle is incomplete: re-export or re-copy it") from None
        if self.verify:  # hash exactly the bytes ONNX Runtime gets, not an earlier read
            check_file(self.bundle_dir, entry, what, data)
        check_onnx_bytes(data, f"{path} ({what})")  # external data would be read relative to the cwd
        try:
            sess = _ort.InferenceSession(data, self._session_options, providers=["CPUExecutionProvider"])
        except Exception as e:  # ORT raises its own exception types for invalid models
            raise BundleError(f"ONNX Runtime cannot load {path} ({what}): {e}") from None
        self.sessions_created += 1
        logger.debug("created session for %s (%s)", what, path.name)
        return sess

    @staticmethod
    def _logits(sess, input_name: str, xp: np.ndarray, entry: dict) -> np.ndarray:
        out = sess.run(None, {input_name: xp})[0]
        sel = entry.get("outputs")
        return out[:, sel] if sel is not None else out

    def class_id(self, node: int) -> int:
        """Original dataset class id of leaf ``node`` (``-1`` for internal nodes)."""
        c = int(self.tree.leaf_class[node])
        return int(self.class_ids[c]) if c >= 0 else -1

    def describe_node(self, node: int) -> dict:
        node = int(node)
        return {
            "node": node,
            "name": self.tree.names[node],
            "is_leaf": bool(self.tree.is_leaf[node]),
            "class_id": self.class_id(node) if self.tree.is_leaf[node] else None,
        }


class BundlePredictor(_BundleBase):
    """The chain of ONNX experts of a bundle, predicting top-down.

    Args:
        bundle_dir: folder holding ``manifest.json`` and the ``.onnx`` files.
        max_sessions: at most this many expert sessions stay alive (least recently used is
            closed first); ``0`` or less means no limit.
        threads: intra-op threads per session (1 mimics one Pi core and is the measured best
            for these tiny models; 0 = all cores).
        verify: check every file's sha256 against the manifest when opening the bundle and
            again on the bytes given to ONNX Runtime when a session is created.
        session_options: an ``onnxruntime.SessionOptions`` replacing the defaults.

    All ``predict_*`` methods take uint8 images ``(N, H, W, 3)`` and work batch-wise: the
    samples sitting at the same node are grouped, so each expert runs once per level.
    """

    def __init__(
        self,
        bundle_dir: str | Path,
        *,
        max_sessions: int = 32,
        threads: int = 1,
        verify: bool = True,
        session_options=None,
    ):
        super().__init__(bundle_dir, threads=threads, verify=verify, session_options=session_options)
        self.max_sessions = int(max_sessions)
        self._experts = {int(k): v for k, v in self.manifest["experts"].items()}
        self._sessions: OrderedDict[int, object] = OrderedDict()
        self.expert_calls = 0

    # ------------------------------------------------------------ sessions
    def session(self, node: int):
        """The session of ``node``'s expert, created on first use (LRU-cached)."""
        node = int(node)
        sess = self._sessions.get(node)
        if sess is not None:
            self._sessions.move_to_end(node)
            return sess
        if node not in self._experts:
            raise BundleError(f"node {node} ({self.tree.names[node]!r}) has no expert in this bundle")
        sess = self._new_session(self._experts[node], f"expert {node} {self.tree.names[node]!r}")
        self._sessions[node] = sess
        while self.max_sessions > 0 and len(self._sessions) > self.max_sessions:
            old, _ = self._sessions.popitem(last=False)
            logger.debug("closed session of expert %s (LRU, max_sessions=%s)", old, self.max_sessions)
        return sess

    @property
    def loaded_experts(self) -> list[int]:
        """Nodes whose sessions are alive, least recently used first."""
        return list(self._sessions)

    def close(self) -> None:
        """Drop every session (they are recreated on demand)."""
        self._sessions.clear()

    # ------------------------------------------------------------ experts
    def expert_logits(self, node: int, xp: np.ndarray) -> np.ndarray:
        """Logits of ``node``'s expert on preprocessed float32 NCHW input ``xp``."""
        self.expert_calls += 1
        return self._logits(self.session(node), self.input_name, xp, self._experts[int(node)])

    def expert_probs_fn(self, xp: np.ndarray, record: dict | None = None) -> routing.ExpertProbs:
        """The ``expert_probs(node, idx)`` callable of :mod:`edgehmoe.core.routing` over
        preprocessed ``xp``.

        With ``record``, each node's probabilities are also stored there
        (``record[node]`` is an ``(N, k)`` array, NaN where the node did not run) to explain
        the path afterwards (:func:`edgehmoe.core.routing.explain_paths`).
        """

        def fn(node: int, idx: np.ndarray) -> np.ndarray:
            return _softmax(self.expert_logits(node, xp[idx]))

        return fn if record is None else routing.record_expert_probs(fn, len(xp), record)

    def expert_probs(self, x: np.ndarray) -> routing.ExpertProbs:
        """``expert_probs(node, idx)`` over uint8 images ``x`` (checked and preprocessed once)."""
        return self.expert_probs_fn(self.preprocess(x))

    # ------------------------------------------------------------ prediction
    def predict(self, x: np.ndarray, *, beam: int = 1, threshold: float | None = None) -> tuple[np.ndarray, np.ndarray]:
        """``(nodes, path_probability)`` through :func:`edgehmoe.core.routing.decode`:
        thresholded descent if ``threshold`` is given, else beam (``beam > 1``) or greedy."""
        return routing.decode(self.tree, len(x), self.expert_probs(x), beam=beam, threshold=threshold)

    def predict_greedy(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Most probable child at each node down to a leaf: ``(nodes, path_probability)``."""
        return self.predict(x)

    def predict_beam(self, x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Beam search of width ``k`` over root-to-leaf paths: ``(nodes, path_probability)``."""
        return self.predict(x, beam=k)

    def predict_until(self, x: np.ndarray, tau: float) -> tuple[np.ndarray, np.ndarray]:
        """Greedy descent that stops at an internal node when the path probability would fall
        below ``tau``: ``(nodes, path_probability)``."""
        return self.predict(x, threshold=tau)

    def explain(self, x: np.ndarray, *, beam: int = 1, threshold: float | None = None, top: int = 3) -> list[dict]:
        """Prediction with its root path and per-step probabilities, one dict per image.

        Each dict has ``node``, ``name``, ``is_leaf``, ``class_id`` (original dataset class
        id, ``None`` for an internal node), ``probability`` (path probability), ``path``
        (list of ``{node, name, probability, path_probability}`` from the root; the root's
        probability is 1) and ``alternatives`` (the ``top`` most probable children at the
        last expert that ran, as ``{node, name, probability}``).
        """
        xp = self.preprocess(x)
        record: dict[int, np.ndarray] = {}
        fn = self.expert_probs_fn(xp, record)
        nodes, pp = routing.decode(self.tree, len(xp), fn, beam=beam, threshold=threshold)
        out = []
        for i, (steps, alts) in enumerate(routing.explain_paths(self.tree, nodes, record, top)):
            node = int(nodes[i])
            d = self.describe_node(node)
            if d["class_id"] is not None:
                d["class_name"] = self.class_names[int(self.tree.leaf_class[node])]
            d.update(probability=float(pp[i]), path=steps, alternatives=alts)
            out.append(d)
        return out


class FlatPredictor(_BundleBase):
    """The flat baseline of a bundle (one softmax over all leaves), for comparison."""

    def __init__(self, bundle_dir: str | Path, *, threads: int = 1, verify: bool = True, session_options=None):
        super().__init__(bundle_dir, threads=threads, verify=verify, session_options=session_options)
        entry = self.manifest.get("flat")
        if not entry:
            raise BundleError(f"{self.bundle_dir} has no flat model (export with include_flat=True)")
        k = len(entry.get("outputs") or range(int(entry["num_outputs"])))
        if k != self.tree.num_classes:
            raise BundleError(f"the flat model gives {k} outputs but the tree has {self.tree.num_classes} leaves")
        self._entry = entry
        self._session = None

    def session(self):
        if self._session is None:
            self._session = self._new_session(self._entry, "flat model")
        return self._session

    def logits(self, x: np.ndarray) -> np.ndarray:
        """Logits over this bundle's classes (class ids of the bundle's tree)."""
        return self._logits(self.session(), self.input_name, self.preprocess(x), self._entry)

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        return _softmax(self.logits(x))

    def predict(self, x: np.ndarray, *, threshold: float | None = None) -> tuple[np.ndarray, np.ndarray]:
        """``(nodes, probability)`` through :func:`edgehmoe.core.routing.flat_decode`: the argmax
        leaf, or with ``threshold`` the deepest node on its path whose summed leaf probability
        is >= threshold."""
        return routing.flat_decode(self.tree, self.predict_proba(x), threshold)

    def predict_until(self, x: np.ndarray, tau: float) -> tuple[np.ndarray, np.ndarray]:
        """Deepest node on the argmax leaf's path whose summed leaf probability is ≥ ``tau``."""
        return self.predict(x, threshold=tau)

    def close(self) -> None:
        self._session = None

