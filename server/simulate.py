"""One-command local federation: broker + N real client processes + the server.

``edgehmoe-server simulate --dataset SPEC --clients N --rounds R --model hmoe|flat|both
--out runs/NAME`` does, in order:

1. starts a broker: Mosquitto from PATH with a generated config (password file + ACL, one
   account per device) on a free loopback port, or an external one with ``--broker URL``;
2. splits the training split (train minus the held-out validation part) into N device
   shards (``--partition iid|dirichlet:ALPHA``) under ``runs/NAME/shards/``;
3. for each model (HMoE, then flat): launches N ``edgehmoe-client`` processes and runs the
   aggregation server for R rounds in ``runs/NAME/<model>/`` (a full run directory);
4. evaluates on the held-out split (the official test split when the dataset has one,
   else the validation part of train), merges both models into ``runs/NAME`` (a model
   directory ``edgehmoe evaluate`` and ``edgehmoe export`` read), exports the ONNX bundle to
   ``runs/NAME/bundle/`` (when an HMoE was trained: a bundle is the expert chain, with the
   flat model beside it; a flat-only run says so and exports none), writes ``summary.json``
   and plots, and prints Table 1.
"""

from __future__ import annotations

import logging
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
from edgehmoe.server.config import RunConfig
from edgehmoe.server.report import build_summary, format_table, load_rows, plot_run

from edgehmoe.core.kinds import FLAT, HMOE

__all__ = ["simulate", "heldout_split", "describe_heldout"]

logger = logging.getLogger(__name__)


def heldout_split(spec: str, val_fraction: float, seed: int) -> str:
    """``test`` when the dataset has a real test split, else ``val`` (held out of train)."""
    from edgehmoe.data import DatasetError, load_dataset, parse_spec

    kind, arg = parse_spec(spec)
    if kind == "npz" or (kind == "cifar100" and str(arg).endswith(".npz")):
        return "val"  # a single .npz has no separate test set: its "test" would be the training data
    try:
        load_dataset(spec, "test", val_fraction=val_fraction, seed=seed, limit_per_class=1)
        return "test"
    except DatasetError:
        return "val"


_TEST_SPLITS = {
    "cifar100": "the official CIFAR-100 test set",
    "tinyimagenet": "Tiny ImageNet's official val/ folder (its test set has no labels)",
    "synthetic": "generated on another random stream of the spec's seed",
}


def describe_heldout(spec: str, split: str, val_fraction: float, seed: int) -> str:
    """How the held-out ``split`` of ``spec`` was made, for the Table 1 header."""
    from edgehmoe.data import parse_spec

    if split == "val":
        return f"{100.0 * val_fraction:g}% of train held out per class, seed {seed}"
    kind, _ = parse_spec(spec)
    return _TEST_SPLITS.get(kind, f"the dataset's {split} split")


def _start_broker(out: Path, device_ids: list[str]):
    """Mosquitto with auth + ACL; returns (broker, {user: password_file})."""
    from edgehmoe.server.broker import MosquittoBroker

    cred_dir = out / "broker" / "credentials"
    cred_dir.mkdir(parents=True, exist_ok=True)
    # runs=[]: the ACL admits no run until add_run, so each phase's devices can publish only
    # under that phase's run (docs/security.md)
    broker = MosquittoBroker(auth=True, run_dir=out / "broker", runs=[])
    files = {}
    for user in ["edgehmoe-server", *device_ids]:
        pw = secrets.token_urlsafe(16)
        broker.add_user(user, pw)
        f = cred_dir / f"{user}.password"
        f.write_text(pw + "\n")
        f.chmod(0o600)
        files[user] = f
    broker.start()
    return broker, files


