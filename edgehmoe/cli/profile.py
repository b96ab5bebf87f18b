"""``edgehmoe-profile`` (also ``python tools/profile_round.py`` and ``python -m
edgehmoe.cli.profile``): the command line of the per-round profiler, :mod:`edgehmoe.measure.profile`.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from edgehmoe.cli.common import add_debug_arg, run_main, tree_groups_arg
from edgehmoe.measure.profile import format_tables, profile, write_plot
from edgehmoe.measure.worker import run_job

__all__ = ["get_args_parser", "main"]


def _positive_int(s: str) -> int:
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {s!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {v}")
    return v


def _positive_float(s: str) -> float:
    try:
        v = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {s!r}") from None
    if not math.isfinite(v) or v <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {s}")
    return v


def get_args_parser(add_help: bool = True, prog: str | None = None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog,
        description="Profile one client training round of the flat model and of every expert "
        "(time and memory per round, the seed paper's Table 1).",
        add_help=add_help,
    )
    p.add_argument("--dataset", required=False, metavar="SPEC",
                   help="dataset spec (required), e.g. synthetic, synthetic:coarse=4,fine=5, "
                   "cifar100:PATH, tinyimagenet:PATH, npz:PATH")
    p.add_argument("--samples-per-client", type=_positive_int, default=500, metavar="N",
                   help="images the simulated client holds, drawn class-balanced from the training "
                   "split (default 500: a 1/100 shard of CIFAR-100's 50k)")
    p.add_argument("--batch-size", type=_positive_int, default=32, metavar="B",
                   help="local batch size (default 32, a batch a Pi-class device trains comfortably)")
    p.add_argument("--epochs", type=_positive_float, default=1.0, metavar="E",
                   help="local epochs per round (default 1; the paper reports one round of local training)")
    p.add_argument("--threads", type=_positive_int, default=1, metavar="T",
                   help="torch threads in each child (default 1)")
    p.add_argument("--repeats", type=_positive_int, default=3, metavar="R",
                   help="fresh subprocesses per model; medians and min/max are reported (default 3)")
    p.add_argument("--jobs", type=_positive_int, default=1, metavar="J",
                   help="children run in parallel (default 1; more distorts time, hardly memory)")
    p.add_argument("--seed", type=int, default=0, help="seed of the client's sample draw and of training (default 0)")
    p.add_argument("--flat-width", type=_positive_int, default=32, metavar="W",
                   help="width of the flat model; expert widths follow from it (default 32)")
    p.add_argument("--expert-head", choices=["children", "leaves"], default="leaves",
                   help="experts trained on their children or on the leaves below them, as in the run "
                        "being profiled (default leaves, the run default; docs/accuracy.md)")
    p.add_argument("--expert-stem-stride", type=int, choices=[1, 2], default=2,
                   help="stride of the other experts' first convolution, as in the run being profiled (default 2)")
    p.add_argument("--root-stem-stride", type=int, choices=[1, 2], default=2,
                   help="stride of the root's first convolution, as in the run being profiled (default 2)")
    p.add_argument("--tree-groups", type=tree_groups_arg, default="auto", metavar="K|auto",
                   help="experts of the routing tree of a run with --tree-groups K|auto (default auto, the "
                        "run default: deep trees cut to groups of at most 30 classes; 0: the dataset's tree)")
    p.add_argument("--cold", action="store_true",
                   help="skip the warm-up round: measure a process's first round, including torch's "
                   "one-time lazy initialisation")
    p.add_argument("--memory-limit-mb", type=_positive_float, default=None, metavar="M",
                   help="also run every model once with the whole child process limited to M MB and "
                   "report which still fit")
    p.add_argument("--limit-mechanism", choices=("auto", "cgroup", "systemd", "watchdog"), default="auto",
                   help="how --memory-limit-mb is enforced (default auto: cgroup v2, then systemd-run, "
                   "then an RSS watchdog)")
    p.add_argument("--run", metavar="DIR", default=None,
                   help="finished federated run directory; info-F1 is read from its summary.json")
    p.add_argument("--json", metavar="FILE", default=None, help="write the results as JSON here")
    p.add_argument("--plot", metavar="FILE.png", default=None, help="write a bar chart per expert here")
    p.add_argument("--timeout-s", type=_positive_float, default=1800.0,
                   help="give up on a child after this many seconds (default 1800)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress lines on stderr")
    add_debug_arg(p)
    # Before edgehmoe.measure.worker existed the children were started with this flag; kept so
    # that such a command line still works.
    p.add_argument("--_child", metavar="JOBJSON", default=None, help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    parser = get_args_parser(prog=prog)
    args = parser.parse_args(argv)
    if args._child is not None:
        run_job("train-round", args._child)  # ends this (child) process
    if not args.dataset:
        parser.print_usage(sys.stderr)
        print(f"{parser.prog}: error: --dataset is required", file=sys.stderr)
        return 2
    return run_main(parser.prog, lambda: _run(args), debug=args.debug)


def _run(args) -> int:
    res = profile(args)
    print(format_tables(res))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(res, indent=2, allow_nan=False) + "\n")
    if args.plot:
        write_plot(res, args.plot)
    return 0



if __name__ == "__main__":
    sys.exit(main(prog="python -m edgehmoe.cli.profile"))
