"""``edgehmoe-fleet``: emulate a fleet of devices (orchestration benchmark and soak tests).

::

    edgehmoe-fleet --broker mqtt://127.0.0.1:1883 --run bench --devices 1000 \\
        --password-dir creds/ --dataset synthetic:coarse=20,fine=5,per_class=500 --train-ms 100

The library is :mod:`edgehmoe.fl.fleet`. With ``--procs P`` the devices are split over P
processes of this command (``--slice K/P`` is what each child gets). It runs until SIGTERM or
SIGINT (or ``--duration``), then disconnects every device cleanly and writes ``--stats``.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from edgehmoe.cli.common import add_debug_arg, configure_logging, run_main

__all__ = ["get_args_parser", "main"]

logger = logging.getLogger("edgehmoe.fleet")

DESCRIPTION = """\
Emulate N devices, each with its own MQTT connection, broker account, hello (class counts from a
real or synthetic partition), persistent session and last will, speaking the real wire protocol
to a real aggregation server. It measures ORCHESTRATION (server, broker, wire, validation,
aggregation, commit), NOT LEARNING: no training happens; after --train-ms each device sends the
weights it received plus a small perturbation, with num_examples = its samples under the node.
Torch is not imported (1,000 devices: 430 MB with CIFAR-size experts, where one real client
takes ~1 GB). Optional faults for soak
tests: a --churn fraction of devices answer late, drop their link, leave and come back, send
garbage or duplicates (--faults)."""


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="edgehmoe-fleet", description=DESCRIPTION,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--broker", required=True, help="mqtt://HOST:PORT or mqtts://HOST:PORT")
    p.add_argument("--run", default="edgehmoe", help="run name (topic level; default edgehmoe)")
    p.add_argument("--devices", type=int, required=True, help="number of virtual devices")
    p.add_argument("--prefix", default="dev-", help="device ids are PREFIX0000, PREFIX0001, ... (default dev-)")
    p.add_argument("--password-dir", default="", metavar="DIR",
                   help="DIR/<device id>.password for each device (edgehmoe-server credentials add writes "
                        "them); without it the devices connect anonymously")
    p.add_argument("--cafile", default=None, help="CA certificate for mqtts://")
    p.add_argument("--insecure", action="store_true", help="no warning for plain MQTT to a remote broker")
    data = p.add_argument_group("data (what each hello announces)")
    data.add_argument("--dataset", default="", metavar="SPEC",
                      help="partition the labels of this dataset's train split (only labels are read)")
    data.add_argument("--partition", default="iid", help="iid | dirichlet:ALPHA (default iid)")
    data.add_argument("--val-fraction", type=float, default=0.1, help="held out by the server (default 0.1)")
    data.add_argument("--classes", type=int, default=100, help="without --dataset: number of classes (default 100)")
    data.add_argument("--samples", type=int, default=500,
                      help="without --dataset: samples per device (default 500)")
    p.add_argument("--train-ms", type=float, default=100.0, help="emulated training time per task (default 100)")
    p.add_argument("--jitter-ms", type=float, default=0.0, help="plus uniform jitter in [0, J) ms")
    p.add_argument("--rel", type=float, default=1e-3, help="relative norm of the derived update (default 1e-3)")
    faults = p.add_argument_group("faults")
    faults.add_argument("--churn", type=float, default=0.0, help="fraction of devices that misbehave (default 0)")
    faults.add_argument("--faults", default="default",
                        help="per-task probabilities for churning devices, e.g. late=0.1,drop=0.1,leave=0.1,"
                             "garbage=0.05,dup=0.05 (that is 'default')")
    faults.add_argument("--late-s", type=float, default=1.0, help="late answers leave this long after the deadline")
    faults.add_argument("--away-s", type=float, default=2.0, help="devices that left come back after this long")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--procs", default="auto", help="processes to spread the devices over (default: one per 250)")
    p.add_argument("--workers", type=int, default=2, help="decode/encode threads per process (default 2)")
    p.add_argument("--events", default="", metavar="FILE", help="append every device action here (JSON lines)")
    p.add_argument("--stats", default="", metavar="FILE", help="write counters (bytes, messages, actions) here at exit")
    p.add_argument("--duration", type=float, default=0.0, help="stop after this many seconds (default: at SIGTERM)")
    p.add_argument("--slice", default="", help=argparse.SUPPRESS)  # K/P: the part a child process emulates
    p.add_argument("-v", "--verbose", action="count", default=0)
    p.add_argument("-q", "--quiet", action="store_true", help="warnings only")
    add_debug_arg(p)
    return p


def _procs(args) -> int:
    from edgehmoe.errors import UsageError

    if args.procs == "auto":
        return max(1, math.ceil(args.devices / 250))
    try:
        n = int(args.procs)
    except ValueError:
        raise UsageError(f"--procs must be 'auto' or a positive integer, got {args.procs!r}") from None
    if n < 1:
        raise UsageError("--procs must be >= 1")
    return min(n, args.devices)


def _stop_event() -> threading.Event:
    stop = threading.Event()

    def on_signal(signum, frame):
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    return stop


def _specs(args):
    import numpy as np

    from edgehmoe.errors import UsageError
    from edgehmoe.fl.fleet import DeviceSpec, class_counts_for, device_ids

    if args.devices < 1:
        raise UsageError("--devices must be >= 1")
    ids = device_ids(args.devices, args.prefix)
    counts = class_counts_for(args.devices, dataset=args.dataset, partition=args.partition, classes=args.classes,
                              samples=args.samples, val_fraction=args.val_fraction, seed=args.seed)
    k, p = 0, 1
    if args.slice:
        try:
            k, p = (int(v) for v in args.slice.split("/"))
        except ValueError:
            raise UsageError(f"--slice must be K/P, got {args.slice!r}") from None
    mine = np.array_split(np.arange(args.devices), p)[k]
    specs = []
    for i in mine:
        pw = None
        if args.password_dir:
            f = Path(args.password_dir) / f"{ids[i]}.password"
            if not f.is_file():
                raise UsageError(f"{f} not found: create the account with edgehmoe-server credentials add "
                                 f"--device-id {ids[i]} --out-dir {args.password_dir} ...")
            pw = f.read_text().strip()
        specs.append(DeviceSpec(int(i), ids[i], pw, counts[i]))
    return specs


def _serve(args) -> int:
    """Emulate this process's devices until stopped; write ``--stats``."""
    import resource

    from edgehmoe.fl.fleet import FaultPlan, Fleet, parse_faults

    stop = _stop_event()
    specs = _specs(args)
    plan = FaultPlan(num_devices=args.devices, churn=args.churn, rates=parse_faults(args.faults) if args.churn else {},
                     seed=args.seed, late_s=args.late_s, away_s=args.away_s)
    fleet = Fleet(args.broker, args.run, specs, train_ms=args.train_ms, jitter_ms=args.jitter_ms, faults=plan,
                  rel=args.rel, workers=args.workers, events=args.events or None, cafile=args.cafile,
                  insecure=args.insecure, seed=args.seed)
    t0 = time.monotonic()
    fleet.start()
    print(f"edgehmoe-fleet: {len(specs)} devices connected{f' (slice {args.slice})' if args.slice else ''}",
          flush=True)
    try:
        while not stop.wait(0.5):
            if args.duration and time.monotonic() - t0 >= args.duration:
                break
    finally:
        fleet.close()
    out = fleet.snapshot()
    ru = resource.getrusage(resource.RUSAGE_SELF)
    out.update(cpu_s=ru.ru_utime + ru.ru_stime, peak_rss_mb=ru.ru_maxrss / 1024.0, seconds=time.monotonic() - t0)
    if args.stats:
        Path(args.stats).write_text(json.dumps(out, indent=1))
    return 0


