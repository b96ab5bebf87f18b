"""One federated round over an injected transport: publish tasks, collect, validate, aggregate.

The server's ``fit_round`` (as in Flower's ``Server.fit_round``), without the disk and without
the scheduling decisions:

1. publish one :class:`~edgehmoe.fl.wire.TrainTask` per device (QoS 1, message expiry = the
   round timeout);
2. handle inbound messages until every asked device answered, refused, failed or went offline
   (last will), or the deadline passed, or ``stop`` was set. ``hello`` and ``status`` update the
   :class:`~edgehmoe.server.registry.DeviceRegistry` at any time; a
   :class:`~edgehmoe.fl.wire.TrainResult` is decoded and validated (:func:`validate_result`)
   before use. A result that cannot be decoded, fails validation, or arrives after the deadline
   is rejected with a logged reason; one for an unknown task or another round is dropped; a
   duplicate is counted once;
3. :func:`aggregate`: FedAvg per expert of the valid results
   (:func:`edgehmoe.fl.aggregation.aggregate_per_expert`, a pure function);
4. :func:`metrics_row`: the ``metrics.jsonl`` row of the round.

The transport is anything with :class:`Transport`'s methods. The real one is an
:class:`edgehmoe.fl.mqtt.MqttConnection` (:func:`connect_mqtt`); the unit tests use a fake
whose inbox is a queue.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Protocol

from edgehmoe.server.registry import DeviceRegistry
from edgehmoe.server.scheduler import FLAT

from edgehmoe.core.hierarchy import Hierarchy
from edgehmoe.fl import wire
from edgehmoe.fl.aggregation import (
    InvalidUpdate,
    Weights,
    aggregate_per_expert,
    validate_update,
)
from edgehmoe.fl.mqtt import MqttError, Topics

__all__ = [
    "Pending",
    "RoundRunner",
    "Transport",
    "aggregate",
    "connect_mqtt",
    "metrics_row",
    "node_name",
    "validate_result",
]

logger = logging.getLogger(__name__)

#: Outcomes of an asked device, as written to ``metrics.jsonl`` ``outcomes``.
OUTCOMES = ("asked", "ok", "refused", "error", "offline", "invalid", "late", "timeout")


class Transport(Protocol):
    """What the round needs of the network (the subset of ``MqttConnection`` it uses)."""

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False, wait: bool = True,
                timeout: float | None = 30.0, expiry_s: float | None = None) -> int:
        """Send ``payload``; may raise ``TimeoutError`` or ``MqttError`` (it stays queued)."""

    def subscribe(self, topic_filter: str, qos: int = 1, timeout: float | None = 10.0) -> None:
        """Receive messages matching ``topic_filter`` from now on."""

    def receive(self, timeout: float | None = None) -> tuple[str, bytes]:
        """Next inbound ``(topic, payload)``; raises ``TimeoutError`` when none came within ``timeout``."""

    def close(self) -> None:
        """Disconnect."""


def connect_mqtt(url: str, run: str, *, username: str = "", password: str | None = None, cafile: str = "",
                 client_id: str = "", timeout: float = 30.0):
    """The real transport: a connected :class:`~edgehmoe.fl.mqtt.MqttConnection` for the server.

    A persistent session (1 h) keeps the server's subscriptions and the devices' QoS 1 results
    at the broker while the server is briefly away.
    """
    from edgehmoe.fl.mqtt import MqttConnection

    conn = MqttConnection.from_url(
        url, client_id=client_id or f"edgehmoe-server-{run}", username=username or None, password=password,
        cafile=cafile or None, session_expiry_s=3600,
    )
    conn.connect(timeout=timeout)
    logger.info("server connected to %s as run %r", url, run)
    return conn


def node_name(tree: Hierarchy, node: int) -> str:
    """``flat`` or ``<node>:<name>`` (as in ``metrics.jsonl`` ``experts``)."""
    return "flat" if node == FLAT else f"{node}:{tree.names[node]}"


@dataclass
class Pending:
    """One task of the round and what became of it."""

    task: wire.TrainTask
    device_id: str
    answered: bool = False
    outcome: str = "asked"  # one of OUTCOMES
    reason: str = ""  # why the result was not used (invalid, late, refused, error, ...)
    result: wire.TrainResult | None = None

    @property
    def task_id(self) -> str:
        return self.task.task_id

    @property
    def node(self) -> int:
        return self.task.node

    def settle(self, outcome: str, reason: str = "", result: wire.TrainResult | None = None) -> None:
        self.answered, self.outcome, self.reason, self.result = True, outcome, reason, result


def validate_result(r: wire.TrainResult, task: wire.TrainTask, device_id: str) -> None:
    """Check a result against the task it answers (Flower's ``validate_message_reply_consistency``).

    Run, round, node and sender must match the task; the weights must have the task's names,
    shapes and dtypes, be finite, and ``num_examples > 0`` (:func:`~edgehmoe.fl.aggregation.validate_update`).

    :raises InvalidUpdate: naming the first problem.
    """
    if r.run != task.run or r.round != task.round:
        raise InvalidUpdate(f"result is for run {r.run!r} round {r.round}, task was run {task.run!r} round {task.round}")
    if r.node != task.node or r.device_id != device_id:
        raise InvalidUpdate(f"result is for node {r.node} from {r.device_id}, task was node {task.node} for {device_id}")
    validate_update(r.weights, task.weights, r.num_examples)


class RoundRunner:
    """Handles inbound messages and runs one round at a time over ``transport``.

    Args:
        transport: see :class:`Transport`.
        topics: the run's topic names.
        registry: updated from ``hello`` and ``status`` messages.
        tree: for log lines (expert names).
        clock: wall-clock time source, compared with the deadline (``TrainTask.deadline_unix``).
        stop: when set, the round stops collecting; :meth:`fit_round` then returns ``None``
            unless every device had answered.
    """

    def __init__(self, transport: Transport, topics: Topics, registry: DeviceRegistry, tree: Hierarchy, *,
                 clock: Callable[[], float] = time.time, stop: threading.Event | None = None):
        self.transport = transport
        self.topics = topics
        self.run = topics.run
        self.registry = registry
        self.tree = tree
        self.clock = clock
        self.stop = stop if stop is not None else threading.Event()
        self.round = -1  # round of the open or last round
        self.deadline = 0.0
        self.open = False  # collecting results of self.round
        self.pending: dict[str, Pending] = {}  # task_id -> Pending

    def subscribe(self) -> None:
        """Listen to every device's hello, status and result."""
        for f in self.topics.server_filters():
            self.transport.subscribe(f)

    # ------------------------------------------------------------------ inbound
    def pump(self, timeout: float) -> None:
        """Handle inbound messages for up to ``timeout`` seconds (returns early when idle)."""
        end = time.monotonic() + timeout
        while True:
            left = end - time.monotonic()
            if left <= 0:
                return
            try:
                topic, payload = self.transport.receive(timeout=min(left, 0.2))
            except TimeoutError:
                return
            self.handle(topic, payload)

    def handle(self, topic: str, payload: bytes) -> None:
        """Decode one inbound message and route it to the registry or the open round."""
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
                self._settle_device(dev_id, "invalid", f"undecodable result: {e}")
            return
        sender = getattr(msg, "device_id", dev_id)
        if sender != dev_id:
            logger.warning("dropped %s on %s: it claims device %r", type(msg).__name__, topic, sender)
            return
        if kind == "hello" and isinstance(msg, wire.Hello):
            self.registry.on_hello(msg)
        elif kind == "status" and isinstance(msg, wire.Status):
            self.registry.on_status(msg)
            self._on_status(msg)
        elif kind == "result" and isinstance(msg, wire.TrainResult):
            self._on_result(msg)
        else:
            logger.warning("dropped %s on %s topic of %s", type(msg).__name__, kind, dev_id)

    def _settle_device(self, dev_id: str, outcome: str, reason: str) -> None:
        """Settle every unanswered task of ``dev_id`` in the open round."""
        if not self.open:
            return
        for p in self.pending.values():
            if p.device_id == dev_id and not p.answered:
                p.settle(outcome, reason)

    def _on_status(self, s: wire.Status) -> None:
        if s.state == "offline":  # last will: its part of the round ends now, not at the deadline
            self._settle_device(s.device_id, "offline", "went offline")
        elif s.state in ("refused", "error") and s.round == self.round and self.open:
            if any(p.device_id == s.device_id and not p.answered for p in self.pending.values()):
                logger.warning("device %s %s round %d: %s", s.device_id, s.state, s.round, s.detail)
            self._settle_device(s.device_id, s.state, s.detail)

    def _on_result(self, r: wire.TrainResult) -> None:
        p = self.pending.get(r.task_id) if self.open else None
        if p is None or r.round != self.round:
            logger.warning("dropped result from %s for task %s (round %d): not a task of this round (late or stale)",
                           r.device_id, r.task_id, r.round)
            return
        if p.answered:
            logger.info("duplicate result for task %s from %s ignored (already %s)", r.task_id, r.device_id, p.outcome)
            return
        now = self.clock()
        if now > self.deadline:
            p.settle("late", f"arrived {now - self.deadline:.1f} s after the deadline")
            logger.warning("dropped late result from %s for round %d", r.device_id, r.round)
            return
        try:
            validate_result(r, p.task, p.device_id)
        except InvalidUpdate as e:
            p.settle("invalid", str(e))
            logger.warning("rejected update from %s for %s: %s", r.device_id, node_name(self.tree, p.node), e)
            return
        p.settle("ok", result=r)

    # ------------------------------------------------------------------ one round
    def fit_round(self, rnd: int, tasks: Mapping[str, wire.TrainTask], deadline: float,
                  expiry_s: float | None = None) -> list[Pending] | None:
        """Publish ``tasks`` (device id -> task), collect the answers; the settled tasks.

        Returns ``None`` when ``stop`` was set before every device answered (the round is
        abandoned and will be run again). Devices that neither answered nor went offline by
        ``deadline`` end with outcome ``timeout``.
        """
        self.round, self.deadline = rnd, deadline
        self.pending = {t.task_id: Pending(t, dev) for dev, t in tasks.items()}
        self.open = True
        try:
            for dev, t in tasks.items():
                try:
                    self.transport.publish(self.topics.task(dev), wire.encode(t), qos=1, expiry_s=expiry_s)
                except (TimeoutError, MqttError) as e:
                    # Not acknowledged (broker away): paho keeps it queued and resends it after the
                    # reconnect; the device's answer is awaited until the deadline as usual.
                    logger.warning("round %d: task for %s not acknowledged yet (%s)", rnd, dev, e)
            while not self.stop.is_set():
                self.pump(0.5)
                if all(p.answered for p in self.pending.values()):
                    break
                if self.clock() > deadline:
                    for p in self.pending.values():
                        if not p.answered:
                            p.settle("timeout", "no answer before the deadline")
                            logger.warning("round %d: %s did not answer before the deadline", rnd, p.device_id)
                    break
        finally:
            self.open = False
        if not all(p.answered for p in self.pending.values()):
            return None  # stopped mid-round
        return list(self.pending.values())


def aggregate(pending: Iterable[Pending]) -> dict[int, Weights]:
    """FedAvg per expert of the ``ok`` results (weighted by ``num_examples``; dtypes of the task)."""
    by_node: dict[int, list] = {}
    templates: dict[int, Weights] = {}
    for p in pending:
        if p.outcome == "ok" and p.result is not None:
            by_node.setdefault(p.node, []).append((p.result.weights, p.result.num_examples))
            templates[p.node] = p.task.weights
    return aggregate_per_expert(by_node, templates=templates)


def metrics_row(rnd: int, kind: str, tree: Hierarchy, pending: list[Pending], updated: Iterable[int], *,
                lr: float, aggregation_ms: float, round_wall_s: float, time_unix: float) -> dict:
    """The ``metrics.jsonl`` row of a round (validation metrics are added by the caller).

    Keys: ``round``, ``kind``, ``nodes``/``experts`` (asked), ``updated`` (aggregated),
    ``devices_asked``/``devices_answered`` (valid results), ``outcomes`` (device -> outcome),
    ``rejected`` (device -> reason, for results received but not used: invalid or late),
    ``tasks`` (device -> node asked), ``reasons`` (device -> reason of every outcome but ok:
    refused, error, offline, timeout, invalid, late),
    ``per_device`` (measurements of the valid results), ``aggregation_ms``, ``round_wall_s``,
    ``lr``, ``time_unix``.
    """
    ok = sorted((p for p in pending if p.outcome == "ok"), key=lambda p: p.device_id)
    nodes = {int(p.node) for p in pending}
    return {
        "round": rnd,
        "kind": kind,
        "nodes": sorted(nodes),
        "experts": sorted(node_name(tree, n) for n in nodes),
        "updated": sorted(int(n) for n in updated),
        "devices_asked": len(pending),
        "devices_answered": len(ok),
        "outcomes": {p.device_id: p.outcome for p in pending},
        "rejected": {p.device_id: p.reason for p in pending if p.outcome in ("invalid", "late")},
        "tasks": {p.device_id: int(p.node) for p in pending},
        "reasons": {p.device_id: p.reason for p in pending if p.outcome != "ok" and p.reason},
        "per_device": [
            {"device": p.device_id, "node": p.node, "num_examples": p.result.num_examples,
             "round_time_ms": p.result.round_time_ms, "round_mem_mb": p.result.round_mem_mb,
             "peak_rss_mb": p.result.peak_rss_mb, "loss": p.result.loss}
            for p in ok
        ],
        "aggregation_ms": aggregation_ms,
        "round_wall_s": round_wall_s,
        "lr": lr,
        "time_unix": time_unix,
    }
