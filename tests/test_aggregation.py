"""Tests of edgehmoe.fl.aggregation on arrays small enough to check by hand."""

from __future__ import annotations

import numpy as np
import pytest

from edgehmoe.fl.aggregation import (
    InvalidUpdate,
    aggregate_per_expert,
    fedavg,
    validate_update,
)


def test_fedavg_weighted_by_num_examples() -> None:
    # Prepare: client A trained on 1 example, client B on 3.
    a = {"w": np.array([1.0, 2.0], np.float32), "b": np.array([[0.0]], np.float32)}
    b = {"w": np.array([5.0, 6.0], np.float32), "b": np.array([[4.0]], np.float32)}

    # Execute
    avg = fedavg([(a, 1), (b, 3)])

    # Assert: (1*1 + 3*5)/4 = 4, (1*2 + 3*6)/4 = 5, (1*0 + 3*4)/4 = 3
    np.testing.assert_array_equal(avg["w"], [4.0, 5.0])
    np.testing.assert_array_equal(avg["b"], [[3.0]])
    assert avg["w"].dtype == np.float32 and avg["b"].shape == (1, 1)


def test_fedavg_computes_in_float64_and_returns_template_dtype() -> None:
    # float16 cannot hold 2049; the mean of 2048 and 2050 is exact only if computed wider.
    a = {"w": np.array([2048.0], np.float16)}
    b = {"w": np.array([2050.0], np.float16)}
    avg = fedavg([(a, 1), (b, 1)], template={"w": np.zeros(1, np.float32)})
    assert avg["w"].dtype == np.float32
    assert avg["w"][0] == 2049.0


def test_fedavg_integers_take_the_max() -> None:
    a = {"bn.num_batches_tracked": np.array(10, np.int64), "w": np.zeros(1, np.float32)}
    b = {"bn.num_batches_tracked": np.array(25, np.int64), "w": np.ones(1, np.float32)}
    avg = fedavg([(a, 3), (b, 1)])
    assert avg["bn.num_batches_tracked"] == 25 and avg["bn.num_batches_tracked"].dtype == np.int64
    # 0-d parameters stay 0-d ndarrays (not numpy scalars, not shape (1,))
    assert isinstance(avg["bn.num_batches_tracked"], np.ndarray) and avg["bn.num_batches_tracked"].shape == ()
    np.testing.assert_array_equal(avg["w"], [0.25])  # (3*0 + 1*1)/4


def test_fedavg_keeps_0d_float_parameters_arrays() -> None:
    avg = fedavg([({"s": np.array(1.0, np.float32)}, 1), ({"s": np.array(3.0, np.float32)}, 1)])
    assert isinstance(avg["s"], np.ndarray) and avg["s"].shape == () and avg["s"] == 2.0


def test_fedavg_single_update_is_a_copy() -> None:
    a = {"w": np.array([1.0, 2.0], np.float32)}
    avg = fedavg([(a, 5)])
    np.testing.assert_array_equal(avg["w"], a["w"])
    avg["w"][0] = 99
    assert a["w"][0] == 1.0


def test_fedavg_errors() -> None:
    with pytest.raises(ValueError, match="at least one update"):
        fedavg([])
    a = {"w": np.zeros(2, np.float32)}
    with pytest.raises(ValueError, match="> 0"):
        fedavg([(a, 0)])
    with pytest.raises(ValueError, match="parameters"):
        fedavg([(a, 1), ({"v": np.zeros(2, np.float32)}, 1)])
    with pytest.raises(ValueError, match="shape"):
        fedavg([(a, 1), ({"w": np.zeros(3, np.float32)}, 1)])


def test_aggregate_per_expert() -> None:
    # Prepare: expert 1 got two updates, expert 4 one, expert 7 none this round.
    updates = {
        1: [({"w": np.array([0.0], np.float32)}, 1), ({"w": np.array([4.0], np.float32)}, 3)],
        4: [({"w": np.array([2.0, 2.0], np.float32)}, 10)],
        7: [],
    }

    # Execute
    out = aggregate_per_expert(updates)

    # Assert
    assert sorted(out) == [1, 4]
    np.testing.assert_array_equal(out[1]["w"], [3.0])  # (0*1 + 4*3)/4
    np.testing.assert_array_equal(out[4]["w"], [2.0, 2.0])


def test_aggregate_per_expert_takes_dtypes_from_the_templates() -> None:
    # Prepare: node 1's first update came back in float16; the server sent float32.
    updates = {
        1: [({"w": np.array([0.5], np.float16)}, 1), ({"w": np.array([1.0], np.float32)}, 1)],
        4: [({"w": np.array([1.0], np.float16)}, 2)],
    }
    templates = {1: {"w": np.zeros(1, np.float32)}}

    # Execute
    out = aggregate_per_expert(updates, templates=templates)

    # Assert: node 1 follows its template, node 4 (no template) its first update
    assert out[1]["w"].dtype == np.float32 and out[1]["w"][0] == 0.75
    assert out[4]["w"].dtype == np.float16 and out[4]["w"][0] == 1.0


# --------------------------------------------------------------------------------------------
# validate_update
# --------------------------------------------------------------------------------------------

TEMPLATE = {
    "conv.weight": np.zeros((2, 3), np.float32),
    "bn.num_batches_tracked": np.array(0, np.int64),
}


def good_update() -> dict:
    return {"conv.weight": np.ones((2, 3), np.float32), "bn.num_batches_tracked": np.array(4, np.int64)}


def test_validate_accepts_good_update_and_float_casts() -> None:
    validate_update(good_update(), TEMPLATE, 10)
    update = good_update()
    update["conv.weight"] = update["conv.weight"].astype(np.float16)
    validate_update(update, TEMPLATE, 10)


@pytest.mark.parametrize(
    "mutate, num_examples, message",
    [
        (lambda u: u.update({"conv.weight": np.ones((3, 2), np.float32)}), 10, "shape"),
        (lambda u: u.pop("conv.weight"), 10, "missing parameter 'conv.weight'"),
        (lambda u: u.update({"extra": np.ones(1, np.float32)}), 10, "unexpected parameter 'extra'"),
        (lambda u: u.update({"bn.num_batches_tracked": np.array(4, np.int32)}), 10, "dtype int32"),
        (lambda u: u.update({"conv.weight": np.ones((2, 3), np.int64)}), 10, "expected a float dtype"),
        (lambda u: u["conv.weight"].__setitem__((0, 0), np.nan), 10, "NaN or inf"),
        (lambda u: u["conv.weight"].__setitem__((1, 2), np.inf), 10, "NaN or inf"),
        (lambda u: u.update({"conv.weight": [[1.0] * 3] * 2}), 10, "not a numpy array"),
        (lambda u: None, 0, "num_examples must be > 0"),
        (lambda u: None, -3, "num_examples must be > 0"),
        (lambda u: None, True, "num_examples must be an integer"),
    ],
    ids=["shape", "missing", "extra", "int-dtype", "float-vs-int", "nan", "inf", "list", "zero", "negative", "bool"],
)
def test_validate_rejects(mutate, num_examples, message: str) -> None:
    update = good_update()
    mutate(update)
    with pytest.raises(InvalidUpdate, match=message):
        validate_update(update, TEMPLATE, num_examples)
