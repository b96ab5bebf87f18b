"""Grow a trained hierarchical model: new classes under a node, or a new sub-tree.

An LCPN expert only knows its own children. When the tree changes, an expert whose node and
ordered list of children (by name) are unchanged computes exactly what it computed before,
so its weights are copied byte for byte; only new internal nodes and the parents whose
children changed are trained (with :func:`edgehmoe.model.central.fit_hmoe`, the same code path as
central training). Nodes are matched by name.

Child order matters: output ``i`` of an expert is its ``i``-th child. Write new children
*after* the old ones in the new tree's CSV (``from_edge_list`` keeps CSV order); a node whose
children were reordered is retrained, never silently permuted.

Ancestors of a changed node are reused by default, as the issue asks: they never saw images
of the new classes but route them by what they look like (a new vehicle usually looks like a
vehicle). ``retrain_ancestors=True`` retrains them too when that is not enough.
The new model keeps the old preprocessing (mean/std), since reused experts were trained
with it. The flat baseline's output layer depends on the class set, so it is copied only
when the classes are unchanged, and dropped otherwise (retrain it with ``edgehmoe fit``).
"""

from __future__ import annotations

import hashlib
import logging
import shutil
from pathlib import Path

import numpy as np

from edgehmoe.core.checkpoint import CheckpointError, NetworkEntry, read_model_dir
from edgehmoe.core.hierarchy import Hierarchy, read_edge_csv
from edgehmoe.errors import UsageError

__all__ = ["plan_extension", "extend_model"]

logger = logging.getLogger(__name__)


def _children_names(tree: Hierarchy, node: int) -> list[str]:
    return [tree.names[c] for c in tree.children(node)]


