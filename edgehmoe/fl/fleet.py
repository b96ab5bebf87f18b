"""Device-fleet emulator: many virtual devices in one process, each a real MQTT client.

It measures **orchestration, not learning**. Every virtual device has its own
:class:`~edgehmoe.fl.mqtt.MqttConnection` (own broker account, persistent session, last will),
announces itself with a retained :class:`~edgehmoe.fl.wire.Hello` whose class counts come from a
real or synthetic partition, and answers each :class:`~edgehmoe.fl.wire.TrainTask` over the real
wire protocol, so the server runs its real decode, validation, aggregation and commit. Only the
training is replaced: after a configurable delay the device sends :func:`derive_update` of the
weights it received (a small perturbation, relative norm ``rel``, in the task's dtypes) with
``num_examples`` = its samples under the task's node. No torch is imported: 1,000 devices take
430 MB (CIFAR-size experts) to 870 MB (a 100k-parameter model) in 4 processes, where one real
client takes ~1 GB.

Per device and task the same messages as ``edgehmoe-client`` go out: ``busy`` status, result,
``idle`` status. A task delivered twice (QoS 1, reconnect) is answered again with the same result.

Faults (:class:`FaultPlan`): a fraction ``churn`` of the devices misbehave, each of their tasks
independently with the given probabilities:

``late``     answer ``late_s`` after the task's deadline (the server must drop it);
``drop``     cut the link mid-round without a DISCONNECT (the broker publishes the will), then
             reconnect by itself about a second later; the task is never answered;
``leave``    stop cleanly mid-round like a stopped ``edgehmoe-client`` (``offline`` with
             :data:`~edgehmoe.fl.wire.STOPPED_DETAIL`, so the server ends the task at once),
             disconnect, come back ``away_s`` later;
``garbage``  send bytes that are no wire message as the result;
``dup``      send the (valid) result twice (the server must count it once).

The decisions are a pure function of ``(seed, device index, task id)``, and every action is
written to an events file (JSON lines) when one is given, so a test can check the server's
rows against what the devices did (``tests/test_soak.py``).

Threads: one paho network thread per device (inside ``MqttConnection``); inbound tasks are
queued to a few worker threads that decode, derive and encode; a timer thread publishes each
answer when its emulated training is over.
"""

from __future__ import annotations

import heapq
import itertools
import json
import logging
import math
import os
import queue
import threading
import time
import zlib
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edgehmoe import __version__
from edgehmoe.errors import EdgeHmoeError, UsageError
from edgehmoe.fl import wire

__all__ = [
    "FAULT_KINDS",
    "DeviceSpec",
    "FaultPlan",
    "Fleet",
    "FleetError",
    "class_counts_for",
    "derive_update",
    "device_ids",
    "parse_faults",
    "raise_fd_limit",
]

logger = logging.getLogger(__name__)

#: What a churning device may do with a task instead of answering it normally.
FAULT_KINDS = ("late", "drop", "leave", "garbage", "dup")
#: Default fault mix of a churning device (per task; the rest are answered normally).
DEFAULT_FAULTS = {"late": 0.1, "drop": 0.1, "leave": 0.1, "garbage": 0.05, "dup": 0.05}
#: Platform string of a virtual device's hello.
PLATFORM = "edgehmoe-fleet virtual device"
#: Per-message MQTT framing counted on top of topic and payload (fixed header, lengths, id, properties).
MQTT_FRAMING_BYTES = 10


class FleetError(EdgeHmoeError, RuntimeError):
    """The fleet could not start (broker unreachable, credentials refused, ...)."""

    exit_code = 1


def raise_fd_limit(need: int) -> int:
    """Raise this process's soft open-file limit towards ``need`` (at most the hard limit); the new soft limit.

    Each virtual device holds a socket and paho's wake-up socket pair (3 descriptors), and a
    broker started from this process inherits the limit, so 1,000 devices need more than the
    common default of 1,024.
    """
    try:
        import resource
    except ImportError:  # pragma: no cover - not Unix
        return need
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = need if hard == resource.RLIM_INFINITY else min(need, hard)
    if soft != resource.RLIM_INFINITY and soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
        soft = want
    if soft != resource.RLIM_INFINITY and soft < need:
        logger.warning("open-file limit is %d (hard limit %d) but %d are needed; raise it with ulimit -n",
                       soft, hard, need)
    return soft


