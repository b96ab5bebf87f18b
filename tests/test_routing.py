from collections import Counter

import numpy as np
import pytest
from tree9 import tree9

from edgehmoe.core.routing import predict_beam, predict_greedy, predict_until

# Child probabilities per node, the same for every sample:
#   root: A 0.55, B 0.45 ; A: a1 0.5, a2 0.5 ; B: b1 0.1, C 0.9 ; C: c1 0.95, c2 0.05
# Greedy: root->A (0.55)->a1 (0.275). Best path: root->B->C->c1 = 0.45*0.9*0.95 = 0.38475.
TABLE = {0: [0.55, 0.45], 1: [0.5, 0.5], 2: [0.1, 0.9], 6: [0.95, 0.05]}


def make_fn(calls: Counter):
    def fn(node, idx):
        calls[node] += 1
        return np.tile(TABLE[node], (len(idx), 1))

    return fn


def test_greedy_runs_each_expert_once_per_level():
    calls = Counter()
    nodes, p = predict_greedy(tree9(), 4, make_fn(calls))
    assert nodes.tolist() == [3, 3, 3, 3]
    np.testing.assert_allclose(p, 0.275)
    assert calls == Counter({0: 1, 1: 1})


def test_beam_finds_better_path_than_greedy():
    calls = Counter()
    nodes, p = predict_beam(tree9(), 3, make_fn(calls), beam=2)
    assert nodes.tolist() == [7, 7, 7]
    np.testing.assert_allclose(p, 0.45 * 0.9 * 0.95)
    assert max(calls.values()) <= 3  # at most once per level


def test_beam_one_is_greedy():
    n1, _ = predict_beam(tree9(), 2, make_fn(Counter()), beam=1)
    assert n1.tolist() == [3, 3]


def test_until_stops_at_internal_node():
    t = tree9()
    nodes, p = predict_until(t, 2, make_fn(Counter()), threshold=0.5)
    assert nodes.tolist() == [1, 1]  # A has 0.55, a1 would be 0.275 < 0.5
    np.testing.assert_allclose(p, 0.55)
    nodes, _ = predict_until(t, 2, make_fn(Counter()), threshold=0.6)
    assert nodes.tolist() == [0, 0]
    nodes, _ = predict_until(t, 2, make_fn(Counter()), threshold=0.0)
    assert nodes.tolist() == [3, 3]


def test_per_sample_routing_groups_by_node():
    t = tree9()
    # sample 0 goes to A, sample 1 to B then C then c2
    def fn(node, idx):
        out = {0: [[0.9, 0.1], [0.2, 0.8]], 1: [[0.3, 0.7]], 2: [[0.4, 0.6]], 6: [[0.1, 0.9]]}[node]
        return np.asarray(out)[: len(idx)]

    nodes, _ = predict_greedy(t, 2, fn)
    assert nodes.tolist() == [4, 8]


def test_wrong_expert_output_shape_is_reported():
    with pytest.raises(ValueError, match=r"expert 0 returned shape \(2, 3\), expected \(2, 2\)"):
        predict_greedy(tree9(), 2, lambda node, idx: np.ones((len(idx), 3)) / 3)
