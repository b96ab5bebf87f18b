"""The ``edgehmoe`` command: class trees, partitions, central training and evaluation.

Sub-commands::

    edgehmoe hierarchy show  --dataset SPEC | --csv TREE.csv [--json]
    edgehmoe hierarchy build --wordnet WNIDS.txt --out TREE.csv [--wordnet-dir DIR]
    edgehmoe partition --dataset SPEC --num-devices N [--scheme iid|dirichlet:ALPHA] --out DIR
    edgehmoe fit       --dataset SPEC --model hmoe|flat|both --epochs N --out DIR
    edgehmoe evaluate  --model-dir DIR | --bundle B  --dataset SPEC --split test [--json]

plus ``export``, ``predict``, ``bundle`` and ``extend`` (see :mod:`edgehmoe.cli.bundle`).
Errors end as :func:`edgehmoe.cli.common.run_main` says: one line and exit status 2 for bad
input, 1 for a failed run, 130 for Ctrl-C; ``--debug`` adds the traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from dataclasses import replace
from pathlib import Path

from edgehmoe.cli.common import (
    add_dataset_args,
    add_debug_arg,
    configure_logging,
    load_data,
    run_main,
    tree_groups_arg,
)
from edgehmoe.errors import UsageError

__all__ = ["main", "get_args_parser"]

logger = logging.getLogger("edgehmoe")


# ---------------------------------------------------------------------------- hierarchy
def cmd_hierarchy_show(args) -> int:
    from edgehmoe.core.hierarchy import read_edge_csv, routing_tree

    if args.csv:
        classes = None
        if args.classes:
            classes = [c.strip() for c in Path(args.classes).read_text().split() if c.strip()]
        tree = read_edge_csv(args.csv, classes)
    elif args.dataset:
        tree = load_data(args).hierarchy
    else:
        raise UsageError("give --dataset SPEC or --csv TREE.csv")
    tree = routing_tree(tree, args.tree_groups)
    if args.json:
        print(json.dumps({**tree.summary(), **tree.to_dict()}))
    else:
        print(tree.describe(args.max_lines))
        print(json.dumps(tree.summary()))
    return 0


def cmd_hierarchy_build(args) -> int:
    from edgehmoe.data.taxonomy import wordnet_hierarchy

    wnids = [w.strip() for w in Path(args.wordnet).read_text().split() if w.strip()]
    tree = wordnet_hierarchy(wnids, args.wordnet_dir)
    out = Path(args.out)
    if out.exists() and not args.force:
        raise FileExistsError(f"{out} exists; pass --force to overwrite it")
    tree.to_csv(out)
    print(f"wrote {out}: {json.dumps(tree.summary())}")
    return 0


# ---------------------------------------------------------------------------- partition
def cmd_partition(args) -> int:
    from edgehmoe.data.partition import make_partitioner, write_shards

    ds = load_data(args)
    part = make_partitioner(args.scheme, args.num_devices, args.seed)
    paths = write_shards(ds, part, args.out, overwrite=args.force)
    # write_shards partitioned with `part`; its partitions give the sizes without re-reading shards
    counts = [len(part.load_partition(i)) for i in range(len(paths))]
    print(f"wrote {len(paths)} shards to {args.out} (samples per device: min {min(counts)}, max {max(counts)})")
    return 0


# ---------------------------------------------------------------------------- fit
def _prepare_out(out: Path, force: bool) -> None:
    if out.exists() and any(out.iterdir()) and not force:
        raise FileExistsError(f"{out} is not empty; choose another --out or pass --force to overwrite")
    out.mkdir(parents=True, exist_ok=True)


def _gmacs(macs: float) -> float:
    return round(float(macs) / 1e9, 2)


def _fit_teacher(args, fitted_flat, md):
    """``(torch flat model, mean, std, source)`` of the distillation teacher."""
    from edgehmoe.model.inference import load_models

    if args.teacher:
        _, fm, tmd = load_models(args.teacher)
        if fm is None:
            raise UsageError(f"--teacher {args.teacher} holds no flat model; train one with `edgehmoe fit --model flat`")
        _check_same_classes(tmd.hierarchy.class_names(), md.hierarchy.class_names())
        return fm.model, tmd.mean, tmd.std, str(args.teacher)
    if fitted_flat:
        _, fm, _ = load_models(md.path)
        return fm.model, md.mean, md.std, "flat model of this run"
    raise UsageError("--distill-weight needs a teacher: use --model both (the flat model is trained first) "
                     "or --teacher DIR (a model directory with a flat model)")


def cmd_fit(args) -> int:
    import torch

    from edgehmoe.data import channel_stats, train_val_split
    from edgehmoe.model.arch import expert_label_map, expert_specs, flat_spec
    from edgehmoe.core.hierarchy import routing_tree
    from edgehmoe.model.central import fit_flat, fit_hmoe, new_model_dir, teacher_probs
    from edgehmoe.model.cost import cnn3_macs, equal_compute_epochs, train_macs
    from edgehmoe.model.inference import evaluate_models, load_models
    from edgehmoe.model.training import TrainConfig

    if args.equal_compute and args.hmoe_epochs is not None:
        raise UsageError("give --equal-compute or --hmoe-epochs, not both")
    if not 0.0 <= args.calibrate_fraction < 1.0:
        raise UsageError(f"--calibrate-fraction must be in [0, 1), got {args.calibrate_fraction}")
    if not 0.0 <= args.distill_weight <= 1.0:
        raise UsageError(f"--distill-weight must be in [0, 1], got {args.distill_weight}")
    if args.distill_temperature <= 0:
        raise UsageError(f"--distill-temperature must be > 0, got {args.distill_temperature}")
    if args.teacher and args.distill_weight <= 0:
        raise UsageError("--teacher is only used for distillation; also give --distill-weight > 0")
    if args.model == "flat" and (args.distill_weight > 0 or args.calibrate_fraction > 0 or args.equal_compute):
        raise UsageError("--distill-weight, --calibrate-fraction and --equal-compute apply to the hierarchical "
                         "model; use --model hmoe or both")
    if args.val_every < 1:
        raise UsageError(f"--val-every must be >= 1, got {args.val_every}")
    if args.distill_weight > 0:  # find the teacher before any data is loaded or model trained
        if args.teacher:
            from edgehmoe.core.checkpoint import read_model_dir

            if read_model_dir(args.teacher).flat is None:
                raise UsageError(f"--teacher {args.teacher} holds no flat model; train one with "
                                 "`edgehmoe fit --model flat`")
        elif args.model != "both":
            _fit_teacher(args, False, None)  # raises: no teacher
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    _prepare_out(out, args.force)
    train = load_data(args, "train")
    val = load_data(args, "val") if args.val_fraction > 0 else None
    val_xy = (val.x, val.y) if val is not None else None
    mean, std = channel_stats(train.x)
    tree = routing_tree(train.hierarchy, args.tree_groups)
    md = new_model_dir(out, tree, train.image_size, mean, std, args.dataset,
                       extra={"fit": {k: v for k, v in vars(args).items() if k != "func"}})
    cfg = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, schedule="onecycle",
                      weight_decay=args.weight_decay, channels_last=True,
                      seed=args.seed if args.train_seed is None else args.train_seed)
    t0 = time.time()
    report: dict = {"dataset": args.dataset, "train_examples": len(train)}
    if val is not None:
        report["val_examples"] = len(val)
    progress = sys.stderr.isatty()
    flat_arch = flat_spec(tree, train.image_size, args.flat_width).to_dict()
    # The flat model first: it is the distillation teacher when --model both.
    if args.model in ("flat", "both"):
        hist: list = []
        report["flat"] = fit_flat(md, train.x, train.y, cfg, width=args.flat_width, progress=progress,
                                  val=val_xy, val_every=args.val_every, history=hist)
        report["flat"]["epochs"] = args.epochs
        report["flat"]["train_gmacs"] = _gmacs(report["flat"].pop("train_macs"))
        if hist:
            report["flat"]["history"] = hist
    if args.model in ("hmoe", "both"):
        specs = expert_specs(tree, train.image_size, flat_width=args.flat_width, fixed_width=args.expert_width,
                             root_width=args.root_width, head=args.expert_head,
                             root_stem_stride=args.root_stem_stride, expert_stem_stride=args.expert_stem_stride)
        hx, hy, cal = train.x, train.y, None
        if args.calibrate_fraction > 0:
            keep, held = train_val_split(train.y, args.calibrate_fraction, args.seed + 1)
            hx, hy, cal = train.x[keep], train.y[keep], (train.x[held], train.y[held])
        epochs = args.hmoe_epochs if args.hmoe_epochs is not None else args.epochs
        if args.equal_compute:
            per_node = {n: (s.to_dict(), int((expert_label_map(tree, n, s)[hy] >= 0).sum())) for n, s in specs.items()}
            epochs = equal_compute_epochs(flat_arch, len(train), args.epochs, per_node)
            logger.info("equal compute: %d flat epochs on %d images = %.2f epochs of every expert",
                        args.epochs, len(train), epochs)
        teacher = None
        if args.distill_weight > 0:
            tmodel, tmean, tstd, source = _fit_teacher(args, args.model == "both", md)
            teacher = teacher_probs(tmodel, hx, tmean, tstd, args.distill_temperature)
            report["teacher"] = {"source": source, "inference_gmacs": _gmacs(cnn3_macs(flat_arch) * len(hx))}
        hist = []
        stats = fit_hmoe(md, hx, hy, replace(cfg, epochs=epochs), specs, progress=progress, teacher=teacher,
                         distill_weight=args.distill_weight, distill_temperature=args.distill_temperature,
                         calibration=cal, val=val_xy, val_every=args.val_every, history=hist)
        report["hmoe"] = {
            "experts": len(stats), "params_total": sum(s["params"] for s in stats.values()),
            "params_max": max(s["params"] for s in stats.values()),
            "epochs": round(float(epochs), 3), "train_examples": int(len(hx)),
            "train_gmacs": _gmacs(sum(s["train_macs"] for s in stats.values())),
            "expert_head": args.expert_head, "root_stem_stride": args.root_stem_stride,
            "expert_stem_stride": args.expert_stem_stride, "tree_groups": args.tree_groups,
            "routing_tree": tree.summary(),
            "distill_weight": args.distill_weight,
            "calibrate_fraction": args.calibrate_fraction,
        }
        if cal is not None:
            report["hmoe"]["temperatures"] = {tree.names[n]: round(s["temperature"], 3) for n, s in stats.items()}
        if hist:
            report["hmoe"]["history"] = hist
    if args.model == "hmoe" or args.equal_compute:
        # what the flat model costs (or would cost) at --epochs, for comparison
        report.setdefault("flat", {}).setdefault(
            "train_gmacs", _gmacs(train_macs(flat_arch, len(train) * args.epochs)))
    report["train_seconds"] = round(time.time() - t0, 1)
    if val is not None:
        hm, fm, _ = load_models(out)
        for kind, ok in (("hmoe", hm is not None), ("flat", fm is not None)):
            if ok:
                m = evaluate_models(hm, fm, val.x, val.y, which=kind)
                report.setdefault(kind, {})["val_info_f1"] = round(m["info_f1"], 4)
                report[kind]["val_top1"] = round(m["top1"], 4)
                if kind == "hmoe":
                    b = evaluate_models(hm, fm, val.x, val.y, which=kind, beam=2)
                    report[kind]["val_info_f1_beam2"] = round(b["info_f1"], 4)
    print(json.dumps(report, indent=1))
    return 0


# ---------------------------------------------------------------------------- evaluate
def cmd_evaluate(args) -> int:
    if bool(args.model_dir) == bool(args.bundle):
        raise UsageError("give exactly one of --model-dir DIR or --bundle BUNDLE")
    from edgehmoe.cli.bundle import _check_before_loading_data

    # Cheap checks first, as bundle evaluate/extend do: the spec, then the model, then the data.
    _check_before_loading_data(args, bundle=args.bundle, model_dir=args.model_dir)
    ds = load_data(args)
    if args.bundle:
        from edgehmoe.cli.bundle import _use_verify_key, evaluate_bundle

        _use_verify_key(args)

        m = evaluate_bundle(args.bundle, ds.x, ds.y, model="hmoe" if args.model == "auto" else args.model,
                            beam=args.beam, threshold=args.threshold, threads=args.threads,
                            class_names=list(ds.class_names))
    else:
        import torch

        from edgehmoe.model.inference import evaluate_models, load_models

        torch.set_num_threads(args.threads)
        hm, fm, md = load_models(args.model_dir)
        _check_same_classes(md.hierarchy.class_names(), ds.class_names)
        m = evaluate_models(hm, fm, ds.x, ds.y, which=args.model, beam=args.beam, threshold=args.threshold)
    m["dataset"] = args.dataset
    m["split"] = args.split
    if args.json:
        print(json.dumps(m))
    else:
        print(f"{m['model']} on {args.dataset} [{args.split}], {m['num_examples']} examples")
        print(f"  info precision {m['info_precision']:.4f}  recall {m['info_recall']:.4f}  F1 {m['info_f1']:.4f}")
        print(f"  top-1 {m['top1']:.4f}  mistake severity (LCA height) {m['mistake_severity']:.3f}")
        print("  accuracy per level: " + ", ".join(f"d{k}={v:.3f}" for k, v in m["accuracy_per_level"].items()))
    return 0


def _check_same_classes(model_classes: list[str], data_classes: list[str]) -> None:
    if list(model_classes) != list(data_classes):
        diff = next((i for i, (a, b) in enumerate(zip(model_classes, data_classes)) if a != b), None)
        raise UsageError(
            f"the model was trained on {len(model_classes)} classes but the dataset has {len(data_classes)}"
            + (f"; class {diff} is {model_classes[diff]!r} in the model and {data_classes[diff]!r} in the data"
               if diff is not None else "")
            + ". Evaluate on the dataset (and tree) the model was trained with."
        )


# ---------------------------------------------------------------------------- parser
def get_args_parser() -> argparse.ArgumentParser:
    from edgehmoe import __version__

    p = argparse.ArgumentParser(prog="edgehmoe", description=__doc__.split("\n\n")[0])
    p.add_argument("--version", action="version", version=f"edgehmoe {__version__}")
    p.add_argument("-v", "--verbose", action="count", default=0)
    p.add_argument("-q", "--quiet", action="store_true")
    add_debug_arg(p)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    h = sub.add_parser("hierarchy", help="show or build class trees")
    hs = h.add_subparsers(dest="hcommand", required=True, metavar="ACTION")
    show = hs.add_parser("show", help="print a tree (from a dataset or a CSV edge list)")
    show.add_argument("--dataset", metavar="SPEC")
    show.add_argument("--csv", metavar="TREE.csv")
    show.add_argument("--classes", metavar="FILE", help="class names in class-id order (with --csv)")
    show.add_argument("--split", default="train", help=argparse.SUPPRESS)
    show.add_argument("--hierarchy", help=argparse.SUPPRESS)
    show.add_argument("--val-fraction", type=float, default=0.1, help=argparse.SUPPRESS)
    show.add_argument("--limit-per-class", type=int, default=1, help=argparse.SUPPRESS)
    show.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    show.add_argument("--tree-groups", type=tree_groups_arg, default=0, metavar="K|auto",
                      help="show the routing tree that fit/simulate --tree-groups K|auto train (default 0: the "
                           "dataset's tree)")
    show.add_argument("--max-lines", type=int, default=80)
    show.add_argument("--json", action="store_true")
    show.set_defaults(func=cmd_hierarchy_show)
    build = hs.add_parser("build", help="build a WordNet tree over wnids (e.g. Tiny ImageNet's wnids.txt)")
    build.add_argument("--wordnet", required=True, metavar="WNIDS.txt")
    build.add_argument("--wordnet-dir", metavar="DIR", help="WordNet 3.0 dict folder (default: /usr/share/wordnet)")
    build.add_argument("--out", required=True, metavar="TREE.csv")
    build.add_argument("--force", action="store_true")
    build.set_defaults(func=cmd_hierarchy_build)

    pa = sub.add_parser("partition", help="split a dataset into per-device shards (.npz)")
    add_dataset_args(pa)
    pa.add_argument("--num-devices", type=int, required=True)
    pa.add_argument("--scheme", default="iid", help="iid | dirichlet:ALPHA (default iid)")
    pa.add_argument("--out", required=True)
    pa.add_argument("--force", action="store_true", help="overwrite existing shards")
    pa.set_defaults(func=cmd_partition)

    f = sub.add_parser("fit", help="central training of the hierarchical model and/or the flat baseline")
    add_dataset_args(f)
    f.add_argument("--model", choices=["hmoe", "flat", "both"], default="hmoe")
    f.add_argument("--epochs", type=float, default=10)
    f.add_argument("--batch-size", type=int, default=64)
    f.add_argument("--lr", type=float, default=0.05)
    f.add_argument("--weight-decay", type=float, default=5e-4)
    f.add_argument("--flat-width", type=int, default=32, help="width w of the flat model (default 32)")
    f.add_argument("--expert-width", type=int, default=None, help="same width for every expert (default: sized per node)")
    f.add_argument("--root-width", type=int, default=None, help="width of the root expert")
    f.add_argument("--threads", type=int, default=2)
    f.add_argument("--out", required=True)
    f.add_argument("--force", action="store_true", help="overwrite a non-empty --out")
    g = f.add_argument_group("hierarchical model (see docs/accuracy.md for what each option measured)")
    g.add_argument("--expert-head", choices=["children", "leaves"], default="leaves",
                   help="train each expert on its children, or on the leaves below it with the network "
                        "summing leaf probabilities into children (same bundle format) (default leaves: "
                        "measured best, docs/accuracy.md)")
    g.add_argument("--expert-stem-stride", type=int, choices=[1, 2], default=2,
                   help="stride of the first convolution of every other expert: 2 runs them at half "
                        "resolution (a quarter of their activations and MACs) (default 2: measured best, "
                        "docs/accuracy.md; 1 for full-resolution experts)")
    g.add_argument("--root-stem-stride", type=int, choices=[1, 2], default=2,
                   help="stride of the root's first convolution: 2 runs the root at half resolution "
                        "(a quarter of its activation memory and MACs per width) (default 2: measured best)")
    g.add_argument("--tree-groups", type=tree_groups_arg, default="auto", metavar="K|auto",
                   help="route through two levels: the root chooses among groups of at most K classes cut "
                        "from the dataset's tree, each group one expert over its classes; metrics are still "
                        "computed on the full tree. 0: the dataset's tree as it is. Default auto: trees of "
                        "two levels as they are (CIFAR-100), deeper ones (Tiny ImageNet's WordNet tree) cut "
                        "to groups of at most 30 classes (measured best, docs/accuracy.md)")
    g.add_argument("--equal-compute", action="store_true",
                   help="give the hierarchical model the training MACs of --epochs flat epochs "
                        "(its epochs are computed from the cost model)")
    g.add_argument("--hmoe-epochs", type=float, default=None,
                   help="epochs of every expert (default: --epochs)")
    g.add_argument("--distill-weight", type=float, default=0.0,
                   help="weight of distillation from a flat teacher in [0, 1] (default 0: off)")
    g.add_argument("--distill-temperature", type=float, default=4.0, help="distillation temperature (default 4)")
    g.add_argument("--teacher", metavar="DIR",
                   help="model directory whose flat model is the teacher (default with --model both: "
                        "the flat model trained first)")
    g.add_argument("--calibrate-fraction", type=float, default=0.0,
                   help="hold out this share of each class of the training data from the experts and fit "
                        "each expert's temperature on it (folded into its weights) (default 0: off)")
    f.add_argument("--train-seed", type=int, default=None,
                   help="seed of initialisation and batch order (default: --seed, which also draws the "
                        "validation split); vary it alone to see run-to-run noise")
    f.add_argument("--val-every", type=int, default=1,
                   help="with --val-fraction > 0, log validation info-F1 every N epochs (default 1)")
    f.set_defaults(func=cmd_fit)

    e = sub.add_parser("evaluate", help="information P/R/F1, per-level accuracy, mistake severity")
    add_dataset_args(e, split_default="test")
    e.add_argument("--model-dir", metavar="DIR")
    e.add_argument("--bundle", metavar="BUNDLE", help="evaluate an exported ONNX bundle instead")
    e.add_argument("--model", choices=["auto", "hmoe", "flat"], default="auto")
    e.add_argument("--beam", type=int, default=1)
    e.add_argument("--threshold", type=float, default=None, help="non-mandatory prediction: stop below this path probability")
    e.add_argument("--threads", type=int, default=2)
    e.add_argument("--json", action="store_true")
    from edgehmoe.cli.bundle import add_verify_key_arg

    add_verify_key_arg(e)  # with --bundle
    e.set_defaults(func=cmd_evaluate)

    try:
        from edgehmoe.cli import bundle as cli_bundle
    except ImportError as exc:  # pragma: no cover - only while the module is absent
        logger.debug("bundle commands unavailable: %s", exc)
    else:
        cli_bundle.register(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = get_args_parser()
    args = parser.parse_args(argv)
    configure_logging(-1 if args.quiet else args.verbose)
    return run_main("edgehmoe", lambda: args.func(args), debug=args.debug)


if __name__ == "__main__":
    sys.exit(main())
