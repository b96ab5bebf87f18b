"""Orchestration benchmark and soak: the real server and Mosquitto against an emulated fleet.

:func:`run_case` starts a private Mosquitto (auth + per-run ACL, persistence), writes one broker
account per device, runs the real aggregation server as its own process (``python -m
edgehmoe.server run``) and, as clients, either the fleet emulator (``edgehmoe-fleet``,
:mod:`edgehmoe.fl.fleet`) or real ``edgehmoe-client`` processes with near-zero training. It
samples the server's and the broker's memory, then reads the committed ``metrics.jsonl``.

Definitions (docs/scale.md):

- **round wall time**: from one round's commit to the next one's (``time_unix`` of consecutive
  rows): planning, task encoding and publishing, the devices' work, collection, validation,
  aggregation and the commit. The first round (no previous commit) and the last (it also
  evaluates the model) are left out.
- **overhead**: round wall time minus the slowest device's ``round_time_ms`` in that round,
  i.e. what orchestration adds to the devices' own time.
- **bytes per round**: MQTT payload + topic + framing between the broker and the devices, both
  ways (the fleet counts them; the server's leg carries the same payloads again). With real
  clients it is the server's count (``bytes_in`` + ``bytes_out`` of the row) when the rows have it.

:func:`run_soak` runs many rounds with churning devices, a broker restart and a server kill
followed by ``--resume``, and :func:`verify_soak` checks the committed rows against the events
the fleet wrote: every round committed once, and each row's ``ok`` devices are exactly those
that answered its tasks in time (see the function for the precise rule).

Reference numbers (Flower 1.42, deployment mode, same 2-core machine, 100k parameters, trivial
training, 20 rounds): :data:`FLOWER_MS`.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from edgehmoe.server.broker import MosquittoBroker, find_mosquitto
from edgehmoe.server.config import RunConfig, dump_config

from edgehmoe.errors import RunError, UsageError
from edgehmoe.fl.fleet import device_ids, raise_fd_limit

__all__ = [
    "FLOWER_MS",
    "SERVER_DATASET",
    "CaseResult",
    "percentile",
    "round_stats",
    "run_case",
    "run_soak",
    "verify_soak",
]

logger = logging.getLogger(__name__)

#: Flower 1.42 deployment mode on this machine: devices -> (median, p95) round time in ms.
FLOWER_MS = {4: (6595.0, 10020.0), 16: (23396.0, 26085.0), 32: (52324.0, 56656.0)}

#: What the server evaluates on: CIFAR-100-sized (100 classes, 20 superclasses, 32x32), tiny.
SERVER_DATASET = "synthetic:coarse=20,fine=5,per_class=10,test_per_class=1,size=32,seed=0"
#: The devices' data (only the class counts travel; real clients get shards of it).
FLEET_DATASET = "synthetic:coarse=20,fine=5,per_class=500,size=32,seed=0"
RUN = "bench"
SERVER_USER = "edgehmoe-server"


def percentile(values, q: float) -> float | None:
    v = [float(x) for x in values]
    return float(np.percentile(v, q)) if v else None


def _write_accounts(broker: MosquittoBroker, users: list[str], cred_dir: Path) -> None:
    """One broker account per user, hashed in one ``mosquitto_passwd -U`` call (1,000 users in ~1 s)."""
    cred_dir.mkdir(parents=True, exist_ok=True)
    lines = []
    for u in users:
        pw = secrets.token_urlsafe(12)
        (cred_dir / f"{u}.password").write_text(pw + "\n")
        lines.append(f"{u}:{pw}\n")
    broker.password_file.write_text("".join(lines))
    os.chmod(broker.password_file, 0o600)
    tool = find_mosquitto("mosquitto_passwd")
    r = subprocess.run([tool, "-U", str(broker.password_file)], capture_output=True, text=True, timeout=600)
    if r.returncode != 0:
        raise RunError(f"mosquitto_passwd -U failed: {(r.stderr or r.stdout).strip()}")


class _Sampler:
    """Samples the RSS of named processes every ``interval`` s; peaks and one reading per commit."""

    def __init__(self, interval: float = 0.1):
        self.interval = interval
        self.pids: dict[str, int] = {}
        self.peak: dict[str, float] = {}
        self.rss_at_round: list[float] = []  # server RSS right after each commit
        self.cpu_at_round: list[float] = []  # server CPU seconds (user + system) at each commit
        self.cpu: dict[str, float] = {}  # name -> last CPU seconds seen (children of the fleet included)
        self.metrics_path: Path | None = None
        self._rows_seen = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="bench-sampler", daemon=True)

    def start(self) -> _Sampler:
        self._thread.start()
        return self

    def _cpu(self, pid: int) -> float | None:
        try:
            import psutil

            p = psutil.Process(pid)
            t = p.cpu_times()
            total = t.user + t.system
            for c in p.children(recursive=True):  # the fleet's worker processes
                ct = c.cpu_times()
                total += ct.user + ct.system
            return total
        except Exception:  # noqa: BLE001 - gone
            return None

    def _rss(self, pid: int, children: bool = False) -> float | None:
        try:
            import psutil

            p = psutil.Process(pid)
            total = p.memory_info().rss
            for c in p.children(recursive=True) if children else ():
                total += c.memory_info().rss
            return total / 2**20
        except Exception:  # noqa: BLE001 - gone
            return None

    def _loop(self) -> None:
        from edgehmoe.measure.meter import process_mem_mb

        while not self._stop.wait(self.interval):
            for name, pid in list(self.pids.items()):
                # server: also its VmHWM; the fleet: with its worker processes
                v = process_mem_mb(pid) if name == "server" else self._rss(pid, children=name == "fleet")
                if v is not None:
                    self.peak[name] = max(self.peak.get(name, 0.0), v)
                c = self._cpu(pid)
                if c is not None:  # max: a stopping fleet's workers leave before their parent
                    self.cpu[name] = max(self.cpu.get(name, 0.0), c)
            if self.metrics_path is not None and "server" in self.pids:
                try:
                    with open(self.metrics_path, "rb") as f:
                        n = sum(1 for _ in f)
                except OSError:
                    n = 0
                if n > self._rows_seen:
                    self._rows_seen = n
                    v = self._rss(self.pids["server"])
                    if v is not None:
                        self.rss_at_round.append(v)
                    c = self._cpu(self.pids["server"])
                    if c is not None:
                        self.cpu_at_round.append(c)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


@dataclass
class CaseResult:
    """One benchmark case; :meth:`to_json` is one entry of the JSON's ``runs``."""

    devices: int
    clients: str  # fleet | real
    model: str
    rounds: int
    rows: list[dict] = field(default_factory=list)
    server_peak_rss_mb: float | None = None
    broker_peak_rss_mb: float | None = None
    clients_peak_rss_mb: float | None = None
    server_rss_by_round: list[float] = field(default_factory=list)
    server_cpu_by_round: list[float] = field(default_factory=list)
    cpu_s: dict = field(default_factory=dict)  # process -> CPU seconds over the whole case
    fleet: dict = field(default_factory=dict)
    train_ms: float = 0.0
    load_before: tuple = ()
    load_after: tuple = ()
    seconds: float = 0.0
    params: int = 0

    def to_json(self) -> dict:
        st = round_stats(self.rows)
        med = st["median_round_ms"]
        flower = FLOWER_MS.get(self.devices)
        rounds_counted = max(1, len(self.rows))
        if self.fleet.get("bytes_in") is not None:
            bpr = (self.fleet["bytes_in"] + self.fleet["bytes_out"]) / rounds_counted
            bytes_source = "fleet (device leg)"
        elif self.rows and "bytes_in" in self.rows[0]:
            bpr = float(np.mean([r["bytes_in"] + r["bytes_out"] for r in self.rows]))
            bytes_source = "server (server leg)"
        else:
            bpr, bytes_source = None, ""
        rss = self.server_rss_by_round
        cpu = self.server_cpu_by_round
        # CPU seconds the server spent per round (between commits, first and last left out like
        # the wall times): what the round costs it, whatever else runs on the machine
        per_round = [b - a for a, b in zip(cpu, cpu[1:-1])] if len(cpu) > 2 else []
        return {
            "devices": self.devices,
            "clients": self.clients,
            "model": self.model,
            "params": self.params,  # of the largest network
            "rounds": len(self.rows),
            "train_ms": self.train_ms,
            **st,
            "server_peak_rss_mb": self.server_peak_rss_mb,
            "broker_peak_rss_mb": self.broker_peak_rss_mb,
            "clients_peak_rss_mb": self.clients_peak_rss_mb,
            "server_rss_first_last_mb": [rss[0], rss[-1]] if rss else None,
            "server_rss_by_round_mb": [round(v, 1) for v in rss],
            "bytes_per_round": bpr,
            "bytes_source": bytes_source,
            "server_cpu_ms_per_round": percentile(per_round, 50) * 1000 if per_round else None,
            "cpu_s": self.cpu_s,
            "fleet_cpu_s": self.fleet.get("cpu_s"),
            "flower_median_round_ms": flower[0] if flower else None,
            "flower_p95_round_ms": flower[1] if flower else None,
            "speedup_vs_flower": (flower[0] / med) if flower and med else None,
            "overhead_fraction_of_flower": (st["overhead_ms"] / flower[0]) if flower and st["overhead_ms"] else None,
            "loadavg_before": list(self.load_before),
            "loadavg_after": list(self.load_after),
            "seconds": self.seconds,
        }


