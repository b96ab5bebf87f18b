"""Summaries of finished runs: the seed paper's Table 1, ``summary.json`` and plots.

Plots (:func:`plot_run`): validation info-F1 per round (``info_f1_per_round.png``), the same
curves against cumulative client compute — seconds of device training summed over devices
and rounds, the axis of the equal-compute comparison — (``info_f1_per_client_compute.png``),
and time / memory per expert with the flat model as reference (``cost_per_expert.png``).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path, PurePath

import numpy as np

from edgehmoe.core.kinds import FLAT, HMOE

__all__ = ["load_rows", "per_node_costs", "build_summary", "format_table", "plot_run", "dataset_label",
           "gmacs_per_example", "run_gmacs_per_example", "val_curve", "equal_at"]

logger = logging.getLogger(__name__)


def load_rows(run_dir: Path) -> list[dict]:
    p = Path(run_dir) / "metrics.jsonl"
    return [json.loads(ln) for ln in p.read_text().splitlines() if ln.strip()] if p.exists() else []


def per_node_costs(rows: list[dict]) -> dict[int, dict]:
    """Median (over device-rounds) time and memory per node, plus totals.

    A compact row (``detail: "summary"``, more than ``rounds.DETAIL_LIMIT`` devices) has no
    ``per_device`` list; its ``per_node`` medians count once per device of that round (weighted
    medians of medians: close to, not exactly, the median over device-rounds), its sums exactly.
    """
    acc: dict[int, dict[str, list]] = {}
    totals: dict[int, float] = {}
    for r in rows:
        for d in r.get("per_device", []):
            a = acc.setdefault(int(d["node"]), {"t": [], "m": [], "p": [], "n": [], "w": []})
            a["t"].append(d["round_time_ms"])
            a["m"].append(d["round_mem_mb"])
            a["p"].append(d["peak_rss_mb"])
            a["n"].append(d["num_examples"])
            a["w"].append(1)
            totals[int(d["node"])] = totals.get(int(d["node"]), 0.0) + d["round_time_ms"]
        if r.get("detail") == "summary":
            for node, st in (r.get("per_node") or {}).items():
                k = int(st["devices"])
                a = acc.setdefault(int(node), {"t": [], "m": [], "p": [], "n": [], "w": []})
                a["t"].append(st["round_time_ms"]["median"])
                a["m"].append(st["round_mem_mb"]["median"])
                a["p"].append(st["peak_rss_mb"]["median"])
                a["n"].append(st["num_examples"] / max(1, k))
                a["w"].append(k)
                totals[int(node)] = totals.get(int(node), 0.0) + st["round_time_ms"]["sum"]
    return {
        n: {
            "round_time_ms": _weighted_median(a["t"], a["w"]),
            "round_mem_mb": _weighted_median(a["m"], a["w"]),
            "peak_rss_mb": _weighted_median(a["p"], a["w"]),
            "samples_per_device": _weighted_median(a["n"], a["w"]),
            "device_rounds": int(sum(a["w"])),
            "total_time_ms": float(totals.get(n, 0.0)),
        }
        for n, a in acc.items()
    }


def _weighted_median(values: list, weights: list) -> float:
    """``np.median`` of ``values`` with each repeated ``weights`` times (equal to it for unit weights)."""
    if all(w == 1 for w in weights):
        return float(np.median(values))
    return float(np.median(np.repeat(np.asarray(values, dtype=np.float64), np.asarray(weights, dtype=np.int64))))


def _row_gmacs(r: dict, gmacs_per_example: Mapping[int, float]) -> float:
    """Training GMACs the devices spent in one metrics row (cost model, not a clock)."""
    total = sum(gmacs_per_example.get(int(d["node"]), 0.0) * d["num_examples"] for d in r.get("per_device", []))
    if r.get("detail") == "summary":
        total += sum(gmacs_per_example.get(int(n), 0.0) * st["num_examples"]
                     for n, st in (r.get("per_node") or {}).items())
    return float(total)


def val_curve(rows: list[dict], gmacs_per_example: Mapping[int, float] | None = None) -> list[tuple]:
    """(round, cumulative client ms, val info-F1, cumulative client GMACs) at each evaluated round.

    GMACs come from the cost model (``gmacs_per_example``: node → training GMACs of one task
    example, epochs included); ``None`` without it. Unlike the clocks they do not depend on
    how busy the machine was.
    """
    out, cum, cum_g = [], 0.0, 0.0
    for r in rows:
        cum += sum(d["round_time_ms"] for d in r.get("per_device", []))
        if r.get("detail") == "summary":  # compact row: the sums per expert
            cum += sum(st["round_time_ms"]["sum"] for st in (r.get("per_node") or {}).values())
        if gmacs_per_example is not None:
            cum_g += _row_gmacs(r, gmacs_per_example)
        if "val_info_f1" in r:
            out.append((r["round"] + 1, cum, r["val_info_f1"], cum_g if gmacs_per_example is not None else None))
    return out


def gmacs_per_example(specs: Mapping[int, Mapping], epochs: float, expert_epochs: float = 0) -> dict[int, float]:
    """node → training GMACs of one example of one task (``train.epochs`` for the root and the
    flat model, ``train.expert_epochs`` (0 = epochs) for the other experts), from the cost model."""
    from edgehmoe.model.cost import train_macs

    return {int(n): train_macs(a, (expert_epochs or epochs) if int(n) > 0 else epochs) / 1e9
            for n, a in specs.items()}


def run_gmacs_per_example(run_dir: Path, kind: str | None = None) -> tuple[str, dict[int, float]]:
    """``(kind, gmacs_per_example)`` of a run directory, from its ``model.json`` (the networks)
    and ``config.toml`` (the epochs); ``kind`` None: hmoe when the run has experts, else flat."""
    from edgehmoe.server.config import load_config

    run_dir = Path(run_dir)
    models = json.loads((run_dir / "model.json").read_text())["models"]
    kind = kind or (HMOE if HMOE in models else FLAT)
    specs = ({int(n): e["arch"] for n, e in models[HMOE]["experts"].items()} if kind == HMOE
             else {-1: models[FLAT]["arch"]})
    train = load_config(run_dir / "config.toml").train
    return kind, gmacs_per_example(specs, train.epochs, train.expert_epochs)


def equal_at(curve: list, target: float, axis: int) -> tuple[int, float, float | None, float]:
    """Flat's curve read at ``target`` on ``axis`` (1: client ms, 3: GMACs): nearest evaluated
    round, its cost, the value interpolated linearly from (0, 0) (None past its end), and the
    nearest round's value."""
    cums = [0.0] + [c[axis] for c in curve]
    f1s = [0.0] + [c[2] for c in curve]
    near = min(curve, key=lambda c: abs(c[axis] - target))
    return near[0], near[axis], (float(np.interp(target, cums, f1s)) if target <= cums[-1] else None), near[2]


