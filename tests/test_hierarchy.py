import numpy as np
import pytest
from tree9 import tree9

from edgehmoe.core.hierarchy import (
    Hierarchy,
    HierarchyError,
    collapse_single_child_chains,
    from_edge_list,
    read_edge_csv,
)
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
