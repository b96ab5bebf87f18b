"""Tests of edgehmoe.fl.aggregation on arrays small enough to check by hand."""

from __future__ import annotations

import numpy as np
import pytest

from edgehmoe.fl.aggregation import (
    InvalidUpdate,
    aggregate,
    aggregate_per_expert,
    check_finite,
    check_update_norm,
    clip_update,
    clip_updates,
    coordinate_median,
    fedavg,
    trimmed_mean,
    update_norm,
    validate_update,
    weights_norm,
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


def test_validate_accepts_good_update_and_refuses_casts() -> None:
    validate_update(good_update(), TEMPLATE, 10)
    validate_update(good_update(), TEMPLATE, 10, max_examples=10)
    # no silent casts: float16 or float64 for a float32 parameter is refused (issue #10 row 2)
    for dtype in (np.float16, np.float64):
        update = good_update()
        update["conv.weight"] = update["conv.weight"].astype(dtype)
        with pytest.raises(InvalidUpdate, match=f"dtype {np.dtype(dtype)}, expected float32"):
            validate_update(update, TEMPLATE, 10)


@pytest.mark.parametrize(
    "mutate, num_examples, message",
    [
        (lambda u: u.update({"conv.weight": np.ones((3, 2), np.float32)}), 10, "shape"),
        (lambda u: u.pop("conv.weight"), 10, "missing parameter 'conv.weight'"),
        (lambda u: u.update({"extra": np.ones(1, np.float32)}), 10, "unexpected parameter 'extra'"),
        (lambda u: u.update({"bn.num_batches_tracked": np.array(4, np.int32)}), 10, "dtype int32"),
        (lambda u: u.update({"conv.weight": np.ones((2, 3), np.int64)}), 10, "dtype int64, expected float32"),
        (lambda u: u["conv.weight"].__setitem__((0, 0), np.nan), 10, "NaN or inf"),
        (lambda u: u["conv.weight"].__setitem__((1, 2), np.inf), 10, "NaN or inf"),
        (lambda u: u.update({"conv.weight": [[1.0] * 3] * 2}), 10, "not a numpy array"),
        (lambda u: None, 0, "num_examples must be > 0"),
        (lambda u: None, -3, "num_examples must be > 0"),
        (lambda u: None, True, "num_examples must be an integer"),
        (lambda u: None, 11, "num_examples 11 exceeds the 10 samples the device announced"),
        (lambda u: None, 10**400, "num_examples about 1e400 exceeds the 10 samples"),
        (lambda u: u.update({"conv.weight": np.full((2, 3), 1e300)}), 10, "dtype float64, expected float32"),
        (lambda u: u.update({"bn.running_var": np.array([-1.0], np.float32)}), 10, "negative variance"),
    ],
    ids=["shape", "missing", "extra", "int-dtype", "float-vs-int", "nan", "inf", "list", "zero", "negative", "bool",
         "above-hello", "huge-int", "float64-1e300", "negative-var"],
)
def test_validate_rejects(mutate, num_examples, message: str) -> None:
    template = dict(TEMPLATE, **{"bn.running_var": np.ones(1, np.float32)})
    update = dict(good_update(), **{"bn.running_var": np.ones(1, np.float32)})
    mutate(update)
    with pytest.raises(InvalidUpdate, match=message):
        validate_update(update, template, num_examples, max_examples=10)


# --------------------------------------------------------------------------------------------
# Overflow and finiteness (issue #10 rows 2, 3)
# --------------------------------------------------------------------------------------------


def test_fedavg_takes_any_integer_count_without_overflow() -> None:
    # Prepare: counts whose float() overflows (10**400) and int64 cannot hold (2**70).
    a = {"w": np.array([1.0], np.float32)}
    b = {"w": np.array([3.0], np.float32)}
    # Execute / Assert: coefficients are exact int quotients, 10**400 : 1 -> all weight on a
    assert fedavg([(a, 10**400), (b, 1)])["w"][0] == 1.0
    np.testing.assert_array_equal(fedavg([(a, 2**70), (b, 2**70)])["w"], [2.0])


def test_aggregation_never_returns_weights_that_are_not_finite_in_their_dtype() -> None:
    # float64 1e300 averaged into a float32 expert would become inf: refused, not cast.
    a = {"w": np.array([1e300], np.float64)}
    with pytest.raises(InvalidUpdate, match="not finite in float32"):
        fedavg([(a, 1)], template={"w": np.zeros(1, np.float32)})
    with pytest.raises(InvalidUpdate, match="not finite in float32"):
        aggregate([(a, 1), (a, 1)], method="median", template={"w": np.zeros(1, np.float32)})
    with pytest.raises(InvalidUpdate, match="NaN or inf"):
        check_finite({"w": np.array([0.0, np.inf], np.float32)})


# --------------------------------------------------------------------------------------------
# Robust rules and clipping, by hand
# --------------------------------------------------------------------------------------------


def _updates(values, counts=None):
    counts = counts or [1] * len(values)
    return [({"w": np.array(v, np.float32), "n": np.array(i, np.int64)}, c)
            for i, (v, c) in enumerate(zip(values, counts))]


def test_coordinate_median_by_hand() -> None:
    # coordinate 0: 1, 2, 100 -> 2; coordinate 1: -5, 0, 3 -> 0; counts are ignored
    out = coordinate_median(_updates([[1.0, 0.0], [100.0, -5.0], [2.0, 3.0]], [1, 10**9, 1]))
    np.testing.assert_array_equal(out["w"], [2.0, 0.0])
    assert out["w"].dtype == np.float32 and out["n"] == 1  # integer: lower middle of 0, 1, 2
    # even count: float median is the mean of the two middle values
    np.testing.assert_array_equal(coordinate_median(_updates([[1.0], [2.0], [4.0], [100.0]]))["w"], [3.0])


def test_trimmed_mean_by_hand() -> None:
    # five clients, trim 0.2 -> drop 1 at each end of every coordinate
    vals = [[1.0], [2.0], [3.0], [4.0], [1000.0]]
    np.testing.assert_array_equal(trimmed_mean(_updates(vals), trim_fraction=0.2)["w"], [3.0])  # (2+3+4)/3
    # trim 0.1 of 5 -> k = 0: the plain (unweighted) mean
    np.testing.assert_array_equal(trimmed_mean(_updates(vals), trim_fraction=0.1)["w"], [202.0])
    with pytest.raises(InvalidUpdate, match="trim_fraction"):
        trimmed_mean(_updates(vals), trim_fraction=0.5)


def test_norm_check_and_clipping_by_hand() -> None:
    ref = {"w": np.array([3.0, 4.0], np.float32), "n": np.array(0, np.int64)}  # ||ref|| = 5
    far = {"w": np.array([3.0, 64.0], np.float32), "n": np.array(7, np.int64)}  # change (0, 60): 12 x 5
    assert weights_norm(ref) == 5.0 and update_norm(far, ref) == 60.0
    assert check_update_norm(far, ref, 12.0) == 12.0
    with pytest.raises(InvalidUpdate, match="update norm is 12 x the weights' norm, above the bound of 10"):
        check_update_norm(far, ref, 10.0)
    clipped = clip_update(far, ref, 6.0)  # change scaled to norm 6: (0, 6)
    np.testing.assert_array_equal(clipped["w"], [3.0, 10.0])
    assert clipped["n"] == 7 and clipped["w"].dtype == np.float32
    # clip_updates: bound = 2 x median change norm; changes 1, 2, 60 -> median 2, bound 4
    near1 = {"w": np.array([3.0, 5.0], np.float32), "n": np.array(0, np.int64)}
    near2 = {"w": np.array([3.0, 6.0], np.float32), "n": np.array(0, np.int64)}
    out = clip_updates([(near1, 1), (near2, 1), (far, 1)], ref, 2.0)
    np.testing.assert_array_equal(out[0][0]["w"], near1["w"])
    np.testing.assert_array_equal(out[2][0]["w"], [3.0, 8.0])
    # through aggregate: fedavg of (4+1)/... -> mean of 5, 6, 8 = 19/3 on coordinate 1
    avg = aggregate([(near1, 1), (near2, 1), (far, 1)], method="fedavg", reference=ref, clip_factor=2.0)
    np.testing.assert_allclose(avg["w"], [3.0, 19 / 3], rtol=1e-6)
    with pytest.raises(InvalidUpdate, match="unknown aggregation 'mean'"):
        aggregate([(near1, 1)], method="mean")


def test_aggregate_per_expert_with_a_robust_rule() -> None:
    updates = {2: _updates([[1.0], [2.0], [1e6]], [1, 1, 10**6])}
    assert aggregate_per_expert(updates, method="median")[2]["w"][0] == 2.0
    assert aggregate_per_expert(updates, method="fedavg")[2]["w"][0] > 9e5
