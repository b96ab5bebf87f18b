"""What every edgehmoe command line shares: dataset arguments, logging set-up, and the one
policy that turns exceptions into exit codes (:func:`run_main`).

Exit codes: 0 done; 2 bad input (an :class:`~edgehmoe.errors.EdgeHmoeError` or an ``OSError``
such as a missing file, printed as one line); 1 a run that could not complete (errors whose
``exit_code`` is 1); 130 interrupted (Ctrl-C). Any other exception is a bug: it propagates
with its traceback. ``--debug`` prints the traceback of one-line errors too.
"""

from __future__ import annotations

import argparse
import logging
import sys
import traceback
from collections.abc import Callable

from edgehmoe.errors import EdgeHmoeError

__all__ = ["EXIT_INTERRUPTED", "add_dataset_args", "add_debug_arg", "configure_logging", "load_data", "run_main"]

EXIT_INTERRUPTED = 130


def configure_logging(verbose: int = 0, fmt: str = "%(asctime)s %(levelname)s %(name)s: %(message)s") -> None:
    """``verbose``: -1 warnings only, 0 info, 1 or more debug."""
    level = logging.WARNING if verbose < 0 else logging.INFO if verbose == 0 else logging.DEBUG
    logging.basicConfig(level=level, format=fmt, datefmt="%H:%M:%S")


def tree_groups_arg(value: str) -> int | str:
    """argparse type of ``--tree-groups``: ``auto`` or a class count >= 0."""
    from edgehmoe.core.hierarchy import parse_tree_groups

    try:
        return parse_tree_groups(value)
    except EdgeHmoeError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def add_debug_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--debug", action="store_true", help="show the traceback of errors that are normally one line")


def add_dataset_args(p: argparse.ArgumentParser, split_default: str = "train", *, hierarchy: bool = True) -> None:
    """``--dataset SPEC --split --val-fraction --limit-per-class --seed`` (and ``--hierarchy CSV``)."""
    p.add_argument("--dataset", required=True, metavar="SPEC",
                   help="synthetic[:opts] | cifar100:PATH | tinyimagenet:PATH | npz:PATH")
    p.add_argument("--split", default=split_default, choices=["train", "val", "test", "all"],
                   help=f"which split (default {split_default}); val = held-out part of train")
    if hierarchy:
        p.add_argument("--hierarchy", metavar="CSV", help="parent,child edge list for npz:PATH with a 'label' array")
    p.add_argument("--val-fraction", type=float, default=0.1, help="share of train held out as val (default 0.1)")
    p.add_argument("--limit-per-class", type=int, default=None, help="use at most this many images per class")
    p.add_argument("--seed", type=int, default=0)


def load_data(args: argparse.Namespace, split: str | None = None):
    """Load the dataset named by :func:`add_dataset_args`' arguments."""
    from edgehmoe.data import load_dataset

    return load_dataset(
        args.dataset,
        split or args.split,
        hierarchy=getattr(args, "hierarchy", None),
        val_fraction=args.val_fraction,
        seed=args.seed,
        limit_per_class=args.limit_per_class,
    )


def run_main(prog: str, func: Callable[[], int | None], *, debug: bool = False) -> int:
    """Run a command's body with the project's exit-code policy (see the module docstring)."""
    try:
        return int(func() or 0)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except EdgeHmoeError as e:
        if debug:
            traceback.print_exc()
        print(f"{prog}: error: {e}", file=sys.stderr)
        return int(getattr(e, "exit_code", 2))
    except OSError as e:
        if debug:
            traceback.print_exc()
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
