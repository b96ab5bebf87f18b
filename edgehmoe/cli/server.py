"""``edgehmoe-server`` (also ``python -m edgehmoe.server``): the aggregation server's command line.

::

    edgehmoe-server run --config run.toml [--resume] [--dashboard [HOST:]PORT [--token T]]
    edgehmoe-server simulate --dataset SPEC --clients N --rounds R --model hmoe|flat|both --out runs/NAME
    edgehmoe-server dashboard --run runs/NAME [--dashboard HOST:PORT] [--token T]   # docs/dashboard.md
    edgehmoe-server credentials add --password-file passwd --device-id pi-07 --out-dir creds/ \
        [--client-cert --ca-dir broker/certs]        # + pi-07.crt/.key for mutual TLS
    edgehmoe-server credentials cert --name edgehmoe-server --ca-dir broker/certs --out-dir creds/
    edgehmoe-server broker-config --out-dir broker/ [--run NAME] [--tls [--tls-host HOST] [--client-certs]]
"""

from __future__ import annotations

import argparse
import logging
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
    tree_groups_arg,
)

__all__ = ["main", "get_args_parser"]

logger = logging.getLogger("edgehmoe.server")


def _dashboard_token(args, token_file: str = "") -> str | None:
    """``--token``, else the token in ``[dashboard] token_file``, else ``None`` (random when needed)."""
    from edgehmoe.server.dashboard import read_token_file

    if args.token:
        return args.token
    return read_token_file(token_file) if token_file else None


def _start_dashboard(run_dir: Path, listen: str, token: str | None):
    """Serve ``run_dir``'s dashboard on ``listen`` and print its URL (with the token when one is needed)."""
    from edgehmoe.server.dashboard import DashboardServer

    dash = DashboardServer(run_dir, listen, token=token).start()
    note = " (token generated for this run; choose one with --token)" if dash.token_generated else ""
    print(f"dashboard: {dash.url}{note}", flush=True)
    return dash


def _check_token_flag(args, listen: str) -> None:
    from edgehmoe.errors import UsageError

    if args.token and not listen:
        raise UsageError("--token protects the dashboard: give --dashboard [HOST:]PORT too")


def cmd_run(args) -> int:
    from edgehmoe.server.app import AggregationServer
    from edgehmoe.server.config import load_config
    from edgehmoe.server.dashboard import LiveStatus

    cfg = load_config(args.config)
    listen = args.dashboard or cfg.dashboard.listen
    _check_token_flag(args, listen)
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
    dash = _start_dashboard(cfg.out_dir, listen, _dashboard_token(args, cfg.dashboard.token_file)) if listen else None
    live = LiveStatus().start()  # live.json: what the dashboard shows between commits
    live.attach(server)
    try:
        rows = server.run()
    finally:
        live.close()
        if dash is not None:
            dash.close()
            print(f"dashboard stopped with the run; to browse it: edgehmoe-server dashboard --run {cfg.out_dir}")
    print(f"run {cfg.run.name}: {server.round}/{cfg.schedule.rounds} rounds complete in {cfg.out_dir}")
    if interrupted:
        return EXIT_INTERRUPTED
    return 0 if server.round >= cfg.schedule.rounds or stop.is_set() else 1 if not rows else 0


