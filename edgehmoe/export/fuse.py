"""Fused graphs of a bundle: the greedy descent through every expert in one ONNX Runtime call.

A bundle holds one ``.onnx`` file per expert; predicting one image then costs one session run
(plus Python routing) per level. This module composes the expert files of a bundle — whatever
they hold, fp32 or int8 — into two extra graphs that run the whole greedy descent inside ONNX
Runtime, so a device makes one call per batch:

- ``fused/path.onnx`` (**batch 1**): runs the root expert, takes the argmax child and
  continues into that child's expert through nested ``If`` nodes (a binary search over the
  children that have experts), down to a leaf. Only the experts on the image's path run.
- ``fused/tree.onnx`` (**any batch**): level by level, every expert whose node holds at
  least one sample (``If`` guarded) gathers those samples, runs, and scatters each sample's
  next node (``ScatterElements``). Each expert runs once per level on all of its samples,
  exactly as :func:`edgehmoe.core.routing.decode` groups them.

Both graphs take the preprocessed float32 NCHW input named ``input`` and return the rows of
every expert evaluation: ``node`` (R,) int64, the expert; ``logits`` (R, K) float32, its
logits over the used outputs (``outputs`` of a subset bundle), NaN-padded to the widest
expert ``K``; and (tree graph) ``sample`` (R,) int64, the sample it ran on. Rows of one
node are contiguous, samples ascending. The runtime (:mod:`edgehmoe.edge.runtime`) turns
them into the ``expert_probs(node, idx)`` callable of :mod:`edgehmoe.core.routing`, so every
decode rule still runs through the one decode path; the computation inside each expert is
the same ONNX nodes on the same batch, so the logits equal the separate sessions' bit for
bit (checked by :func:`check_fused` when a bundle is written).

The manifest records them under ``fused`` (see :mod:`edgehmoe.edge.manifest`) together with
the sha256 and used outputs of every expert they were built from, so a runtime never uses
fused graphs that do not match the experts next to them. Needs ``onnx`` (the ``train`` extra); building
happens on the laptop, the device only runs the files.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import numpy as np

from edgehmoe.core.hierarchy import Hierarchy
from edgehmoe.edge.manifest import FUSED_KINDS, FUSED_VERSION, BundleError, fused_fingerprint

__all__ = ["FusedParityError", "build_fused", "build_path_graph", "build_tree_graph", "check_fused", "fused_entry"]

logger = logging.getLogger(__name__)


class FusedParityError(BundleError):
    """A fused graph does not reproduce the separate expert sessions."""


def _onnx():
    try:
        import onnx
    except ImportError:  # pragma: no cover - onnx is in the train extra
        from edgehmoe.errors import MissingDependency

        raise MissingDependency("building fused graphs needs onnx: pip install 'edgehmoe[train]'") from None
    return onnx


# ---------------------------------------------------------------------- graph pieces
class _Builder:
    """Accumulates the nodes and initializers of one (sub)graph with unique names."""

    def __init__(self, owner: "_Namer"):
        self.nodes: list = []
        self.inits: list = []
        self.namer = owner

    def const(self, array: np.ndarray, hint: str) -> str:
        from onnx import numpy_helper

        name = self.namer.fresh(hint)
        self.inits.append(numpy_helper.from_array(np.asarray(array), name))
        return name

    def node(self, op: str, inputs: list[str], hint: str, n_out: int = 1, **attrs) -> list[str]:
        from onnx import helper

        outs = [self.namer.fresh(f"{hint}_{i}" if n_out > 1 else hint) for i in range(n_out)]
        self.nodes.append(helper.make_node(op, inputs, outs, name=self.namer.fresh(f"{op}_{hint}"), **attrs))
        return outs

    def graph(self, name: str, outputs: list[tuple[str, int, list]]):
        from onnx import helper

        outs = [helper.make_tensor_value_info(n, t, s) for n, t, s in outputs]
        return helper.make_graph(self.nodes, self.namer.fresh(name), [], outs, initializer=self.inits)


class _Namer:
    def __init__(self):
        self.count = 0

    def fresh(self, hint: str) -> str:
        self.count += 1
        return f"{hint}__{self.count}"


def _embed(b: _Builder, model, prefix: str, input_name: str) -> str:
    """Copy the nodes and initializers of a one-input, one-output expert graph into ``b``,
    renamed under ``prefix``, reading ``input_name``. Returns the name of its output."""
    onnx = _onnx()
    g = model.graph
    if len(g.input) != 1 or len(g.output) != 1:
        raise BundleError(f"an expert graph must have one input and one output; got {len(g.input)} and {len(g.output)}")
    rename = {g.input[0].name: input_name}
    for t in g.initializer:
        t2 = onnx.TensorProto()
        t2.CopyFrom(t)
        t2.name = prefix + t.name
        rename[t.name] = t2.name
        b.inits.append(t2)
    if len(g.sparse_initializer):
        raise BundleError("expert graphs with sparse initializers cannot be fused")
    for i, n in enumerate(g.node):
        if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in n.attribute):
            raise BundleError(f"expert node {n.name or n.op_type} holds a subgraph; such experts cannot be fused")
        n2 = onnx.NodeProto()
        n2.CopyFrom(n)
        n2.name = f"{prefix}{i}:{n.name or n.op_type}"  # unique even where the expert leaves names empty
        del n2.input[:]
        del n2.output[:]
        n2.input.extend([rename.get(i, i) if i else i for i in n.input])
        for o in n.output:
            if o:
                rename[o] = prefix + o
        n2.output.extend([rename[o] if o else o for o in n.output])
        b.nodes.append(n2)
    return rename[g.output[0].name]


def _restricted_logits(b: _Builder, logits: str, outputs: list[int] | None, node: int) -> str:
    """The logit columns the runtime uses (a subset bundle's ``outputs``), as the runtime
    would select them."""
    if outputs is None:
        return logits
    cols = b.const(np.asarray(outputs, dtype=np.int64), f"cols{node}")
    return b.node("Gather", [logits, cols], f"used{node}", axis=1)[0]


# ---------------------------------------------------------------------- path graph (batch 1)
def build_path_graph(tree: Hierarchy, experts: dict, outputs: dict, image_shape, width: int):
    """The batch-1 greedy descent: ``input`` (1, C, H, W) → ``node`` (R,), ``logits`` (R, width).

    ``experts`` maps internal node → its ``onnx.ModelProto``; ``outputs`` maps node → the
    used logit columns or ``None``.
    """
    onnx = _onnx()
    from onnx import TensorProto, helper

    namer = _Namer()

    def block(b: _Builder, n: int) -> tuple[str, str]:
        lg = _restricted_logits(b, _embed(b, experts[n], f"e{n}/", "input"), outputs.get(n), n)
        k = int(tree.num_children[n])
        row = lg
        if width > k:
            row = b.node("Concat", [lg, b.const(np.full((1, width - k), np.nan, np.float32), f"nan{n}")],
                         f"row{n}", axis=1)[0]
        best = b.node("ArgMax", [lg], f"best{n}", axis=1, keepdims=0)[0]  # (1,), first index on ties
        kids = tree.children(n)
        internal = [i for i, c in enumerate(kids) if not tree.is_leaf[c]]
        tail_nodes, tail_logits = switch(b, n, kids, internal, best, 0, len(kids))
        me = b.const(np.array([n], dtype=np.int64), f"id{n}")
        if tail_nodes is None:
            return b.node("Identity", [me], f"nodes{n}")[0], b.node("Identity", [row], f"rows{n}")[0]
        nodes = b.node("Concat", [me, tail_nodes], f"nodes{n}", axis=0)[0]
        rows = b.node("Concat", [row, tail_logits], f"rows{n}", axis=0)[0]
        return nodes, rows

    def branch(n: int, kids, positions: list[int], best: str, lo: int, hi: int):
        sub = _Builder(namer)
        if positions:
            a, c = switch(sub, n, kids, positions, best, lo, hi)
        else:
            a, c = None, None
        if a is None:  # only leaves here: the descent ends
            a = sub.node("Constant", [], "no_nodes", value=helper.make_tensor("v", TensorProto.INT64, [0], []))[0]
            c = sub.node("Constant", [], "no_rows", value=helper.make_tensor("v", TensorProto.FLOAT, [0, width], []))[0]
        else:
            a = sub.node("Identity", [a], "out_nodes")[0]
            c = sub.node("Identity", [c], "out_rows")[0]
        return sub.graph(f"branch{n}", [(a, TensorProto.INT64, [None]), (c, TensorProto.FLOAT, [None, width])])

    def switch(b: _Builder, n: int, kids, positions: list[int], best: str, lo: int, hi: int):
        """Continue into child ``best``, known to lie in ``[lo, hi)``, among the child
        positions ``positions`` (those with an expert); leaves end the descent."""
        if not positions:
            return None, None
        if len(positions) == 1 and hi - lo == 1:  # the only child left: no test needed
            return block(b, int(kids[positions[0]]))
        if len(positions) == 1:
            cond = b.node("Equal", [best, b.const(np.array([positions[0]], np.int64), "pos")], "is")[0]
            then_g = _Builder(namer)
            tn, tl = block(then_g, int(kids[positions[0]]))
            tn = then_g.node("Identity", [tn], "out_nodes")[0]
            tl = then_g.node("Identity", [tl], "out_rows")[0]
            then_graph = then_g.graph(f"then{n}", [(tn, TensorProto.INT64, [None]), (tl, TensorProto.FLOAT, [None, width])])
            else_graph = branch(n, kids, [], best, lo, hi)
        else:
            half = len(positions) // 2
            split = positions[half]
            cond = b.node("Less", [best, b.const(np.array([split], np.int64), "split")], "lt")[0]
            then_graph = branch(n, kids, positions[:half], best, lo, split)
            else_graph = branch(n, kids, positions[half:], best, split, hi)
        cond = b.node("Squeeze", [cond], "cond")[0]
        return tuple(b.node("If", [cond], f"sw{n}", n_out=2, then_branch=then_graph, else_branch=else_graph))

    b = _Builder(namer)
    nodes, rows = block(b, 0)
    h, w, c = (int(v) for v in image_shape)
    b.nodes.append(helper.make_node("Identity", [nodes], ["node"], name="out_node"))
    b.nodes.append(helper.make_node("Identity", [rows], ["logits"], name="out_logits"))
    graph = helper.make_graph(
        b.nodes, "edgehmoe_fused_path",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, c, h, w])],
        [helper.make_tensor_value_info("node", TensorProto.INT64, ["rows"]),
         helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["rows", width])],
        initializer=b.inits,
    )
    return _model(onnx, graph, experts, "edgehmoe fused greedy path (batch 1)")


# ---------------------------------------------------------------------- tree graph (any batch)
def build_tree_graph(tree: Hierarchy, experts: dict, outputs: dict, image_shape, width: int):
    """Level-synchronous greedy descent of a whole batch: ``input`` (N, C, H, W) →
    ``node`` (R,), ``sample`` (R,), ``logits`` (R, width)."""
    onnx = _onnx()
    from onnx import TensorProto, helper

    namer = _Namer()
    b = _Builder(namer)
    n_shape = b.node("Shape", ["input"], "n", start=0, end=1)[0]
    at = b.node("ConstantOfShape", [n_shape], "at0", value=helper.make_tensor("v", TensorProto.INT64, [1], [0]))[0]
    zero_axis = b.const(np.array([0], np.int64), "axis0")
    all_nodes, all_samples, all_rows = [], [], []
    internal = [int(n) for n in tree.internal_nodes]
    depths = sorted({int(tree.depths[n]) for n in internal})
    for level, d in enumerate(depths):
        lv_nodes, lv_samples, lv_next, lv_rows = [], [], [], []
        for n in (m for m in internal if int(tree.depths[m]) == d):
            k = int(tree.num_children[n])
            kids = b.const(tree.children(n).astype(np.int64), f"kids{n}")
            if n == 0:
                # Every sample starts at the root: no guard, no gather.
                count = b.node("Squeeze", [n_shape, zero_axis], "count")[0]
                idx = b.node("Range", [b.const(np.array(0, np.int64), "start"), count,
                                       b.const(np.array(1, np.int64), "step")], "idx0")[0]
                outs = _expert_rows(b, experts[0], outputs.get(0), 0, k, width, "input", idx, kids)
            else:
                mask = b.node("Equal", [at, b.const(np.array(n, np.int64), f"id{n}")], f"m{n}")[0]
                count = b.node("ReduceMax", [b.node("Cast", [mask], f"mi{n}", to=TensorProto.INT64)[0]], f"c{n}", keepdims=0)[0]
                cond = b.node("Greater", [count, b.const(np.array(0, np.int64), "zero")], f"any{n}")[0]
                then_b = _Builder(namer)
                idx = then_b.node("Squeeze", [then_b.node("NonZero", [mask], f"nz{n}")[0], zero_axis], f"idx{n}")[0]
                xs = then_b.node("Gather", ["input", idx], f"x{n}", axis=0)[0]
                outs = _expert_rows(then_b, experts[n], outputs.get(n), n, k, width, xs, idx, kids)
                outs = [then_b.node("Identity", [o], f"o{n}")[0] for o in outs]
                types = [TensorProto.INT64, TensorProto.INT64, TensorProto.INT64, TensorProto.FLOAT]
                shapes = [[None], [None], [None], [None, width]]
                then_graph = then_b.graph(f"then{n}", list(zip(outs, types, shapes)))
                else_b = _Builder(namer)
                empty = [
                    else_b.node("Constant", [], f"e{i}", value=helper.make_tensor("v", t, [0] + ([width] if i == 3 else []), []))[0]
                    for i, t in enumerate(types)
                ]
                else_graph = else_b.graph(f"else{n}", list(zip(empty, types, shapes)))
                outs = b.node("If", [cond], f"run{n}", n_out=4, then_branch=then_graph, else_branch=else_graph)
            for lst, o in zip((lv_nodes, lv_samples, lv_next, lv_rows), outs):
                lst.append(o)
        cat = (lambda xs, h: xs[0] if len(xs) == 1 else b.node("Concat", xs, h, axis=0)[0])
        samples, nxt = cat(lv_samples, f"samples_d{d}"), cat(lv_next, f"next_d{d}")
        all_nodes.append(cat(lv_nodes, f"nodes_d{d}"))
        all_samples.append(samples)
        all_rows.append(cat(lv_rows, f"rows_d{d}"))
        if level < len(depths) - 1:
            at = b.node("ScatterElements", [at, samples, nxt], f"at{d + 1}", axis=0)[0]
    for name, parts in (("node", all_nodes), ("sample", all_samples), ("logits", all_rows)):
        op = "Concat" if len(parts) > 1 else "Identity"
        kw = {"axis": 0} if len(parts) > 1 else {}
        b.nodes.append(helper.make_node(op, parts, [name], name=f"out_{name}", **kw))
    h, w, c = (int(v) for v in image_shape)
    graph = helper.make_graph(
        b.nodes, "edgehmoe_fused_tree",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", c, h, w])],
        [helper.make_tensor_value_info("node", TensorProto.INT64, ["rows"]),
         helper.make_tensor_value_info("sample", TensorProto.INT64, ["rows"]),
         helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["rows", width])],
        initializer=b.inits,
    )
    return _model(onnx, graph, experts, "edgehmoe fused greedy tree (any batch)")


def _expert_rows(b: _Builder, model, outputs, n: int, k: int, width: int, xs: str, idx: str, kids: str):
    """Run expert ``n`` on ``xs`` (the samples ``idx``): ``[node column, idx, next node, padded logits]``."""
    lg = _restricted_logits(b, _embed(b, model, f"e{n}/", xs), outputs, n)
    best = b.node("ArgMax", [lg], f"best{n}", axis=1, keepdims=0)[0]
    nxt = b.node("Gather", [kids, best], f"next{n}", axis=0)[0]
    rows = lg
    if width > k:
        pads = b.const(np.array([0, 0, 0, width - k], np.int64), f"pads{n}")
        nan = b.const(np.array(np.nan, np.float32), "nan")
        rows = b.node("Pad", [lg, pads, nan], f"rows{n}", mode="constant")[0]
    col = b.node("Expand", [b.const(np.array([n], np.int64), f"id{n}"), b.node("Shape", [idx], f"len{n}")[0]],
                 f"col{n}")[0]
    return [col, idx, nxt, rows]


def _model(onnx, graph, experts: dict, doc: str):
    from onnx import helper

    opsets: dict[str, int] = {}
    ir = 8
    for m in experts.values():
        ir = max(ir, int(m.ir_version))
        for o in m.opset_import:
            dom = o.domain or ""
            opsets[dom] = max(opsets.get(dom, 0), int(o.version))
    opsets[""] = max(opsets.get("", 0), 13)  # Squeeze/ReduceMax/Pad with tensor inputs need 13+
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid(d, v) for d, v in sorted(opsets.items())])
    model.ir_version = ir
    model.producer_name = "edgehmoe"
    model.doc_string = doc
    onnx.checker.check_model(model)
    return model


# ---------------------------------------------------------------------- bundle level
def fused_entry(file: str, data: bytes, kind: str, batch) -> dict:
    return {"file": file, "sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data), "batch": batch,
            "kind": kind}


def build_fused(bundle_dir: str | Path, manifest: dict, kinds=FUSED_KINDS) -> dict:
    """Write the fused graphs of a bundle folder whose expert files and ``manifest`` are final;
    returns the manifest's ``fused`` entry (the caller writes the manifest)."""
    onnx = _onnx()
    bundle_dir = Path(bundle_dir)
    tree = Hierarchy.from_dict(manifest["hierarchy"])
    bad = [k for k in kinds if k not in FUSED_KINDS]
    if bad:
        raise BundleError(f"unknown fused graph kind(s) {bad}; valid: {', '.join(FUSED_KINDS)}")
    experts, outputs = {}, {}
    for key, e in manifest["experts"].items():
        experts[int(key)] = onnx.load_from_string((bundle_dir / e["file"]).read_bytes())
        outputs[int(key)] = e.get("outputs")
    width = int(tree.num_children.max())
    shape = manifest["input"]["image_shape"]
    graphs = {}
    (bundle_dir / "fused").mkdir(exist_ok=True)
    for kind in kinds:
        builder = build_path_graph if kind == "path" else build_tree_graph
        data = builder(tree, experts, outputs, shape, width).SerializeToString()
        rel = f"fused/{kind}.onnx"
        (bundle_dir / rel).write_bytes(data)
        graphs[kind] = fused_entry(rel, data, kind, 1 if kind == "path" else "any")
        logger.info("fused %s graph over %d experts: %d bytes", kind, len(experts), len(data))
    return {
        "version": FUSED_VERSION,
        "width": width,
        "graphs": graphs,
        "built_from": fused_fingerprint(manifest),
    }


def check_fused(bundle_dir: str | Path, x: np.ndarray, *, atol: float = 0.0) -> dict:
    """Run the bundle's fused graphs and its separate expert sessions on uint8 images ``x``
    (each image alone through the path graph, all together through the tree graph) and
    require equal routing and logits within ``atol`` (0: bit for bit). Returns a report."""
    from edgehmoe.core import routing
    from edgehmoe.edge.runtime import BundlePredictor

    ref = BundlePredictor(bundle_dir, max_sessions=0, fused="off")
    fused = BundlePredictor(bundle_dir, max_sessions=0, fused="on")
    xp = ref.preprocess(x)
    report: dict = {"samples": int(len(x)), "atol": atol}
    ref_nodes, _ = routing.decode(ref.tree, len(x), ref.expert_probs_fn(xp))
    worst = 0.0
    for kind in fused.fused_kinds:
        batches = [np.arange(i, i + 1) for i in range(len(x))] if kind == "path" else [np.arange(len(x))]
        got_nodes = np.empty(len(x), dtype=np.int64)
        for idx in batches:
            rows = fused.fused_rows(xp[idx], kind)
            for node, (samples, logits) in rows.items():
                want = ref.expert_logits(node, xp[idx][samples])
                d = float(np.abs(want - logits).max()) if len(samples) else 0.0
                worst = max(worst, d)
                if not d <= atol:
                    raise FusedParityError(
                        f"fused {kind} graph: expert {node} logits differ from its own session by {d:.3g} (> {atol:g}); "
                        "rebuild the bundle"
                    )
            got_nodes[idx], _ = routing.decode(fused.tree, len(idx), fused.expert_probs_fn(xp[idx], kind=kind))
        if not np.array_equal(got_nodes, ref_nodes):
            raise FusedParityError(f"fused {kind} graph: greedy predictions differ from the expert sessions on "
                                   f"{int((got_nodes != ref_nodes).sum())} of {len(x)} images")
        report[f"{kind}_greedy_equal"] = int(len(x))
    report["max_abs_diff"] = worst
    return report