def round_stats(rows: list[dict]) -> dict:
    """Median/p95 round wall time and overhead (module docstring) of committed rows."""
    walls, over = [], []
    for prev, row in zip(rows, rows[1:-1]):  # rows 1 .. n-2: a previous commit, no final evaluation
        wall = (row["time_unix"] - prev["time_unix"]) * 1000.0
        slowest = max((d.get("round_time_ms", 0.0) for d in row.get("per_device") or []), default=0.0)
        if row.get("detail") == "summary":  # a compact row: per-device figures summarised per expert
            slowest = max([slowest, *(st["round_time_ms"]["max"] for st in row["per_node"].values())])
        walls.append(wall)
        over.append(wall - slowest)
    return {
        "median_round_ms": percentile(walls, 50),
        "p95_round_ms": percentile(walls, 95),
        "overhead_ms": percentile(over, 50),
        "overhead_p95_ms": percentile(over, 95),
        "round_samples": len(walls),
        "aggregation_ms": percentile([r.get("aggregation_ms", 0.0) for r in rows[1:-1]], 50),
    }


def _config(work: Path, n: int, broker_url: str, rounds: int, model: str, timeout_s: float,
            min_devices: int = 0) -> Path:
    cfg = RunConfig()
    cfg.run.name, cfg.run.out, cfg.run.dataset, cfg.run.val_fraction = RUN, str(work / "run"), SERVER_DATASET, 0.2
    cfg.broker.url, cfg.broker.username = broker_url, SERVER_USER
    cfg.broker.password_file = str(work / "creds" / f"{SERVER_USER}.password")
    cfg.broker.client_id = SERVER_USER
    cfg.model.kind, cfg.model.flat_width = model, 32
    cfg.schedule.rounds, cfg.schedule.min_devices = rounds, min_devices or n
    cfg.schedule.round_timeout_s, cfg.schedule.wait_for_devices_s = timeout_s, 600.0
    cfg.train.batch_size, cfg.train.epochs = 64, 1
    cfg.eval.every, cfg.eval.max_examples = 0, 200
    path = work / "run.toml"
    path.write_text(dump_config(cfg.validate()))
    return path


