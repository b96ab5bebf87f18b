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

A bundle may also hold *fused graphs* (:mod:`edgehmoe.export.fuse`) that run the whole greedy
descent of a batch in one ONNX Runtime call; the predictor then reads every expert's logits
from that call and still decodes through :func:`~edgehmoe.core.routing.decode`, so greedy,
beam and thresholded results are those of the expert-by-expert chain. int8 bundles
(``export --quantize int8``) run through the same code: ONNX Runtime executes their QDQ graphs.

Per image, the cost beyond ONNX Runtime is kept small: preprocessing is a per-channel lookup
table (bit for bit :func:`preprocess`), expert sessions are called through the C++ session
directly, and a one-image descent takes :mod:`edgehmoe.core.routing`'s scalar path.

This module imports numpy and onnxruntime only (plus the numpy core of edgehmoe): it works on
a device without torch. Session defaults (one intra-op thread, sequential execution, CPU
memory arena and memory pattern off, all graph optimisations) were chosen by measurement for
these small convolutional models; see ``docs/inference.md``.
"""

from __future__ import annotations

import logging
from collections import Counter, OrderedDict
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from edgehmoe.core import routing
from edgehmoe.core.hierarchy import Hierarchy
from edgehmoe.edge.manifest import (
    FUSED_KINDS,
    BundleError,
    bundle_entries,
    check_file,
    check_onnx_bytes,
    fused_graphs,
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
    "FUSED_MODES",
    "BundlePredictor",
    "FlatPredictor",
    "make_session_options",
    "preprocess",
    "preprocess_table",
    "softmax_rows",
]

# How BundlePredictor uses a bundle's fused graphs: "auto" when present and up to date,
# "on" requires them, "off" runs one session per expert (the reference chain).
FUSED_MODES = ("auto", "on", "off")

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


def preprocess_table(mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """``(C, 256)`` float32 table of :func:`preprocess`'s value for every uint8 value and channel.

    Each entry is computed with exactly the float32 operations :func:`preprocess` applies to
    that value, so looking pixels up gives the same bits at a fraction of the cost
    (≈ 10 vs 16 µs for one 32x32 image, 0.1 vs 0.34 ms for 32, on the x86 dev machine).
    """
    v = np.arange(256, dtype=np.float32)
    v /= np.float32(255.0)
    m = np.asarray(mean, dtype=np.float32).reshape(-1, 1)
    s = np.asarray(std, dtype=np.float32).reshape(-1, 1)
    return np.ascontiguousarray((v[None, :] - m) / s)


def softmax_rows(z: np.ndarray) -> np.ndarray:
    """Row softmax in float64 (in place on a fresh copy: the same operations as
    ``e = exp(z - max); e / sum(e)``, hence the same bits, with fewer allocations)."""
    z = np.array(z, dtype=np.float64)
    z -= z.max(axis=1, keepdims=True)
    np.exp(z, out=z)
    z /= z.sum(axis=1, keepdims=True)
    return z


def _rows(xp: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """``xp[idx]``, without the copy when ``idx`` takes every row in order (one image, or
    a batch still all at one node)."""
    n = len(xp)
    if len(idx) == n and (n == 1 or (idx[0] == 0 and idx[-1] == n - 1 and bool((idx[1:] > idx[:-1]).all()))):
        return xp
    return xp[idx]


def _runner(sess):
    """``run(feed) -> list of outputs`` of a session. Calls ONNX Runtime's C++ session
    directly when the binding exposes it, skipping the Python wrapper's per-call checks
    (≈ 1.5 µs of a 35 µs expert run); the public ``run`` otherwise."""
    names = [o.name for o in sess.get_outputs()]
    inner = getattr(sess, "_sess", None)
    if inner is not None and callable(getattr(inner, "run", None)):
        return lambda feed: inner.run(names, feed, None)
    return lambda feed: sess.run(names, feed)


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
        if len(self.mean) != self.image_shape[2] or len(self.std) != self.image_shape[2]:
            raise BundleError(f"{self.bundle_dir}: preprocess mean/std must give one value per channel "
                              f"({self.image_shape[2]}); re-export the bundle")
        self._table = preprocess_table(self.mean, self.std)
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
        """Checked uint8 NHWC images → the networks' float32 NCHW input; bit for bit
        :func:`preprocess`, through a per-channel lookup table."""
        xt = self.check_input(x).transpose(0, 3, 1, 2)
        out = np.empty(xt.shape, dtype=np.float32)
        for c in range(xt.shape[1]):
            np.take(self._table[c], xt[:, c], out=out[:, c])
        return out

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
        fused: use the bundle's fused graphs (:mod:`edgehmoe.export.fuse`) for greedy and
            thresholded descent: ``"auto"`` (default) when the bundle has up-to-date ones,
            ``"on"`` to require them, ``"off"`` for one session per expert.
        max_batch: an expert session runs on at most this many images at a time (``0``: all
            the samples at its node at once). Bounds activation memory, which the C
            allocator keeps after a run: see ``docs/inference.md`` for the measured trade.

    All ``predict_*`` methods take uint8 images ``(N, H, W, 3)`` and work batch-wise: the
    samples sitting at the same node are grouped, so each expert runs once per level. With
    fused graphs the whole greedy descent of a batch is one ONNX Runtime call (the ``path``
    graph for one image, the ``tree`` graph for more); their logits feed the same
    :func:`edgehmoe.core.routing.decode`, and an expert they did not run (beam search
    leaving the greedy path) falls back to its own session.
    """

    def __init__(
        self,
        bundle_dir: str | Path,
        *,
        max_sessions: int = 32,
        threads: int = 1,
        verify: bool = True,
        session_options=None,
        fused: str = "auto",
        max_batch: int = 0,
    ):
        super().__init__(bundle_dir, threads=threads, verify=verify, session_options=session_options)
        if fused not in FUSED_MODES:
            raise UsageError(f"unknown fused mode {fused!r}; valid: {', '.join(FUSED_MODES)}")
        if isinstance(max_batch, bool) or int(max_batch) != max_batch or max_batch < 0:
            raise UsageError(f"max_batch must be an integer >= 0 (0 = no limit), got {max_batch!r}")
        self.max_batch = int(max_batch)
        self.max_sessions = int(max_sessions)
        self._experts = {int(k): v for k, v in self.manifest["experts"].items()}
        self._sessions: OrderedDict[int, tuple] = OrderedDict()
        self._width = {n: int(self.tree.num_children[n]) for n in self._experts}
        self._fused_entries: dict[str, dict] = {}
        if fused != "off":
            self._fused_entries = fused_graphs(self.manifest)
            if self.manifest.get("fused") and not self._fused_entries:
                logger.warning("%s: its fused graphs were built from other expert files; using one session per "
                               "expert (re-export the bundle to rebuild them)", self.bundle_dir)
            if fused == "on" and not self._fused_entries:
                raise BundleError(f"{self.bundle_dir} has no up-to-date fused graphs; re-export it with "
                                  "`edgehmoe export` (fused graphs are written by default)")
        self._fused_sessions: dict[str, object] = {}
        self._fused_outputs: dict[str, tuple] = {}
        self.expert_calls = 0  # expert evaluations (one expert on the samples at its node)
        self.session_runs = 0  # ONNX Runtime calls made for the chain
        self.expert_samples: Counter = Counter()  # node -> samples its expert has run on

    # ------------------------------------------------------------ sessions
    def session(self, node: int):
        """The session of ``node``'s expert, created on first use (LRU-cached)."""
        return self._live(int(node))[0]

    def _live(self, node: int) -> tuple:
        """``(session, runner)`` of ``node``'s expert, created on first use (LRU-cached)."""
        live = self._sessions.get(node)
        if live is not None:
            if self.max_sessions > 0:
                self._sessions.move_to_end(node)
            return live
        if node not in self._experts:
            raise BundleError(f"node {node} ({self.tree.names[node]!r}) has no expert in this bundle")
        sess = self._new_session(self._experts[node], f"expert {node} {self.tree.names[node]!r}")
        live = self._sessions[node] = (sess, _runner(sess))
        while self.max_sessions > 0 and len(self._sessions) > self.max_sessions:
            old, _ = self._sessions.popitem(last=False)
            logger.debug("closed session of expert %s (LRU, max_sessions=%s)", old, self.max_sessions)
        return live

    @property
    def loaded_experts(self) -> list[int]:
        """Nodes whose sessions are alive, least recently used first."""
        return list(self._sessions)

    @property
    def fused_kinds(self) -> list[str]:
        """The fused graphs this predictor uses (``path``, ``tree``), if any."""
        return [k for k in FUSED_KINDS if k in self._fused_entries]

    @property
    def loaded_fused(self) -> list[str]:
        """Fused graphs whose sessions are alive."""
        return list(self._fused_sessions)

    def close(self) -> None:
        """Drop every session (they are recreated on demand)."""
        self._sessions.clear()
        self._fused_sessions.clear()

    # ------------------------------------------------------------ experts
    def expert_logits(self, node: int, xp: np.ndarray) -> np.ndarray:
        """Logits of ``node``'s expert on preprocessed float32 NCHW input ``xp``."""
        node = int(node)
        self.expert_calls += 1
        self.expert_samples[node] += len(xp)
        run = self._live(node)[1]
        step = self.max_batch if 0 < self.max_batch < len(xp) else len(xp)
        if step == len(xp):
            self.session_runs += 1
            out = run({self.input_name: xp})[0]
        else:  # bounded activation memory: at most max_batch images per run
            parts = [run({self.input_name: xp[i : i + step]})[0] for i in range(0, len(xp), step)]
            self.session_runs += len(parts)
            out = np.concatenate(parts)
        sel = self._experts[node].get("outputs")
        return out[:, sel] if sel is not None else out

    def fused_kind(self, num_samples: int) -> str | None:
        """The fused graph a greedy descent of ``num_samples`` images uses, or ``None``."""
        if num_samples == 1 and "path" in self._fused_entries:
            return "path"
        if "tree" in self._fused_entries:
            return "tree"
        return None

    def fused_rows(self, xp: np.ndarray, kind: str) -> dict[int, tuple[np.ndarray, np.ndarray]]:
        """Run fused graph ``kind`` on preprocessed ``xp``: for every expert it ran, ``node ->
        (samples, logits)`` (sample indices ascending, logits over the node's children)."""
        sess = self._fused_sessions.get(kind)
        if sess is None:
            if kind not in self._fused_entries:
                raise BundleError(f"{self.bundle_dir} has no fused {kind!r} graph")
            sess = self._new_session(self._fused_entries[kind], f"fused {kind} graph")
            self._fused_sessions[kind] = sess
            self._fused_outputs[kind] = ([o.name for o in sess.get_outputs()], _runner(sess))
        if kind == "path" and len(xp) != 1:
            raise BundleError(f"the fused path graph takes one image; got {len(xp)}")
        names, run = self._fused_outputs[kind]
        out = dict(zip(names, run({"input": xp})))
        self.session_runs += 1
        nodes, logits = out["node"], out["logits"]
        rows: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        if kind == "path":
            one = np.zeros(1, dtype=np.int64)
            for i, n in enumerate(nodes.tolist()):
                rows[n] = (one, logits[i : i + 1, : self._width[n]].copy())
        else:
            samples = out["sample"]
            cuts = np.flatnonzero(nodes[1:] != nodes[:-1]) + 1
            for a, b in zip([0, *cuts.tolist()], [*cuts.tolist(), len(nodes)]):
                n = int(nodes[a])
                rows[n] = (samples[a:b], np.ascontiguousarray(logits[a:b, : self._width[n]]))
        self.expert_calls += len(rows)
        for n, (smp, _) in rows.items():
            self.expert_samples[n] += len(smp)
        return rows

    def expert_probs_fn(self, xp: np.ndarray, record: dict | None = None, *, kind: str | None = "auto") -> routing.ExpertProbs:
        """The ``expert_probs(node, idx)`` callable of :mod:`edgehmoe.core.routing` over
        preprocessed ``xp``.

        ``kind`` picks a fused graph (``"auto"``: :meth:`fused_kind`; ``None``: one session per
        expert): on the first call the graph runs the greedy descent of the whole batch, and
        each call returns its logits' softmax for the requested samples; samples or experts
        the graph did not run (beam search off the greedy path) use the expert's own session.
        With ``record``, each node's probabilities are also stored there (``record[node]`` is
        an ``(N, k)`` array, NaN where the node did not run) to explain the path afterwards
        (:func:`edgehmoe.core.routing.explain_paths`).
        """
        if kind == "auto":
            kind = self.fused_kind(len(xp))
        if kind is None:

            def fn(node: int, idx: np.ndarray) -> np.ndarray:
                return softmax_rows(self.expert_logits(node, _rows(xp, idx)))

        else:
            cache: list[dict] = []

            def fn(node: int, idx: np.ndarray) -> np.ndarray:
                if not cache:
                    cache.append(self.fused_rows(xp, kind))
                hit = cache[0].get(int(node))
                if hit is not None:
                    samples, logits = hit
                    if len(samples) == len(idx) and (
                        samples[0] == idx[0] if len(idx) == 1 else bool((samples == idx).all())
                    ):
                        return softmax_rows(logits)
                    pos = np.searchsorted(samples, idx)
                    if len(samples) and (pos < len(samples)).all() and np.array_equal(samples[pos], idx):
                        return softmax_rows(logits[pos])
                return softmax_rows(self.expert_logits(node, _rows(xp, idx)))

        return fn if record is None else routing.record_expert_probs(fn, len(xp), record)

    def expert_probs(self, x: np.ndarray, *, fused: bool = True) -> routing.ExpertProbs:
        """``expert_probs(node, idx)`` over uint8 images ``x`` (checked and preprocessed once);
        ``fused=False`` runs one session per expert (what beam search wants)."""
        return self.expert_probs_fn(self.preprocess(x), kind="auto" if fused else None)

    # ------------------------------------------------------------ prediction
    def predict(self, x: np.ndarray, *, beam: int = 1, threshold: float | None = None) -> tuple[np.ndarray, np.ndarray]:
        """``(nodes, path_probability)`` through :func:`edgehmoe.core.routing.decode`:
        thresholded descent if ``threshold`` is given, else beam (``beam > 1``) or greedy."""
        routing.check_decode(beam, threshold)
        return routing.decode(self.tree, len(x), self.expert_probs(x, fused=beam == 1), beam=beam, threshold=threshold)

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
        routing.check_decode(beam, threshold)
        xp = self.preprocess(x)
        record: dict[int, np.ndarray] = {}
        fn = self.expert_probs_fn(xp, record, kind="auto" if beam == 1 else None)
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
        return softmax_rows(self.logits(x))

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