def device_ids(n: int, prefix: str = "dev-") -> list[str]:
    """``dev-0000``, ``dev-0001``, ... (zero-padded to at least 4 digits, so they sort by index)."""
    width = max(4, len(str(max(0, n - 1))))
    ids = [f"{prefix}{i:0{width}d}" for i in range(n)]
    if ids:
        wire.check_id(ids[0], "device id")
    return ids


def parse_faults(spec: str) -> dict[str, float]:
    """``"late=0.1,drop=0.05"`` -> ``{"late": 0.1, "drop": 0.05}``; ``"default"`` -> :data:`DEFAULT_FAULTS`."""
    spec = (spec or "").strip()
    if spec in ("", "none"):
        return {}
    if spec == "default":
        return dict(DEFAULT_FAULTS)
    out: dict[str, float] = {}
    for item in filter(None, (s.strip() for s in spec.split(","))):
        name, eq, value = item.partition("=")
        name = name.strip()
        if not eq or name not in FAULT_KINDS:
            raise UsageError(f"fault {item!r}: use KIND=PROBABILITY with KIND one of {', '.join(FAULT_KINDS)} "
                             "(e.g. late=0.1,drop=0.05), or 'default'")
        try:
            p = float(value)
        except ValueError:
            raise UsageError(f"fault {item!r}: {value!r} is not a number") from None
        if not 0.0 <= p <= 1.0:
            raise UsageError(f"fault {item!r}: the probability must be in [0, 1]")
        out[name] = p
    if sum(out.values()) > 1.0 + 1e-9:
        raise UsageError(f"fault probabilities add up to {sum(out.values()):.3f} > 1: {spec}")
    return out


@dataclass(frozen=True)
class FaultPlan:
    """Which devices misbehave, and how, task by task (a pure function of the seed).

    ``churn`` of the ``num_devices`` devices (rounded, chosen by ``seed``) are churners; each of
    their tasks draws one of ``rates`` (probability per kind) or a normal answer.
    """

    num_devices: int = 0
    churn: float = 0.0  # fraction of devices that misbehave at all
    rates: Mapping[str, float] = field(default_factory=dict)  # per task of a churner
    seed: int = 0
    late_s: float = 1.0  # a late answer leaves this long after the task's deadline
    away_s: float = 2.0  # a device that left cleanly comes back after this long

    def __post_init__(self) -> None:
        if not 0.0 <= self.churn <= 1.0:
            raise UsageError(f"churn must be a fraction in [0, 1], got {self.churn}")
        unknown = set(self.rates) - set(FAULT_KINDS)
        if unknown:
            raise UsageError(f"unknown fault kinds {sorted(unknown)}; valid: {', '.join(FAULT_KINDS)}")

    @property
    def churners(self) -> frozenset[int]:
        """Indices of the misbehaving devices."""
        k = int(round(self.churn * self.num_devices))
        if k == 0 or not self.rates:
            return frozenset()
        rng = np.random.default_rng([self.seed, 0xC4])
        return frozenset(int(i) for i in rng.choice(self.num_devices, size=k, replace=False))

    def action(self, index: int, task_id: str) -> str:
        """``ok`` or one of :data:`FAULT_KINDS` for device ``index`` and this task."""
        if index not in self._churners:
            return "ok"
        u = np.random.default_rng([self.seed, index, zlib.crc32(task_id.encode())]).random()
        acc = 0.0
        for kind in FAULT_KINDS:
            acc += float(self.rates.get(kind, 0.0))
            if u < acc:
                return kind
        return "ok"

    @property
    def _churners(self) -> frozenset[int]:
        cached = self.__dict__.get("_churner_cache")
        if cached is None:
            cached = self.churners
            object.__setattr__(self, "_churner_cache", cached)
        return cached


