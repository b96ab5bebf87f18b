#!/usr/bin/env python3
"""Learning curves at equal compute from `edgehmoe fit` reports.

`edgehmoe fit ... --val-fraction 0.1 > NAME.json` prints a report whose ``history`` holds the
validation info-F1 after every epoch. This plots each run's curve against its cumulative
training multiply-accumulates (the cost model's ``train_gmacs``, spread evenly over its
epochs), so a flat run and a hierarchical run are compared at the same compute:

    python tools/plot_fit_curves.py flat-e12.json h-leaves-s2.json --out curves.png

The label of a curve is its file name without ``.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def curve(report: dict) -> tuple[str, list[tuple[float, float]]]:
    """(model kind, [(cumulative training TMACs, val info-F1), ...]) of one fit report."""
    kind = "hmoe" if "hmoe" in report else "flat"
    r = report[kind]
    if not r.get("history"):
        raise ValueError(f"the {kind} report has no history: fit with --val-fraction > 0")
    per_epoch = float(r["train_gmacs"]) / float(r["epochs"]) / 1000.0
    return kind, [(min(float(h["epoch"]), float(r["epochs"])) * per_epoch, float(h["val_info_f1"]))
                  for h in r["history"] if "val_info_f1" in h]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("reports", nargs="+", type=Path, help="fit reports (JSON printed by edgehmoe fit)")
    p.add_argument("--out", type=Path, required=True, help="PNG to write")
    p.add_argument("--title", default="validation info-F1 vs training compute")
    args = p.parse_args(argv)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for path in args.reports:
        try:
            kind, pts = curve(json.loads(path.read_text()))
        except (OSError, ValueError, KeyError) as e:
            print(f"plot_fit_curves: error: {path}: {e}", file=sys.stderr)
            return 2
        ax.plot([t for t, _ in pts], [f for _, f in pts], "o-" if kind == "flat" else "s-", ms=3,
                label=f"{path.stem} ({kind})")
        print(f"{path.stem}: {pts[-1][1]:.4f} at {pts[-1][0]:.2f} TMAC")
    ax.set_xlabel("training compute (TMAC, cost model)")
    ax.set_ylabel("validation info-F1")
    ax.set_title(args.title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=120)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
