"""Class trees as parent-index arrays.

A :class:`Hierarchy` stores a rooted tree in topological order: ``parents[0] == -1`` and
``parents[j] < j`` for every other node, so depths, leaf masks, paths and lowest common
ancestors are cheap to derive. Node names live in a separate list. Each leaf corresponds to
exactly one dataset class (``leaf_class[node]``), and each internal node is one expert in
the local-classifier-per-parent-node (LCPN) model.

The layout follows jvlmdr/hiercls ``hier.py``. This module is numpy only: the tree, the
edge-list / CSV builder and tree edits. Dataset taxonomies (CIFAR-100, WordNet, Tiny
ImageNet) are built in :mod:`edgehmoe.data.taxonomy`.
"""

from __future__ import annotations

import csv
import io
import logging
from collections.abc import Iterable, Sequence
from functools import cached_property
from pathlib import Path

import numpy as np

from edgehmoe.errors import EdgeHmoeError

__all__ = [
    "Hierarchy",
    "HierarchyError",
    "from_edge_list",
    "read_edge_csv",
    "collapse_single_child_chains",
    "group_leaves",
    "routing_tree",
    "parse_tree_groups",
    "AUTO_GROUPS",
]

logger = logging.getLogger(__name__)


class HierarchyError(EdgeHmoeError, ValueError):
    """A tree is malformed (cycle, two parents, several roots, class not a leaf, ...)."""


