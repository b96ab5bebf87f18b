"""server/report.py: Table 1 header, plot titles and the info-F1-against-client-compute plot."""

from __future__ import annotations

import matplotlib
import pytest
from tree9 import tree9

from edgehmoe.server.report import build_summary, format_table, plot_run

matplotlib.use("Agg")

LONG_NPZ = ("npz:/work/shared/data/some_project/experiments/2024-05-01/preprocessed/"
            "cifar100_32px_train_subset_with_a_long_name/train.npz")
METRICS = {"info_f1": 0.5, "top1": 0.4}


def _rows(costs, evals):
    """Metric rows: one device per round training node ``n`` for ``c`` ms; val info-F1 at ``evals``."""
    return [{"round": i, "per_device": [{"node": n, "round_time_ms": c, "round_mem_mb": 1.0, "peak_rss_mb": 2.0,
                                        "num_examples": 5}], **({"val_info_f1": evals[i]} if i in evals else {})}
            for i, (n, c) in enumerate(costs)]


def _flat(split="val", description="10% of train held out per class, seed 0"):
    # 4 flat rounds of 1000 ms each; evaluated after rounds 1..4
    return {"rows": _rows([(-1, 1000.0)] * 4, {0: 0.1, 1: 0.2, 2: 0.3, 3: 0.4}), "metrics": METRICS, "params": 10,
            "heldout_split": split, "heldout_description": description}


def _hmoe(split="val", description="10% of train held out per class, seed 0"):
    # 6 expert rounds of 50 ms each over the four experts of tree9; evaluated after rounds 3 and 6
    return {"rows": _rows([(0, 50.0), (1, 50.0), (2, 50.0), (6, 50.0), (0, 50.0), (2, 50.0)], {2: 0.25, 5: 0.35}),
            "metrics": METRICS, "params": {0: 1, 1: 1, 2: 1, 6: 1}, "tree": tree9(),
            "heldout_split": split, "heldout_description": description}


@pytest.fixture
def saved_figures(monkeypatch):
    """Every figure plot_run saves: {file name: figure}, drawn, before it is closed."""
    from matplotlib.figure import Figure

    saved = {}
    original = Figure.savefig

    def spy(self, fname, *args, **kwargs):
        self.canvas.draw()
        saved[str(fname).rsplit("/", 1)[-1]] = self
        return original(self, fname, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", spy)
    return saved


def _titles(fig):
    texts = [ax.title for ax in fig.axes if ax.get_title()]
    if fig._suptitle is not None:
        texts.append(fig._suptitle)
    return texts


@pytest.mark.parametrize("which", ["flat", "hmoe", "both"])
def test_table_header_names_the_heldout_split_and_how_it_was_made(which):
    # Prepare: synthetic data has an official test split; npz data is evaluated on val
    flat = _flat("test", "generated on another random stream of the spec's seed") if which != "hmoe" else None
    hmoe = _hmoe("test", "generated on another random stream of the spec's seed") if which != "flat" else None
    # Execute
    s = build_summary("synthetic", 6, 1, hmoe, flat)
    header = format_table(s).splitlines()[0]
    # Assert
    assert "n/a" not in header
    assert header.endswith("held-out split: test (generated on another random stream of the spec's seed)")
    assert s["heldout_split"] == "test"


def test_table_header_for_a_flat_only_npz_run_says_how_val_was_held_out():
    s = build_summary(LONG_NPZ, 4, 3, None, _flat())
    header = format_table(s).splitlines()[0]
    assert header.endswith("held-out split: val (10% of train held out per class, seed 0)")


@pytest.mark.parametrize("spec, label", [
    (LONG_NPZ, "npz:train.npz"),
    ("cifar100:/work/shared/data/cifar100/train.npz", "cifar100"),
    ("tinyimagenet:/data/tiny-imagenet-200", "tinyimagenet"),
    ("synthetic", "synthetic"),
    ("synthetic:coarse=2,fine=3,per_class=30,test_per_class=10,size=16", "synthetic"),
])
def test_plot_titles_use_a_short_dataset_name_that_fits(spec, label, tmp_path, saved_figures):
    # Execute
    paths = plot_run(build_summary(spec, 6, 1, _hmoe(), _flat()), tmp_path)
    # Assert: every title starts with the short name and lies inside its figure
    assert {p.name for p in paths} >= {"info_f1_per_round.png", "cost_per_expert.png"}
    for name, fig in saved_figures.items():
        titles = _titles(fig)
        assert titles, name
        width = fig.bbox.width
        for t in titles:
            assert t.get_text().startswith(f"{label}:"), (name, t.get_text())
            box = t.get_window_extent()
            assert box.x0 >= 0 and box.x1 <= width, (name, t.get_text(), box.x0, box.x1, width)


def test_info_f1_against_cumulative_client_compute_has_both_curves(tmp_path, saved_figures):
    # Execute
    s = build_summary("synthetic", 6, 1, _hmoe(), _flat())
    paths = plot_run(s, tmp_path)
    # Assert: a new PNG beside the old ones, x = seconds of device training summed so far
    p = tmp_path / "info_f1_per_client_compute.png"
    assert p in paths and p.read_bytes()[:4] == b"\x89PNG"
    assert (tmp_path / "info_f1_per_round.png").exists()
    ax = saved_figures[p.name].axes[0]
    lines = {ln.get_label(): ln for ln in ax.get_lines()}
    assert list(lines["flat"].get_xdata()) == pytest.approx([1.0, 2.0, 3.0, 4.0])
    assert list(lines["flat"].get_ydata()) == pytest.approx([0.1, 0.2, 0.3, 0.4])
    assert list(lines["hmoe"].get_xdata()) == pytest.approx([0.15, 0.30])
    assert list(lines["hmoe"].get_ydata()) == pytest.approx([0.25, 0.35])
    assert "client compute" in ax.get_xlabel() and "s" in ax.get_xlabel()


def test_compute_plot_with_one_model_draws_that_curve(tmp_path, saved_figures):
    paths = plot_run(build_summary("synthetic", 4, 1, None, _flat()), tmp_path)
    assert tmp_path / "info_f1_per_client_compute.png" in paths
    ax = saved_figures["info_f1_per_client_compute.png"].axes[0]
    assert [ln.get_label() for ln in ax.get_lines() if not ln.get_label().startswith("_")] == ["flat"]