# Dataset kinds whose name says which data it is; for the others the file name does.
_NAMED_KINDS = ("cifar100", "tinyimagenet", "synthetic")


def dataset_label(spec: str, max_len: int = 32) -> str:
    """A short name for a dataset spec, for titles: ``cifar100``, ``synthetic``, ``npz:train.npz``.

    The spec's path (and synthetic options) are dropped; the summary keeps the full spec.
    """
    kind, _, arg = str(spec).strip().partition(":")
    key = kind.strip().lower().replace("-", "").replace("_", "")
    if key in _NAMED_KINDS or not arg.strip():
        label = kind.strip()
    else:
        label = f"{kind.strip()}:{PurePath(arg.strip()).name}"
    return label if len(label) <= max_len else label[: max_len - 1] + "…"


def build_summary(dataset: str, rounds: int, clients: int, hmoe: dict | None, flat: dict | None) -> dict:
    """``hmoe``/``flat``: dicts with keys rows, metrics (held-out), params, tree, heldout_split
    and optionally heldout_description (how that split was made, for the Table 1 header)."""
    s: dict = {"dataset": dataset, "rounds": rounds, "clients": clients}
    for entry in (hmoe, flat):
        if entry is not None and entry.get("heldout_split"):
            s["heldout_split"] = entry["heldout_split"]
            if entry.get("heldout_description"):
                s["heldout_description"] = entry["heldout_description"]
            break
    if flat is not None:
        costs = per_node_costs(flat["rows"]).get(-1, {})
        s[FLAT] = {
            "info_f1": flat["metrics"]["info_f1"],
            "top1": flat["metrics"]["top1"],
            "round_time_ms": costs.get("round_time_ms", float("nan")),
            "round_mem_mb": costs.get("round_mem_mb", float("nan")),
            "peak_rss_mb": costs.get("peak_rss_mb", float("nan")),
            "params": flat["params"],
            "total_client_ms": costs.get("total_time_ms", 0.0),
            "metrics": flat["metrics"],
            "val_curve": val_curve(flat["rows"], flat.get("gmacs_per_example")),
        }
        if flat.get("gmacs_per_example") is not None:
            s[FLAT]["total_client_gmacs"] = float(sum(_row_gmacs(r, flat["gmacs_per_example"]) for r in flat["rows"]))
    if hmoe is not None:
        tree = hmoe["tree"]
        costs = per_node_costs(hmoe["rows"])
        experts = []
        for n in tree.internal_nodes:
            c = costs.get(int(n))
            experts.append({
                "node": int(n),
                "name": tree.names[n],
                "depth": int(tree.depths[n]),
                "children": int(tree.num_children[n]),
                "params": hmoe["params"][int(n)],
                "round_time_ms": c["round_time_ms"] if c else None,
                "round_mem_mb": c["round_mem_mb"] if c else None,
                "peak_rss_mb": c["peak_rss_mb"] if c else None,
                "device_rounds": c["device_rounds"] if c else 0,
            })
        s[HMOE] = {
            "info_f1": hmoe["metrics"]["info_f1"],
            "top1": hmoe["metrics"]["top1"],
            "info_f1_beam2": hmoe.get("metrics_beam2", {}).get("info_f1"),
            "params_total": int(sum(hmoe["params"].values())),
            "total_client_ms": float(sum(c["total_time_ms"] for c in costs.values())),
            "experts": experts,
            "metrics": hmoe["metrics"],
            "val_curve": val_curve(hmoe["rows"], hmoe.get("gmacs_per_example")),
            "experts_never_trained": [e["name"] for e in experts if e["device_rounds"] == 0],
        }
        if hmoe.get("gmacs_per_example") is not None:
            s[HMOE]["total_client_gmacs"] = float(sum(_row_gmacs(r, hmoe["gmacs_per_example"]) for r in hmoe["rows"]))
    if flat is not None and hmoe is not None:
        # Equal total client compute: flat's validation info-F1 interpolated (linearly in
        # cumulative client time, between its evaluated rounds; from 0 compute = no skill)
        # at what the whole HMoE run spent. Extrapolation is not attempted.
        curve = s[FLAT]["val_curve"]
        hmoe_f1 = s[HMOE]["val_curve"][-1][2] if s[HMOE]["val_curve"] else None
        if curve:
            s["equal_compute"] = _equal_compute(curve, s[HMOE]["total_client_ms"], 1, "ms", hmoe_f1)
        if curve and "total_client_gmacs" in s[HMOE] and curve[0][3] is not None:
            # The same comparison on the cost model's training MACs: immune to machine load.
            s["equal_compute_macs"] = _equal_compute(curve, s[HMOE]["total_client_gmacs"], 3, "gmacs", hmoe_f1)
    return s


