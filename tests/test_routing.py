from collections import Counter

import numpy as np
import pytest
from tree9 import tree9

from edgehmoe.core.evaluation import evaluate_decoded, resolve_model
from edgehmoe.core.metrics import evaluate
from edgehmoe.core.routing import (
    decode,
    explain_paths,
    flat_decode,
    predict_beam,
    predict_greedy,
    predict_until,
    record_expert_probs,
)
from edgehmoe.errors import UsageError

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


# ---------------------------------------------------------------------- decode / flat_decode
# Three samples with their own child probabilities (rows = samples 0, 1, 2):
#   root: A/B        A: a1/a2      B: b1/C       C: c1/c2
#   s0  .55/.45      .50/.50       .10/.90       .95/.05
#   s1  .20/.80      .60/.40       .30/.70       .40/.60
#   s2  .90/.10      .52/.48       .50/.50       .50/.50
# Greedy:  s0 root>A>a1 = .275 ; s1 root>B>C>c2 = .8*.7*.6 = .336 ; s2 root>A>a1 = .9*.52 = .468
# Beam 2:  s0 keeps {A,B}, then {C .405, a1 .275}, then {c1 .38475, a1 .275} -> c1 ;
#          s1 -> c2 .336 (beats b1 .24) ; s2 -> a1 .468 (beats a2 .432)
# Threshold .3: s0 stops at A (.55; a1 would be .275) ; s1 c2 (.336) ; s2 a1 (.468)
# Threshold .4: s0 A (.55) ; s1 stops at C (.56; c2 would be .336) ; s2 a1 (.468)
TABLE3 = {
    0: np.array([[0.55, 0.45], [0.2, 0.8], [0.9, 0.1]]),
    1: np.array([[0.5, 0.5], [0.6, 0.4], [0.52, 0.48]]),
    2: np.array([[0.1, 0.9], [0.3, 0.7], [0.5, 0.5]]),
    6: np.array([[0.95, 0.05], [0.4, 0.6], [0.5, 0.5]]),
}


def table3_fn(node, idx):
    return TABLE3[node][idx]


@pytest.mark.parametrize(
    ("kw", "nodes", "probs"),
    [
        ({}, [3, 8, 3], [0.275, 0.336, 0.468]),
        ({"beam": 1}, [3, 8, 3], [0.275, 0.336, 0.468]),
        ({"beam": 2}, [7, 8, 3], [0.45 * 0.9 * 0.95, 0.336, 0.468]),
        ({"threshold": 0.3}, [1, 8, 3], [0.55, 0.336, 0.468]),
        ({"threshold": 0.4}, [1, 6, 3], [0.55, 0.56, 0.468]),
        ({"threshold": 0.0}, [3, 8, 3], [0.275, 0.336, 0.468]),
        ({"threshold": 0.95}, [0, 0, 0], [1.0, 1.0, 1.0]),
    ],
)
def test_decode_dispatches_greedy_beam_and_threshold(kw, nodes, probs):
    # Execute
    got_nodes, got_p = decode(tree9(), 3, table3_fn, **kw)
    # Assert
    assert got_nodes.tolist() == nodes
    np.testing.assert_allclose(got_p, probs)


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"beam": 2, "threshold": 0.5}, "choose either --beam or --threshold, not both"),
        ({"beam": 0}, "beam width must be an integer >= 1"),
        ({"beam": 1.5}, "beam width must be an integer >= 1"),
        ({"threshold": -0.1}, "threshold must be >= 0"),
        ({"threshold": float("nan")}, "threshold must be >= 0"),
    ],
)
def test_decode_rejects_invalid_combinations_before_running_an_expert(kw, message):
    calls = Counter()
    with pytest.raises(UsageError, match=message):
        decode(tree9(), 3, make_fn(calls), **kw)
    assert calls == Counter()


# Flat softmax over the classes a1, a2, b1, c1, c2 (nodes 3, 4, 5, 7, 8):
#   f0 [.10 .05 .15 .40 .30]  argmax c1 (.4); C holds .7, B .85
#   f1 [.30 .25 .20 .15 .10]  argmax a1 (.3); A holds .55
#   f2 [.05 .05 .60 .20 .10]  argmax b1 (.6); B holds .9
FLAT = np.array([[0.10, 0.05, 0.15, 0.40, 0.30], [0.30, 0.25, 0.20, 0.15, 0.10], [0.05, 0.05, 0.60, 0.20, 0.10]])


