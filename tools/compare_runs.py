#!/usr/bin/env python3
"""Compare federated runs at equal client training MACs: one flat run against HMoE runs made
separately (e.g. `simulate --model flat` once, `simulate --model hmoe` with different options).

    python tools/compare_runs.py runs/fed-flat runs/fed-hmoe-a runs/fed-hmoe-b --plot curves.png

Each argument is a `simulate --out` folder (holding `flat/` or `hmoe/` and `summary.json`) or a
run directory itself. For every HMoE run it prints its held-out info-F1, its total client
training compute (cost model: examples × epochs × 3 × MACs of the network each device trained)
and the flat run's validation info-F1 at the same compute (linear between evaluated rounds;
`n/a` past the flat run's end), plus the client wall-clock time of both. `--json FILE` writes
the same numbers; `--plot FILE.png` draws validation info-F1 against training TMAC.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from edgehmoe.core.kinds import FLAT, HMOE


def load_run(path: Path) -> dict:
    """Kind, validation curve (round, client ms, info-F1, client GMACs), held-out summary of one run."""
    from edgehmoe.server.report import load_rows, run_gmacs_per_example, val_curve

    path = Path(path)
    run, summary = path, None
    for kind in (HMOE, FLAT):
        if (path / kind / "state.json").is_file():
            run = path / kind
            if (path / "summary.json").is_file():
                summary = json.loads((path / "summary.json").read_text()).get(kind)
            break
    if not (run / "model.json").is_file() or not (run / "config.toml").is_file():
        raise ValueError(f"{path} is neither a simulate folder nor a run directory (no model.json/config.toml)")
    kind, gmacs = run_gmacs_per_example(run)
    rows = load_rows(run)
    curve = val_curve(rows, gmacs)
    if not curve:
        raise ValueError(f"{run} has no evaluated round (eval.every = 0?)")
    client_s = sum(d["round_time_ms"] for r in rows for d in r.get("per_device", [])) / 1000.0
    return {"path": str(path), "kind": kind, "rounds": len(rows), "curve": curve, "client_s": client_s,
            "heldout_info_f1": (summary or {}).get("info_f1"), "heldout_info_f1_beam2": (summary or {}).get("info_f1_beam2")}


def compare(flat: dict, hmoe: dict) -> dict:
    from edgehmoe.server.report import equal_at

    total = hmoe["curve"][-1][3]
    r, cum, f1, near = equal_at(flat["curve"], total, 3)
    return {"hmoe": hmoe["path"], "hmoe_rounds": hmoe["rounds"], "hmoe_total_tmac": total / 1000.0,
            "hmoe_val_info_f1": hmoe["curve"][-1][2], "hmoe_heldout_info_f1": hmoe["heldout_info_f1"],
            "hmoe_heldout_info_f1_beam2": hmoe["heldout_info_f1_beam2"], "hmoe_client_s": hmoe["client_s"],
            "flat_val_info_f1_at_equal_macs": f1, "flat_nearest_round": r, "flat_nearest_round_info_f1": near,
            "flat_total_tmac": flat["curve"][-1][3] / 1000.0, "flat_val_info_f1": flat["curve"][-1][2],
            "flat_heldout_info_f1": flat["heldout_info_f1"], "flat_client_s": flat["client_s"]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("flat", type=Path, help="the flat run (simulate --out folder or run directory)")
    p.add_argument("hmoe", type=Path, nargs="+", help="HMoE runs")
    p.add_argument("--json", type=Path, help="write the comparison here")
    p.add_argument("--plot", type=Path, help="validation info-F1 against training TMAC (PNG)")
    args = p.parse_args(argv)
    try:
        flat = load_run(args.flat)
        runs = [load_run(h) for h in args.hmoe]
    except (OSError, ValueError, KeyError) as e:
        print(f"compare_runs: error: {e}", file=sys.stderr)
        return 2
    if flat["kind"] != FLAT or any(r["kind"] != HMOE for r in runs):
        print("compare_runs: error: give the flat run first, then HMoE runs", file=sys.stderr)
        return 2
    out = [compare(flat, r) for r in runs]
    print(f"flat {args.flat}: {flat['rounds']} rounds, {out[0]['flat_total_tmac']:.2f} TMAC, "
          f"{flat['client_s']:.0f} s client time, val info-F1 {flat['curve'][-1][2]:.4f}")
    for c in out:
        eq = "n/a" if c["flat_val_info_f1_at_equal_macs"] is None else f"{c['flat_val_info_f1_at_equal_macs']:.4f}"
        print(f"hmoe {c['hmoe']}: {c['hmoe_rounds']} rounds, {c['hmoe_total_tmac']:.2f} TMAC, "
              f"{c['hmoe_client_s']:.0f} s client time, val info-F1 {c['hmoe_val_info_f1']:.4f}; "
              f"flat at equal MACs {eq}")
    if args.json:
        args.json.write_text(json.dumps({"flat": str(args.flat), "comparisons": out}, indent=1))
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4.5))
        for r in [flat, *runs]:
            ax.plot([c[3] / 1000 for c in r["curve"]], [c[2] for c in r["curve"]], "o-" if r["kind"] == FLAT else "s-",
                    ms=3, label=f"{Path(r['path']).name} ({r['kind']}, {r['rounds']} rounds)")
        ax.set_xlabel("client training compute (TMAC, cost model)")
        ax.set_ylabel("validation info-F1")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(args.plot, dpi=120)
        print(f"wrote {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