def class_counts_for(num_devices: int, *, dataset: str = "", partition: str = "iid", classes: int = 100,
                     samples: int = 500, val_fraction: float = 0.1, seed: int = 0) -> np.ndarray:
    """Per-device class counts ``(num_devices, num_classes)`` int64 of a partition.

    With ``dataset`` (a spec such as ``cifar100:PATH`` or ``synthetic:coarse=20,fine=5``) the
    labels of its train split (minus the held-out ``val_fraction``, as the server holds it out)
    are partitioned with ``partition`` (``iid`` | ``dirichlet:ALPHA``); only labels are read, no
    image. Without, ``samples`` per device over ``classes`` classes (balanced labels) are.
    """
    from edgehmoe.data.partition import make_partitioner

    if num_devices < 1:
        raise UsageError(f"the fleet needs at least one device, got {num_devices}")
    if dataset:
        from edgehmoe.data import open_source, train_val_split

        source = open_source(dataset)
        labels = source.train.y
        if val_fraction > 0:
            labels = labels[train_val_split(labels, val_fraction, seed)[0]]
        num_classes = len(source.class_names)
    else:
        if classes < 1 or samples < 1:
            raise UsageError(f"classes and samples per device must be >= 1, got {classes} and {samples}")
        labels = np.arange(num_devices * samples, dtype=np.int64) % classes
        num_classes = classes
    parts = make_partitioner(partition, num_devices, seed=seed).partition(labels)
    return np.stack([np.bincount(labels[p], minlength=num_classes) for p in parts]).astype(np.int64)


_NOISE_SIZE = 1 << 20
_noise_cache: dict[int, np.ndarray] = {}


def _noise(seed: int) -> np.ndarray:
    buf = _noise_cache.get(seed)
    if buf is None:
        buf = np.random.default_rng([seed, 0x5EED]).standard_normal(_NOISE_SIZE, dtype=np.float32)
        _noise_cache[seed] = buf
    return buf


def derive_update(weights: Mapping[str, np.ndarray], key: int, rel: float = 1e-3, seed: int = 0
                  ) -> dict[str, np.ndarray]:
    """What a virtual device sends back: ``weights`` plus a small perturbation.

    Each float tensor ``w`` becomes ``w + rel * rms(w) * z`` with ``z`` standard normal noise
    (a window of a fixed noise buffer chosen by ``key``), so ``||update - w|| ≈ rel * ||w||`` per
    tensor and overall, in ``w``'s dtype; integer tensors (counters) come back unchanged. Cheap:
    one multiply-add per parameter, no random numbers drawn per call.
    """
    noise = _noise(seed)
    out: dict[str, np.ndarray] = {}
    offset = key % _NOISE_SIZE
    for name, w in weights.items():
        w = np.asarray(w)
        if w.dtype.kind != "f" or w.size == 0:
            out[name] = w.copy()
            continue
        flat = w.reshape(-1)
        # not np.dot: a BLAS call may wake its thread pool, which spins on a busy machine
        rms = math.sqrt(float(np.square(flat, dtype=np.float64).sum()) / flat.size)
        idx = (offset + np.arange(flat.size)) % _NOISE_SIZE if offset + flat.size > _NOISE_SIZE else None
        z = noise[idx] if idx is not None else noise[offset:offset + flat.size]
        out[name] = (flat + np.float32(rel * rms) * z).astype(w.dtype, copy=False).reshape(w.shape)
        offset = (offset + flat.size * 7 + 1) % _NOISE_SIZE
    return out


@dataclass
class DeviceSpec:
    """One virtual device: its index in the whole fleet, id (= broker user name), password, data."""

    index: int
    device_id: str
    password: str | None
    class_counts: np.ndarray  # int64 (num_classes,)


class _Timer:
    """Runs callables at monotonic times, in one thread (answers leave when their training is over)."""

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, Callable[[], None]]] = []
        self._seq = itertools.count()
        self._cond = threading.Condition()
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="fleet-timer", daemon=True)
        self._thread.start()

    def at(self, when: float, fn: Callable[[], None]) -> None:
        with self._cond:
            heapq.heappush(self._heap, (when, next(self._seq), fn))
            self._cond.notify()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._stop and (not self._heap or self._heap[0][0] > time.monotonic()):
                    self._cond.wait(None if not self._heap else max(0.0, self._heap[0][0] - time.monotonic()))
                if self._stop:
                    return
                _, _, fn = heapq.heappop(self._heap)
            try:
                fn()
            except Exception:  # noqa: BLE001 - one device's failure must not stop the others
                logger.exception("fleet timer job failed")

    def close(self) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify()
        self._thread.join(timeout=5)


@dataclass
class _Acted:
    action: str
    n: int
    round_time_ms: float
    answered: bool = False


class _Device:
    """State of one virtual device inside a :class:`Fleet`."""

    def __init__(self, spec: DeviceSpec) -> None:
        self.spec = spec
        self.id = spec.device_id
        self.conn = None
        self.acted: dict[str, _Acted] = {}  # task id -> what was done (last few tasks only)
        self.lock = threading.Lock()