def cmd_simulate(args) -> int:
    from edgehmoe.server.config import RunConfig, config_from_dict, load_config
    from edgehmoe.server.dashboard import LiveStatus
    from edgehmoe.server.simulate import simulate

    base = load_config(args.config) if args.config else RunConfig()
    d = {f.name: dict(vars(getattr(base, f.name))) for f in fields(RunConfig)}
    d["run"].update(seed=args.seed, val_fraction=args.val_fraction)
    d["schedule"].update(mode=args.mode, round_timeout_s=args.round_timeout)
    d["eval"].update(every=args.eval_every)
    for sec, key, value in (("train", "epochs", args.local_epochs), ("train", "expert_epochs", args.expert_epochs),
                            ("schedule", "weighting", args.weighting), ("train", "batch_size", args.batch_size),
                            ("train", "lr", args.lr), ("model", "flat_width", args.flat_width),
                            ("model", "expert_width", args.expert_width), ("model", "root_width", args.root_width),
                            ("model", "expert_head", args.expert_head),
                            ("model", "root_stem_stride", args.root_stem_stride),
                            ("model", "expert_stem_stride", args.expert_stem_stride),
                            ("model", "tree_groups", args.tree_groups)):
        if value is not None:
            d[sec][key] = value
    merged = config_from_dict(d, "simulate options")
    listen = args.dashboard or merged.dashboard.listen
    _check_token_flag(args, listen)
    token = _dashboard_token(args, merged.dashboard.token_file)
    dash = _start_dashboard(Path(args.out), listen, token) if listen else None
    live = LiveStatus().start()  # live.json of each model's run directory, for the dashboard
    try:
        simulate(
            args.dataset, args.clients, args.rounds, args.model, Path(args.out), partition=args.partition,
            base=merged, flat_rounds=args.flat_rounds, threads_per_client=args.threads_per_client,
            memory_budget_mb=args.memory_budget_mb, broker_url=args.broker, export=not args.no_export,
            force=args.force, print_fn=lambda s: print(s, flush=True), on_server=live.attach,
        )
    finally:
        live.close()
        if dash is not None:
            dash.close()
            print(f"dashboard stopped with the run; to browse it: edgehmoe-server dashboard --run {args.out}")
    return 0


def cmd_dashboard(args) -> int:
    from edgehmoe.server.dashboard import PHASES, DashboardError

    run = Path(args.run)
    if not run.is_dir():
        raise DashboardError(f"{run} is not a directory: give a run directory (runs/NAME, holding state.json) "
                             "or a simulate --out directory (holding hmoe/ and flat/)")
    if not any((run / p / "state.json").is_file() for p in (".", *PHASES)):
        logger.warning("%s holds no run yet (no state.json, hmoe/ or flat/); the page shows it once it starts", run)
    dash = _start_dashboard(run, args.dashboard, args.token)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda signum, frame: stop.set())
    try:
        while not stop.wait(0.5):
            pass
    finally:
        dash.close()
    print("dashboard stopped")
    return 0


def _ca_files(ca_dir: str) -> tuple[Path, Path]:
    from edgehmoe.errors import UsageError

    if not ca_dir:
        raise UsageError("--client-cert needs --ca-dir: the directory holding ca.crt and ca.key "
                         "(broker-config --tls writes them to OUT_DIR/certs)")
    files = Path(ca_dir) / "ca.crt", Path(ca_dir) / "ca.key"
    for f in files:
        if not f.is_file():
            raise FileNotFoundError(f"{f} not found: --ca-dir must hold the CA's ca.crt and ca.key "
                                    "(edgehmoe-server broker-config --tls writes them to OUT_DIR/certs)")
    return files


def cmd_credentials_add(args) -> int:
    from edgehmoe.server.broker import (
        create_client_certificate,
        create_device_credentials,
    )

    ca = _ca_files(args.ca_dir) if args.client_cert else None
    path = create_device_credentials(args.password_file, args.device_id, args.out_dir)
    print(f"added {args.device_id} to {args.password_file}; its password is in {path} "
          "(copy it to the device, e.g. with firmware_scripts/flash_sd.sh --credentials)")
    if ca is not None:
        crt, key = create_client_certificate(*ca, args.out_dir, args.device_id, force=args.force)
        print(f"client certificate {crt} and key {key} (mode 0600): copy both to the device and start it "
              "with --certfile/--keyfile (EDGEHMOE_CERTFILE/EDGEHMOE_KEYFILE)")
    print("reload the broker to apply: systemctl reload mosquitto (or kill -HUP <pid>)")
    return 0