class Hierarchy:
    """A rooted tree whose leaves are dataset classes.

    Args:
        parents: ``parents[j]`` is the parent of node ``j``; ``parents[0] == -1`` and
            ``parents[j] < j`` (topological order).
        names: one unique name per node.
        leaf_class: dataset class id of each leaf node, ``-1`` for internal nodes. Every
            class id ``0..num_classes-1`` must appear exactly once.
    """

    def __init__(self, parents: Sequence[int], names: Sequence[str], leaf_class: Sequence[int]):
        parents = np.asarray(parents, dtype=np.int64)
        leaf_class = np.asarray(leaf_class, dtype=np.int64)
        n = len(parents)
        if n == 0:
            raise HierarchyError("a hierarchy needs at least one node")
        if len(names) != n or len(leaf_class) != n:
            raise HierarchyError(
                f"parents ({n}), names ({len(names)}) and leaf_class ({len(leaf_class)}) "
                "must have the same length"
            )
        if parents[0] != -1:
            raise HierarchyError("node 0 must be the root (parents[0] == -1)")
        idx = np.arange(n)
        if n > 1 and not np.all((parents[1:] >= 0) & (parents[1:] < idx[1:])):
            bad = int(np.flatnonzero(~((parents[1:] >= 0) & (parents[1:] < idx[1:])))[0] + 1)
            raise HierarchyError(
                f"nodes must be in topological order (parents[j] < j); node {bad} "
                f"({names[bad]!r}) has parent {int(parents[bad])}"
            )
        if len(set(names)) != n:
            seen: set[str] = set()
            dup = next(x for x in names if x in seen or seen.add(x))  # type: ignore[func-returns-value]
            raise HierarchyError(f"node names must be unique; {dup!r} appears twice")
        self.parents = parents
        self.names = list(names)
        self.leaf_class = leaf_class
        is_leaf = self.is_leaf
        if np.any(is_leaf & (leaf_class < 0)):
            bad = int(np.flatnonzero(is_leaf & (leaf_class < 0))[0])
            raise HierarchyError(f"leaf {self.names[bad]!r} has no dataset class")
        if np.any(~is_leaf & (leaf_class >= 0)):
            bad = int(np.flatnonzero(~is_leaf & (leaf_class >= 0))[0])
            raise HierarchyError(
                f"dataset class {int(leaf_class[bad])} is mapped to internal node "
                f"{self.names[bad]!r}; every dataset class must be a leaf"
            )
        classes = np.sort(leaf_class[is_leaf])
        if not np.array_equal(classes, np.arange(len(classes))):
            raise HierarchyError(
                "leaf class ids must be exactly 0..num_classes-1, each once "
                f"(got {len(classes)} leaves with ids {classes[:10].tolist()}...)"
            )
        self._index = {name: i for i, name in enumerate(self.names)}
        # The tree metrics are computed on, when this one is a routing tree derived from it
        # (:func:`group_leaves`); ``None``: this tree itself.
        self.metric_tree: Hierarchy | None = None

    # ------------------------------------------------------------------ structure
    @property
    def num_nodes(self) -> int:
        return len(self.parents)

    @cached_property
    def is_leaf(self) -> np.ndarray:
        mask = np.ones(self.num_nodes, dtype=bool)
        mask[self.parents[1:]] = False
        return mask

    @cached_property
    def num_classes(self) -> int:
        return int(self.is_leaf.sum())

    @property
    def num_leaves(self) -> int:
        return self.num_classes

    @cached_property
    def internal_nodes(self) -> np.ndarray:
        """Indices of internal nodes (one expert each), in topological order."""
        return np.flatnonzero(~self.is_leaf)

    @cached_property
    def class_to_node(self) -> np.ndarray:
        """``class_to_node[c]`` is the leaf node of dataset class ``c``."""
        out = np.empty(self.num_classes, dtype=np.int64)
        leaves = np.flatnonzero(self.is_leaf)
        out[self.leaf_class[leaves]] = leaves
        return out

    @cached_property
    def _children(self) -> list[np.ndarray]:
        order = np.argsort(self.parents[1:], kind="stable") + 1
        counts = np.bincount(self.parents[1:], minlength=self.num_nodes)
        splits = np.cumsum(counts)[:-1]
        return list(np.split(order, splits))

    def children(self, node: int) -> np.ndarray:
        """Children of ``node`` in index order (this order defines the expert's outputs)."""
        return self._children[node]

    @cached_property
    def num_children(self) -> np.ndarray:
        return np.bincount(self.parents[1:], minlength=self.num_nodes)

    @cached_property
    def child_index(self) -> np.ndarray:
        """Position of each node among its parent's children (``-1`` for the root)."""
        out = np.full(self.num_nodes, -1, dtype=np.int64)
        for kids in self._children:
            out[kids] = np.arange(len(kids))
        return out

    @cached_property
    def depths(self) -> np.ndarray:
        d = np.zeros(self.num_nodes, dtype=np.int64)
        for j in range(1, self.num_nodes):
            d[j] = d[self.parents[j]] + 1
        return d

    @cached_property
    def max_depth(self) -> int:
        return int(self.depths.max())

    @cached_property
    def heights(self) -> np.ndarray:
        """Longest number of edges from each node down to a leaf (leaves: 0)."""
        h = np.zeros(self.num_nodes, dtype=np.int64)
        for j in range(self.num_nodes - 1, 0, -1):
            p = self.parents[j]
            h[p] = max(h[p], h[j] + 1)
        return h

    @cached_property
    def leaves_under(self) -> np.ndarray:
        """Number of leaves in the sub-tree of each node."""
        c = self.is_leaf.astype(np.int64)
        for j in range(self.num_nodes - 1, 0, -1):
            c[self.parents[j]] += c[j]
        return c

    @cached_property
    def ancestor_matrix(self) -> np.ndarray:
        """``A[i, d]`` is the ancestor of node ``i`` at depth ``d`` (itself at its own depth),
        ``-1`` for ``d > depth(i)``."""
        a = np.full((self.num_nodes, self.max_depth + 1), -1, dtype=np.int64)
        a[0, 0] = 0
        for j in range(1, self.num_nodes):
            a[j] = a[self.parents[j]]
            a[j, self.depths[j]] = j
        return a

    def index(self, name: str) -> int:
        """Node index of ``name``; raises ``KeyError`` listing a few valid names."""
        try:
            return self._index[name]
        except KeyError:
            examples = ", ".join(self.names[:5])
            raise HierarchyError(f"no node named {name!r} (examples: {examples}, ...)") from None

    def path(self, node: int) -> list[int]:
        """Nodes from the root down to ``node`` (inclusive)."""
        out = []
        while node >= 0:
            out.append(int(node))
            node = int(self.parents[node])
        return out[::-1]

    def lca(self, a: np.ndarray | int, b: np.ndarray | int) -> np.ndarray:
        """Lowest common ancestor, vectorised over arrays of node indices."""
        a = np.asarray(a, dtype=np.int64)
        b = np.asarray(b, dtype=np.int64)
        anc = self.ancestor_matrix
        pa, pb = anc[a], anc[b]
        same = (pa == pb) & (pa >= 0)
        # Paths agree on a prefix; the LCA is the deepest depth where they agree.
        depth = same.sum(axis=-1) - 1
        return np.take_along_axis(pa, depth[..., None], axis=-1)[..., 0]

    def is_ancestor_or_self(self, anc: np.ndarray, node: np.ndarray) -> np.ndarray:
        """Vectorised test: is ``anc`` on the root path of ``node``?"""
        anc = np.asarray(anc, dtype=np.int64)
        node = np.asarray(node, dtype=np.int64)
        d = self.depths[anc]
        return self.ancestor_matrix[node, d] == anc

    def leaf_classes_under(self, node: int) -> np.ndarray:
        """Dataset class ids of the leaves below ``node``."""
        leaves = np.flatnonzero(self.is_leaf)
        return self.leaf_class[leaves[self.is_ancestor_or_self(np.full(len(leaves), node), leaves)]]

    def label_map(self, node: int) -> np.ndarray:
        """``map[c]`` = index of the child of ``node`` above class ``c``, or ``-1``.

        This is the expert's target for every dataset class; used to relabel samples.
        """
        if self.is_leaf[node]:
            raise HierarchyError(f"node {self.names[node]!r} is a leaf and has no expert")
        leaves = self.class_to_node
        depth = self.depths[node]
        anc = self.ancestor_matrix[leaves]
        under = anc[:, depth] == node
        out = np.full(self.num_classes, -1, dtype=np.int64)
        child = anc[under, depth + 1]
        out[under] = self.child_index[child]
        return out

    def relabel(self, node: int, labels: np.ndarray) -> np.ndarray:
        """Child index of ``node`` above each dataset class in ``labels``, ``-1`` if not under it."""
        return self.label_map(node)[np.asarray(labels, dtype=np.int64)]

    # ------------------------------------------------------------------ I/O
    def edges(self) -> list[tuple[str, str]]:
        return [(self.names[self.parents[j]], self.names[j]) for j in range(1, self.num_nodes)]

    def to_csv(self, path: str | Path | None = None, class_names: Sequence[str] | None = None) -> str:
        """Write the ``parent,child`` edge list (topological order). Returns the text."""
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(["parent", "child"])
        w.writerows(self.edges())
        text = buf.getvalue()
        if path is not None:
            Path(path).write_text(text)
        return text

    def to_dict(self) -> dict:
        d = {
            "parents": self.parents.tolist(),
            "names": list(self.names),
            "leaf_class": self.leaf_class.tolist(),
        }
        if self.metric_tree is not None:
            d["metric_tree"] = self.metric_tree.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Hierarchy":
        try:
            tree = cls(d["parents"], d["names"], d["leaf_class"])
        except KeyError as e:
            raise HierarchyError(f"tree description lacks key {e}") from None
        except TypeError as e:
            raise HierarchyError(f"tree description is malformed: {e}") from None
        if d.get("metric_tree") is not None:
            if not isinstance(d["metric_tree"], dict):
                raise HierarchyError("tree description: metric_tree must be a tree description (an object)")
            tree.with_metric_tree(cls.from_dict(d["metric_tree"]))
        return tree

    def with_metric_tree(self, metric: "Hierarchy") -> "Hierarchy":
        """Record ``metric`` as the tree metrics are computed on (this tree routes); returns self.

        Every node of this tree must be a node of ``metric`` (same name) and the classes must
        be the same, so a prediction here names a node there.
        """
        if metric.metric_tree is not None:
            metric = metric.metric_tree
        if metric.class_names() != self.class_names():
            raise HierarchyError("a routing tree and its metric tree must have the same classes in the same order")
        missing = [n for n in self.names if n not in metric._index]
        if missing:
            raise HierarchyError(
                f"routing-tree nodes {', '.join(missing[:5])} are not in the metric tree; "
                "a routing tree may only drop nodes of the tree it was derived from"
            )
        self.metric_tree = metric
        return self

    @cached_property
    def metric_node(self) -> np.ndarray:
        """``metric_node[j]``: index in :attr:`metric_tree` of node ``j`` (identity without one)."""
        if self.metric_tree is None:
            return np.arange(self.num_nodes)
        return np.array([self.metric_tree.index(n) for n in self.names], dtype=np.int64)

    def class_names(self) -> list[str]:
        """Leaf names ordered by dataset class id."""
        return [self.names[i] for i in self.class_to_node]

    def describe(self, max_lines: int = 60) -> str:
        """Indented text rendering (children under parents)."""
        lines: list[str] = []

        def rec(node: int) -> None:
            if len(lines) >= max_lines:
                return
            tag = f" [class {self.leaf_class[node]}]" if self.is_leaf[node] else (
                f" ({self.num_children[node]} children, {self.leaves_under[node]} leaves)"
            )
            lines.append("  " * int(self.depths[node]) + self.names[node] + tag)
            for c in self.children(node):
                rec(int(c))

        rec(0)
        if len(lines) >= max_lines:
            lines.append(f"... ({self.num_nodes} nodes in all)")
        return "\n".join(lines)

    def summary(self) -> dict:
        return {
            "nodes": self.num_nodes,
            "leaves": self.num_leaves,
            "experts": len(self.internal_nodes),
            "max_depth": self.max_depth,
            "max_children": int(self.num_children.max()),
        }

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, Hierarchy)
            and np.array_equal(self.parents, other.parents)
            and self.names == other.names
            and np.array_equal(self.leaf_class, other.leaf_class)
            and self.metric_tree == other.metric_tree
        )

    def __repr__(self) -> str:
        s = self.summary()
        return f"Hierarchy(nodes={s['nodes']}, leaves={s['leaves']}, experts={s['experts']}, max_depth={s['max_depth']})"