@pytest.mark.parametrize(
    ("threshold", "nodes", "probs"),
    [
        (None, [7, 3, 5], [0.4, 0.3, 0.6]),
        (0.0, [7, 3, 5], [0.4, 0.3, 0.6]),
        (0.4, [7, 1, 5], [0.4, 0.55, 0.6]),
        (0.5, [6, 1, 5], [0.7, 0.55, 0.6]),
        (0.8, [2, 0, 2], [0.85, 1.0, 0.9]),
        (0.95, [0, 0, 0], [1.0, 1.0, 1.0]),
    ],
)
def test_flat_decode_stops_at_the_deepest_node_holding_the_threshold(threshold, nodes, probs):
    got_nodes, got_p = flat_decode(tree9(), FLAT, threshold)
    assert got_nodes.tolist() == nodes
    np.testing.assert_allclose(got_p, probs)


def test_flat_decode_checks_its_input():
    with pytest.raises(UsageError, match="threshold must be >= 0"):
        flat_decode(tree9(), FLAT, -1.0)
    with pytest.raises(ValueError, match=r"shape \(3, 4\), expected \(N, 5\)"):
        flat_decode(tree9(), FLAT[:, :4])
    nodes, probs = flat_decode(tree9(), np.zeros((0, 5)), 0.5)
    assert nodes.shape == probs.shape == (0,)


def test_explain_paths_gives_step_probabilities_and_alternatives():
    # Prepare
    t = tree9()
    record: dict = {}
    fn = record_expert_probs(table3_fn, 3, record)
    # Execute: s1 stops at C with threshold .4; s0 at A.
    nodes, _ = decode(t, 3, fn, threshold=0.4)
    explained = explain_paths(t, nodes, record, top=2)
    # Assert: A's expert ran for s0 and s2 only, so s1's row is NaN.
    assert sorted(record) == [0, 1, 2, 6]
    assert np.isnan(record[1][1]).all() and record[1][0].tolist() == [0.5, 0.5]
    steps, alts = explained[1]
    assert [s["name"] for s in steps] == ["root", "B", "C"]
    np.testing.assert_allclose([s["probability"] for s in steps], [1.0, 0.8, 0.7])
    np.testing.assert_allclose([s["path_probability"] for s in steps], [1.0, 0.8, 0.56])
    assert [a["name"] for a in alts] == ["c2", "c1"]
    np.testing.assert_allclose([a["probability"] for a in alts], [0.6, 0.4])
    # A leaf prediction: the alternatives are its parent's children.
    steps, alts = explained[2]
    assert [s["node"] for s in steps] == [0, 1, 3]
    assert [(a["name"], a["probability"]) for a in alts] == [("a1", 0.52), ("a2", 0.48)]


@pytest.mark.parametrize("batch_size", [None, 1, 2])
def test_evaluate_decoded_builds_the_metrics_dict(batch_size):
    # Prepare: sample i's probabilities are row i of TABLE3 / FLAT; the "images" are indices.
    t = tree9()
    x = np.arange(3)
    y = np.array([3, 4, 0])  # classes c1, c2, a1

    def hier(xb):
        return lambda node, idx: TABLE3[node][xb[idx]]

    # Execute
    beam2 = evaluate_decoded(t, x, y, "hmoe", hier, beam=2, batch_size=batch_size)
    until = evaluate_decoded(t, x, y, "hmoe", hier, threshold=0.4, batch_size=batch_size)
    flat = evaluate_decoded(t, x, y, "flat", lambda xb: FLAT[xb], beam=3, batch_size=batch_size)
    flat_until = evaluate_decoded(t, x, y, "flat", lambda xb: FLAT[xb], threshold=0.5, batch_size=batch_size)
    # Assert: beam 2 predicts c1, c2, a1 (all right); threshold .4 predicts A, C, a1.
    assert beam2 == {**evaluate(t, y, np.array([7, 8, 3])), "model": "hmoe", "beam": 2}
    assert beam2["top1"] == 1.0
    assert until == {**evaluate(t, y, np.array([1, 6, 3])), "model": "hmoe", "beam": 1, "threshold": 0.4}
    # The flat model ignores the beam width: argmax c1, a1, b1; with threshold .5: C, A, b1.
    assert flat == {**evaluate(t, y, np.array([7, 3, 5])), "model": "flat", "beam": 1}
    assert flat_until == {**evaluate(t, y, np.array([6, 1, 5])), "model": "flat", "beam": 1, "threshold": 0.5}


def test_evaluate_decoded_and_resolve_model_reject_bad_choices():
    t = tree9()
    with pytest.raises(UsageError, match="not both"):
        evaluate_decoded(t, np.arange(3), np.zeros(3, int), "flat", lambda xb: FLAT[xb], beam=2, threshold=0.5)
    assert resolve_model("auto", has_hmoe=False) == "flat"
    assert resolve_model("auto") == "hmoe"
    with pytest.raises(UsageError, match="valid: auto, hmoe, flat"):
        resolve_model("tree")
    with pytest.raises(UsageError, match="this bundle has no flat model; use --model hmoe"):
        resolve_model("flat", has_flat=False, source="bundle")
