"""``edgehmoe-server`` (also ``python -m edgehmoe.server``): the aggregation server's command line.

::

    edgehmoe-server run --config run.toml [--resume]
    edgehmoe-server simulate --dataset SPEC --clients N --rounds R --model hmoe|flat|both --out runs/NAME
    edgehmoe-server credentials add --password-file passwd --device-id pi-07 --out-dir creds/
    edgehmoe-server broker-config --out-dir broker/   # mosquitto.conf + acl to start from
"""

from __future__ import annotations

import argparse
import logging
import shutil
import signal
import sys
import threading
from dataclasses import fields
from pathlib import Path

from edgehmoe.cli.common import (
    EXIT_INTERRUPTED,
    add_debug_arg,
    configure_logging,
    run_main,
)

__all__ = ["main", "get_args_parser"]

logger = logging.getLogger("edgehmoe.server")


def cmd_run(args) -> int:
    from edgehmoe.server.app import AggregationServer
    from edgehmoe.server.config import load_config

    cfg = load_config(args.config)
    stop = threading.Event()
    interrupted = []

    def on_signal(signum, frame):
        logger.warning("signal %d: stopping after the current round (run again with --resume)", signum)
        if signum == signal.SIGINT:
            interrupted.append(signum)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    def progress(r, total, row):
        f1 = f" val info-F1 {row['val_info_f1']:.4f}" if "val_info_f1" in row else ""
        print(f"round {r}/{total}: {', '.join(row['experts'])} "
              f"({row['devices_answered']}/{row['devices_asked']} answered){f1}", flush=True)

    server = AggregationServer(cfg, resume=args.resume, stop=stop, progress=progress)
    rows = server.run()
    print(f"run {cfg.run.name}: {server.round}/{cfg.schedule.rounds} rounds complete in {cfg.out_dir}")
    if interrupted:
        return EXIT_INTERRUPTED
    return 0 if server.round >= cfg.schedule.rounds or stop.is_set() else 1 if not rows else 0


def cmd_simulate(args) -> int:
    from edgehmoe.server.config import RunConfig, config_from_dict, load_config
    from edgehmoe.server.simulate import simulate

    base = load_config(args.config) if args.config else RunConfig()
    d = {f.name: dict(vars(getattr(base, f.name))) for f in fields(RunConfig)}
    d["run"].update(seed=args.seed, val_fraction=args.val_fraction)
    d["schedule"].update(mode=args.mode, round_timeout_s=args.round_timeout)
    d["eval"].update(every=args.eval_every)
    for sec, key, value in (("train", "epochs", args.local_epochs), ("train", "expert_epochs", args.expert_epochs),
                            ("schedule", "weighting", args.weighting), ("train", "batch_size", args.batch_size),
                            ("train", "lr", args.lr), ("model", "flat_width", args.flat_width),
                            ("model", "expert_width", args.expert_width), ("model", "root_width", args.root_width)):
        if value is not None:
            d[sec][key] = value
    merged = config_from_dict(d, "simulate options")
    simulate(
        args.dataset, args.clients, args.rounds, args.model, Path(args.out), partition=args.partition,
        base=merged, flat_rounds=args.flat_rounds, threads_per_client=args.threads_per_client,
        memory_budget_mb=args.memory_budget_mb, broker_url=args.broker, export=not args.no_export,
        force=args.force, print_fn=lambda s: print(s, flush=True),
    )
    return 0


def cmd_credentials_add(args) -> int:
    from edgehmoe.server.broker import create_device_credentials

    path = create_device_credentials(args.password_file, args.device_id, args.out_dir)
    print(f"added {args.device_id} to {args.password_file}; its password is in {path} "
          "(copy it to the device, e.g. with firmware_scripts/flash_sd.sh --credentials)")
    print("reload the broker to apply: systemctl reload mosquitto (or kill -HUP <pid>)")
    return 0


