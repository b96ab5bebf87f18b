"""The aggregation server: schedules single-expert tasks over MQTT and aggregates per expert.

One round (see docs/design.md):

1. pick devices and experts (:mod:`server.scheduler`) among the devices that announced
   themselves (``hello``) and are not offline (status / last will);
2. publish a :class:`~edgehmoe.fl.wire.TrainTask` to each (QoS 1, with a deadline);
3. collect :class:`~edgehmoe.fl.wire.TrainResult` messages until every asked device answered,
   refused or went offline, or the deadline passed (late results are dropped with a log
   line); every result is decoded and validated before use, a bad one is logged and skipped;
4. FedAvg per expert (:func:`edgehmoe.fl.aggregation.fedavg`, weighted by ``num_examples``);
5. commit: new weights go to new files ``experts/<node>.r<round>.safetensors``, a row is
   appended to ``metrics.jsonl``, then ``state.json`` is replaced atomically — the commit
   point — and ``model.json`` is rewritten. A crash at any moment leaves the last committed
   round intact; ``--resume`` continues after it, so no round is lost or repeated.
"""

from __future__ import annotations

import json
import logging
import math
import os
import queue
import threading
import time
import uuid
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from edgehmoe.server.config import RunConfig, dump_config
from edgehmoe.server.scheduler import FLAT, DeviceView, Scheduler

from edgehmoe import __version__
from edgehmoe.core.checkpoint import (
    ModelDir,
    NetworkEntry,
    atomic_write_bytes,
    atomic_write_json,
    contiguous_arrays,
)
from edgehmoe.core.hierarchy import Hierarchy
from edgehmoe.errors import EdgeHmoeError, RunError
from edgehmoe.fl import wire
from edgehmoe.fl.aggregation import InvalidUpdate, fedavg, validate_update
from edgehmoe.fl.mqtt import MqttError

__all__ = ["AggregationServer", "RunDirError"]

logger = logging.getLogger(__name__)

STATE_VERSION = 1


class RunDirError(EdgeHmoeError, ValueError):
    """The run directory exists without --resume, or cannot be resumed."""


@dataclass
class Device:
    device_id: str
    class_counts: np.ndarray
    memory_budget_mb: float
    ram_mb: float = 0.0
    cores: int = 0
    platform: str = ""
    software_version: str = ""
    online: bool = True
    busy: bool = False
    last_seen: float = field(default_factory=time.time)

    def to_json(self) -> dict:
        d = {k: v for k, v in vars(self).items() if k != "class_counts"}
        d["class_counts"] = self.class_counts.tolist()
        return d

    @classmethod
    def from_json(cls, d: dict) -> "Device":
        d = dict(d)
        d["class_counts"] = np.asarray(d["class_counts"], dtype=np.int64)
        return cls(**d)


@dataclass
class Pending:
    task_id: str
    device_id: str
    node: int
    answered: bool = False
    result: wire.TrainResult | None = None
    outcome: str = "asked"  # asked | ok | refused | offline | invalid | late


