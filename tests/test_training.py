import numpy as np
import pytest
import torch
from tree9 import tree9

from edgehmoe.measure.meter import RoundMeter
from edgehmoe.measure.rounds import measured_local_round
from edgehmoe.model.arch import (
    ArchSpec,
    build_model,
    count_params,
    estimate_train_memory_mb,
    expert_specs,
    expert_width,
)
from edgehmoe.model.training import (
    TrainConfig,
    augment,
    load_state_arrays,
    local_round,
    predict_logits,
    state_arrays,
    train_epochs,
)

MEAN = np.array([0.5, 0.5, 0.5], dtype=np.float32)
STD = np.array([0.25, 0.25, 0.25], dtype=np.float32)


def toy_images(n=120, size=16, seed=0):
    """Class 0: bright left half; class 1: bright right half (plus noise)."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    x = rng.integers(0, 60, (n, size, size, 3)).astype(np.uint8)
    for i, c in enumerate(y):
        if c == 0:
            x[i, :, : size // 2] += 150
        else:
            x[i, :, size // 2 :] += 150
    return x, y.astype(np.int64)


def test_width_rule_matches_design_reference():
    # CIFAR-100: 100 leaves, flat w=32 -> root (20-way) w=16, 5-way experts w=8
    assert expert_width(20, 100) == 16
    assert expert_width(5, 100) == 8
    assert count_params(ArchSpec(32, 100)) == 106372  # ~107k as in DESIGN.md


def test_expert_specs_follow_tree():
    specs = expert_specs(tree9(), input_size=16)
    assert sorted(specs) == [0, 1, 2, 6]
    assert all(s.num_outputs == 2 for s in specs.values())


def test_augment_shifts_and_flips_keep_shape():
    x = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).view(2, 3, 8, 8)
    out = augment(x, torch.Generator().manual_seed(0))
    assert out.shape == x.shape
    # every output row is a shifted/flipped copy: values come from the input or the zero pad
    assert set(out.unique().tolist()) <= set(x.unique().tolist()) | {0.0}


def test_training_learns_a_simple_task():
    x, y = toy_images()
    torch.manual_seed(0)
    model = build_model(ArchSpec(8, 2, input_size=16))
    before = (predict_logits(model, x, MEAN, STD).argmax(1) == y).mean()
    loss, steps = train_epochs(model, x, y, TrainConfig(epochs=8, batch_size=16, lr=0.05, augment=False), MEAN, STD)
    after = (predict_logits(model, x, MEAN, STD).argmax(1) == y).mean()
    assert steps == 8 * 8
    assert after >= 0.95 and after > before


def test_local_round_uses_only_samples_under_node_and_returns_new_weights():
    x, y = toy_images(60)
    labels = np.where(y == 0, 0, 3)  # dataset classes 0 (a1) and 3 (c1) of tree9
    t = tree9()
    spec = ArchSpec(4, 2, input_size=16)
    init = state_arrays(build_model(spec))
    out = local_round(spec, init, t.label_map(1), x, labels, TrainConfig(epochs=1, batch_size=8), MEAN, STD)
    assert out.num_examples == int((labels == 0).sum())  # only class a1 is under A
    assert set(out.weights) == set(init)
    assert any(not np.array_equal(out.weights[k], init[k]) for k in init)
    with pytest.raises(ValueError, match="no samples under"):
        local_round(spec, init, t.label_map(1), x[labels == 3], labels[labels == 3], TrainConfig(), MEAN, STD)


def test_measured_round_reports_positive_time_and_memory():
    x, y = toy_images(64)
    out, m = measured_local_round(ArchSpec(8, 2, input_size=16), None, np.array([0, 1]), x, y,
                                  TrainConfig(epochs=1, batch_size=16), MEAN, STD)
    assert m.round_time_ms > 0 and m.peak_rss_mb > 0 and m.round_mem_mb >= 0
    assert m.peak_rss_mb >= m.rss_before_mb


def test_round_meter_sees_allocation():
    with RoundMeter() as meter:
        block = np.ones(64 * 1024 * 1024 // 8)  # 64 MiB
        block[::512] = 2.0
    assert meter.result.round_mem_mb > 40
    del block


def test_load_state_arrays_rejects_bad_weights():
    m = build_model(ArchSpec(4, 2))
    w = state_arrays(m)
    bad = dict(w)
    bad["classifier.weight"] = np.zeros((3, 16), np.float32)
    with pytest.raises(ValueError, match="classifier.weight.*shape"):
        load_state_arrays(m, bad)
    nan = dict(w)
    nan["classifier.bias"] = np.array([np.nan, 0], np.float32)
    with pytest.raises(ValueError, match="NaN"):
        load_state_arrays(m, nan)
    with pytest.raises(ValueError, match="missing"):
        load_state_arrays(m, {k: v for k, v in w.items() if k != "classifier.bias"})


def test_memory_estimate_grows_with_width_and_batch():
    a = estimate_train_memory_mb(ArchSpec(8, 5), 32)
    assert estimate_train_memory_mb(ArchSpec(32, 100), 32) > a
    assert estimate_train_memory_mb(ArchSpec(8, 5), 128) > a


def test_arch_spec_validation():
    with pytest.raises(ValueError, match="unknown architecture keys"):
        ArchSpec.from_dict({"width": 4, "num_outputs": 2, "depth": 9})
    with pytest.raises(ValueError, match="at least 2 outputs"):
        ArchSpec(4, 1)


def test_train_epochs_with_index_equals_training_on_the_subset():
    x, y = toy_images(80)
    keep = np.arange(0, 80, 2)
    cfg = TrainConfig(epochs=1, batch_size=8, seed=3)
    torch.manual_seed(0)
    a = build_model(ArchSpec(4, 2, input_size=16))
    torch.manual_seed(0)
    b = build_model(ArchSpec(4, 2, input_size=16))
    train_epochs(a, x[keep], y[keep], cfg, MEAN, STD)
    train_epochs(b, x, y[keep], cfg, MEAN, STD, index=keep)
    for k, v in state_arrays(a).items():
        np.testing.assert_allclose(v, state_arrays(b)[k], rtol=1e-6, atol=1e-6)