def cmd_credentials_cert(args) -> int:
    from edgehmoe.server.broker import create_client_certificate

    crt, key = create_client_certificate(*_ca_files(args.ca_dir), args.out_dir, args.name, force=args.force)
    print(f"client certificate {crt} and key {key} (mode 0600) for {args.name}")
    return 0


def _default_tls_hosts() -> list[str]:
    import socket

    name = socket.gethostname()
    return [name, f"{name}.local", socket.getfqdn(), "localhost", "127.0.0.1", "::1"]


def cmd_broker_config(args) -> int:
    from edgehmoe.server.broker import (
        TEMPLATE_RUN,
        create_ca,
        create_server_certificate,
        render_acl,
        render_broker_config,
    )

    out = Path(args.out_dir)
    text = render_broker_config(
        conf_dir=args.conf_dir, listen=args.listen, tls=args.tls, tls_listen=args.tls_listen,
        client_certs=args.client_certs, max_payload_bytes=int(args.max_payload_mb * 1024 * 1024),
        max_queued_bytes=None if args.max_queued_mb is None else int(args.max_queued_mb * 1024 * 1024),
    )
    files = {"mosquitto.conf": text, "acl": render_acl(runs=args.run or [TEMPLATE_RUN])}
    targets = [out / name for name in files]
    if args.tls:
        targets += [out / "certs" / n for n in ("ca.crt", "ca.key", "server.crt", "server.key")]
    existing = [str(t) for t in targets if t.exists()]
    if existing and not args.force:
        raise FileExistsError(f"{', '.join(existing)} exist(s); pass --force to overwrite")
    out.mkdir(parents=True, exist_ok=True)
    for name, content in files.items():
        (out / name).write_text(content, encoding="utf-8")
        print(f"wrote {out / name}")
    if args.tls:
        hosts = list(dict.fromkeys(args.tls_host or _default_tls_hosts()))
        ca, ca_key = create_ca(out / "certs", force=args.force)
        crt, key = create_server_certificate(ca, ca_key, out / "certs", hosts, force=args.force)
        print(f"wrote {ca} (give it to every device: --cafile), {ca_key} (keep it safe, off the broker if you can), "
              f"{crt} and {key} for {', '.join(hosts)}")
        print(f"copy ca.crt, server.crt and server.key to {args.conf_dir}/certs/ (readable by the mosquitto user); "
              f"devices connect to mqtts://{hosts[0]}:8883")
    return 0


DEFAULT_LISTEN = "127.0.0.1:8765"  # = edgehmoe.server.dashboard.DEFAULT_LISTEN (not imported: --help stays fast)