def plan_extension(old: Hierarchy, new: Hierarchy, has_expert=None, retrain_ancestors: bool = False) -> dict[int, str]:
    """For every internal node of ``new``: ``"reuse:<old node>"`` or the reason it must be trained.

    ``has_expert(old_node) -> bool`` says whether the old model holds that expert (default: all).
    """
    plan: dict[int, str] = {}
    for n in new.internal_nodes.tolist():
        name = new.names[n]
        if name not in old.names:
            plan[n] = "new node"
            continue
        o = old.index(name)
        if old.is_leaf[o]:
            plan[n] = "was a leaf, now has children"
            continue
        if has_expert is not None and not has_expert(o):
            plan[n] = "no expert in the old model"
            continue
        before, after = _children_names(old, o), _children_names(new, n)
        if before == after:
            plan[n] = f"reuse:{o}"
        elif sorted(before) == sorted(after):
            plan[n] = "children reordered (output indices would change)"
        else:
            added = [c for c in after if c not in before]
            removed = [c for c in before if c not in after]
            parts = ([f"added {', '.join(added[:5])}"] if added else []) + (
                [f"removed {', '.join(removed[:5])}"] if removed else [])
            plan[n] = "children changed (" + "; ".join(parts or ["order"]) + ")"
    if retrain_ancestors:
        changed = [n for n, r in plan.items() if not r.startswith("reuse:")]
        for n in changed:
            for a in new.path(n)[:-1]:
                if plan[a].startswith("reuse:"):
                    plan[a] = f"ancestor of changed node {new.names[n]!r}"
    return plan


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def extend_model(
    model_dir: str | Path,
    new_hierarchy: str | Path | Hierarchy,
    x: np.ndarray,
    y: np.ndarray,
    out_dir: str | Path,
    cfg,
    *,
    class_names: list[str] | None = None,
    overwrite: bool = False,
    retrain_ancestors: bool = False,
    width: int | None = None,
    dataset: str = "",
) -> dict:
    """Write a model for ``new_hierarchy`` to ``out_dir``, training only the affected experts.

    Args:
        model_dir: the trained model directory to extend.
        new_hierarchy: the new tree, or a ``parent,child`` CSV read with ``class_names``.
        x: uint8 images ``(N, H, W, 3)`` at the old model's input size, covering every class
            under the experts to train (old classes too, for a parent whose children changed).
        y: class ids in the *new* tree's class order.
        out_dir: new model directory (must be absent or empty unless ``overwrite``).
        cfg: :class:`edgehmoe.model.training.TrainConfig` for the trained experts.
        retrain_ancestors: also retrain every ancestor of a changed node.
        width: width of trained experts that did not exist before (default: the width rule
            :func:`edgehmoe.model.arch.expert_width` with the old flat model's width, or 32).
            Retrained existing nodes keep their old width.

    Returns ``{"reused": [...], "trained": [...], "flat": ..., "out": ...}``; each entry names
    the node and why it was reused or trained.
    """
    from edgehmoe.model.arch import ArchSpec, expert_width
    from edgehmoe.model.central import fit_hmoe, new_model_dir

    old = read_model_dir(model_dir)
    if not old.experts:
        raise CheckpointError(f"{old.path} holds no hierarchical model to extend")
    if isinstance(new_hierarchy, Hierarchy):
        new = new_hierarchy
    else:
        new = read_edge_csv(new_hierarchy, class_names)
    x = np.asarray(x)
    y = np.asarray(y, dtype=np.int64)
    s = old.input_size
    if x.dtype != np.uint8 or x.ndim != 4 or x.shape[1:] != (s, s, 3):
        raise UsageError(f"x must be uint8 images of shape (N, {s}, {s}, 3) like the old model's input; got {x.dtype} {x.shape}")
    if len(y) != len(x):
        raise UsageError(f"{len(x)} images but {len(y)} labels")
    if len(y) and (y.min() < 0 or y.max() >= new.num_classes):
        raise UsageError(f"labels must be class ids of the new tree (0..{new.num_classes - 1}); got {y.min()}..{y.max()}")
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out} is not empty; choose another --out or pass --force to overwrite")
    if out.resolve() == old.path.resolve():
        raise UsageError("the new model directory must differ from the old one")

    old_tree = old.hierarchy
    plan = plan_extension(old_tree, new, lambda o: o in old.experts, retrain_ancestors)
    missing = [c for c in old_tree.class_names() if c not in new.names]
    if missing:
        logger.warning("classes of the old model absent from the new tree: %s", ", ".join(missing[:10]))

    md = new_model_dir(
        out, new, s, old.mean, old.std, dataset or old.dataset,
        extra={"extended_from": str(old.path)},
    )
    reused, trained_specs, reasons = [], {}, {}
    flat_w = int(old.flat.arch["width"]) if old.flat is not None else 32
    for n, reason in plan.items():
        name = new.names[n]
        k = int(new.num_children[n])
        if reason.startswith("reuse:"):
            o = int(reason.split(":", 1)[1])
            entry = old.experts[o]
            rel = f"experts/{n}.safetensors"
            dst = md.path / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(old.path / entry.file, dst)  # byte for byte
            md.experts[n] = NetworkEntry(arch=dict(entry.arch), file=rel, name=name, params=entry.params)
            reused.append({"node": n, "name": name, "old_node": o, "sha256": _sha(dst)})
        else:
            if name in old_tree.names and old_tree.index(name) in old.experts:
                w = int(old.experts[old_tree.index(name)].arch["width"])
            else:
                w = width or expert_width(k, new.num_leaves, flat_width=flat_w)
            trained_specs[n] = ArchSpec(width=w, num_outputs=k, input_size=s)
            reasons[n] = reason
            under = np.bincount(new.relabel(n, y)[new.relabel(n, y) >= 0], minlength=k)
            empty = [new.names[c] for c, cnt in zip(new.children(n), under) if cnt == 0]
            if empty:
                raise UsageError(
                    f"expert {name!r} must be trained but the data has no samples of its children "
                    f"{', '.join(empty[:5])}; give a dataset that covers every class under it"
                )
    stats = {}
    if trained_specs:
        logger.info("training %d experts: %s", len(trained_specs), ", ".join(new.names[n] for n in trained_specs))
        stats = fit_hmoe(md, x, y, cfg, specs=trained_specs)
    flat = "none"
    if old.flat is not None:
        if old_tree.class_names() == new.class_names():
            shutil.copyfile(old.path / old.flat.file, md.path / old.flat.file)
            md.flat = NetworkEntry(**vars(old.flat))
            flat = "copied"
        else:
            flat = "dropped (the class set changed; retrain it with `edgehmoe fit --model flat`)"
            logger.info("flat model not carried over: %s", flat)
    trained = [
        {"node": n, "name": new.names[n], "reason": reasons[n], "width": trained_specs[n].width,
         **{k: v for k, v in stats.get(n, {}).items() if k in ("samples", "loss", "steps", "params")}}
        for n in trained_specs
    ]
    dropped = [old_tree.names[o] for o in old.experts if old_tree.names[o] not in set(new.names[i] for i in new.internal_nodes)]
    md.extra = {
        **md.extra,
        "extend": {
            "reused": [r["name"] for r in reused],
            "trained": [t["name"] for t in trained],
            "dropped": dropped,
        },
    }
    md.save_json()
    logger.info("extended model written to %s: %d experts reused, %d trained", out, len(reused), len(trained))
    return {"out": str(out), "reused": reused, "trained": trained, "dropped_experts": dropped, "flat": flat}
