import numpy as np
import pytest
from tree9 import tree9

from edgehmoe.core.hierarchy import (
    Hierarchy,
    HierarchyError,
    collapse_single_child_chains,
    from_edge_list,
    group_leaves,
    read_edge_csv,
    routing_tree,
)
from edgehmoe.core.metrics import evaluate
from edgehmoe.data.taxonomy import cifar100_hierarchy


def test_structure_of_tree9():
    t = tree9()
    assert t.num_nodes == 9 and t.num_leaves == 5
    assert t.internal_nodes.tolist() == [0, 1, 2, 6]
    assert t.children(0).tolist() == [1, 2]
    assert t.children(6).tolist() == [7, 8]
    assert t.depths.tolist() == [0, 1, 1, 2, 2, 2, 2, 3, 3]
    assert t.heights.tolist() == [3, 1, 2, 0, 0, 0, 1, 0, 0]
    assert t.leaves_under.tolist() == [5, 2, 3, 1, 1, 1, 2, 1, 1]
    assert t.path(7) == [0, 2, 6, 7]
    assert t.class_to_node.tolist() == [3, 4, 5, 7, 8]
    assert t.class_names() == ["a1", "a2", "b1", "c1", "c2"]


def test_lca_vectorised():
    t = tree9()
    a = np.array([7, 7, 3, 5, 8, 0])
    b = np.array([8, 5, 7, 5, 6, 4])
    assert t.lca(a, b).tolist() == [6, 2, 0, 5, 6, 0]
    assert int(t.lca(3, 4)) == 1


def test_relabel_gives_child_index_or_minus_one():
    t = tree9()
    labels = np.array([0, 1, 2, 3, 4])
    assert t.relabel(0, labels).tolist() == [0, 0, 1, 1, 1]
    assert t.relabel(1, labels).tolist() == [0, 1, -1, -1, -1]
    assert t.relabel(2, labels).tolist() == [-1, -1, 0, 1, 1]
    assert t.relabel(6, labels).tolist() == [-1, -1, -1, 0, 1]
    with pytest.raises(ValueError, match="leaf"):
        t.label_map(3)


def test_csv_round_trip(tmp_path):
    t = tree9()
    p = tmp_path / "tree.csv"
    t.to_csv(p)
    t2 = read_edge_csv(p, t.class_names())
    assert t2 == t


@pytest.mark.parametrize(
    "rows, message",
    [
        ("root,A\nA,x\nB,x\n", "row 3: node 'x' has two parents"),
        ("root,A\nA,B\nB,A\n", "two parents"),
        ("a,b\nc,d\n", "2 roots"),
        ("root,A\nA,a1\nroot,a2\nA,\n", "row 4: empty"),
        ("root,A,extra\n", "row 1: expected 2 columns"),
    ],
)
def test_bad_csv_names_the_row(tmp_path, rows, message):
    p = tmp_path / "bad.csv"
    p.write_text(rows)
    with pytest.raises(HierarchyError, match=message):
        read_edge_csv(p)


def test_cycle_detected():
    with pytest.raises(HierarchyError, match="cycle"):
        from_edge_list([("r", "a"), ("b", "c"), ("c", "b")])


def test_class_must_be_leaf_and_leaf_must_be_class():
    edges = [("r", "a"), ("r", "b"), ("a", "a1"), ("a", "a2")]
    with pytest.raises(HierarchyError, match="dataset class 'a' is an internal node"):
        from_edge_list(edges, ["a", "b"])
    with pytest.raises(HierarchyError, match="not dataset classes: a2"):
        from_edge_list(edges, ["a1", "b"])
    with pytest.raises(HierarchyError, match="missing from the tree: zz"):
        from_edge_list(edges, ["a1", "a2", "b", "zz"])


def test_constructor_validates_topological_order():
    with pytest.raises(HierarchyError, match="topological"):
        Hierarchy([-1, 2, 0], ["r", "a", "b"], [-1, 0, -1])


def test_cifar100_tree():
    fine = [f"f{i}" for i in range(100)]
    coarse = [f"c{i}" for i in range(20)]
    f2c = [i % 20 for i in range(100)]
    t = cifar100_hierarchy(fine, coarse, f2c)
    assert t.num_leaves == 100 and len(t.internal_nodes) == 21
    assert sorted(t.num_children[t.internal_nodes].tolist()) == [5] * 20 + [20]
    # class 7 is under coarse 7
    assert t.names[t.parents[t.class_to_node[7]]] == "coarse:c7"


def test_collapse_single_child_chains():
    # r - x - y - {a, b}; r - c  => x and y collapse? y has 2 children, x has one.
    t = from_edge_list([("r", "x"), ("x", "y"), ("y", "a"), ("y", "b"), ("r", "c")], ["a", "b", "c"])
    out = collapse_single_child_chains(t)
    assert "x" not in out.names and "y" in out.names
    assert np.all(out.num_children[out.internal_nodes] >= 2)
    assert out.class_names() == ["a", "b", "c"]


def test_group_leaves_cuts_tree9_and_scores_on_the_full_tree():
    # Prepare: tree9 has root 5 leaves, A 2, B 3 (b1 and C), C 2
    t = tree9()
    # Execute: groups of at most 2 classes: B (3) is replaced by its children b1 and C
    g = group_leaves(t, 2)
    # Assert: root -> A (a1, a2), b1, C (c1, c2); every node a node of tree9; classes unchanged
    assert [g.names[c] for c in g.children(0)] == ["A", "b1", "C"]
    assert sorted(g.names[c] for c in g.children(g.index("C"))) == ["c1", "c2"]
    assert g.max_depth == 2 and len(g.internal_nodes) == 3
    assert g.class_names() == t.class_names() and g.metric_tree == t
    assert [t.names[j] for j in g.metric_node] == g.names
    # predicting b1 for c1: LCA B in tree9 (I = log2 5/3), the root in the routing tree
    gt = np.array([3, 3, 4])
    pred_classes = np.array([2, 3, 3])
    full = evaluate(t, gt, t.class_to_node[pred_classes])
    routed = evaluate(g, gt, g.class_to_node[pred_classes])
    assert routed == full
    expect = np.log2(5 / 3) / np.log2(5)  # P = R for two leaves
    assert full["info_f1"] == pytest.approx((expect + 1 + np.log2(5 / 2) / np.log2(5)) / 3)