def _start_broker(work: Path, users: list[str], persistence: bool = True) -> MosquittoBroker:
    raise_fd_limit(2 * len(users) + 1024)  # Mosquitto inherits this process's open-file limit
    # Mosquitto's queue limits are per client and the same for every client: the server's queue
    # must hold a retained hello and status per device (delivered at once when it subscribes) and
    # a round of results and statuses, or the broker drops them ("Outgoing messages are being
    # dropped"); docs/scale.md.
    n = len(users)
    broker = MosquittoBroker(run_dir=work / "broker", runs=[RUN], persistence=work / "broker-db" if persistence else None,
                             max_queued_messages=max(1000, 4 * n), max_queued_bytes=max(64 << 20, n << 20))
    broker.password_file.parent.mkdir(parents=True, exist_ok=True)
    _write_accounts(broker, users, work / "creds")
    broker.start()
    return broker


def _fleet_cmd(broker_url: str, n: int, work: Path, train_ms: float, extra: list[str] = ()) -> list[str]:
    return [sys.executable, "-m", "edgehmoe.cli.fleet", "--broker", broker_url, "--run", RUN, "--devices", str(n),
            "--password-dir", str(work / "creds"), "--dataset", FLEET_DATASET, "--train-ms", str(train_ms),
            "--stats", str(work / "fleet.json"), "-q", *extra]


def _server_cmd(cfg_path: Path, resume: bool = False) -> list[str]:
    return [sys.executable, "-m", "edgehmoe.server", "run", "--config", str(cfg_path), *(["--resume"] if resume else [])]


def _rows(run_dir: Path) -> list[dict]:
    p = run_dir / "metrics.jsonl"
    return [json.loads(ln) for ln in p.read_text().splitlines() if ln.strip()] if p.exists() else []