# ---------------------------------------------------------------------- builders
def from_edge_list(
    edges: Iterable[tuple[str, str]],
    class_names: Sequence[str] | None = None,
    *,
    row_numbers: Sequence[int] | None = None,
) -> Hierarchy:
    """Build a tree from ``(parent, child)`` name pairs, validating it.

    Args:
        edges: parent/child name pairs.
        class_names: dataset class names in class-id order; each must be a leaf, and every
            leaf must be a class. If ``None``, leaves get class ids in sorted-name order.
        row_numbers: source line numbers of ``edges`` used in error messages.
    """
    edges = list(edges)
    rows = list(row_numbers) if row_numbers is not None else list(range(1, len(edges) + 1))
    parent_of: dict[str, str] = {}
    row_of: dict[str, int] = {}
    children: dict[str, list[str]] = {}
    for (p, c), r in zip(edges, rows):
        p, c = p.strip(), c.strip()
        if not p or not c:
            raise HierarchyError(f"row {r}: empty parent or child name")
        if p == c:
            raise HierarchyError(f"row {r}: node {c!r} is its own parent")
        if c in parent_of:
            if parent_of[c] == p:
                raise HierarchyError(f"row {r}: edge {p!r} -> {c!r} repeats row {row_of[c]}")
            raise HierarchyError(
                f"row {r}: node {c!r} has two parents ({parent_of[c]!r} on row {row_of[c]} "
                f"and {p!r}); a hierarchy must be a tree"
            )
        parent_of[c] = p
        row_of[c] = r
        children.setdefault(p, []).append(c)
    nodes = set(parent_of) | set(children)
    roots = sorted(n for n in nodes if n not in parent_of)
    if len(roots) != 1:
        if not roots:
            raise HierarchyError("the edge list has no root (every node has a parent): it contains a cycle")
        raise HierarchyError(f"the edge list has {len(roots)} roots ({', '.join(roots[:5])}); it needs exactly one")
    # Breadth-first from the root gives topological order; unreachable nodes are in cycles.
    order = [roots[0]]
    i = 0
    while i < len(order):
        order.extend(children.get(order[i], []))
        i += 1
    if len(order) != len(nodes):
        cyc = sorted(nodes - set(order))
        raise HierarchyError(
            f"nodes {', '.join(cyc[:5])} are not reachable from root {roots[0]!r}: "
            f"cycle through row {min(row_of[c] for c in cyc if c in row_of)}"
        )
    index = {n: k for k, n in enumerate(order)}
    parents = [-1] + [index[parent_of[n]] for n in order[1:]]
    leaves = [n for n in order if n not in children]
    if class_names is None:
        class_names = sorted(leaves)
    class_id = {}
    for k, name in enumerate(class_names):
        if name in class_id:
            raise HierarchyError(f"class name {name!r} is listed twice")
        class_id[name] = k
    missing = [c for c in class_names if c not in index]
    if missing:
        raise HierarchyError(f"dataset classes missing from the tree: {', '.join(missing[:10])}")
    internal_classes = [c for c in class_names if c in children]
    if internal_classes:
        c = internal_classes[0]
        raise HierarchyError(
            f"dataset class {c!r} is an internal node (it is the parent on row "
            f"{min(r for (p, _), r in zip(edges, rows) if p.strip() == c)}); every class must be a leaf"
        )
    extra = [n for n in leaves if n not in class_id]
    if extra:
        raise HierarchyError(
            f"leaves that are not dataset classes: {', '.join(extra[:10])} "
            f"(row {row_of[extra[0]]}); remove them or add them to the class list"
        )
    leaf_class = [class_id.get(n, -1) if n not in children else -1 for n in order]
    return Hierarchy(parents, order, leaf_class)


