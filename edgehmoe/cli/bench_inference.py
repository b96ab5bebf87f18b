"""``edgehmoe-bench-inference`` (also ``python tools/bench_inference.py`` and ``python -m
edgehmoe.cli.bench_inference``): the command line of the inference benchmark,
:mod:`edgehmoe.measure.bench_inference`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from edgehmoe.cli.common import add_debug_arg, run_main
from edgehmoe.errors import UsageError
from edgehmoe.measure.bench_inference import (
    INT8_VARIANT,
    SWEEP,
    bundle_sizes,
    chain_over_flat,
    int8_over_fp32,
    inference_job,
    make_cifar_bundle,
    run_worker,
    table,
)

__all__ = ["get_args_parser", "main"]

_DESCRIPTION = "Inference latency and resident memory of an ONNX bundle: the chain of experts vs the flat model."


def get_args_parser(prog: str | None = None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=_DESCRIPTION)
    p.add_argument("--bundle", metavar="BUNDLE", help="bundle folder (manifest.json + .onnx files)")
    p.add_argument("--make-cifar-bundle", metavar="DIR", help="first write a random CIFAR-100-sized bundle to DIR (needs torch)")
    p.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads (default 1 = one Pi core)")
    p.add_argument("--batch-sizes", default="1,32", help="comma-separated batch sizes (default 1,32)")
    p.add_argument("--repeats", type=int, default=200, help="timed calls per batch size (default 200)")
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--max-sessions", type=int, default=32, help="chain: expert sessions kept alive (default 32; 0 = all)")
    p.add_argument("--models", default="chain,flat", help="which to measure: chain, flat (default both)")
    p.add_argument("--dataset", metavar="SPEC", help="real images instead of random ones (e.g. cifar100:PATH)")
    p.add_argument("--split", default="train")
    p.add_argument("--pool", type=int, default=1000, help="distinct input images to draw batches from")
    p.add_argument("--sweep", action="store_true", help="also measure session-option variants (see SWEEP)")
    p.add_argument("--variants", metavar="NAMES", default=None,
                   help="comma-separated variants to measure instead (default, or names of SWEEP, e.g. 'fused off')")
    p.add_argument("--int8-bundle", metavar="BUNDLE8", default=None,
                   help="also measure this int8 bundle (edgehmoe export --quantize int8) of the same model and "
                        "report int8 / float32 ratios")
    p.add_argument("--mmap-threshold", type=int, default=None, metavar="BYTES",
                   help="run workers with MALLOC_MMAP_THRESHOLD_=BYTES (glibc): big buffers are unmapped when freed")
    p.add_argument("--chain-options", metavar="JSON", default=None,
                   help="chain predictor options for every variant, e.g. '{\"fused\": \"off\", \"max_batch\": 8}'")
    p.add_argument("--json", metavar="FILE", help="write all results as JSON")
    add_debug_arg(p)
    # Before edgehmoe.measure.worker existed the workers were started with this flag; kept so
    # that such a command line still works (prints the result row as one JSON line).
    p.add_argument("--_worker", help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    args = get_args_parser(prog).parse_args(argv)
    if args._worker:
        print(json.dumps(inference_job(json.loads(args._worker))))
        return 0
    return run_main("bench_inference", lambda: _run(args), debug=args.debug)


def _run(args: argparse.Namespace) -> int:
    if args.make_cifar_bundle:
        args.bundle = str(make_cifar_bundle(args.make_cifar_bundle))
        print(f"wrote random CIFAR-100-sized bundle to {args.bundle}", file=sys.stderr)
    if not args.bundle:
        raise UsageError("give --bundle BUNDLE (or --make-cifar-bundle DIR)")
    try:
        batch_sizes = [int(b) for b in args.batch_sizes.split(",") if b.strip()]
    except ValueError:
        raise UsageError(f"--batch-sizes must be integers like 1,32; got {args.batch_sizes!r}") from None
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    bad = [m for m in models if m not in ("chain", "flat")]
    if bad or not batch_sizes or min(batch_sizes) < 1:
        raise UsageError(f"--models takes chain,flat (got {bad}); batch sizes must be >= 1")
    base = {"bundle": args.bundle, "threads": args.threads, "batch_sizes": batch_sizes, "repeats": args.repeats,
            "warmup": args.warmup, "max_sessions": args.max_sessions, "dataset": args.dataset, "split": args.split,
            "pool": args.pool, "mmap_threshold": args.mmap_threshold}
    extra = {}
    if args.chain_options:
        try:
            extra = json.loads(args.chain_options)
        except json.JSONDecodeError as e:
            raise UsageError(f"--chain-options must be a JSON object like '{{\"fused\": \"off\"}}': {e}") from None
        if not isinstance(extra, dict):
            raise UsageError("--chain-options must be a JSON object")
    variants = SWEEP if args.sweep else {"default": {}}
    if args.variants:
        names = [v.strip() for v in args.variants.split(",") if v.strip()]
        unknown = [v for v in names if v != "default" and v not in SWEEP]
        if unknown:
            raise UsageError(f"unknown --variants {unknown}; valid: default, {', '.join(SWEEP)}")
        variants = {v: SWEEP.get(v, {}) for v in names}
    if args.int8_bundle:
        base["int8_bundle"] = args.int8_bundle
    rows = []
    plan = [(name, opts, args.bundle) for name, opts in variants.items()]
    if args.int8_bundle:
        plan.append((INT8_VARIANT, {}, args.int8_bundle))
    for name, opts, bundle in plan:
        for model in models:
            cfg = {**base, "bundle": bundle, "model": model, "options": {**opts, **(extra if model == "chain" else {})}}
            r = run_worker(cfg)
            r["variant"] = name
            r["bundle"] = bundle
            rows.append(r)
            print(f"measured {model} [{name}]", file=sys.stderr)
    print(f"bundle {args.bundle}, threads {args.threads}, inputs: {args.dataset or 'random uint8'}, "
          f"repeats {args.repeats}, max_sessions {args.max_sessions}")
    print(table(rows, batch_sizes))
    summary = chain_over_flat(rows, [p[0] for p in plan], batch_sizes)
    if summary:
        print("chain / flat: " + json.dumps(summary, indent=1))
    out = {"config": base, "results": rows, "chain_over_flat": summary,
           "bundles": {b: bundle_sizes(b) for b in dict.fromkeys(p[2] for p in plan)}}
    if args.int8_bundle:
        out["int8_over_fp32"] = int8_over_fp32(rows, "default" if "default" in variants else next(iter(variants)),
                                               batch_sizes, out["bundles"][args.bundle], out["bundles"][args.int8_bundle])
        print("int8 / float32: " + json.dumps(out["int8_over_fp32"], indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
    return 0



if __name__ == "__main__":
    sys.exit(main(prog="python -m edgehmoe.cli.bench_inference"))