def _params(run_dir: Path) -> int:
    try:
        m = json.loads((run_dir / "model.json").read_text())
    except (OSError, ValueError):
        return 0
    models = m.get("models") or {}
    nets = list(((models.get("hmoe") or {}).get("experts") or {}).values())
    if models.get("flat"):
        nets.append(models["flat"])
    return max((int(e.get("params", 0)) for e in nets), default=0)


def _kill(proc: subprocess.Popen | None, sig=signal.SIGTERM, timeout: float = 60.0) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(sig)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def run_case(n: int, *, clients: str = "fleet", rounds: int = 20, model: str = "flat", train_ms: float = 50.0,
             work_dir: Path, round_timeout_s: float = 120.0, time_limit_s: float = 900.0,
             print_fn=None) -> CaseResult:
    """Run the real server and Mosquitto against ``n`` devices for ``rounds`` rounds (module docstring)."""
    if clients not in ("fleet", "real"):
        raise UsageError(f"clients must be 'fleet' or 'real', got {clients!r}")
    work = Path(work_dir) / f"{clients}-{model}-{n}"
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    ids = device_ids(n)
    res = CaseResult(devices=n, clients=clients, model=model, rounds=rounds, train_ms=train_ms,
                     load_before=os.getloadavg())
    t0 = time.monotonic()
    broker = _start_broker(work, [SERVER_USER, *ids])
    cfg_path = _config(work, n, broker.url, rounds, model, round_timeout_s)
    sampler = _Sampler()
    sampler.metrics_path = work / "run" / "metrics.jsonl"
    sampler.pids["broker"] = broker.pid
    server = fleet = None
    real: list[subprocess.Popen] = []
    logs = work / "logs"
    logs.mkdir()
    try:
        with open(logs / "server.log", "ab") as log:
            server = subprocess.Popen(_server_cmd(cfg_path), stdout=log, stderr=subprocess.STDOUT)
        sampler.pids["server"] = server.pid
        sampler.start()
        if clients == "fleet":
            with open(logs / "fleet.log", "ab") as log:
                fleet = subprocess.Popen(_fleet_cmd(broker.url, n, work, train_ms), stdout=log, stderr=subprocess.STDOUT)
            sampler.pids["fleet"] = fleet.pid
        else:
            real = _start_real_clients(broker.url, ids, work)
        deadline = time.monotonic() + time_limit_s
        while server.poll() is None:
            if time.monotonic() > deadline:
                raise RunError(f"{n} devices ({clients}): the run did not finish within {time_limit_s:.0f} s "
                               f"(see {logs / 'server.log'})")
            if fleet is not None and fleet.poll() is not None:
                raise RunError(f"the fleet exited with {fleet.returncode} (see {logs / 'fleet.log'})")
            if real:
                peak = sum(v for v in (sampler._rss(p.pid) for p in real) if v is not None)
                res.clients_peak_rss_mb = max(res.clients_peak_rss_mb or 0.0, peak)
            time.sleep(0.2)
        if server.returncode != 0:
            tail = (logs / "server.log").read_text(errors="replace")[-2000:]
            raise RunError(f"the server exited with {server.returncode}:\n{tail}")
    finally:
        _kill(server)
        _kill(fleet)
        if real:
            from edgehmoe.server.simulate import _stop_clients

            _stop_clients(real)
        sampler.close()
        broker.close()
    res.rows = _rows(work / "run")
    res.params = _params(work / "run")
    res.server_peak_rss_mb = sampler.peak.get("server")
    res.broker_peak_rss_mb = sampler.peak.get("broker")
    if fleet is not None:
        res.clients_peak_rss_mb = sampler.peak.get("fleet")
        if (work / "fleet.json").is_file():
            res.fleet = json.loads((work / "fleet.json").read_text())
    res.server_rss_by_round = sampler.rss_at_round
    res.server_cpu_by_round = sampler.cpu_at_round
    res.cpu_s = dict(sampler.cpu)
    res.load_after = os.getloadavg()
    res.seconds = time.monotonic() - t0
    return res


def _start_real_clients(url: str, ids: list[str], work: Path) -> list[subprocess.Popen]:
    """``edgehmoe-client`` processes on tiny shards of the server's dataset (near-zero training)."""
    from edgehmoe.server.simulate import _launch_clients

    from edgehmoe.data import load_dataset
    from edgehmoe.data.partition import IidPartitioner, write_shards

    train = load_dataset(SERVER_DATASET, "train", val_fraction=0.2)
    shards = write_shards(train, IidPartitioner(len(ids), seed=0), work / "shards")
    creds = {d: work / "creds" / f"{d}.password" for d in ids}
    return _launch_clients(url, RUN, shards, ids, creds, work, threads=1, budget_mb=0.0)