def read_edge_csv(path: str | Path, class_names: Sequence[str] | None = None) -> Hierarchy:
    """Read a ``parent,child`` CSV (header optional; ``#`` comments allowed)."""
    path = Path(path)
    if not path.is_file():
        raise HierarchyError(f"hierarchy CSV {path} does not exist")
    edges, rows = [], []
    with path.open(newline="") as f:
        for r, row in enumerate(csv.reader(f), start=1):
            if not row or not "".join(row).strip() or row[0].lstrip().startswith("#"):
                continue
            if r == 1 and [x.strip().lower() for x in row[:2]] == ["parent", "child"]:
                continue
            if len(row) != 2:
                raise HierarchyError(f"{path}: row {r}: expected 2 columns 'parent,child', got {len(row)}: {row}")
            edges.append((row[0], row[1]))
            rows.append(r)
    if not edges:
        raise HierarchyError(f"{path}: no edges found (expected lines 'parent,child')")
    try:
        return from_edge_list(edges, class_names, row_numbers=rows)
    except HierarchyError as e:
        raise HierarchyError(f"{path}: {e}") from None


def collapse_single_child_chains(tree: Hierarchy) -> Hierarchy:
    """Remove internal non-root nodes with exactly one child (attach the child to the grandparent).

    The root is kept; if it has a single child, that child is removed instead and its
    children hang from the root.
    """
    parent = tree.parents.copy()
    keep = np.ones(tree.num_nodes, dtype=bool)
    for j in range(tree.num_nodes):
        if tree.is_leaf[j] or tree.num_children[j] != 1:
            continue
        if j == 0:
            (only,) = tree.children(0)
            if tree.is_leaf[only]:
                continue
            keep[only] = False
        else:
            keep[j] = False

    def kept_parent(j: int) -> int:
        p = int(parent[j])
        while p > 0 and not keep[p]:
            p = int(parent[p])
        return p

    edges = [(tree.names[kept_parent(j)], tree.names[j]) for j in range(1, tree.num_nodes) if keep[j]]
    if not edges:
        return tree
    return from_edge_list(edges, tree.class_names())