class AggregationServer:
    """Runs a federated training job described by a :class:`RunConfig`.

    Args:
        cfg: the validated configuration.
        resume: continue an existing run directory from its last committed round.
        password: the broker password (read from ``cfg.broker.password_file`` if ``None``).
        stop: set this event to stop after the current round (clean shutdown).
    """

    def __init__(self, cfg: RunConfig, resume: bool = False, password: str | None = None,
                 stop: threading.Event | None = None, progress=None):
        self.cfg = cfg
        self.out = cfg.out_dir
        self.resume = resume
        self.stop = stop or threading.Event()
        self.progress = progress
        if password is None and cfg.broker.password_file:
            password = Path(cfg.broker.password_file).read_text().strip()
        self.password = password
        self.devices: dict[str, Device] = {}
        self.inbox: queue.Queue[tuple[str, bytes]] = queue.Queue()
        self.pending: dict[str, Pending] = {}
        self.round = 0  # next round to run
        self.files: dict[int, str] = {}  # node -> committed weights file (relative)
        self.weights: dict[int, dict[str, np.ndarray]] = {}
        self.credits: dict[int, float] = {}
        self.visits: dict[int, int] = {}
        self.history: list[dict] = []
        self.conn = None
        self.scheduler: Scheduler | None = None  # set by prepare()
        self.deadline = 0.0

    # ------------------------------------------------------------------ set-up
    def _load_eval_data(self):
        from edgehmoe.data import channel_stats, load_dataset

        c = self.cfg.run
        val = load_dataset(c.dataset, c.eval_split, val_fraction=c.val_fraction, seed=c.seed)
        if len(val) > self.cfg.eval.max_examples > 0:
            idx = np.random.default_rng(c.seed).choice(len(val), self.cfg.eval.max_examples, replace=False)
            val = val.subset(np.sort(idx))
        mean, std = channel_stats(val.x)
        return val, mean, std

    def _specs(self, tree: Hierarchy, input_size: int) -> dict[int, dict]:
        from edgehmoe.model.arch import expert_specs, flat_spec

        m = self.cfg.model
        if m.kind == "flat":
            return {FLAT: flat_spec(tree, input_size, m.flat_width).to_dict()}
        specs = expert_specs(tree, input_size, flat_width=m.flat_width, min_width=m.min_width,
                             fixed_width=m.expert_width or None, root_width=m.root_width or None)
        return {n: s.to_dict() for n, s in specs.items()}

    def prepare(self) -> None:
        """Create or resume the run directory and load/initialise all weights."""
        from edgehmoe.model.arch import (
            build_model,
            count_params,
            estimate_train_memory_mb,
        )
        from edgehmoe.model.training import state_arrays

        state_path = self.out / "state.json"
        if state_path.exists() and not self.resume:
            raise RunDirError(f"{self.out} already holds a run; pass --resume to continue it, or choose another out")
        if self.resume and not state_path.exists():
            raise RunDirError(f"cannot resume: {state_path} does not exist (start the run without --resume)")
        self.val, mean, std = self._load_eval_data()
        self.tree = self.val.hierarchy
        input_size = self.val.image_size
        self.specs = self._specs(self.tree, input_size)
        self.memory_need = {n: estimate_train_memory_mb(s, self.cfg.train.batch_size) for n, s in self.specs.items()}
        self.params = {n: count_params(build_model(s)) for n, s in self.specs.items()}
        self.out.mkdir(parents=True, exist_ok=True)
        if self.resume:
            self._load_state(state_path)
            mean, std = self.mean, self.std
        else:
            import torch

            self.mean, self.std = [float(v) for v in mean], [float(v) for v in std]
            for n, s in self.specs.items():
                torch.manual_seed(self.cfg.run.seed + max(n, 0) + 1000 * (n == FLAT))
                self.weights[n] = state_arrays(build_model(s))
                self.files[n] = self._write_weights(n, -1, self.weights[n])
            (self.out / "config.toml").write_text(dump_config(self.cfg))
            self._commit_state()
        self.scheduler = Scheduler(self.tree, self.cfg.model.kind, self.cfg.schedule.mode,
                                   self.cfg.schedule.weighting, self.memory_need, self.credits)

    def _write_weights(self, node: int, rnd: int, arrays: dict[str, np.ndarray]) -> str:
        from safetensors.numpy import save

        name = "flat" if node == FLAT else str(node)
        rel = f"experts/{name}.r{rnd + 1}.safetensors"
        data = save(contiguous_arrays(arrays),
                    metadata={"node": name, "round": str(rnd)})
        atomic_write_bytes(self.out / rel, data)
        return rel

    def _load_state(self, path: Path) -> None:
        from safetensors.numpy import load_file

        st = json.loads(path.read_text())
        if st.get("state_version") != STATE_VERSION:
            raise RunDirError(f"{path}: state_version {st.get('state_version')} is not {STATE_VERSION}")
        if st.get("kind") != self.cfg.model.kind:
            raise RunDirError(f"{path} is a {st.get('kind')} run but the config says model.kind = {self.cfg.model.kind}")
        self.round = int(st["round"])
        self.mean, self.std = st["mean"], st["std"]
        self.files = {int(k): v for k, v in st["files"].items()}
        self.credits = {int(k): float(v) for k, v in st.get("credits", {}).items()}
        self.visits = {int(k): int(v) for k, v in st.get("visits", {}).items()}
        self.devices = {d["device_id"]: Device.from_json(d) for d in st.get("devices", [])}
        for d in self.devices.values():  # their status is unknown until they speak again
            d.online = False
            d.busy = False
        for n, rel in self.files.items():
            self.weights[n] = load_file(str(self.out / rel))
        # Drop what an interrupted round left behind: metric rows and weight files past the commit.
        self._truncate_metrics()
        keep = set(self.files.values())
        for f in (self.out / "experts").glob("*.safetensors"):
            if f"experts/{f.name}" not in keep:
                f.unlink()
        self.history = [json.loads(line) for line in self._metrics_lines()]
        logger.info("resuming %s at round %d (%d devices known)", self.out, self.round, len(self.devices))

    def _metrics_lines(self) -> list[str]:
        p = self.out / "metrics.jsonl"
        return [ln for ln in p.read_text().splitlines() if ln.strip()] if p.exists() else []

    def _truncate_metrics(self) -> None:
        lines = [ln for ln in self._metrics_lines() if json.loads(ln).get("round", -1) < self.round]
        atomic_write_bytes(self.out / "metrics.jsonl", "".join(ln + "\n" for ln in lines).encode())

    def _commit_state(self) -> None:
        state = {
            "state_version": STATE_VERSION,
            "run": self.cfg.run.name,
            "kind": self.cfg.model.kind,
            "round": self.round,
            "rounds": self.cfg.schedule.rounds,
            "mean": self.mean,
            "std": self.std,
            "files": {str(k): v for k, v in self.files.items()},
            "credits": {str(k): v for k, v in (self.scheduler.credits if self.scheduler else self.credits).items()},
            "visits": {str(k): v for k, v in self.visits.items()},
            "devices": [d.to_json() for d in sorted(self.devices.values(), key=lambda d: d.device_id)],
            "software_version": __version__,
            "updated_unix": time.time(),
        }
        atomic_write_json(self.out / "state.json", state)  # the commit point
        self._write_model_json()

    def _write_model_json(self) -> None:
        md = ModelDir(path=self.out, hierarchy=self.tree, input_size=int(self.val.image_size),
                      mean=self.mean, std=self.std, dataset=self.cfg.run.dataset,
                      extra={"run": self.cfg.run.name, "rounds_completed": self.round})
        for n, rel in self.files.items():
            entry = NetworkEntry(arch=self.specs[n], file=rel, name="flat" if n == FLAT else self.tree.names[n],
                                 params=self.params[n])
            if n == FLAT:
                md.flat = entry
            else:
                md.experts[n] = entry
        md.save_json()

    # ------------------------------------------------------------------ MQTT
    def connect(self) -> None:
        from edgehmoe.fl.mqtt import MqttConnection, Topics

        b = self.cfg.broker
        self.topics = Topics(self.cfg.run.name)
        self.conn = MqttConnection.from_url(
            b.url, client_id=b.client_id or f"edgehmoe-server-{self.cfg.run.name}",
            username=b.username or None, password=self.password, cafile=b.cafile or None,
            on_message=lambda t, p: self.inbox.put((t, p)), session_expiry_s=3600,
        )
        self.conn.connect(timeout=30)
        for f in self.topics.server_filters():
            self.conn.subscribe(f)
        logger.info("server connected to %s as run %r", b.url, self.cfg.run.name)

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None

    def _handle(self, topic: str, payload: bytes) -> None:
        try:
            dev_id, kind = self.topics.parse(topic)
        except ValueError as e:
            logger.warning("ignoring message on unexpected topic %s: %s", topic, e)
            return
        try:
            msg = wire.decode(payload)
        except wire.WireError as e:
            logger.warning("dropped bad %s payload from %s (%d bytes): %s", kind, dev_id, len(payload), e)
            if kind == "result":
                self._mark_invalid(dev_id)
            return
        sender = getattr(msg, "device_id", dev_id)
        if sender != dev_id:
            logger.warning("dropped %s on %s: it claims device %r", type(msg).__name__, topic, sender)
            return
        if kind == "hello" and isinstance(msg, wire.Hello):
            self._on_hello(msg)
        elif kind == "status" and isinstance(msg, wire.Status):
            self._on_status(msg)
        elif kind == "result" and isinstance(msg, wire.TrainResult):
            self._on_result(msg)
        else:
            logger.warning("dropped %s on %s topic of %s", type(msg).__name__, kind, dev_id)

    def _on_hello(self, h: wire.Hello) -> None:
        if len(h.class_counts) != self.tree.num_classes:
            logger.warning("device %s reports %d classes but the run has %d; ignored (wrong data shard?)",
                           h.device_id, len(h.class_counts), self.tree.num_classes)
            return
        known = h.device_id in self.devices
        self.devices[h.device_id] = Device(
            device_id=h.device_id, class_counts=np.asarray(h.class_counts, dtype=np.int64),
            memory_budget_mb=h.memory_budget_mb, ram_mb=h.ram_mb, cores=h.cores, platform=h.platform,
            software_version=h.software_version, online=True,
        )
        logger.info("device %s %s: %d samples, budget %.0f MB, %s", h.device_id, "re-announced" if known else "joined",
                    int(h.class_counts.sum()), h.memory_budget_mb, h.platform)

    def _on_status(self, s: wire.Status) -> None:
        d = self.devices.get(s.device_id)
        if d is None:
            return
        d.last_seen = time.time()
        if s.state == "offline":
            if d.online:
                logger.warning("device %s went offline", s.device_id)
            d.online = False
            for p in self.pending.values():
                if p.device_id == s.device_id and not p.answered:
                    p.answered, p.outcome = True, "offline"
        else:
            d.online = True
            d.busy = s.state == "busy"
        if s.state in ("refused", "error"):
            for p in self.pending.values():
                if p.device_id == s.device_id and not p.answered and s.round == self.round:
                    p.answered, p.outcome = True, s.state
                    logger.warning("device %s %s round %d: %s", s.device_id, s.state, s.round, s.detail)

    def _mark_invalid(self, dev_id: str) -> None:
        for p in self.pending.values():
            if p.device_id == dev_id and not p.answered:
                p.answered, p.outcome = True, "invalid"

    def _on_result(self, r: wire.TrainResult) -> None:
        p = self.pending.get(r.task_id)
        if p is None or r.run != self.cfg.run.name or r.round != self.round:
            logger.warning("dropped result from %s for task %s (round %d): not a task of this round (late or stale)",
                           r.device_id, r.task_id, r.round)
            return
        if p.answered:
            logger.info("duplicate result for task %s ignored", r.task_id)
            return
        if time.time() > self.deadline:
            p.answered, p.outcome = True, "late"
            logger.warning("dropped late result from %s for round %d", r.device_id, r.round)
            return
        try:
            if r.node != p.node or r.device_id != p.device_id:
                raise InvalidUpdate(f"result is for node {r.node} from {r.device_id}, task was node {p.node} for {p.device_id}")
            validate_update(r.weights, self.weights[p.node], r.num_examples)
        except InvalidUpdate as e:
            p.answered, p.outcome = True, "invalid"
            logger.warning("rejected update from %s for %s: %s", r.device_id, self._node_name(p.node), e)
            return
        p.answered, p.outcome, p.result = True, "ok", r

    def _pump(self, timeout: float) -> None:
        """Handle inbound messages for up to ``timeout`` seconds (returns early when idle)."""
        end = time.monotonic() + timeout
        while True:
            left = end - time.monotonic()
            if left <= 0:
                return
            try:
                topic, payload = self.inbox.get(timeout=min(left, 0.2))
            except queue.Empty:
                return
            self._handle(topic, payload)

    def _node_name(self, node: int) -> str:
        return "flat" if node == FLAT else f"{node}:{self.tree.names[node]}"

    # ------------------------------------------------------------------ rounds
    def _lr(self, rnd: int) -> float:
        t = self.cfg.train
        if t.lr_schedule == "constant":
            return t.lr
        frac = rnd / max(1, self.cfg.schedule.rounds - 1)
        lo = t.lr * t.lr_min_factor
        return lo + (t.lr - lo) * 0.5 * (1 + math.cos(math.pi * frac))

    def wait_for_devices(self) -> None:
        need = self.cfg.schedule.min_devices
        end = time.monotonic() + self.cfg.schedule.wait_for_devices_s
        while time.monotonic() < end and not self.stop.is_set():
            self._pump(0.5)
            if sum(d.online for d in self.devices.values()) >= need:
                return
        online = sum(d.online for d in self.devices.values())
        if online < need:
            raise RunError(
                f"only {online} of the {need} devices needed (schedule.min_devices) announced themselves within "
                f"{self.cfg.schedule.wait_for_devices_s:.0f} s; start more clients or lower min_devices"
            )

    def run_round(self) -> dict | None:
        rnd = self.round
        cfg = self.cfg
        views = [DeviceView(d.device_id, d.class_counts, d.memory_budget_mb) for d in self.devices.values() if d.online]
        plan = self.scheduler.plan(views, cfg.schedule.devices_per_round, np.random.default_rng(cfg.run.seed + rnd))
        if not plan:
            logger.warning("round %d: no online device holds data for any expert; waiting", rnd)
            return None
        lr = self._lr(rnd)
        self.deadline = time.time() + cfg.schedule.round_timeout_s
        self.pending = {}
        t_pub = time.time()
        for dev_id, node in sorted(plan.items()):
            task_id = f"r{rnd}-{uuid.uuid4().hex[:12]}"
            spec = self.specs[node]
            label_map = (np.arange(self.tree.num_classes, dtype=np.int64) if node == FLAT
                         else self.tree.label_map(node))
            task = wire.TrainTask(
                run=cfg.run.name, round=rnd, task_id=task_id, node=node, arch=dict(spec),
                label_map=label_map, weights=self.weights[node],
                epochs=cfg.train.expert_epochs if node > 0 and cfg.train.expert_epochs else cfg.train.epochs,
                batch_size=cfg.train.batch_size, lr=lr, momentum=cfg.train.momentum,
                weight_decay=cfg.train.weight_decay, deadline_unix=self.deadline,
                seed=(cfg.run.seed * 100003 + rnd * 131 + zlib.crc32(dev_id.encode())) % (2**31),
                preprocess={"mean": self.mean, "std": self.std},
            )
            self.pending[task_id] = Pending(task_id, dev_id, node)
            try:
                self.conn.publish(self.topics.task(dev_id), wire.encode(task), qos=1,
                                  expiry_s=cfg.schedule.round_timeout_s)
            except (TimeoutError, MqttError) as e:
                # Not acknowledged (broker away): paho keeps it queued and resends it after the
                # reconnect; the device's answer is awaited until the deadline as usual.
                logger.warning("round %d: task for %s not acknowledged yet (%s)", rnd, dev_id, e)
        logger.info("round %d/%d: %s on %d device(s), lr %.4f", rnd + 1, cfg.schedule.rounds,
                    ", ".join(sorted({self._node_name(n) for n in plan.values()})), len(plan), lr)
        while not self.stop.is_set():
            self._pump(0.5)
            if all(p.answered for p in self.pending.values()):
                break
            if time.time() > self.deadline:
                for p in self.pending.values():
                    if not p.answered:
                        p.outcome = "timeout"
                        logger.warning("round %d: %s did not answer before the deadline", rnd, p.device_id)
                break
        if self.stop.is_set() and not all(p.answered for p in self.pending.values()):
            return None
        return self._aggregate_and_commit(rnd, plan, lr, time.time() - t_pub)

    def _aggregate_and_commit(self, rnd: int, plan: dict[str, int], lr: float, wall_s: float) -> dict | None:
        ok = [p for p in self.pending.values() if p.outcome == "ok"]
        by_node: dict[int, list] = {}
        for p in ok:
            by_node.setdefault(p.node, []).append((p.result.weights, p.result.num_examples))
        t0 = time.perf_counter()
        new = {n: fedavg(ups) for n, ups in by_node.items()}
        agg_ms = (time.perf_counter() - t0) * 1000
        row = {
            "round": rnd,
            "kind": self.cfg.model.kind,
            "nodes": sorted({int(n) for n in plan.values()}),
            "experts": sorted({self._node_name(n) for n in plan.values()}),
            "updated": sorted(int(n) for n in new),
            "devices_asked": len(plan),
            "devices_answered": len(ok),
            "outcomes": {p.device_id: p.outcome for p in self.pending.values()},
            "per_device": [
                {"device": p.device_id, "node": p.node, "num_examples": p.result.num_examples,
                 "round_time_ms": p.result.round_time_ms, "round_mem_mb": p.result.round_mem_mb,
                 "peak_rss_mb": p.result.peak_rss_mb, "loss": p.result.loss}
                for p in sorted(ok, key=lambda p: p.device_id)
            ],
            "aggregation_ms": agg_ms,
            "round_wall_s": wall_s,
            "lr": lr,
            "time_unix": time.time(),
        }
        if not new:
            logger.warning("round %d: no valid update (outcomes %s); round repeated", rnd, row["outcomes"])
            return None
        old_files = {n: self.files[n] for n in new}
        for n, arrays in new.items():
            self.files[n] = self._write_weights(n, rnd, arrays)
            self.weights[n] = arrays
            self.visits[n] = self.visits.get(n, 0) + 1
        self.round = rnd + 1
        every = self.cfg.eval.every
        if (every and self.round % every == 0) or self.round == self.cfg.schedule.rounds:
            row.update({f"val_{k}": v for k, v in self.evaluate().items() if k in ("info_f1", "top1")})
        with open(self.out / "metrics.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self._commit_state()
        for n, rel in old_files.items():
            if rel != self.files[n]:
                (self.out / rel).unlink(missing_ok=True)
        self.history.append(row)
        logger.info("round %d done: %d/%d answered, agg %.1f ms%s", rnd + 1, len(ok), len(plan), agg_ms,
                    f", val info-F1 {row['val_info_f1']:.4f}" if "val_info_f1" in row else "")
        return row

    def evaluate(self, x=None, y=None) -> dict:
        """Metrics of the in-memory weights (``self.weights``) on the validation split (or given data).

        The networks are built from the arrays in memory, not read back from ``model.json``:
        during a commit ``model.json`` still names the previous round's files until
        ``state.json`` has been replaced, so reading it would score the previous weights.
        """
        from edgehmoe.model.arch import build_model
        from edgehmoe.model.inference import FlatModel, HierarchicalModel, evaluate_models
        from edgehmoe.model.training import load_state_arrays

        x = self.val.x if x is None else x
        y = self.val.y if y is None else y
        nets = {}
        for n, arrays in self.weights.items():
            m = load_state_arrays(build_model(self.specs[n]), arrays)
            m.eval()
            nets[n] = m
        hm = fm = None
        if self.cfg.model.kind == "flat":
            fm = FlatModel(self.tree, nets[FLAT], self.mean, self.std)
        else:
            hm = HierarchicalModel(self.tree, nets, self.mean, self.std)
        return evaluate_models(hm, fm, x, y, which=self.cfg.model.kind)

    def run(self) -> list[dict]:
        """Prepare, connect, run the remaining rounds; returns the metric rows of all rounds."""
        self.prepare()
        self.connect()
        try:
            self.wait_for_devices()
            failures = 0
            while self.round < self.cfg.schedule.rounds and not self.stop.is_set():
                row = self.run_round()
                if row is None:
                    failures += 1
                    if failures > self.cfg.schedule.retries + 2:
                        raise RunError(f"round {self.round} failed {failures} times; see the log above")
                    self._pump(1.0)
                    continue
                failures = 0
                if self.progress is not None:
                    self.progress(self.round, self.cfg.schedule.rounds, row)
        finally:
            self.close()
        return self.history