# ---------------------------------------------------------------------- soak
@dataclass
class SoakResult:
    rounds: int
    devices: int
    problems: list[str]
    rows: list[dict]
    broker_restart_unix: float | None
    server_kill_unix: float | None
    resumed_at_round: int | None
    seconds: float
    checked_rounds: int = 0
    relaxed_rounds: int = 0
    server_rss_by_round: list[float] = field(default_factory=list)


def run_soak(n: int = 20, rounds: int = 200, *, work_dir: Path, churn: float = 0.1, faults: str = "default",
             train_ms: float = 50.0, round_timeout_s: float = 3.0, model: str = "hmoe", seed: int = 0,
             time_limit_s: float = 3600.0, print_fn=None) -> SoakResult:
    """``rounds`` rounds with ``churn`` of ``n`` devices misbehaving (:mod:`edgehmoe.fl.fleet`), one broker
    restart at a third of the run, one ``kill -9`` of the server at two thirds and ``--resume``."""
    say = print_fn or (lambda s: None)
    work = Path(work_dir) / f"soak-{n}"
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    ids = device_ids(n)
    t0 = time.monotonic()
    broker = _start_broker(work, [SERVER_USER, *ids])
    # Churning devices may be away when the server (re)starts; the others are always there.
    cfg_path = _config(work, n, broker.url, rounds, model, round_timeout_s,
                       min_devices=max(1, n - int(round(churn * n))))
    events = work / "events.jsonl"
    logs = work / "logs"
    logs.mkdir()
    sampler = _Sampler()
    sampler.metrics_path = work / "run" / "metrics.jsonl"
    server = fleet = None
    restart_at = kill_at = None
    resumed_at = None
    restart_round, kill_round = max(1, rounds // 3), max(2, (2 * rounds) // 3)
    state = work / "run" / "state.json"

    def committed() -> int:
        try:
            return int(json.loads(state.read_text())["round"])
        except (OSError, ValueError, KeyError):
            return 0

    log = open(logs / "server.log", "ab")
    try:
        server = subprocess.Popen(_server_cmd(cfg_path), stdout=log, stderr=subprocess.STDOUT)
        sampler.pids["server"] = server.pid
        sampler.start()
        with open(logs / "fleet.log", "ab") as flog:
            fleet = subprocess.Popen(_fleet_cmd(broker.url, n, work, train_ms, [
                "--churn", str(churn), "--faults", faults, "--events", str(events), "--seed", str(seed),
                "--late-s", "1.0", "--away-s", "2.0"]), stdout=flog, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + time_limit_s
        while True:
            if time.monotonic() > deadline:
                raise RunError(f"soak did not finish within {time_limit_s:.0f} s (see {logs})")
            if fleet.poll() is not None:
                raise RunError(f"the fleet exited with {fleet.returncode} (see {logs / 'fleet.log'})")
            done = committed()
            if restart_at is None and done >= restart_round:
                time.sleep(0.3 * train_ms / 1000.0)  # most likely mid-round
                restart_at = time.time()
                say(f"soak: restarting the broker after round {done}")
                broker.restart(downtime=1.0)
            if kill_at is None and done >= kill_round:
                time.sleep(0.5 * train_ms / 1000.0)
                kill_at = time.time()
                say(f"soak: kill -9 of the server after round {committed()}")
                _kill(server, signal.SIGKILL)
                resumed_at = committed()
                server = subprocess.Popen(_server_cmd(cfg_path, resume=True), stdout=log, stderr=subprocess.STDOUT)
                sampler.pids["server"] = server.pid
            if server.poll() is not None:
                if server.returncode != 0:
                    tail = (logs / "server.log").read_text(errors="replace")[-3000:]
                    raise RunError(f"the server exited with {server.returncode}:\n{tail}")
                break
            time.sleep(0.05)
    finally:
        _kill(server)
        _kill(fleet)
        sampler.close()
        broker.close()
        log.close()
    rows = _rows(work / "run")
    problems, checked, relaxed = verify_soak(rows, events, timeout_s=round_timeout_s,
                                             disturbed=[t for t in (restart_at, kill_at) if t is not None])
    if len(rows) != rounds:
        problems.insert(0, f"{len(rows)} rows committed, expected {rounds}")
    return SoakResult(rounds=rounds, devices=n, problems=problems, rows=rows, broker_restart_unix=restart_at,
                      server_kill_unix=kill_at, resumed_at_round=resumed_at, seconds=time.monotonic() - t0,
                      checked_rounds=checked, relaxed_rounds=relaxed, server_rss_by_round=sampler.rss_at_round)


def verify_soak(rows: list[dict], events_path: Path, *, timeout_s: float, disturbed: list[float] = (),
                settle_s: float = 3.0) -> tuple[list[str], int, int]:
    """Check committed ``rows`` against the fleet's events; ``(problems, rounds checked exactly, relaxed)``.

    - rounds ``0 .. len(rows)-1`` are committed once each, in order;
    - in every row, ``per_device`` names each device at most once and exactly the ``ok`` devices,
      ``devices_answered`` counts them, and each one's ``num_examples`` is what its device sent;
    - the row's attempt is found by its deadline (all tasks of one attempt share it; a round is
      attempted again after a server kill or when no update was valid); its ``ok`` devices are
      exactly the devices that sent a valid result (``ok`` or ``dup``) for that attempt before
      the deadline, and never one that answered late, dropped, left or sent garbage.
      Devices whose link went down or came back during the attempt may have been counted
      ``offline`` first (their result then is a duplicate): they are allowed either way.
      Rounds during which the broker restarted or the server was killed (``disturbed``, UNIX
      times), or that started less than ``settle_s`` after, are checked only one way (``ok``
      devices answered in time).
    """
    problems: list[str] = []
    rounds = [r["round"] for r in rows]
    if rounds != list(range(len(rows))):
        problems.append(f"committed rounds are {rounds[:20]}..., expected 0..{len(rows) - 1} once each")
    by_attempt: dict[tuple[int, float], dict[str, dict]] = {}
    links: dict[str, list[float]] = {}
    for ln in Path(events_path).read_text().splitlines():
        e = json.loads(ln)
        if e["action"] in ("drop", "leave", "rejoin", "connected"):
            links.setdefault(e["device"], []).append(e["t"])
        if "deadline" in e and e["action"] not in ("redelivered", "expired"):
            by_attempt.setdefault((e["round"], round(e["deadline"], 3)), {})[e["device"]] = e
    checked = relaxed = 0
    for row in rows:
        r = row["round"]
        ok = {d for d, o in row["outcomes"].items() if o == "ok"}
        per = [d["device"] for d in row.get("per_device", [])]
        if len(per) != len(set(per)):
            problems.append(f"round {r}: a device is counted twice in per_device: {sorted(per)}")
        if set(per) != ok or row["devices_answered"] != len(ok):
            problems.append(f"round {r}: per_device {sorted(per)} / devices_answered {row['devices_answered']} "
                            f"do not match the ok outcomes {sorted(ok)}")
        attempts = sorted(k for k in by_attempt if k[0] == r and k[1] - timeout_s <= row["time_unix"])
        if not attempts:
            problems.append(f"round {r}: no device event for any attempt of this round")
            continue
        key = attempts[-1]
        ev = by_attempt[key]
        start = key[1] - timeout_s
        answered = {d for d, e in ev.items() if e["action"] in ("ok", "dup") and e.get("sent", 1e300) <= key[1]}
        bad = {d for d, e in ev.items() if e["action"] in ("late", "drop", "leave", "garbage")}
        flappy = {d for d, ts in links.items() if any(start - 1.0 <= t <= key[1] for t in ts)}
        if ok & bad:
            problems.append(f"round {r}: counted devices that did not answer in time: {sorted(ok & bad)}")
        if ok - answered:
            problems.append(f"round {r}: ok devices without a result in time: {sorted(ok - answered)}")
        for d in row.get("per_device", []):
            e = ev.get(d["device"])
            if e is not None and d["num_examples"] != e.get("n"):
                problems.append(f"round {r}: {d['device']} counted {d['num_examples']} examples, sent {e.get('n')}")
        if any(start - 1.0 <= t <= row["time_unix"] or 0.0 <= start - t <= settle_s for t in disturbed):
            relaxed += 1
            continue
        missing = answered - ok - flappy
        if missing:
            problems.append(f"round {r}: answered in time but not counted: "
                            f"{ {d: row['outcomes'].get(d) for d in sorted(missing)} }")
        checked += 1
    return problems, checked, relaxed


def default_work_dir() -> Path:
    return Path(tempfile.mkdtemp(prefix="edgehmoe-bench-"))