def group_leaves(tree: Hierarchy, max_leaves: int) -> Hierarchy:
    """A two-level routing tree: the root routes among groups of at most ``max_leaves`` classes.

    The groups are a cut of ``tree``: starting from the root, the node with the most leaves is
    replaced by its children until no node of the cut has more than ``max_leaves`` leaves.
    Each group of several classes becomes one expert that predicts all of its classes
    directly; a group of one class is a leaf under the root. Every node of the result is a
    node of ``tree`` (same name), and ``tree`` is kept as the result's :attr:`metric_tree`, so
    information precision / recall are still computed on the full tree: a deep, unbalanced
    tree such as WordNet's over Tiny ImageNet (12 levels, 102 experts) routes through two
    decisions instead of about ten, and scores the same way.
    """
    metric = tree.metric_tree if tree.metric_tree is not None else tree
    if int(max_leaves) < 1:
        raise HierarchyError(f"group size must be a positive number of classes; got {max_leaves}")
    size = metric.leaves_under
    cut = [0]
    while True:
        big = [n for n in cut if size[n] > max_leaves and not metric.is_leaf[n]]
        if not big:
            break
        n = max(big, key=lambda j: (size[j], -j))
        k = cut.index(n)
        cut[k:k + 1] = [int(c) for c in metric.children(n)]
    root = metric.names[0]
    edges: list[tuple[str, str]] = []
    if cut == [0]:  # one group: the root predicts every class (a flat classifier)
        cut = [int(j) for j in metric.class_to_node]
    for g in cut:
        edges.append((root, metric.names[g]))
        if not metric.is_leaf[g]:
            edges += [(metric.names[g], metric.names[int(metric.class_to_node[c])]) for c in sorted(metric.leaf_classes_under(g))]
    out = from_edge_list(edges, metric.class_names())
    logger.info("grouped %d classes under %d root choices (%d experts, largest group %d classes)",
                metric.num_classes, len(cut), len(out.internal_nodes), int(max(size[g] for g in cut)))
    return out.with_metric_tree(metric)