def cmd_broker_config(args) -> int:
    from edgehmoe.server.broker import TEMPLATE_DIR

    src = TEMPLATE_DIR
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        dst = out / f.name
        if dst.exists() and not args.force:
            raise FileExistsError(f"{dst} exists; pass --force to overwrite")
        shutil.copyfile(f, dst)
        print(f"wrote {dst}")
    return 0


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="edgehmoe-server", description="edgehmoe aggregation server")
    p.add_argument("-v", "--verbose", action="count", default=0)
    add_debug_arg(p)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    r = sub.add_parser("run", help="run (or resume) a federated training job from a TOML config")
    r.add_argument("--config", required=True, metavar="run.toml")
    r.add_argument("--resume", action="store_true", help="continue from the last complete round")
    r.set_defaults(func=cmd_run)

    s = sub.add_parser("simulate", help="local federation: broker + N client processes + server, then Table 1")
    s.add_argument("--dataset", required=True, metavar="SPEC", help="synthetic | cifar100:PATH | tinyimagenet:PATH | npz:PATH")
    s.add_argument("--clients", type=int, default=3)
    s.add_argument("--rounds", type=int, default=20)
    s.add_argument("--flat-rounds", type=int, default=None, help="rounds of the flat run (default: --rounds)")
    s.add_argument("--model", choices=["hmoe", "flat", "both"], default="both")
    s.add_argument("--partition", default="iid", help="iid | dirichlet:ALPHA")
    s.add_argument("--mode", choices=["paper", "parallel"], default="paper")
    s.add_argument("--local-epochs", type=int, default=None, help="local epochs per round (default 1)")
    s.add_argument("--expert-epochs", type=int, default=None,
                   help="local epochs for non-root experts (default: --local-epochs)")
    s.add_argument("--weighting", choices=["data", "sqrt", "uniform"], default=None,
                   help="how often each expert is visited in paper mode (default data)")
    s.add_argument("--batch-size", type=int, default=None)
    s.add_argument("--lr", type=float, default=None)
    s.add_argument("--flat-width", type=int, default=None)
    s.add_argument("--expert-width", type=int, default=None)
    s.add_argument("--root-width", type=int, default=None)
    s.add_argument("--eval-every", type=int, default=5)
    s.add_argument("--round-timeout", type=float, default=300.0, help="seconds before stragglers are dropped")
    s.add_argument("--threads-per-client", type=int, default=1)
    s.add_argument("--memory-budget-mb", type=float, default=0.0)
    s.add_argument("--val-fraction", type=float, default=0.1)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--broker", default=None, help="use this broker instead of starting one")
    s.add_argument("--config", default=None, help="base TOML config (its values are defaults)")
    s.add_argument("--no-export", action="store_true", help="skip the ONNX bundle")
    s.add_argument("--out", required=True, metavar="runs/NAME")
    s.add_argument("--force", action="store_true", help="replace a non-empty --out")
    s.set_defaults(func=cmd_simulate)

    c = sub.add_parser("credentials", help="manage device broker accounts")
    cs = c.add_subparsers(dest="ccommand", required=True, metavar="ACTION")
    ca = cs.add_parser("add", help="create a device account with a random password")
    ca.add_argument("--password-file", required=True, help="Mosquitto password file to add to")
    ca.add_argument("--device-id", required=True)
    ca.add_argument("--out-dir", required=True, help="where <device-id>.password is written (mode 0600)")
    ca.set_defaults(func=cmd_credentials_add)

    b = sub.add_parser("broker-config", help="copy the example mosquitto.conf and ACL to start from")
    b.add_argument("--out-dir", required=True)
    b.add_argument("--force", action="store_true")
    b.set_defaults(func=cmd_broker_config)
    return p


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    configure_logging(1 if args.verbose > 1 else 0 if args.verbose else -1)
    if args.command != "simulate" or args.verbose:
        logging.getLogger().setLevel(logging.DEBUG if args.verbose > 1 else logging.INFO)
    return run_main("edgehmoe-server", lambda: args.func(args), debug=args.debug)


if __name__ == "__main__":
    sys.exit(main())
