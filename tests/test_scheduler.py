from collections import Counter

import numpy as np
import pytest
from edgehmoe.server.scheduler import FLAT, DeviceView, Scheduler
from tree9 import tree9

# tree9 experts: root (0, 5 leaves), A (1, 2 leaves), B (2, 3 leaves), C (6, 2 leaves)
ALL = np.ones(5, dtype=np.int64) * 10  # 10 samples of every class


def test_paper_mode_visits_experts_in_proportion_to_data():
    # Prepare: weights = samples under node: root 50, A 20, B 30, C 20 (total 120)
    s = Scheduler(tree9(), "hmoe", "paper", "data")
    devs = [DeviceView("d1", ALL, 0), DeviceView("d2", ALL, 0)]
    # Execute
    picks = [set(s.plan(devs).values()) for _ in range(120)]
    # Assert: everyone trains the same expert; frequencies follow 50:20:30:20
    assert all(len(p) == 1 for p in picks)
    counts = Counter(next(iter(p)) for p in picks)
    assert counts == {0: 50, 1: 20, 2: 30, 6: 20}


def test_paper_mode_asks_only_devices_with_data_under_the_node():
    s = Scheduler(tree9(), "hmoe", "paper", "uniform")
    only_a = np.array([10, 10, 0, 0, 0])
    devs = [DeviceView("d1", ALL, 0), DeviceView("d2", only_a, 0)]
    plans = [s.plan(devs) for _ in range(8)]
    for p in plans:
        node = next(iter(p.values()))
        if node in (2, 6):
            assert set(p) == {"d1"}
        else:
            assert set(p) == {"d1", "d2"}


def test_parallel_mode_gives_devices_different_experts_within_budget():
    need = {0: 100.0, 1: 10.0, 2: 10.0, 6: 10.0}
    s = Scheduler(tree9(), "hmoe", "parallel", "data", memory_need_mb=need)
    devs = [DeviceView("big", ALL, 0), DeviceView("small1", ALL, 50), DeviceView("small2", ALL, 50)]
    for _ in range(10):
        plan = s.plan(devs)
        assert len(plan) == 3 and len(set(plan.values())) == 3
        assert plan["small1"] != 0 and plan["small2"] != 0  # root does not fit 50 MB


def test_flat_mode_and_credits_resume():
    s = Scheduler(tree9(), "flat")
    assert s.plan([DeviceView("d", ALL, 0)]) == {"d": FLAT}
    a = Scheduler(tree9(), "hmoe", "paper")
    devs = [DeviceView("d", ALL, 0)]
    seq = [next(iter(a.plan(devs).values())) for _ in range(7)]
    # by hand, weights root 50, A 20, B 30, C 20 (total 120), ties to the smaller node id:
    # credits after adding the weights -> pick (its credit then drops by 120)
    # (50,20,30,20)->0  (-20,40,60,40)->2  (30,60,-30,60)->1  (80,-40,0,80)->0
    # (10,-20,30,100)->6  (60,0,60,0)->0  (-10,20,90,20)->2
    assert seq == [0, 2, 1, 0, 6, 0, 2]
    assert a.credits == {0: -10.0, 1: 20.0, 2: -30.0, 6: 20.0}
    # a second scheduler started from the saved credits continues the same sequence
    b = Scheduler(tree9(), "hmoe", "paper", credits=dict(a.credits))
    cont_a = [next(iter(a.plan(devs).values())) for _ in range(5)]
    cont_b = [next(iter(b.plan(devs).values())) for _ in range(5)]
    assert cont_a == cont_b


def test_no_devices_no_plan():
    assert Scheduler(tree9(), "hmoe").plan([]) == {}
    with pytest.raises(ValueError, match="mode"):
        Scheduler(tree9(), "hmoe", "weird")


def test_sqrt_weighting_visits_root_less_often():
    # weights: root sqrt(50)=7.07, A sqrt(20)=4.47, B sqrt(30)=5.48, C 4.47 -> root ~33% instead of ~42%
    s = Scheduler(tree9(), "hmoe", "paper", "sqrt")
    devs = [DeviceView("d1", ALL, 0)]
    counts = Counter(next(iter(s.plan(devs).values())) for _ in range(2149))
    total = 7.0711 + 4.4721 + 5.4772 + 4.4721
    assert counts[0] == pytest.approx(2149 * 7.0711 / total, abs=2)
    assert counts[1] == pytest.approx(2149 * 4.4721 / total, abs=2)
    with pytest.raises(ValueError, match="weighting"):
        Scheduler(tree9(), "hmoe", "paper", "log")


def test_counts_that_overflow_int64_do_not_wrap_around():
    # issue #10 row 6: 5 classes x 2**62 overflows int64 (the old sum wrapped to a negative
    # number, logged as "0 samples"); the registry refuses such hellos, and the scheduler's own
    # sums are Python ints / float64 anyway
    huge = np.full(5, 2**62, dtype=np.int64)
    s = Scheduler(tree9(), "hmoe", "paper", "data")
    assert s.samples_under(0, huge) == 5 * 2**62 and s.samples_under(1, huge) == 2 * 2**62
    w = s.weights([DeviceView("d", huge, 0)])
    assert w[0] == pytest.approx(5 * 2.0**62) and w[2] == pytest.approx(3 * 2.0**62)
    assert set(s.plan([DeviceView("d", huge, 0)]).values()) == {0}  # the largest weight goes first
