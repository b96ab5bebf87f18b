"""Command line of the orchestration benchmark (``tools/bench_orchestration.py``).

::

    python tools/bench_orchestration.py --devices 4,16,32,128,512,1000 --json out.json
    python tools/bench_orchestration.py --soak --devices 100 --rounds 200

The benchmark itself is :mod:`edgehmoe.server.bench`; results and method: docs/scale.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

from edgehmoe.cli.common import add_debug_arg, configure_logging, run_main

__all__ = ["get_args_parser", "main", "rounds_for"]

DESCRIPTION = """\
Orchestration benchmark: the real aggregation server and a real Mosquitto against N emulated
devices (edgehmoe-fleet: real MQTT connections and wire protocol, no training) and, for small N,
real edgehmoe-client processes with near-zero training. Prints per N the median and p95 round
wall time, the orchestration overhead (round wall time minus the slowest device), server and
broker peak RSS, bytes on the wire per round, and the ratio to Flower 1.42 on this machine.
--soak runs many rounds with churning devices, a broker restart and a server kill + --resume,
and checks every committed round."""


#: Rounds with real edgehmoe-client processes (each starts torch: ~1 GB and seconds each).
REAL_ROUNDS = 10


def rounds_for(n: int) -> int:
    """Rounds per case: 20 (as Flower's reference) up to 128 devices, fewer above."""
    return 20 if n <= 128 else 10 if n <= 512 else 8


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bench_orchestration", description=DESCRIPTION,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--devices", default="4,16,32,128,512,1000", help="comma-separated device counts")
    p.add_argument("--real-max", type=int, default=16,
                   help="also run real edgehmoe-client processes for N up to this (0 = never; default 16)")
    p.add_argument("--rounds", type=int, default=0,
                   help="rounds per case (default: 20, 10 above 128, 8 above 512; 10 with real clients)")
    p.add_argument("--model", choices=["flat", "hmoe"], default="flat",
                   help="flat: one 106k-parameter network (as Flower's 100k reference); hmoe: CIFAR-100-size "
                        "experts (root 25k, others 6k parameters)")
    p.add_argument("--train-ms", type=float, default=50.0, help="emulated training time per task (default 50)")
    p.add_argument("--round-timeout", type=float, default=120.0, help="round deadline in seconds (default 120)")
    p.add_argument("--json", default="", metavar="FILE", help="write the results as JSON")
    p.add_argument("--work-dir", default="", help="keep run directories and logs here (default: a temporary "
                                                  "folder, removed at the end)")
    soak = p.add_argument_group("soak")
    soak.add_argument("--soak", action="store_true", help="run the soak instead (--devices: one number)")
    soak.add_argument("--churn", type=float, default=0.1, help="fraction of churning devices (default 0.1)")
    soak.add_argument("--soak-timeout", type=float, default=3.0, help="round deadline of the soak (default 3 s)")
    p.add_argument("-v", "--verbose", action="count", default=0)
    add_debug_arg(p)
    return p


def _fmt(v, spec: str = ".0f") -> str:
    return "-" if v is None else format(v, spec)


def print_table(runs: list[dict], out=sys.stdout) -> None:
    head = (f"{'devices':>7} {'clients':>7} {'median ms':>10} {'p95 ms':>9} {'overhead':>9} {'srv CPU':>8} {'server MB':>9} "
            f"{'broker MB':>9} {'MB/round':>9} {'Flower ms':>10} {'x faster':>8} {'load':>5}")
    print(head, file=out)
    for r in runs:
        bpr = r["bytes_per_round"] / 1e6 if r["bytes_per_round"] is not None else None
        print(f"{r['devices']:>7} {r['clients']:>7} {_fmt(r['median_round_ms']):>10} {_fmt(r['p95_round_ms']):>9} "
              f"{_fmt(r['overhead_ms']):>9} {_fmt(r.get('server_cpu_ms_per_round')):>8} {_fmt(r['server_peak_rss_mb']):>9} {_fmt(r['broker_peak_rss_mb'], '.1f'):>9} "
              f"{_fmt(bpr, '.1f'):>9} {_fmt(r['flower_median_round_ms']):>10} {_fmt(r['speedup_vs_flower'], '.1f'):>8} "
              f"{_fmt(r['loadavg_after'][0] if r['loadavg_after'] else None, '.1f'):>5}", file=out, flush=True)


def _bench(args) -> int:
    from edgehmoe.server.bench import default_work_dir, run_case

    from edgehmoe.errors import UsageError

    try:
        ns = [int(v) for v in args.devices.split(",") if v.strip()]
    except ValueError:
        raise UsageError(f"--devices must be comma-separated integers, got {args.devices!r}") from None
    if not ns or min(ns) < 1:
        raise UsageError("--devices needs at least one positive count")
    work = Path(args.work_dir) if args.work_dir else default_work_dir()
    cases = [(n, "real") for n in ns if n <= args.real_max] + [(n, "fleet") for n in ns]
    cases.sort(key=lambda c: (c[0], c[1] != "fleet"))
    runs = []
    print(f"bench: {len(cases)} cases, model {args.model}, train {args.train_ms:.0f} ms, "
          f"load average {os.getloadavg()[0]:.1f}, work dir {work}", flush=True)
    try:
        for n, kind in cases:
            rounds = args.rounds or (REAL_ROUNDS if kind == "real" else rounds_for(n))
            res = run_case(n, clients=kind, rounds=rounds, model=args.model,
                           train_ms=args.train_ms, work_dir=work, round_timeout_s=args.round_timeout)
            runs.append(res.to_json())
            print(f"  {n} devices ({kind}): median {runs[-1]['median_round_ms']:.0f} ms, overhead "
                  f"{runs[-1]['overhead_ms']:.0f} ms, {res.seconds:.0f} s", flush=True)
            if args.json:  # after every case, so a long run leaves partial results
                Path(args.json).write_text(json.dumps({"runs": runs}, indent=1))
    finally:
        if not args.work_dir:
            shutil.rmtree(work, ignore_errors=True)
    print()
    print_table(runs)
    return 0


def _soak(args) -> int:
    from edgehmoe.server.bench import default_work_dir, run_soak

    n = int(args.devices.split(",")[0])
    work = Path(args.work_dir) if args.work_dir else default_work_dir()
    try:
        res = run_soak(n, args.rounds or 200, work_dir=work, churn=args.churn, round_timeout_s=args.soak_timeout,
                       train_ms=args.train_ms, print_fn=lambda s: print(s, flush=True))
    finally:
        if not args.work_dir:
            shutil.rmtree(work, ignore_errors=True)
    summary = {"soak": {"devices": n, "rounds": res.rounds, "committed": len(res.rows), "seconds": res.seconds,
                        "checked_exactly": res.checked_rounds, "checked_one_way": res.relaxed_rounds,
                        "resumed_at_round": res.resumed_at_round, "problems": res.problems,
                        "server_rss_first_last_mb": ([res.server_rss_by_round[0], res.server_rss_by_round[-1]]
                                                     if res.server_rss_by_round else None),
                        "outcomes": _outcome_counts(res.rows), "loadavg": list(os.getloadavg())}}
    print(json.dumps(summary, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=1))
    return 0 if not res.problems else 1


def _outcome_counts(rows: list[dict]) -> dict:
    out: dict[str, int] = {}
    for r in rows:
        for o in r["outcomes"].values():
            out[o] = out.get(o, 0) + 1
    return out


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    configure_logging(args.verbose - 1)
    return run_main("bench_orchestration", lambda: _soak(args) if args.soak else _bench(args), debug=args.debug)


if __name__ == "__main__":
    sys.exit(main())
