"""``edgehmoe-client``: the device agent that trains one expert per federated round.

::

    edgehmoe-client --broker mqtt://HOST:1883 --device-id pi-07 --data shard.npz \\
        [--memory-budget-mb 600] [--username pi-07 --password-file pw.txt] [--cafile ca.crt] [--run NAME]

Every option can also come from the environment (``EDGEHMOE_BROKER``, ``EDGEHMOE_DEVICE_ID``,
``EDGEHMOE_DATA``, ``EDGEHMOE_MEMORY_BUDGET_MB``, ``EDGEHMOE_USERNAME``,
``EDGEHMOE_PASSWORD_FILE``, ``EDGEHMOE_CAFILE``, ``EDGEHMOE_RUN``, ``EDGEHMOE_THREADS``,
``EDGEHMOE_STATE_DIR``), which is how the systemd unit configures it.

The client announces itself (retained ``hello`` with RAM, memory budget, cores, versions and
per-class sample counts; retained ``status``; last will ``offline``), then waits for
:class:`~edgehmoe.fl.wire.TrainTask` messages. For each task it checks the deadline and its
memory budget (refusing with a ``refused`` status rather than being killed), trains the
named expert on its samples under that node with :func:`edgehmoe.measure.rounds.measured_local_round`
(the same code the profiler measures), and publishes a :class:`~edgehmoe.fl.wire.TrainResult`
with ``round_time_ms``, ``round_mem_mb`` and ``peak_rss_mb``. The MQTT session is persistent
and reconnects by itself, so broker restarts and network drops lose no task; the last result
is kept on disk so a task delivered twice (QoS 1, or after a client restart) is answered
again without retraining.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from pathlib import Path

import numpy as np

from edgehmoe import __version__
from edgehmoe.fl import wire

__all__ = ["DeviceClient"]

logger = logging.getLogger(__name__)


class DeviceClient:
    def __init__(
        self,
        broker: str,
        device_id: str,
        data: str | Path,
        run: str = "edgehmoe",
        memory_budget_mb: float = 0.0,
        username: str | None = None,
        password: str | None = None,
        cafile: str | None = None,
        threads: int = 0,
        state_dir: str | Path | None = None,
        max_tasks: int = 0,
        session_expiry_s: int = 86400,
        certfile: str | None = None,
        keyfile: str | None = None,
        insecure: bool = False,
    ):
        from edgehmoe.data.partition import load_shard

        self.device_id = wire.check_id(device_id, "device id")
        self.run = wire.check_id(run, "run name")
        self.broker = broker
        self.shard = load_shard(data)
        self.memory_budget_mb = float(memory_budget_mb)
        self.username = username
        self.password = password
        self.cafile = cafile
        self.certfile, self.keyfile, self.insecure = certfile, keyfile, insecure  # TLS client certificate
        self.threads = threads
        self.max_tasks = max_tasks
        self.session_expiry_s = session_expiry_s
        self.state_dir = Path(state_dir) if state_dir else None
        self.stop = threading.Event()
        self.tasks_done = 0
        self._last: tuple[str, bytes] | None = self._load_last()
        self.conn = None

    # ---------------------------------------------------------------- persistence
    def _load_last(self) -> tuple[str, bytes] | None:
        if self.state_dir is None:
            return None
        meta, blob = self.state_dir / "last_result.json", self.state_dir / "last_result.bin"
        try:
            task_id = json.loads(meta.read_text())["task_id"]
            return task_id, blob.read_bytes()
        except (OSError, ValueError, KeyError):
            return None

    def _save_last(self, task_id: str, payload: bytes) -> None:
        self._last = (task_id, payload)
        if self.state_dir is None:
            return
        from edgehmoe.core.checkpoint import atomic_write_bytes, atomic_write_json

        atomic_write_bytes(self.state_dir / "last_result.bin", payload)
        atomic_write_json(self.state_dir / "last_result.json", {"task_id": task_id, "time_unix": time.time()})

    # ---------------------------------------------------------------- MQTT
    def _hello(self) -> bytes:
        from edgehmoe.measure.meter import device_facts

        f = device_facts()
        return wire.encode(wire.Hello(
            device_id=self.device_id, software_version=__version__, protocol_version=wire.PROTOCOL_VERSION,
            ram_mb=float(f["ram_mb"]), memory_budget_mb=self.memory_budget_mb, cores=int(f["cores"]),
            platform=f["platform"], class_counts=self.shard.class_counts().astype(np.int64),
        ))

    def _status(self, state: str, rnd: int = -1, detail: str = "", wait: bool = True) -> None:
        payload = wire.encode(wire.Status(self.device_id, state, rnd, detail))
        try:
            self.conn.publish(self.topics.status(self.device_id), payload, qos=1, retain=True, wait=wait, timeout=30)
        except (TimeoutError, ConnectionError) as e:  # queued; sent after the reconnect
            logger.info("status %s not acknowledged yet: %s", state, e)

    def connect(self) -> None:
        from edgehmoe.fl.mqtt import MqttConnection, Topics, Will

        self.topics = Topics(self.run)
        will = Will(self.topics.status(self.device_id),
                    wire.encode(wire.Status(self.device_id, "offline", -1, "connection lost")), qos=1, retain=True)
        self.conn = MqttConnection.from_url(
            self.broker, client_id=self.username or self.device_id, username=self.username, password=self.password,
            cafile=self.cafile, certfile=self.certfile, keyfile=self.keyfile, insecure=self.insecure,
            will=will, session_expiry_s=self.session_expiry_s,
        )

        def announce() -> None:  # after every (re)connect, in the network thread: never block
            self.conn.publish(self.topics.hello(self.device_id), self._hello(), qos=1, retain=True, wait=False)
            self.conn.publish(self.topics.status(self.device_id),
                              wire.encode(wire.Status(self.device_id, "idle", -1, "")), qos=1, retain=True, wait=False)

        self.conn.add_connect_callback(announce)
        self.conn.connect(timeout=30)
        self.conn.subscribe(self.topics.task(self.device_id))
        logger.info("device %s connected to %s (run %s, %d samples, budget %s)", self.device_id, self.broker,
                    self.run, len(self.shard.label), f"{self.memory_budget_mb:.0f} MB" if self.memory_budget_mb else "none")

    # ---------------------------------------------------------------- tasks
    def handle(self, payload: bytes) -> None:
        try:
            task = wire.decode(payload, expect=wire.TrainTask)
        except wire.WireError as e:
            logger.warning("dropped bad task payload (%d bytes): %s", len(payload), e)
            self._status("error", -1, f"bad task payload: {e}")
            return
        if task.run != self.run:
            logger.warning("dropped task for run %s (this client serves %s)", task.run, self.run)
            return
        if self._last is not None and self._last[0] == task.task_id:
            logger.info("task %s delivered again; re-sending the stored result", task.task_id)
            self.conn.publish(self.topics.result(self.device_id), self._last[1], qos=1, timeout=300)
            return
        if time.time() > task.deadline_unix:
            logger.warning("task %s (round %d) arrived after its deadline; skipped", task.task_id, task.round)
            self._status("idle", task.round, "task past its deadline")
            return
        from edgehmoe.model.arch import ArchSpec, estimate_train_memory_mb

        try:
            spec = ArchSpec.from_dict(task.arch)
            if len(task.label_map) != len(self.shard.class_counts()):
                raise ValueError(f"the task has {len(task.label_map)} classes, this shard {len(self.shard.class_counts())}")
        except (ValueError, TypeError) as e:
            self._status("error", task.round, f"unusable task: {e}")
            return
        need = estimate_train_memory_mb(spec, task.batch_size)
        if self.memory_budget_mb > 0 and need > self.memory_budget_mb:
            msg = f"task needs ~{need:.0f} MB, memory budget is {self.memory_budget_mb:.0f} MB"
            logger.warning("refusing task %s: %s", task.task_id, msg)
            self._status("refused", task.round, msg)
            return
        self._status("busy", task.round, f"training node {task.node}", wait=False)
        try:
            result = self.train(task, spec)
        except (ValueError, FloatingPointError, RuntimeError, MemoryError) as e:
            logger.error("task %s failed: %s", task.task_id, e)
            self._status("error", task.round, str(e)[:500])
            return
        payload_out = wire.encode(result)
        self._save_last(task.task_id, payload_out)
        try:
            self.conn.publish(self.topics.result(self.device_id), payload_out, qos=1, timeout=300)
        except TimeoutError:
            logger.warning("result of %s not acknowledged yet; paho resends it after reconnect", task.task_id)
        self._status("idle", task.round, "", wait=False)
        self.tasks_done += 1
        logger.info("round %d node %d: %d samples, %.0f ms, +%.1f MB, loss %.3f", task.round, task.node,
                    result.num_examples, result.round_time_ms, result.round_mem_mb, result.loss)

    def train(self, task: wire.TrainTask, spec) -> wire.TrainResult:
        from edgehmoe.measure.rounds import measured_local_round
        from edgehmoe.model.training import TrainConfig

        cfg = TrainConfig(epochs=task.epochs, batch_size=task.batch_size, lr=task.lr, momentum=task.momentum,
                          weight_decay=task.weight_decay, seed=task.seed, schedule="constant")
        pre = task.preprocess or {}
        mean = np.asarray(pre.get("mean", [0.5] * spec.in_channels), dtype=np.float32)
        std = np.asarray(pre.get("std", [0.25] * spec.in_channels), dtype=np.float32)
        out, m = measured_local_round(spec, task.weights, task.label_map, self.shard.x, self.shard.label, cfg, mean, std)
        return wire.TrainResult(
            run=task.run, round=task.round, task_id=task.task_id, device_id=self.device_id, node=task.node,
            weights=out.weights, num_examples=out.num_examples, round_time_ms=m.round_time_ms,
            round_mem_mb=m.round_mem_mb, peak_rss_mb=m.peak_rss_mb, loss=float(out.loss),
        )

    def serve(self) -> int:
        """Connect and process tasks until stopped (SIGTERM/SIGINT) or ``max_tasks`` are done."""
        import torch

        from edgehmoe.model.training import warm_up

        if self.threads > 0:
            torch.set_num_threads(self.threads)
        warm_up()  # torch's one-time start-up cost is not part of any round
        import gc

        gc.collect()
        gc.freeze()  # long-lived start-up objects: keeps the per-round gc.collect() cheap
        self.connect()
        try:
            while not self.stop.is_set():
                try:
                    topic, payload = self.conn.receive(timeout=0.5)
                except TimeoutError:
                    continue
                self.handle(payload)
                if self.max_tasks and self.tasks_done >= self.max_tasks:
                    break
        finally:
            self._status("offline", -1, wire.STOPPED_DETAIL)
            self.conn.close()
        return 0