def _spawn(args, argv: list[str], procs: int) -> int:
    """Run ``procs`` child processes (one slice each); forward SIGTERM/SIGINT; merge their stats."""
    stop = _stop_event()
    stats_base = Path(args.stats) if args.stats else None
    children = []
    for k in range(procs):
        extra = ["--slice", f"{k}/{procs}", "--procs", "1"]
        if stats_base is not None:
            extra += ["--stats", str(stats_base.with_suffix(f".{k}.json"))]
        children.append(subprocess.Popen([sys.executable, "-m", "edgehmoe.cli.fleet", *argv, *extra]))
    try:
        while not stop.wait(0.5):
            if all(c.poll() is not None for c in children):
                break
    finally:
        for c in children:
            if c.poll() is None:
                c.send_signal(signal.SIGTERM)
        for c in children:
            try:
                c.wait(timeout=60)
            except subprocess.TimeoutExpired:
                c.kill()
    rc = max(c.returncode or 0 for c in children)
    if stats_base is not None:
        merged: dict = {}
        for k in range(procs):
            f = stats_base.with_suffix(f".{k}.json")
            if f.is_file():
                for key, v in json.loads(f.read_text()).items():
                    merged[key] = max(merged.get(key, 0), v) if key in ("seconds",) else merged.get(key, 0) + v
                f.unlink()
        merged["procs"] = procs
        stats_base.write_text(json.dumps(merged, indent=1))
    return rc


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = get_args_parser().parse_args(argv)
    configure_logging(-1 if args.quiet else args.verbose)

    def body() -> int:
        procs = _procs(args) if not args.slice else 1
        if procs > 1:
            out, skip = [], False  # argv without --procs/--stats (each child gets its own)
            for a in argv:
                if skip:
                    skip = False
                    continue
                if a in ("--procs", "--stats"):
                    skip = True
                    continue
                if a.startswith(("--procs=", "--stats=")):
                    continue
                out.append(a)
            return _spawn(args, out, procs)
        return _serve(args)

    return run_main("edgehmoe-fleet", body, debug=args.debug)


if __name__ == "__main__":
    sys.exit(main())
