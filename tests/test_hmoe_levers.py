"""The accuracy levers of issue #11: leaf-head experts, distillation, temperature calibration,
the cost model behind ``--equal-compute``, and training in resumable pieces.

Tree (tests/tree9.py)::

    0 root ── 1 A ── 3 a1 (class 0), 4 a2 (class 1)
           └─ 2 B ── 5 b1 (class 2)
                  └─ 6 C ── 7 c1 (class 3), 8 c2 (class 4)

Leaves in node order: a1, a2, b1, c1, c2. A leaf head at the root groups them [A, A, B, B, B];
at B it groups b1, c1, c2 as [b1, C, C].
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tree9 import tree9

from edgehmoe.core.checkpoint import read_model_dir
from edgehmoe.model.arch import (
    ArchSpec,
    build_model,
    expert_label_map,
    expert_specs,
    leaf_groups,
    scale_logits,
)
from edgehmoe.model.central import fit_hmoe, new_model_dir, soft_targets
from edgehmoe.model.cost import cnn3_macs, equal_compute_epochs, train_macs
from edgehmoe.model.training import (
    Trainer,
    TrainConfig,
    fit_temperature,
    local_round,
    predict_logits,
    relabel_samples,
    state_arrays,
    train_epochs,
)

MEAN = np.array([0.5, 0.5, 0.5], dtype=np.float32)
STD = np.array([0.25, 0.25, 0.25], dtype=np.float32)


def tree9_images(per_class=12, size=8, seed=0):
    """Each of the 5 classes brightens its own colour channel / half, plus noise."""
    rng = np.random.default_rng(seed)
    y = np.repeat(np.arange(5), per_class)
    x = rng.integers(0, 60, (len(y), size, size, 3)).astype(np.uint8)
    for i, c in enumerate(y):
        x[i, :, : size // 2 if c % 2 else size, c % 3] += 150
    return x, y


# ------------------------------------------------------------------ leaf heads
def test_leaf_groups_and_label_maps_worked_out_by_hand():
    # Prepare
    t = tree9()
    # Execute / Assert
    assert leaf_groups(t, 0).tolist() == [0, 0, 1, 1, 1]
    assert leaf_groups(t, 2).tolist() == [0, 1, 1]
    specs = expert_specs(t, input_size=8, fixed_width=4, head="leaves")
    assert specs[0].leaf_groups == (0, 0, 1, 1, 1) and specs[2].leaf_groups == (0, 1, 1)
    assert specs[1].leaf_groups is None and specs[6].leaf_groups is None  # children are all leaves
    assert expert_label_map(t, 0, specs[0]).tolist() == [0, 1, 2, 3, 4]
    assert expert_label_map(t, 2, specs[2]).tolist() == [-1, -1, 0, 1, 2]
    assert expert_label_map(t, 2, expert_specs(t, 8, fixed_width=4)[2]).tolist() == [-1, -1, 0, 1, 1]


def test_leaf_head_spec_round_trips_and_plain_spec_dict_is_unchanged():
    plain = ArchSpec(4, 2, input_size=8)
    assert plain.to_dict() == {"width": 4, "num_outputs": 2, "input_size": 8, "in_channels": 3, "kind": "cnn3"}
    leaf = ArchSpec(4, 2, input_size=8, leaf_groups=[0, 0, 1, 1, 1])
    d = leaf.to_dict()
    assert d["leaf_groups"] == [0, 0, 1, 1, 1] and ArchSpec.from_dict(d) == leaf
    assert leaf.num_head_outputs == 5 and plain.num_head_outputs == 2
    with pytest.raises(ValueError, match="leaf_groups must name every output"):
        ArchSpec(4, 3, leaf_groups=[0, 0, 1])  # output 2 has no leaf
    with pytest.raises(ValueError, match="grouped differently"):
        expert_label_map(tree9(), 0, ArchSpec(4, 2, leaf_groups=[0, 1, 1, 1, 1]))


def test_leaf_head_softmax_over_children_equals_summed_leaf_probabilities():
    # Prepare
    torch.manual_seed(0)
    model = build_model(ArchSpec(4, 2, input_size=8, leaf_groups=[0, 0, 1, 1, 1])).eval()
    x = torch.randn(6, 3, 8, 8)
    # Execute
    with torch.no_grad():
        leaf_p = torch.softmax(model.head_logits(x), dim=1)
        child_p = torch.softmax(model(x), dim=1)
    # Assert
    assert model(x).shape == (6, 2)
    np.testing.assert_allclose(child_p[:, 0], leaf_p[:, :2].sum(1), rtol=1e-5)
    np.testing.assert_allclose(child_p[:, 1], leaf_p[:, 2:].sum(1), rtol=1e-5)
    # a child whose leaves are all far below the best leaf stays finite (probability ~0)
    head = torch.tensor([[0.0, -200.0, 50.0, 1.0, 2.0]])
    out = model.group(head)
    assert torch.isfinite(out).all() and torch.softmax(out, 1)[0, 0] < 1e-20
    np.testing.assert_allclose(out[0, 1].item(), torch.logsumexp(head[0, 2:], 0).item(), rtol=1e-6)


def test_leaf_head_weights_have_the_same_keys_and_local_round_trains_it():
    # The federated hook: a task whose arch has a leaf head carries expert_label_map as label_map.
    t = tree9()
    spec = expert_specs(t, input_size=8, fixed_width=4, head="leaves")[0]
    x, y = tree9_images()
    init = state_arrays(build_model(spec))
    assert set(init) == set(state_arrays(build_model(ArchSpec(4, 2, input_size=8))))
    assert init["classifier.weight"].shape == (5, 16)  # one row per leaf
    out = local_round(spec, init, expert_label_map(t, 0, spec), x, y, TrainConfig(epochs=2, batch_size=10), MEAN, STD)
    assert out.num_examples == 60 and out.steps == 12
    assert not np.array_equal(out.weights["classifier.weight"], init["classifier.weight"])


# ------------------------------------------------------------------ cost model
def test_cnn3_macs_counts_the_leaf_head_linear_layer():
    plain = {"width": 16, "num_outputs": 20, "input_size": 32}
    leaf = {**plain, "leaf_groups": [i // 5 for i in range(100)]}
    convs = 32 * 32 * 9 * 3 * 16 + 16 * 16 * 9 * 16 * 32 + 8 * 8 * 9 * 32 * 64
    assert cnn3_macs(plain) == convs + 64 * 20 == 2_802_944
    assert cnn3_macs(leaf) == convs + 64 * 100
    assert train_macs(plain, 10) == 3 * 10 * 2_802_944


def _hooked_macs(spec: ArchSpec) -> int:
    """MACs counted on the torch network itself (convolutions and linear layers)."""
    total = [0]

    def conv(m, inp, out):
        total[0] += out.numel() * m.in_channels * m.kernel_size[0] * m.kernel_size[1]

    def linear(m, inp, out):
        total[0] += m.in_features * m.out_features

    model = build_model(spec)
    for m in model.modules():
        if isinstance(m, torch.nn.Conv2d):
            m.register_forward_hook(conv)
        elif isinstance(m, torch.nn.Linear):
            m.register_forward_hook(linear)
    with torch.no_grad():
        model(torch.zeros(1, 3, spec.input_size, spec.input_size))
    return total[0]


@pytest.mark.parametrize("spec", [
    ArchSpec(16, 20, input_size=32, leaf_groups=[i // 5 for i in range(100)]),
    ArchSpec(32, 20, input_size=32, stem_stride=2),
    ArchSpec(8, 2, input_size=16, stem_stride=2, leaf_groups=[0, 0, 1, 1, 1]),
])
def test_cost_model_matches_the_network_with_leaf_head_and_strided_stem(spec):
    assert cnn3_macs(spec.to_dict()) == _hooked_macs(spec)


def test_strided_stem_halves_the_resolution_and_keeps_plain_dicts_unchanged():
    spec = ArchSpec(32, 20, input_size=32, stem_stride=2)
    assert spec.to_dict()["stem_stride"] == 2 and ArchSpec.from_dict(spec.to_dict()) == spec
    assert "stem_stride" not in ArchSpec(32, 20).to_dict()
    # same width, a quarter of the convolution MACs (the linear layer is unchanged)
    assert cnn3_macs(spec.to_dict()) - 128 * 20 == (cnn3_macs(ArchSpec(32, 20).to_dict()) - 128 * 20) // 4
    specs = expert_specs(tree9(), input_size=8, fixed_width=4, root_stem_stride=2)
    assert specs[0].stem_stride == 2 and all(specs[n].stem_stride == 1 for n in (1, 2, 6))
    with pytest.raises(ValueError, match="stem_stride must be 1 or 2"):
        ArchSpec(4, 2, stem_stride=3)
    with pytest.raises(ValueError, match="input_size / stem_stride"):
        ArchSpec(4, 2, input_size=6, stem_stride=2)


def test_equal_compute_epochs_balances_training_macs():
    flat = {"width": 32, "num_outputs": 100, "input_size": 32}
    root = {"width": 16, "num_outputs": 20, "input_size": 32}
    sup = {"width": 8, "num_outputs": 5, "input_size": 32}
    experts = {0: (root, 45000), **{n: (sup, 2250) for n in range(1, 21)}}
    e = equal_compute_epochs(flat, 45000, 12, experts)
    # 12 flat epochs = 12 * 10,334,720 MACs per image; one HMoE epoch = root + one expert per image
    assert e == pytest.approx(12 * 10_334_720 / (2_802_944 + 811_168))
    assert e == pytest.approx(34.31, abs=0.01)  # not 48: the width rule's k/L is only approximate
    hmoe = sum(train_macs(a, n * e) for a, n in experts.values())
    assert hmoe == pytest.approx(train_macs(flat, 45000 * 12))


# ------------------------------------------------------------------ training in pieces
def test_trainer_run_in_pieces_equals_one_run():
    x, y = tree9_images()
    cfg = TrainConfig(epochs=2.5, batch_size=8, schedule="onecycle", seed=2)
    torch.manual_seed(0)
    a = build_model(ArchSpec(4, 5, input_size=8))
    torch.manual_seed(0)
    b = build_model(ArchSpec(4, 5, input_size=8))
    loss_a, steps_a = train_epochs(a, x, y, cfg, MEAN, STD)
    tb = Trainer(b, x, y, cfg, MEAN, STD)
    for until in (3, 7, 7, 16, 100):
        tb.run(until=until)
    assert steps_a == tb.step == 20 and tb.seen == 60 + 60 + 4 * 8  # 8 steps per epoch, 2.5 epochs
    assert loss_a == tb.mean_loss
    for k, v in state_arrays(a).items():
        np.testing.assert_array_equal(v, state_arrays(b)[k])


def test_fit_hmoe_in_lockstep_equals_training_each_expert_alone(tmp_path):
    # Prepare
    t = tree9()
    x, y = tree9_images()
    specs = expert_specs(t, input_size=8, fixed_width=4)
    cfg = TrainConfig(epochs=2, batch_size=8, seed=5)
    md = new_model_dir(tmp_path / "m", t, 8, MEAN, STD, "toy")
    history: list = []
    # Execute
    stats = fit_hmoe(md, x, y, cfg, specs, val=(x, y), history=history)
    # Assert: the old loop, one expert after another with the same seeds
    for node, spec in specs.items():
        torch.manual_seed(cfg.seed + node)
        ref = build_model(spec)
        keep, targets = relabel_samples(t.label_map(node), y)
        cfgn = TrainConfig(epochs=2, batch_size=8, seed=5 + node)
        train_epochs(ref, x, targets, cfgn, MEAN, STD, index=keep)
        got = md.load_weights(md.experts[node])
        for k, v in state_arrays(ref).items():
            np.testing.assert_array_equal(v, got[k])
        assert stats[node]["train_macs"] == 3 * cnn3_macs(spec.to_dict()) * 2 * len(keep)
    assert [p["epoch"] for p in history] == [1, 2] and all(0 <= p["val_info_f1"] <= 1 for p in history)
    assert read_model_dir(md.path).experts.keys() == specs.keys()


# ------------------------------------------------------------------ distillation
def test_soft_targets_sum_each_child_subtree_by_hand():
    t = tree9()
    p = np.array([[0.1, 0.2, 0.3, 0.15, 0.25]], dtype=np.float32)
    np.testing.assert_allclose(soft_targets(p, t.label_map(0), 2), [[0.3, 0.7]], rtol=1e-6)
    np.testing.assert_allclose(soft_targets(p, t.label_map(2), 2), [[0.3 / 0.7, 0.4 / 0.7]], rtol=1e-6)
    leaf_map = expert_label_map(t, 2, expert_specs(t, 8, fixed_width=4, head="leaves")[2])
    np.testing.assert_allclose(soft_targets(p, leaf_map, 3), [[0.3 / 0.7, 0.15 / 0.7, 0.25 / 0.7]], rtol=1e-6)


def test_distillation_from_one_hot_targets_at_temperature_one_is_cross_entropy():
    # KL(one-hot ‖ softmax) = CE, so α = 1, τ = 1 with one-hot soft targets trains exactly as α = 0;
    # a uniform teacher must pull the weights elsewhere.
    x, y = tree9_images()
    cfg = TrainConfig(epochs=1, batch_size=10, seed=1)
    runs = {}
    for name, soft, alpha in (("ce", None, 0.0), ("onehot", np.eye(5)[y], 1.0), ("uniform", np.full((60, 5), 0.2), 1.0)):
        torch.manual_seed(0)
        m = build_model(ArchSpec(4, 5, input_size=8))
        Trainer(m, x, y, cfg, MEAN, STD, soft_targets=soft, distill_weight=alpha, distill_temperature=1.0).run()
        runs[name] = state_arrays(m)["classifier.weight"]
    np.testing.assert_allclose(runs["onehot"], runs["ce"], atol=1e-5)
    assert np.abs(runs["uniform"] - runs["ce"]).max() > 1e-3
    with pytest.raises(ValueError, match="soft targets"):
        Trainer(build_model(ArchSpec(4, 5, input_size=8)), x, y, cfg, MEAN, STD, distill_weight=0.5)


# ------------------------------------------------------------------ calibration
def test_fit_temperature_finds_a_known_scaling_and_folding_it_calibrates():
    # Prepare: a trained model, then the same model with logits scaled by 2.5; a third of the
    # calibration labels are wrong, so the best temperature is not at the edge of the search
    x, y = tree9_images(per_class=20)
    torch.manual_seed(0)
    m = build_model(ArchSpec(4, 5, input_size=8))
    train_epochs(m, x, y, TrainConfig(epochs=3, batch_size=10, seed=0), MEAN, STD)
    y = np.where(np.arange(len(y)) % 3 == 0, (y + 1) % 5, y)
    t0 = fit_temperature(m, x, y, MEAN, STD)
    assert 0.1 < t0 < 10
    before = predict_logits(m, x, MEAN, STD)
    # Execute
    scale_logits(m, 2.5)
    t1 = fit_temperature(m, x, y, MEAN, STD)
    scale_logits(m, 1.0 / t1)
    t2 = fit_temperature(m, x, y, MEAN, STD)
    # Assert
    assert t1 == pytest.approx(2.5 * t0, rel=0.01)
    assert t2 == pytest.approx(1.0, rel=0.01)
    np.testing.assert_allclose(predict_logits(m, x, MEAN, STD), before * 2.5 / t1, rtol=1e-4, atol=1e-5)


def test_fit_hmoe_calibration_folds_one_temperature_per_expert(tmp_path):
    t = tree9()
    x, y = tree9_images()
    xc, yc = tree9_images(per_class=6, seed=1)
    specs = expert_specs(t, input_size=8, fixed_width=4)
    cfg = TrainConfig(epochs=3, batch_size=8, seed=0)
    plain = fit_hmoe(new_model_dir(tmp_path / "a", t, 8, MEAN, STD, "toy"), x, y, cfg, specs)
    md = new_model_dir(tmp_path / "b", t, 8, MEAN, STD, "toy")
    cal = fit_hmoe(md, x, y, cfg, specs, calibration=(xc, yc))
    for node in specs:
        assert plain[node]["temperature"] == 1.0
        w_plain = read_model_dir(tmp_path / "a").load_weights(read_model_dir(tmp_path / "a").experts[node])
        w_cal = md.load_weights(md.experts[node])
        temp = cal[node]["temperature"]
        assert temp != 1.0
        np.testing.assert_allclose(w_cal["classifier.weight"], w_plain["classifier.weight"] / temp, rtol=1e-5)
        np.testing.assert_array_equal(w_cal["features.0.weight"], w_plain["features.0.weight"])