def _launch_clients(url: str, run: str, shards: list[Path], device_ids: list[str], creds: dict, out: Path,
                    threads: int, budget_mb: float) -> list[subprocess.Popen]:
    logs = out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    procs = []
    for dev, shard in zip(device_ids, shards):
        cmd = [sys.executable, "-m", "edgehmoe.cli.client", "--broker", url, "--device-id", dev, "--data", str(shard),
               "--run", run, "--threads", str(threads), "--state-dir", str(out / "clients" / f"{dev}-{run}")]
        if budget_mb:
            cmd += ["--memory-budget-mb", str(budget_mb)]
        if dev in creds:
            cmd += ["--username", dev, "--password-file", str(creds[dev])]
        log = open(logs / f"{dev}-{run}.log", "ab")
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        procs.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env))
        log.close()
    return procs


def _stop_clients(procs: list[subprocess.Popen], timeout: float = 20.0) -> None:
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    end = time.monotonic() + timeout
    for p in procs:
        try:
            p.wait(timeout=max(0.1, end - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def _merge_model_dir(out: Path, phases: dict[str, Path]) -> None:
    """Make ``out`` a model directory holding both models (copies of the final weights)."""
    from edgehmoe.core.checkpoint import read_model_dir

    merged = None
    for kind, d in phases.items():
        md = read_model_dir(d)
        if merged is None:
            merged = replace(md, path=out, experts={}, flat=None, extra={"phases": {k: str(v) for k, v in phases.items()}})
        if kind == HMOE:
            for n, e in md.experts.items():
                (out / "experts").mkdir(parents=True, exist_ok=True)
                shutil.copyfile(d / e.file, out / f"experts/{n}.safetensors")
                merged.experts[n] = replace(e, file=f"experts/{n}.safetensors")
        else:
            shutil.copyfile(d / md.flat.file, out / "flat.safetensors")
            merged.flat = replace(md.flat, file="flat.safetensors")
    merged.save_json()


def simulate(
    dataset: str,
    clients: int,
    rounds: int,
    model: str,
    out: Path,
    partition: str = "iid",
    base: RunConfig | None = None,
    flat_rounds: int | None = None,
    threads_per_client: int = 1,
    memory_budget_mb: float = 0.0,
    broker_url: str | None = None,
    export: bool = True,
    force: bool = False,
    print_fn=print,
    on_server=None,
) -> dict:
    """See the module docstring; ``on_server(server)`` is called with each model's
    :class:`~edgehmoe.server.app.AggregationServer` before it runs (the CLI's dashboard follows it)."""
    from edgehmoe.server.app import AggregationServer

    from edgehmoe.data import load_dataset
    from edgehmoe.data.partition import make_partitioner, write_shards

    out = Path(out)
    if broker_url is None:
        from edgehmoe.server.broker import find_mosquitto

        # Before anything is written: no embedded broker (see docs/protocol.md, "Brokers").
        find_mosquitto()
        find_mosquitto("mosquitto_passwd")
    if out.exists() and any(out.iterdir()):
        if not force:
            raise FileExistsError(f"{out} is not empty; pass --force to replace it, or choose another --out")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    base = base or RunConfig()
    seed = base.run.seed
    kinds = {"both": [HMOE, FLAT], HMOE: [HMOE], FLAT: [FLAT]}[model]
    t0 = time.time()
    train = load_dataset(dataset, "train", val_fraction=base.run.val_fraction, seed=seed)
    shards = write_shards(train, make_partitioner(partition, clients, seed), out / "shards")
    device_ids = [f"dev-{i:03d}" for i in range(clients)]
    print_fn(f"[simulate] {dataset}: {len(train)} training images in {clients} shards ({partition}); "
             f"models: {', '.join(kinds)}; {rounds} rounds each")
    broker, creds = (None, {}) if broker_url else _start_broker(out, device_ids)
    url = broker_url or broker.url
    phases: dict[str, Path] = {}
    try:
        for kind in kinds:
            cfg = RunConfig()
            cfg.run = replace(base.run, name=f"{out.name}-{kind}".replace("/", "-")[:100], out=str(out / kind),
                              dataset=dataset, eval_split="val")
            cfg.broker = replace(base.broker, url=url, username="edgehmoe-server" if creds else "",
                                 password_file=str(creds["edgehmoe-server"]) if creds else "")
            cfg.model = replace(base.model, kind=kind)
            cfg.schedule = replace(base.schedule, rounds=(flat_rounds or rounds) if kind == FLAT else rounds,
                                   min_devices=clients)
            cfg.train, cfg.eval = base.train, base.eval
            cfg.validate()
            if broker is not None:
                broker.add_run(cfg.run.name)
            procs = _launch_clients(url, cfg.run.name, shards, device_ids, creds, out, threads_per_client,
                                    memory_budget_mb)
            try:
                def progress(r, total, row, kind=kind):
                    f1 = f", val info-F1 {row['val_info_f1']:.4f}" if "val_info_f1" in row else ""
                    t = np.median([d["round_time_ms"] for d in row["per_device"]]) if row["per_device"] else float("nan")
                    print_fn(f"[{kind}] round {r}/{total}: {', '.join(row['experts'])[:60]} "
                             f"({row['devices_answered']}/{row['devices_asked']} devices, median {t:.0f} ms){f1}")

                server = AggregationServer(cfg, progress=progress)
                if on_server is not None:
                    on_server(server)
                server.run()
            finally:
                _stop_clients(procs)
            phases[kind] = Path(cfg.run.out)
    finally:
        if broker is not None:
            broker.close() if hasattr(broker, "close") else broker.stop()

    split = heldout_split(dataset, base.run.val_fraction, seed)
    test = load_dataset(dataset, split, val_fraction=base.run.val_fraction, seed=seed)
    results = _evaluate_phases(phases, test, split, describe_heldout(dataset, split, base.run.val_fraction, seed))
    _merge_model_dir(out, phases)
    summary = build_summary(dataset, rounds, clients, results.get(HMOE), results.get(FLAT))
    summary["partition"] = partition
    summary["wall_seconds"] = round(time.time() - t0, 1)
    if export and HMOE not in phases:
        # A bundle is the expert chain (the flat model travels beside it); there is none here.
        summary["bundle"] = None
        print_fn("[simulate] no ONNX bundle exported: a bundle is the HMoE expert chain (the flat model goes "
                 "beside it in a --model both run) and this run trained the flat model only; evaluate it with "
                 f"`edgehmoe evaluate --model-dir {out} --model flat`")
    elif export:
        summary["bundle"] = _export(out)
    from edgehmoe.core.checkpoint import atomic_write_json

    atomic_write_json(out / "summary.json", summary)
    plots = plot_run(summary, out / "plots")
    print_fn("")
    print_fn(format_table(summary))
    print_fn(f"summary: {out / 'summary.json'}; plots: {', '.join(str(p) for p in plots)}")
    return summary


def _evaluate_phases(phases: dict[str, Path], test, split: str, description: str = "") -> dict:
    import torch

    from edgehmoe.model.inference import evaluate_models, load_models

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    from edgehmoe.server.report import run_gmacs_per_example

    results = {}
    for kind, d in phases.items():
        hm, fm, md = load_models(d)
        entry = {"rows": load_rows(d), "tree": md.hierarchy, "heldout_split": split, "heldout_description": description,
                 "gmacs_per_example": run_gmacs_per_example(d, kind)[1]}
        if kind == HMOE:
            entry["metrics"] = evaluate_models(hm, fm, test.x, test.y, which=HMOE)
            entry["metrics_beam2"] = evaluate_models(hm, fm, test.x, test.y, which=HMOE, beam=2)
            entry["params"] = {n: e.params for n, e in md.experts.items()}
        else:
            entry["metrics"] = evaluate_models(hm, fm, test.x, test.y, which=FLAT)
            entry["params"] = md.flat.params
        results[kind] = entry
    return results


def _export(out: Path) -> str | None:
    try:
        from edgehmoe.export.bundle import export_bundle
    except ImportError as e:
        logger.warning("ONNX export skipped: %s", e)
        return None
    try:
        return str(export_bundle(out, out / "bundle"))
    except Exception as e:  # noqa: BLE001 - the run itself succeeded; report and go on
        logger.error("ONNX export failed: %s", e)
        return None