def test_group_leaves_edge_cases_and_serialisation():
    t = tree9()
    # a group as big as the tree: one expert over every class (a flat classifier)
    flat = group_leaves(t, 5)
    assert flat.max_depth == 1 and len(flat.internal_nodes) == 1 and flat.num_children[0] == 5
    # groups of 1: every class under the root
    assert group_leaves(t, 1).num_children[0] == 5
    # grouping a routing tree again starts from its full tree
    assert group_leaves(group_leaves(t, 2), 3).metric_tree == t
    assert routing_tree(t, 0) is t and routing_tree(t, 2) == group_leaves(t, 2)
    # auto: small or two-level trees as they are, deep large ones cut to groups of <= 30 classes
    assert routing_tree(t, "auto") is t and routing_tree(t, "AUTO ") is t
    cifar = cifar100_hierarchy([f"f{i}" for i in range(100)], [f"c{i}" for i in range(20)], [i % 20 for i in range(100)])
    assert routing_tree(cifar, "auto") is cifar and group_leaves(cifar, 30).names == cifar.names
    chain = from_edge_list([("r", "x"), ("x", "y")] + [("y", f"c{i}") for i in range(40)] + [("x", "z"), ("r", "w")]
                           + [("z", f"d{i}") for i in range(20)] + [("w", f"e{i}") for i in range(25)])
    auto = routing_tree(chain, "auto")
    assert auto.max_depth == 2 and auto.metric_tree == chain and auto == group_leaves(chain, 30)
    for bad in (-1, "deep", 2.5, True):
        with pytest.raises(HierarchyError, match="auto"):
            routing_tree(t, bad)
    with pytest.raises(HierarchyError, match="positive"):
        group_leaves(t, 0)
    with pytest.raises(HierarchyError, match="positive"):
        routing_tree(t, -1)
    # the metric tree travels with the tree (model.json, bundle manifests)
    g = group_leaves(t, 2)
    d = g.to_dict()
    assert Hierarchy.from_dict(d) == g and Hierarchy.from_dict(d).metric_tree == t
    assert "metric_tree" not in t.to_dict() and Hierarchy.from_dict(t.to_dict()).metric_tree is None
    with pytest.raises(HierarchyError, match="metric_tree"):
        Hierarchy.from_dict({**d, "metric_tree": [1, 2]})
    with pytest.raises(HierarchyError, match="not in the metric tree"):
        from_edge_list([("root", "X"), ("X", "a1"), ("X", "a2"), ("root", "b1"), ("root", "c1"), ("root", "c2")],
                       t.class_names()).with_metric_tree(t)


def _wordnet_available() -> bool:
    from pathlib import Path

    return any((Path(d) / "data.noun").is_file() for d in ("/usr/share/wordnet", Path.home() / "nltk_data/corpora/wordnet"))


def test_packaged_tiny_imagenet_tree_is_rebuilt_from_wordnet():
    import os

    from edgehmoe.data.taxonomy import (
        packaged_tree_path,
        tiny_imagenet_hierarchy,
        wordnet_hierarchy,
    )

    if not _wordnet_available():
        msg = "WordNet 3.0 missing: apt-get install -y wordnet-base"
        if os.environ.get("CI") == "true":
            pytest.fail(msg)
        pytest.skip(msg)
    # Prepare
    packaged = tiny_imagenet_hierarchy()
    wnids = packaged.class_names()
    # Execute
    rebuilt = wordnet_hierarchy(wnids)
    # Assert
    assert rebuilt == packaged, f"{packaged_tree_path()} is out of date: rebuild it with `edgehmoe hierarchy build`"
    assert packaged.num_leaves == 200 and packaged.names[0] == "entity.n.01"
    assert np.all(packaged.num_children[packaged.internal_nodes] >= 2)


def test_unknown_wnid_is_a_clear_error():
    from edgehmoe.data.taxonomy import wordnet_hierarchy

    if not _wordnet_available():
        pytest.skip("WordNet 3.0 missing")
    with pytest.raises(HierarchyError, match="n09999999 is not a noun synset"):
        wordnet_hierarchy(["n01443537", "n09999999"])
    with pytest.raises(HierarchyError, match="not a WordNet noun id"):
        wordnet_hierarchy(["dog"])


def test_auto_groups_cut_the_packaged_tiny_imagenet_tree_to_two_levels():
    from edgehmoe.data.taxonomy import tiny_imagenet_hierarchy

    full = tiny_imagenet_hierarchy()
    t = routing_tree(full)  # the default, "auto"
    assert full.max_depth > 2 and len(full.internal_nodes) == 102
    assert t.max_depth == 2 and len(t.internal_nodes) == 18 and t.num_children[0] == 23
    assert t.class_names() == full.class_names() and t.metric_tree == full
    assert max(int(t.leaves_under[c]) for c in t.children(0)) <= 30
    # every group is a node of the full tree with exactly its classes
    for g in t.internal_nodes[1:]:
        assert sorted(t.leaf_classes_under(int(g))) == sorted(full.leaf_classes_under(full.index(t.names[g])))
