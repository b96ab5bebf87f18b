import math

import numpy as np
import pytest
from tree9 import tree9

from edgehmoe.core.metrics import (
    correct_at_depth,
    evaluate,
    info_f1,
    info_precision,
    info_recall,
    information,
)

# Information of a node: I(n) = log2(5 / leaves(n)); 5 leaves in all.
I_ROOT = 0.0
I_B = math.log2(5 / 3)
I_C = math.log2(5 / 2)
I_LEAF = math.log2(5)

# (gt node, pred node) pairs and hand-computed precision / recall:
#  (a1, a1): LCA a1            -> P = R = 1
#  (c1, b1): LCA B             -> P = I_B / I_LEAF, R = I_B / I_LEAF
#  (c1, C):  LCA C (internal)  -> P = I_C / I_C = 1, R = I_C / I_LEAF
#  (a1, c2): LCA root          -> P = R = 0
#  (b1, root): pred is root    -> P = 1 (denominator 0), R = 0
GT = np.array([3, 7, 7, 3, 5])
PRED = np.array([3, 5, 6, 8, 0])
P_HAND = [1.0, I_B / I_LEAF, 1.0, 0.0, 1.0]
R_HAND = [1.0, I_B / I_LEAF, I_C / I_LEAF, 0.0, 0.0]


def f1(p, r):
    return 0.0 if p + r == 0 else 2 * p * r / (p + r)


def test_information_values():
    info = information(tree9())
    assert info[0] == I_ROOT
    assert info[2] == pytest.approx(I_B)
    assert info[6] == pytest.approx(I_C)
    assert info[7] == pytest.approx(I_LEAF)


def test_precision_recall_f1_by_hand():
    t = tree9()
    np.testing.assert_allclose(info_precision(t, GT, PRED), P_HAND)
    np.testing.assert_allclose(info_recall(t, GT, PRED), R_HAND)
    np.testing.assert_allclose(info_f1(t, GT, PRED), [f1(p, r) for p, r in zip(P_HAND, R_HAND)])
    # The worked values: 0.3174 for the sibling-of-parent mistake, 0.7255 for stopping at C.
    assert info_f1(t, GT, PRED)[1] == pytest.approx(0.31739, abs=1e-4)
    assert info_f1(t, GT, PRED)[2] == pytest.approx(0.72549, abs=1e-4)


def test_evaluate_means_and_levels():
    t = tree9()
    classes = t.leaf_class[GT]
    m = evaluate(t, classes, PRED)
    assert m["num_examples"] == 5
    assert m["info_f1"] == pytest.approx(np.mean([f1(p, r) for p, r in zip(P_HAND, R_HAND)]))
    assert m["info_precision"] == pytest.approx(np.mean(P_HAND))
    assert m["info_recall"] == pytest.approx(np.mean(R_HAND))
    assert m["top1"] == pytest.approx(1 / 5)
    # depth 1: A|a1 ok, B|b1 ok, B|C ok, A|c2 wrong, B|root wrong -> 3/5
    # depth 2: a1 ok, C|b1 wrong, C|C ok, wrong, b1|root wrong -> 2/5
    # depth 3: a1 (leaf at depth 2) ok, c1|b1 wrong, c1|C wrong, wrong, wrong -> 1/5
    assert m["accuracy_per_level"] == {"1": pytest.approx(0.6), "2": pytest.approx(0.4), "3": pytest.approx(0.2)}
    # mistakes' LCA heights: B=2, C=1, root=3, root=3 -> 9/4
    assert m["mistake_severity"] == pytest.approx(2.25)
    assert m["leaf_prediction_rate"] == pytest.approx(3 / 5)


def test_perfect_predictions():
    t = tree9()
    leaves = t.class_to_node
    m = evaluate(t, np.arange(5), leaves)
    assert m["info_f1"] == 1.0 and m["top1"] == 1.0 and m["mistake_severity"] == 0.0


def test_correct_at_depth_internal_prediction_above_depth_is_wrong():
    t = tree9()
    assert correct_at_depth(t, np.array([7]), np.array([2]), 1).tolist() == [True]
    assert correct_at_depth(t, np.array([7]), np.array([2]), 2).tolist() == [False]


def test_evaluate_rejects_mismatched_lengths():
    with pytest.raises(ValueError, match="2 labels but 1 predictions"):
        evaluate(tree9(), np.array([0, 1]), np.array([3]))