AUTO_GROUPS = 30  # the group size "auto" uses (measured on Tiny ImageNet, docs/accuracy.md)


def parse_tree_groups(value: str | int) -> int | str:
    """``"auto"``, or a class count >= 0 (``0``: the dataset's tree); :class:`HierarchyError` otherwise."""
    if isinstance(value, str) and value.strip().lower() == "auto":
        return "auto"
    try:
        groups = int(value)
    except (TypeError, ValueError):
        groups = -1
    if isinstance(value, bool) or groups < 0 or (isinstance(value, float) and value != groups):
        raise HierarchyError(f"tree groups must be 'auto', 0 (the dataset's tree) or a positive number of classes; "
                             f"got {value!r}")
    return groups


def routing_tree(tree: Hierarchy, groups: int | str = "auto") -> Hierarchy:
    """The tree the experts route through.

    ``0``: ``tree`` itself. ``K > 0``: :func:`group_leaves` ``(tree, K)``. ``"auto"``: a tree of
    at most two levels below the root, or of at most :data:`AUTO_GROUPS` classes, as it is
    (CIFAR-100's superclasses); a deeper, larger one cut to groups of at most
    :data:`AUTO_GROUPS` classes (WordNet over Tiny ImageNet: 12 levels and 102 experts become
    2 levels and 18 experts; docs/accuracy.md).
    """
    groups = parse_tree_groups(groups)
    if groups == "auto":
        deep = tree.max_depth > 2 and tree.num_classes > AUTO_GROUPS
        return group_leaves(tree, AUTO_GROUPS) if deep else tree
    return group_leaves(tree, groups) if groups else tree