class Fleet:
    """N virtual devices (see the module docstring) against one broker and run.

    Args:
        broker: broker URL (``mqtt://HOST:PORT`` or ``mqtts://``).
        run: run name (topic level).
        devices: the devices this process emulates.
        train_ms: emulated training time per task; ``jitter_ms`` adds uniform noise in [0, jitter).
        faults: who misbehaves and how (:class:`FaultPlan`).
        rel: relative norm of the derived updates.
        workers: threads that decode tasks and encode answers.
        events: JSON-lines file of every action (appended; shared by processes of one fleet).
        cafile, insecure: as for ``edgehmoe-client``.
        session_expiry_s: the devices' persistent sessions (tasks wait for a reconnecting device).
        seed: noise and jitter seed.
    """

    def __init__(self, broker: str, run: str, devices: Sequence[DeviceSpec], *, train_ms: float = 100.0,
                 jitter_ms: float = 0.0, faults: FaultPlan | None = None, rel: float = 1e-3, workers: int = 2,
                 events: str | Path | None = None, cafile: str | None = None, insecure: bool = False,
                 session_expiry_s: int = 3600, seed: int = 0, keepalive: int = 60):
        self.broker = broker
        self.run = wire.check_id(run, "run name")
        self.devices = [_Device(s) for s in devices]
        if train_ms < 0 or jitter_ms < 0:
            raise UsageError("train_ms and jitter_ms must be >= 0")
        self.train_ms, self.jitter_ms = float(train_ms), float(jitter_ms)
        self.faults = faults or FaultPlan(num_devices=len(devices))
        self.rel = float(rel)
        self.cafile, self.insecure = cafile, insecure
        self.session_expiry_s = int(session_expiry_s)
        self.keepalive = int(keepalive)
        self.seed = int(seed)
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._workers = [threading.Thread(target=self._work, name=f"fleet-worker-{i}", daemon=True)
                         for i in range(max(1, workers))]
        self._timer: _Timer | None = None
        self._events = open(events, "a", buffering=1) if events else None
        self._events_lock = threading.Lock()
        self._stats_lock = threading.Lock()
        self.stats: dict[str, float] = {"bytes_in": 0, "bytes_out": 0, "messages_in": 0, "messages_out": 0,
                                        "tasks": 0, **{f"action_{a}": 0 for a in ("ok", *FAULT_KINDS)},
                                        "redelivered": 0, "expired": 0, "bad_tasks": 0}
        self._topics = None
        self._started = False

    # ------------------------------------------------------------------ life cycle
    def start(self, timeout: float = 60.0, parallel: int = 16) -> None:
        """Connect every device (``parallel`` at a time) and announce it; raises :class:`FleetError`."""
        from edgehmoe.fl.mqtt import Topics

        self._topics = Topics(self.run)
        raise_fd_limit(3 * len(self.devices) + 256)
        self._timer = _Timer()
        for w in self._workers:
            w.start()
        self._started = True
        t0 = time.monotonic()
        with ThreadPoolExecutor(max_workers=max(1, parallel), thread_name_prefix="fleet-connect") as pool:
            errors = [e for e in pool.map(self._connect_device, self.devices) if e]
        if errors:
            self.close()
            raise FleetError(f"{len(errors)} of {len(self.devices)} virtual devices could not connect; first: "
                             f"{errors[0]}")
        logger.info("fleet: %d devices connected to %s in %.1f s", len(self.devices), self.broker,
                    time.monotonic() - t0)

    def _connect_device(self, dev: _Device) -> str:
        """Connect ``dev`` with a new connection; an error text, or ``""``."""
        from edgehmoe.fl.mqtt import MqttConnection, Will

        t = self._topics
        will = Will(t.status(dev.id), wire.encode(wire.Status(dev.id, "offline", -1, "connection lost")))
        hello = wire.encode(wire.Hello(dev.id, __version__, wire.PROTOCOL_VERSION, 0.0, 0.0, 1, PLATFORM,
                                       dev.spec.class_counts.astype(np.int64)))
        idle = wire.encode(wire.Status(dev.id, "idle", -1, ""))
        user = dev.id if dev.spec.password is not None else None
        conn = MqttConnection.from_url(
            self.broker, client_id=dev.id, username=user, password=dev.spec.password, cafile=self.cafile,
            insecure=self.insecure, will=will, session_expiry_s=self.session_expiry_s, keepalive=self.keepalive,
            on_message=lambda topic, payload, dev=dev: self._inbox.put((dev, topic, payload, time.time(),
                                                                        time.monotonic())),
        )
        dev.conn = conn

        def announce() -> None:  # network thread, after every (re)connect: never block
            self._event(device=dev.id, action="connected")
            self._send(dev, t.hello(dev.id), hello, retain=True)
            self._send(dev, t.status(dev.id), idle, retain=True)

        conn.add_connect_callback(announce)
        conn.subscribe(t.task(dev.id))  # renewed by the connection on every (re)connect
        try:
            conn.connect(timeout=60)
        except (ConnectionError, EdgeHmoeError) as e:
            return f"{dev.id}: {e}"
        return ""

    def close(self) -> None:
        """Disconnect every device cleanly (an ``offline`` status first, like ``edgehmoe-client``)."""
        for dev in self.devices:
            if dev.conn is not None and dev.conn.connected:
                self._status(dev, "offline", -1, wire.STOPPED_DETAIL)
        for dev in self.devices:
            if dev.conn is not None:
                try:
                    dev.conn.close()
                except Exception:  # noqa: BLE001 - best effort while closing
                    logger.debug("closing %s failed", dev.id, exc_info=True)
        if self._timer is not None:
            self._timer.close()
            self._timer = None
        for _ in self._workers:
            self._inbox.put(None)
        if self._events is not None:
            self._events.close()
            self._events = None

    def __enter__(self) -> Fleet:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ sending
    def _send(self, dev: _Device, topic: str, payload: bytes, retain: bool = False) -> None:
        try:
            dev.conn.publish(topic, payload, qos=1, retain=retain, wait=False)
        except (ConnectionError, EdgeHmoeError) as e:  # queued by paho, or refused: note and go on
            logger.info("%s: publish to %s not sent now: %s", dev.id, topic, e)
        self._count(bytes_out=len(payload) + len(topic) + MQTT_FRAMING_BYTES, messages_out=1)

    def _count(self, **inc: int) -> None:
        with self._stats_lock:
            for k, v in inc.items():
                self.stats[k] += v

    def _status(self, dev: _Device, state: str, rnd: int, detail: str) -> None:
        self._send(dev, self._topics.status(dev.id), wire.encode(wire.Status(dev.id, state, rnd, detail)),
                   retain=True)

    def _event(self, **fields) -> None:
        if self._events is None:
            return
        line = json.dumps({"t": time.time(), **fields}, separators=(",", ":")) + "\n"
        with self._events_lock:
            if self._events is not None:
                self._events.write(line)

    # ------------------------------------------------------------------ tasks
    def _work(self) -> None:
        while True:
            item = self._inbox.get()
            if item is None:
                return
            try:
                self._handle(*item)
            except Exception:  # noqa: BLE001 - keep the worker alive for the other devices
                logger.exception("fleet: handling a task of %s failed", item[0].id)

    def _answer(self, dev: _Device, task: wire.TrainTask, acted: _Acted) -> bytes:
        key = zlib.crc32(f"{dev.id}/{task.task_id}".encode())
        weights = derive_update(task.weights, key, self.rel, self.seed)
        loss = 2.0 / (1.0 + 0.05 * task.round)
        return wire.encode(wire.TrainResult(task.run, task.round, task.task_id, dev.id, task.node, weights, acted.n,
                                            acted.round_time_ms, 0.0, 0.0, loss))

    def _handle(self, dev: _Device, topic: str, payload: bytes, t_wall: float, t_mono: float) -> None:
        self._count(bytes_in=len(payload) + len(topic) + MQTT_FRAMING_BYTES, messages_in=1)
        try:
            task = wire.decode(payload, expect=wire.TrainTask)
        except wire.WireError as e:
            logger.warning("%s: dropped bad task payload (%d bytes): %s", dev.id, len(payload), e)
            self._count(bad_tasks=1)
            self._status(dev, "error", -1, f"bad task payload: {e}")
            return
        if task.run != self.run:
            return
        with dev.lock:
            acted = dev.acted.get(task.task_id)
        if acted is not None:  # delivered again: answer as before (a dropped task stays unanswered)
            self._count(redelivered=1)
            self._event(device=dev.id, round=task.round, task=task.task_id, action="redelivered",
                        deadline=task.deadline_unix)
            if acted.answered and acted.action in ("ok", "dup"):
                self._send(dev, self._topics.result(dev.id), self._answer(dev, task, acted))
            return
        if t_wall > task.deadline_unix:
            self._count(expired=1)
            self._event(device=dev.id, round=task.round, task=task.task_id, action="expired",
                        deadline=task.deadline_unix)
            self._status(dev, "idle", task.round, "task past its deadline")
            return
        counts = dev.spec.class_counts
        if len(task.label_map) != len(counts):
            self._status(dev, "error", task.round, f"the task has {len(task.label_map)} classes, "
                                                   f"this device {len(counts)}")
            return
        n = int(counts[np.asarray(task.label_map) >= 0].sum())
        action = self.faults.action(dev.spec.index, task.task_id)
        train_s = self.train_ms / 1000.0
        if self.jitter_ms:
            u = (zlib.crc32(f"j/{dev.id}/{task.task_id}".encode()) % 10_000) / 10_000.0
            train_s += u * self.jitter_ms / 1000.0
        due = t_mono + train_s
        if action == "late":
            due = t_mono + (task.deadline_unix + self.faults.late_s - t_wall)
        acted = _Acted(action, n, 0.0)
        with dev.lock:
            dev.acted[task.task_id] = acted
            while len(dev.acted) > 8:  # bounded: only recent tasks can be redelivered
                dev.acted.pop(next(iter(dev.acted)))
        self._count(tasks=1, **{f"action_{action}": 1})
        self._status(dev, "busy", task.round, f"training node {task.node} (emulated)")
        if action == "drop":
            self._timer.at(t_mono + train_s / 2, lambda: self._drop(dev, task))
            return
        if action == "leave":
            self._timer.at(t_mono + train_s / 2, lambda: threading.Thread(
                target=self._leave, args=(dev, task), daemon=True).start())
            return
        if action == "garbage":
            body = b"not a wire message " + os.urandom(16)
        else:
            acted.round_time_ms = round((max(due, time.monotonic()) - t_mono) * 1000.0, 3)
            body = self._answer(dev, task, acted)
        self._timer.at(due, lambda: self._deliver(dev, task, acted, body))

    def _deliver(self, dev: _Device, task: wire.TrainTask, acted: _Acted, body: bytes) -> None:
        topic = self._topics.result(dev.id)
        self._send(dev, topic, body)
        if acted.action == "dup":
            self._send(dev, topic, body)
        acted.answered = True
        self._event(device=dev.id, round=task.round, task=task.task_id, action=acted.action, n=acted.n,
                    deadline=task.deadline_unix, sent=time.time(), connected=bool(dev.conn.connected))
        self._status(dev, "idle", task.round, "")

    def _drop(self, dev: _Device, task: wire.TrainTask) -> None:
        self._event(device=dev.id, round=task.round, task=task.task_id, action="drop", deadline=task.deadline_unix)
        dev.conn.drop_link()  # the broker publishes the will; paho reconnects by itself

    def _leave(self, dev: _Device, task: wire.TrainTask) -> None:
        self._event(device=dev.id, round=task.round, task=task.task_id, action="leave", deadline=task.deadline_unix)
        try:
            stopped = wire.Status(dev.id, "offline", -1, wire.STOPPED_DETAIL)
            dev.conn.publish(self._topics.status(dev.id), wire.encode(stopped), qos=1, retain=True, wait=True,
                             timeout=10)
        except (TimeoutError, ConnectionError, EdgeHmoeError) as e:
            logger.info("%s: offline status not acknowledged: %s", dev.id, e)
        dev.conn.close()
        time.sleep(self.faults.away_s)
        for attempt in range(10):  # a new connection (and session resumption), like a restarted client
            error = self._connect_device(dev)
            if not error:
                break
            logger.warning("reconnect after leaving failed (%s); retrying", error)
            dev.conn.close()
            time.sleep(1.0 + attempt)
        self._event(device=dev.id, round=task.round, task=task.task_id, action="rejoin")

    # ------------------------------------------------------------------ views
    @property
    def connected(self) -> int:
        """Devices connected now."""
        return sum(1 for d in self.devices if d.conn is not None and d.conn.connected)

    def snapshot(self) -> dict:
        """Counters so far (bytes and messages both ways, tasks, actions) plus ``devices``/``connected``."""
        with self._stats_lock:
            out = dict(self.stats)
        out["devices"] = len(self.devices)
        out["connected"] = self.connected
        return out