def _equal_compute(curve: list, target: float, axis: int, unit: str, hmoe_f1: float | None) -> dict:
    """``equal_compute`` (``unit`` "ms", client time) or ``equal_compute_macs`` ("gmacs")."""
    r, cum, f1, f1_near = equal_at(curve, target, axis)
    return {
        f"hmoe_total_client_{unit}": target,
        "flat_round": r,
        f"flat_total_client_{unit}": cum,
        "flat_val_info_f1": f1,
        "flat_val_info_f1_nearest_round": f1_near,
        "hmoe_val_info_f1": hmoe_f1,
    }


def _pct(v, ref) -> str:
    if v is None or ref in (None, 0) or not np.isfinite(ref):
        return "n/a"
    return f"{100.0 * v / ref:.1f}%"


def _num(v, fmt="{:.1f}") -> str:
    return "n/a" if v is None or (isinstance(v, float) and not np.isfinite(v)) else fmt.format(v)


def format_table(s: dict) -> str:
    """The seed paper's Table 1 for this run (plus median and root rows)."""
    flat = s.get(FLAT, {})
    ft, fm = flat.get("round_time_ms"), flat.get("round_mem_mb")
    split = s.get("heldout_split", "n/a")
    if s.get("heldout_description"):
        split = f"{split} ({s['heldout_description']})"
    lines = [
        f"Table 1 — {s['dataset']}, {s['clients']} clients, {s['rounds']} rounds, held-out split: {split}",
        f"{'model':<22}{'info-F1':>9}{'time/round ms':>15}{'% flat':>8}{'mem/round MB':>14}{'% flat':>8}{'params':>10}",
    ]
    if flat:
        lines.append(f"{'Flat softmax':<22}{flat['info_f1']:>9.4f}{_num(ft):>15}{'100%':>8}{_num(fm):>14}{'100%':>8}{flat['params']:>10}")
    h = s.get(HMOE)
    if h:
        lines.append(f"{'HMoE greedy':<22}{h['info_f1']:>9.4f}{'':>15}{'':>8}{'':>14}{'':>8}{h['params_total']:>10}")
        if h.get("info_f1_beam2") is not None:
            lines.append(f"{'HMoE beam 2':<22}{h['info_f1_beam2']:>9.4f}")
        trained = [e for e in h["experts"] if e["round_time_ms"] is not None]
        if trained:
            by_t = sorted(trained, key=lambda e: e["round_time_ms"])
            by_m = sorted(trained, key=lambda e: e["round_mem_mb"])
            rows = [
                ("HMoE max", by_t[-1]["round_time_ms"], by_m[-1]["round_mem_mb"], max(e["params"] for e in trained)),
                ("HMoE median", float(np.median([e["round_time_ms"] for e in trained])),
                 float(np.median([e["round_mem_mb"] for e in trained])), int(np.median([e["params"] for e in trained]))),
                ("HMoE min", by_t[0]["round_time_ms"], by_m[0]["round_mem_mb"], min(e["params"] for e in trained)),
            ]
            root = next((e for e in trained if e["node"] == 0), None)
            if root:
                rows.append(("HMoE root expert", root["round_time_ms"], root["round_mem_mb"], root["params"]))
            for name, t, m, p in rows:
                lines.append(f"{name:<22}{'':>9}{_num(t):>15}{_pct(t, ft):>8}{_num(m):>14}{_pct(m, fm):>8}{p:>10}")
        if trained:
            lines.append("")
            lines.append(f"{'expert':<28}{'depth':>6}{'children':>9}{'params':>8}{'dev-rds':>8}"
                         f"{'time ms':>10}{'% flat':>8}{'mem MB':>9}{'% flat':>8}{'peak MB':>9}")
            shown = sorted(trained, key=lambda e: -e["round_time_ms"])
            if len(shown) > 24:
                shown = shown[:12] + shown[-12:]
                lines.append(f"  ({len(trained)} trained experts; the 12 slowest and the 12 fastest)")
            for e in shown:
                lines.append(f"{e['name'][:27]:<28}{e['depth']:>6}{e['children']:>9}{e['params']:>8}{e['device_rounds']:>8}"
                             f"{e['round_time_ms']:>10.1f}{_pct(e['round_time_ms'], ft):>8}{e['round_mem_mb']:>9.1f}"
                             f"{_pct(e['round_mem_mb'], fm):>8}{e['peak_rss_mb']:>9.1f}")
        if h["experts_never_trained"]:
            lines.append(f"  experts never trained in this run: {len(h['experts_never_trained'])} "
                         f"(e.g. {', '.join(h['experts_never_trained'][:3])}) — more rounds needed")
    eq = s.get("equal_compute")
    if eq:
        lines.append(
            f"Equal client compute ({eq['hmoe_total_client_ms'] / 1000:.1f} s for HMoE): flat val info-F1 "
            f"{_flat_at(eq)} vs HMoE {_num(eq['hmoe_val_info_f1'], '{:.4f}')} (validation split)"
        )
    eqm = s.get("equal_compute_macs")
    if eqm:
        lines.append(
            f"Equal client training MACs ({eqm['hmoe_total_client_gmacs'] / 1000:.2f} TMAC for HMoE, cost model): "
            f"flat val info-F1 {_flat_at(eqm)} vs HMoE {_num(eqm['hmoe_val_info_f1'], '{:.4f}')}"
        )
    return "\n".join(lines)