def _add_dashboard_args(p: argparse.ArgumentParser, default: str | None = None) -> None:
    p.add_argument("--dashboard", metavar="[HOST:]PORT", default=default,
                   help="serve a read-only live web page of the run (host default 127.0.0.1; any other "
                        f"address needs a token){'' if default is None else f' (default {default})'}")
    p.add_argument("--token", default=None, metavar="T",
                   help="token the dashboard requires (default: none on loopback, else random and printed)")


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="edgehmoe-server", description="edgehmoe aggregation server")
    p.add_argument("-v", "--verbose", action="count", default=0)
    add_debug_arg(p)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    r = sub.add_parser("run", help="run (or resume) a federated training job from a TOML config")
    r.add_argument("--config", required=True, metavar="run.toml")
    r.add_argument("--resume", action="store_true", help="continue from the last complete round")
    _add_dashboard_args(r)
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
    s.add_argument("--expert-head", choices=["children", "leaves"], default=None,
                   help="train each expert on its children or on the leaves below it (default: the config's, "
                        "leaves; docs/accuracy.md)")
    s.add_argument("--expert-stem-stride", type=int, choices=[1, 2], default=None,
                   help="2: strided first convolution of every other expert too (a quarter of their "
                        "activations); 1: full resolution (default: the config's, 2)")
    s.add_argument("--root-stem-stride", type=int, choices=[1, 2], default=None,
                   help="2: strided first convolution of the root (a quarter of its activations); 1: full "
                        "resolution (default: the config's, 2)")
    s.add_argument("--tree-groups", type=tree_groups_arg, default=None, metavar="K|auto",
                   help="route through two levels: the root chooses among groups of at most K classes cut "
                        "from the dataset's tree (metrics still on the full tree); 0: the dataset's tree; "
                        "auto: deep trees cut to groups of at most 30 classes (default: the config's, auto; "
                        "docs/accuracy.md)")
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
    _add_dashboard_args(s)
    s.set_defaults(func=cmd_simulate)

    w = sub.add_parser("dashboard", help="serve the live web dashboard of a run directory (finished or running)")
    w.add_argument("--run", required=True, metavar="runs/NAME", help="a run directory or a simulate --out directory")
    _add_dashboard_args(w, default=DEFAULT_LISTEN)
    w.set_defaults(func=cmd_dashboard)

    c = sub.add_parser("credentials", help="manage device broker accounts")
    cs = c.add_subparsers(dest="ccommand", required=True, metavar="ACTION")
    ca = cs.add_parser("add", help="create a device account with a random password")
    ca.add_argument("--password-file", required=True, help="Mosquitto password file to add to")
    ca.add_argument("--device-id", required=True)
    ca.add_argument("--out-dir", required=True, help="where <device-id>.password is written (mode 0600)")
    ca.add_argument("--client-cert", action="store_true",
                    help="also write <device-id>.crt/.key signed by the CA in --ca-dir (mutual TLS)")
    ca.add_argument("--ca-dir", default="", help="directory with ca.crt and ca.key (broker-config --tls: OUT/certs)")
    ca.add_argument("--force", action="store_true", help="replace an existing certificate")
    ca.set_defaults(func=cmd_credentials_add)
    cc = cs.add_parser("cert", help="create a client certificate only (e.g. for the server under mutual TLS)")
    cc.add_argument("--name", required=True, help="user name the certificate is for (its common name)")
    cc.add_argument("--ca-dir", required=True, help="directory with ca.crt and ca.key")
    cc.add_argument("--out-dir", required=True, help="where <name>.crt and <name>.key (mode 0600) are written")
    cc.add_argument("--force", action="store_true", help="replace an existing certificate")
    cc.set_defaults(func=cmd_credentials_cert)

    b = sub.add_parser("broker-config", help="write mosquitto.conf and the ACL to start from (and TLS certificates)")
    b.add_argument("--out-dir", required=True)
    b.add_argument("--force", action="store_true")
    b.add_argument("--run", action="append", metavar="NAME",
                   help="run name the ACL admits (repeatable; default: the default run 'edgehmoe')")
    b.add_argument("--listen", default="127.0.0.1",
                   help="address of the plain MQTT listener on port 1883 (default 127.0.0.1; '' = all interfaces)")
    b.add_argument("--conf-dir", default="/etc/mosquitto",
                   help="where the password file, ACL and certs/ will live on the broker host (paths in the config)")
    b.add_argument("--tls", action="store_true",
                   help="enable the TLS listener on port 8883 and create a private CA and the broker certificate "
                        "in OUT_DIR/certs")
    b.add_argument("--tls-host", action="append", metavar="HOST",
                   help="host name or IP address devices use for the broker (repeatable; default: this host's names "
                        "and loopback)")
    b.add_argument("--tls-listen", default="", help="address of the TLS listener (default: all interfaces)")
    b.add_argument("--client-certs", action="store_true",
                   help="mutual TLS: the TLS listener refuses clients without a certificate signed by the CA")
    b.add_argument("--max-payload-mb", type=float, default=64.0,
                   help="largest message the broker accepts, MiB (default 64 = the wire limit; today's experts "
                        "need well under 1)")
    b.add_argument("--max-queued-mb", type=float, default=None,
                   help="bytes queued per disconnected client, MiB (default max(64, packet limit))")
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
