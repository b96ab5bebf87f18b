"""server/evalplan.py: which rounds are evaluated on the validation split."""

from __future__ import annotations

import pytest

from edgehmoe.server.evalplan import MIN_FLAT_POINTS, eval_due


def _evaluated(kind, total, every):
    return [r for r in range(1, total + 1) if eval_due(kind, r, total, every)]


def test_short_flat_run_is_evaluated_every_round():
    # 8 flat rounds with --eval-every 4 used to give two points (rounds 4 and 8)
    assert _evaluated("flat", 8, 4) == [1, 2, 3, 4, 5, 6, 7, 8]


def test_long_flat_run_keeps_at_least_min_points_on_a_regular_grid():
    assert MIN_FLAT_POINTS == 8
    assert _evaluated("flat", 30, 5) == [3, 6, 9, 12, 15, 18, 21, 24, 27, 30]
    assert _evaluated("flat", 200, 5) == list(range(5, 201, 5))  # already dense enough: unchanged


@pytest.mark.parametrize("total, every, expected", [
    (30, 5, [5, 10, 15, 20, 25, 30]),
    (8, 4, [4, 8]),
    (7, 3, [3, 6, 7]),  # the last round is always evaluated
])
def test_hmoe_schedule_is_every_k_rounds_and_the_last(total, every, expected):
    assert _evaluated("hmoe", total, every) == expected


@pytest.mark.parametrize("kind", ["hmoe", "flat"])
def test_every_zero_means_only_at_the_end(kind):
    assert _evaluated(kind, 8, 0) == [8]
