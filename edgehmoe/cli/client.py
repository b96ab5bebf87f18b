"""``edgehmoe-client``: the device client's command line (see :mod:`edgehmoe.fl.client`).

Every option can also come from the environment (``EDGEHMOE_BROKER``, ``EDGEHMOE_DEVICE_ID``,
``EDGEHMOE_DATA``, ...), which is how the systemd unit written by
``firmware_scripts/install_client.sh`` configures it.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from pathlib import Path

from edgehmoe.cli.common import (
    EXIT_INTERRUPTED,
    add_debug_arg,
    configure_logging,
    run_main,
)
from edgehmoe.errors import UsageError
from edgehmoe.fl.client import DeviceClient
from edgehmoe.fl.mqtt import BrokerRefused

__all__ = ["main", "get_args_parser"]

logger = logging.getLogger("edgehmoe.client")


def _env(name: str, default=None):
    v = os.environ.get(name)
    return v if v not in (None, "") else default


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="edgehmoe-client", description="edgehmoe device client (trains one expert per round)")
    p.add_argument("--broker", default=_env("EDGEHMOE_BROKER"), help="mqtt://HOST:PORT or mqtts://HOST:PORT")
    p.add_argument("--device-id", default=_env("EDGEHMOE_DEVICE_ID"))
    p.add_argument("--data", default=_env("EDGEHMOE_DATA"), help="this device's shard (.npz from `edgehmoe partition`)")
    p.add_argument("--run", default=_env("EDGEHMOE_RUN", "edgehmoe"), help="run name the server uses (default edgehmoe)")
    p.add_argument("--memory-budget-mb", type=float, default=float(_env("EDGEHMOE_MEMORY_BUDGET_MB", 0)),
                   help="refuse tasks estimated to need more than this (0 = no limit)")
    p.add_argument("--username", default=_env("EDGEHMOE_USERNAME"), help="broker user (default: the device id)")
    p.add_argument("--password-file", default=_env("EDGEHMOE_PASSWORD_FILE"))
    p.add_argument("--cafile", default=_env("EDGEHMOE_CAFILE"), help="CA certificate for mqtts://")
    p.add_argument("--certfile", default=_env("EDGEHMOE_CERTFILE"),
                   help="this device's client certificate, for a broker that requires one (mutual TLS, mqtts://)")
    p.add_argument("--keyfile", default=_env("EDGEHMOE_KEYFILE"), help="private key of --certfile")
    p.add_argument("--insecure", action="store_true", default=_env("EDGEHMOE_INSECURE", "") not in ("", "0"),
                   help="allow plain mqtt:// to a remote broker without the warning (closed lab networks only)")
    p.add_argument("--threads", type=int, default=int(_env("EDGEHMOE_THREADS", 0)), help="torch threads (0 = default)")
    p.add_argument("--state-dir", default=_env("EDGEHMOE_STATE_DIR"), help="keeps the last result across restarts")
    p.add_argument("--max-tasks", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("-v", "--verbose", action="count", default=0)
    add_debug_arg(p)
    return p


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    configure_logging(1 if args.verbose > 1 else 0)
    return run_main("edgehmoe-client", lambda: _serve(args), debug=args.debug)


def _serve(args: argparse.Namespace) -> int:
    missing = [f"--{k.replace('_', '-')}" for k in ("broker", "device_id", "data") if not getattr(args, k)]
    if missing:
        raise UsageError(f"missing {', '.join(missing)} (or the EDGEHMOE_* environment variables)")
    from edgehmoe.fl.mqtt import parse_broker_url

    parse_broker_url(args.broker)
    password = Path(args.password_file).read_text().strip() if args.password_file else None
    client = DeviceClient(
        args.broker, args.device_id, args.data, run=args.run, memory_budget_mb=args.memory_budget_mb,
        username=args.username or (args.device_id if password else None), password=password,
        cafile=args.cafile, threads=args.threads, state_dir=args.state_dir, max_tasks=args.max_tasks,
        certfile=args.certfile, keyfile=args.keyfile, insecure=args.insecure,
    )
    interrupted = []

    def on_signal(signum, frame):
        logger.info("signal %d: stopping after the current task", signum)
        if signum == signal.SIGINT:
            interrupted.append(signum)
        client.stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    # Keep trying to reach the broker: a Pi may boot before the network or the server is up.
    delay = 2.0
    rc = 0
    while not client.stop.is_set():
        try:
            rc = client.serve()
            break
        except BrokerRefused:
            raise  # wrong credentials or client certificate: retrying cannot help (one line, exit 2)
        except ConnectionError as e:
            logger.warning("cannot reach the broker (%s); retrying in %.0f s", e, delay)
            client.stop.wait(delay)
            delay = min(delay * 2, 60.0)
    return EXIT_INTERRUPTED if interrupted else rc


if __name__ == "__main__":
    sys.exit(main())