def _flat_at(eq: dict) -> str:
    """Flat's info-F1 at the HMoE run's compute, or why there is none (an equal_compute block)."""
    if eq["flat_val_info_f1"] is not None:
        return f"{eq['flat_val_info_f1']:.4f} (interpolated)"
    return f"n/a (flat spent less in all its rounds; {eq['flat_val_info_f1_nearest_round']:.4f} at its end)"


def _save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_run(s: dict, out_dir: Path) -> list[Path]:
    """info-F1 per round and against cumulative client compute, and time / memory per expert
    with the flat model as reference (see the module docstring for the file names)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    name = dataset_label(s["dataset"])
    paths = []
    curves = [(kind, style, s.get(kind, {}).get("val_curve") or []) for kind, style in ((FLAT, "o-"), (HMOE, "s-"))]
    fig, ax = plt.subplots(figsize=(6, 4))
    for kind, style, curve in curves:
        if curve:
            ax.plot([c[0] for c in curve], [c[2] for c in curve], style, label=kind)
    ax.set_xlabel("round")
    ax.set_ylabel("validation info-F1")
    ax.set_title(f"{name}: info-F1 per round")
    ax.grid(alpha=0.3)
    ax.legend()
    paths.append(_save(fig, out_dir / "info_f1_per_round.png"))

    # A flat round costs many expert rounds, so rounds mislead; cumulative client compute is
    # the axis of the equal-compute comparison (build_summary's "equal_compute").
    fig, ax = plt.subplots(figsize=(6, 4))
    for kind, style, curve in curves:
        if curve:
            ax.plot([c[1] / 1000.0 for c in curve], [c[2] for c in curve], style, label=kind)
    hmoe_total = s.get(HMOE, {}).get("total_client_ms")
    if s.get(FLAT) and hmoe_total:
        ax.axvline(hmoe_total / 1000.0, color="gray", ls=":", label="HMoE's total")
    ax.set_xlabel("cumulative client compute (s of device training, summed)")
    ax.set_ylabel("validation info-F1")
    ax.set_title(f"{name}: info-F1 per client compute")
    ax.grid(alpha=0.3)
    ax.legend()
    paths.append(_save(fig, out_dir / "info_f1_per_client_compute.png"))
    h = s.get(HMOE)
    if h:
        trained = [e for e in h["experts"] if e["round_time_ms"] is not None]
        if trained:
            fig, axes = plt.subplots(1, 2, figsize=(11, 4))
            for ax, key, label in ((axes[0], "round_time_ms", "time / round (ms)"),
                                   (axes[1], "round_mem_mb", "memory / round (MB)")):
                es = sorted(trained, key=lambda e: -e[key])
                ax.bar(range(len(es)), [e[key] for e in es], color="tab:blue", label="experts")
                ref = s.get(FLAT, {}).get(key)
                if ref is not None and np.isfinite(ref):
                    ax.axhline(ref, color="tab:red", ls="--", label=FLAT)
                if len(es) <= 30:
                    ax.set_xticks(range(len(es)))
                    ax.set_xticklabels([e["name"][:14] for e in es], rotation=70, fontsize=7)
                ax.set_ylabel(label)
                ax.legend()
            fig.suptitle(f"{name}: per-round client cost per expert")
            paths.append(_save(fig, out_dir / "cost_per_expert.png"))
    return paths
