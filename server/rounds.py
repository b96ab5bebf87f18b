"""One federated round over an injected transport: publish tasks, collect, validate, aggregate.

The server's ``fit_round`` (as in Flower's ``Server.fit_round``), without the disk and without
the scheduling decisions:

1. publish one :class:`~edgehmoe.fl.wire.TrainTask` per device (QoS 1, message expiry = the
   round timeout); an expert's tensors are serialised once for all its tasks
   (:func:`~edgehmoe.fl.wire.iter_encode`) and the tasks are pipelined, not acknowledged one by
   one (at most :data:`PUBLISH_WINDOW` unacknowledged; answers are handled meanwhile);
2. handle inbound messages until every asked device answered, refused, failed or went offline
   (last will), or the deadline passed, or ``stop`` was set. ``hello`` and ``status`` update the
   :class:`~edgehmoe.server.registry.DeviceRegistry` at any time; a
   :class:`~edgehmoe.fl.wire.TrainResult` is decoded and validated (:func:`validate_result`:
   names, shapes, exact dtypes, finite values, ``num_examples`` no larger than what the device
   announced under the node, an update-norm bound relative to the current weights) before use.
   A result that cannot be decoded, fails validation, or arrives after the deadline is rejected
   with a logged reason; one for an unknown task or another round is dropped; a duplicate is
   counted once. Whatever a message holds, handling it never raises: it is used or dropped with
   a logged reason (retained junk, a left-over of the persistent session, during a run or on
   ``--resume``). Devices that miss deadlines are reported to the registry, which stops
   scheduling them after ``max_missed_rounds`` in a row;
3. :func:`aggregate`: the chosen rule per expert (FedAvg, coordinate-wise median or trimmed
   mean, optional norm clipping; :func:`edgehmoe.fl.aggregation.aggregate_per_expert`, pure,
   float64, checked finite) of the valid results; an expert whose aggregate is unusable keeps
   its weights. FedAvg without ``clip_factor`` streams: each valid result is folded into a
   running sum (:class:`~edgehmoe.fl.aggregation.FedAvgStream`) and keeps no weights, so a
   round's memory is O(model), not O(devices x model); the other rules keep every update;
4. :func:`metrics_row`: the ``metrics.jsonl`` row of the round (compact above
   :data:`DETAIL_LIMIT` devices).

The round ends as soon as every task is settled (no wait for silence); see docs/scale.md for
what each of these costs at 1,000 devices.

The transport is anything with :class:`Transport`'s methods. The real one is an
:class:`edgehmoe.fl.mqtt.MqttConnection` (:func:`connect_mqtt`); the unit tests use a fake
whose inbox is a queue.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from typing import Protocol

import numpy as np
from edgehmoe.server.registry import DeviceRegistry
from edgehmoe.server.scheduler import FLAT

from edgehmoe.core.hierarchy import Hierarchy
from edgehmoe.errors import EdgeHmoeError
from edgehmoe.fl import wire
from edgehmoe.fl.aggregation import (
    AGGREGATIONS,
    FedAvgStream,
    InvalidUpdate,
    Weights,
    aggregate_per_expert,
    check_update_norm,
    clip_update,
    validate_update,
    weights_norm,
)
from edgehmoe.fl.mqtt import MqttError, Topics

__all__ = [
    "Pending",
    "RoundRunner",
    "Transport",
    "UpdateRules",
    "aggregate",
    "connect_mqtt",
    "metrics_row",
    "node_name",
    "per_node_summary",
    "validate_result",
]

logger = logging.getLogger(__name__)

#: Outcomes of an asked device, as written to ``metrics.jsonl`` ``outcomes``.
OUTCOMES = ("asked", "ok", "refused", "error", "offline", "invalid", "late", "timeout")
#: Seconds between two "dropped ..." lines about one device (or topic).
DROP_LOG_INTERVAL_S = 60.0
#: Above this many asked devices a ``metrics.jsonl`` row summarises the per-device measurements
#: per expert (``per_node``) instead of listing them (``per_device`` is then empty and ``detail``
#: is ``"summary"``): a row stays ~20 KB at 1,000 devices instead of ~200 KB (issue #12).
DETAIL_LIMIT = 100
#: Tasks a round keeps unacknowledged at most while publishing (a pipeline, not a round trip per
#: task; bounds what paho holds in memory). The broker acknowledges a task once it has it.
PUBLISH_WINDOW = 32
#: Outcomes that count as a missed deadline (see ``DeviceRegistry.on_missed``).
MISSED = ("timeout", "late")


@dataclass(frozen=True)
class UpdateRules:
    """How results are checked and combined (the ``[schedule]`` keys of the same names).

    Attributes:
        max_update_norm: bound of ``||w_new - w_task|| / max(||w_task||, 1)``; 0 = no bound.
        update_norm_action: ``reject`` a result above the bound, or ``clip`` its change to it.
        aggregation: one of :data:`edgehmoe.fl.aggregation.AGGREGATIONS`.
        trim_fraction: for ``trimmed_mean``.
        clip_factor: > 0 clips every change to this times the round's median change norm.
    """

    max_update_norm: float = 0.0
    update_norm_action: str = "reject"
    aggregation: str = "fedavg"
    trim_fraction: float = 0.2
    clip_factor: float = 0.0

    def __post_init__(self) -> None:
        if self.aggregation not in AGGREGATIONS:
            raise InvalidUpdate(f"unknown aggregation {self.aggregation!r}; valid: {', '.join(AGGREGATIONS)}")
        if self.update_norm_action not in ("reject", "clip"):
            raise InvalidUpdate(f"update_norm_action must be reject or clip, got {self.update_norm_action!r}")

    @classmethod
    def from_schedule(cls, s) -> UpdateRules:
        """From a :class:`~edgehmoe.server.config.ScheduleSection`."""
        return cls(max_update_norm=s.max_update_norm, update_norm_action=s.update_norm_action,
                   aggregation=s.aggregation, trim_fraction=s.trim_fraction, clip_factor=s.clip_factor)


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
                 client_id: str = "", timeout: float = 30.0, fresh_session: bool = False):
    """The real transport: a connected :class:`~edgehmoe.fl.mqtt.MqttConnection` for the server.

    A persistent session (1 h) keeps the server's subscriptions and the devices' QoS 1 results
    at the broker while the server is briefly away. ``fresh_session`` (a new run) first drops
    a session the broker kept for this client id: its subscriptions to another run's topics
    would deliver that run's messages here.
    """
    from edgehmoe.fl.mqtt import MqttConnection

    conn = MqttConnection.from_url(
        url, client_id=client_id or username or f"edgehmoe-server-{run}", username=username or None, password=password,
        cafile=cafile or None, session_expiry_s=3600,
    )
    conn.connect(timeout=timeout, fresh_session=fresh_session)
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


def validate_result(r: wire.TrainResult, task: wire.TrainTask, device_id: str, *, max_examples: int | None = None,
                    max_update_norm: float = 0.0, reference_norm: float | None = None) -> None:
    """Check a result against the task it answers (Flower's ``validate_message_reply_consistency``).

    Run, round, node and sender must match the task; the weights must have the task's names,
    shapes and exact dtypes, be finite, and ``0 < num_examples <= max_examples`` (what the
    device announced under the node; :func:`~edgehmoe.fl.aggregation.validate_update`); with
    ``max_update_norm > 0`` the change from the task's weights must be at most that many times
    their norm (:func:`~edgehmoe.fl.aggregation.check_update_norm`).

    :raises InvalidUpdate: naming the first problem.
    """
    if r.run != task.run or r.round != task.round:
        raise InvalidUpdate(f"result is for run {r.run!r} round {r.round}, task was run {task.run!r} round {task.round}")
    if r.node != task.node or r.device_id != device_id:
        raise InvalidUpdate(f"result is for node {r.node} from {r.device_id}, task was node {task.node} for {device_id}")
    validate_update(r.weights, task.weights, r.num_examples, max_examples=max_examples)
    if max_update_norm > 0:
        check_update_norm(r.weights, task.weights, max_update_norm, reference_norm=reference_norm)


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
        rules: the update-norm bound and the aggregation rule (:class:`UpdateRules`).
        offline_grace_s: a device whose last will arrives during the open round keeps its task
            this long (``schedule.offline_grace_s``): if it says hello again (it reconnected,
            e.g. after a broker restart) its task is sent again, since the broker may have lost
            it; if not, the task ends ``offline`` then. ``0`` ends it at once.
    """

    def __init__(self, transport: Transport, topics: Topics, registry: DeviceRegistry, tree: Hierarchy, *,
                 clock: Callable[[], float] = time.time, stop: threading.Event | None = None,
                 rules: UpdateRules | None = None, offline_grace_s: float = 0.0):
        self.transport = transport
        self.offline_grace_s = float(offline_grace_s)
        self.rules = rules if rules is not None else UpdateRules()
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
        self._by_device: dict[str, list[Pending]] = {}  # device id -> its pending tasks
        self._left = 0  # tasks of the open round not yet answered
        self._lost: dict[str, float] = {}  # device -> clock time its will arrived in the open round
        self._expiry_s: float | None = None  # message expiry of the open round's tasks
        #: FedAvg running sums of the open round by node (when the rules allow streaming).
        self.streams: dict[int, FedAvgStream] = {}
        self._ref_norms: dict[int, float] = {}  # node -> norm of the weights sent this round
        #: Payload bytes of the last round: tasks published, results received.
        self.bytes_out = self.bytes_in = 0
        self._drop_log: dict[str, tuple[float, int]] = {}  # key -> (time of last line, lines not written)

    def subscribe(self) -> None:
        """Listen to every device's hello, status and result."""
        for f in self.topics.server_filters():
            self.transport.subscribe(f)

    # ------------------------------------------------------------------ inbound
    def pump(self, timeout: float) -> None:
        """Handle inbound messages for up to ``timeout`` seconds (returns early when idle, and as
        soon as every task of the open round is answered)."""
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
            if self.open and self._left == 0:
                return

    def handle(self, topic: str, payload: bytes) -> None:
        """Decode one inbound message and route it to the registry or the open round.

        Never raises for anything a device can send: a message that cannot be used is dropped
        with a logged reason (one line; an unforeseen exception is logged with its traceback as
        a server bug, and the message is still only dropped), so retained junk or a left-over
        of the persistent session cannot stop a run or a ``--resume``.
        """
        try:
            self._handle(topic, payload)
        except EdgeHmoeError as e:
            self._drop(topic, "dropped message on %s (%s bytes): %s", topic, _size(payload), e)
        except Exception:  # noqa: BLE001 - network input must never stop the server
            logger.error("server bug while handling a message on %s (%s bytes); message dropped", topic,
                         _size(payload), exc_info=True)

    def _handle(self, topic: str, payload: bytes) -> None:
        try:
            dev_id, kind = self.topics.parse(topic)
        except ValueError as e:
            self._drop(topic, "ignoring message on unexpected topic %s: %s", topic, e)
            return
        try:
            msg = wire.decode(payload)
        except wire.WireError as e:
            self._drop(f"{dev_id}/{kind}", "dropped bad %s payload from %s (%s bytes): %s", kind, dev_id,
                       _size(payload), e)
            if kind == "result":
                self._settle_device(dev_id, "invalid", f"undecodable result: {e}")
            return
        sender = getattr(msg, "device_id", dev_id)
        if sender != dev_id:
            self._drop(dev_id, "dropped %s on %s: it claims device %r", type(msg).__name__, topic, sender)
            return
        if kind == "hello" and isinstance(msg, wire.Hello):
            if self.registry.on_hello(msg):
                self._on_back(dev_id)
        elif kind == "status" and isinstance(msg, wire.Status):
            self.registry.on_status(msg)
            self._on_status(msg)
        elif kind == "result" and isinstance(msg, wire.TrainResult):
            if self.open:
                self.bytes_in += len(payload)
            self._on_result(msg)
        else:
            self._drop(dev_id, "dropped %s on %s topic of %s", type(msg).__name__, kind, dev_id)

    def _drop(self, key: str, msg: str, *args) -> None:
        """Warn that a message was dropped; at most one line per ``key`` (device or topic) per
        :data:`DROP_LOG_INTERVAL_S`, then a count of the lines not written (a device sending junk
        in a loop cannot fill the log)."""
        now = self.clock()
        last, skipped = self._drop_log.get(key, (-math.inf, 0))
        if now - last < DROP_LOG_INTERVAL_S:
            self._drop_log[key] = (last, skipped + 1)
            return
        if skipped:
            msg += " (%d more dropped message(s) of it in the last %.0f s not logged)"
            args += (skipped, now - last)
        if len(self._drop_log) > 100_000:  # bound the memory of the limiter itself
            self._drop_log.clear()
        self._drop_log[key] = (now, 0)
        logger.warning(msg, *args)

    def _settle(self, p: Pending, outcome: str, reason: str = "", result: wire.TrainResult | None = None) -> None:
        if not p.answered:
            self._left -= 1
        p.settle(outcome, reason, result)

    def _settle_device(self, dev_id: str, outcome: str, reason: str) -> None:
        """Settle every unanswered task of ``dev_id`` in the open round."""
        if not self.open:
            return
        for p in self._by_device.get(dev_id, ()):
            if not p.answered:
                self._settle(p, outcome, reason)

    def _unanswered(self, dev_id: str) -> list[Pending]:
        return [p for p in self._by_device.get(dev_id, ()) if not p.answered] if self.open else []

    def _on_back(self, dev_id: str) -> None:
        """``dev_id`` said hello (it connected again): send its unanswered tasks of the open round again.

        A broker restart, or a session the broker did not keep, loses the task the device had not
        yet received; one it had received arrives twice, and the client answers the copy with its
        stored result (the server ignores the duplicate).
        """
        self._lost.pop(dev_id, None)
        # the copy expires with the round, as the first did
        expiry = None if self._expiry_s is None else max(1.0, self.deadline - self.clock())
        for p in self._unanswered(dev_id):
            payload = wire.encode(p.task)
            self.bytes_out += len(payload)
            try:
                self.transport.publish(self.topics.task(dev_id), payload, qos=1, expiry_s=expiry, wait=False)
                logger.info("device %s connected again during round %d; its task %s was sent again", dev_id,
                            self.round, p.task_id)
            except (TimeoutError, MqttError) as e:
                logger.warning("round %d: task for %s not sent again yet (%s)", self.round, dev_id, e)

    def _expire_lost(self) -> None:
        """End the tasks of devices whose will arrived ``offline_grace_s`` ago and that did not come back."""
        now = self.clock()
        for dev_id, t in list(self._lost.items()):
            if now - t >= self.offline_grace_s:
                del self._lost[dev_id]
                self._settle_device(dev_id, "offline", f"went offline (not back within {self.offline_grace_s:g} s)")

    def _on_status(self, s: wire.Status) -> None:
        if s.state == "offline":  # its last will, or it stopped on purpose
            if s.stopped:  # not coming back for this task: end it now
                self._lost.pop(s.device_id, None)
                self._settle_device(s.device_id, "offline", "the device stopped")
            elif self.offline_grace_s <= 0:  # its part of the round ends now, not at the deadline
                self._settle_device(s.device_id, "offline", "went offline")
            elif self._unanswered(s.device_id) and s.device_id not in self._lost:
                self._lost[s.device_id] = self.clock()
                logger.warning("device %s lost its connection during round %d; its task is kept %g s for it to "
                               "reconnect (schedule.offline_grace_s)", s.device_id, self.round, self.offline_grace_s)
            return
        self._lost.pop(s.device_id, None)
        if s.state in ("refused", "error") and s.round == self.round and self.open:
            if any(not p.answered for p in self._by_device.get(s.device_id, ())):
                logger.warning("device %s %s round %d: %s", s.device_id, s.state, s.round, s.detail)
            self._settle_device(s.device_id, s.state, s.detail)

    def _on_result(self, r: wire.TrainResult) -> None:
        self.registry.on_answer(r.device_id)  # it is alive, whatever becomes of this result
        self._lost.pop(r.device_id, None)
        p = self.pending.get(r.task_id) if self.open else None
        if p is None or r.round != self.round:
            self._drop(r.device_id, "dropped result from %s for task %s (round %d): not a task of this round "
                       "(late or stale)", r.device_id, r.task_id, r.round)
            return
        if p.answered:
            logger.info("duplicate result for task %s from %s ignored (already %s)", r.task_id, r.device_id, p.outcome)
            return
        now = self.clock()
        if now > self.deadline:
            self._settle(p, "late", f"arrived {now - self.deadline:.1f} s after the deadline")
            logger.warning("dropped late result from %s for round %d", r.device_id, r.round)
            return
        rules = self.rules
        reject_norm = rules.max_update_norm if rules.update_norm_action == "reject" else 0.0
        ref_norm = None
        if rules.max_update_norm > 0:  # once per expert and round, not once per result
            ref_norm = self._ref_norms.get(p.node)
            if ref_norm is None:
                ref_norm = self._ref_norms[p.node] = weights_norm(p.task.weights)
        try:
            validate_result(r, p.task, p.device_id, max_examples=self.registry.samples_under(p.device_id,
                                                                                             p.task.label_map),
                            max_update_norm=reject_norm, reference_norm=ref_norm)
            if rules.update_norm_action == "clip" and rules.max_update_norm > 0:
                ratio = check_update_norm(r.weights, p.task.weights, 0.0, reference_norm=ref_norm)
                if ratio > rules.max_update_norm:
                    bound = rules.max_update_norm * max(ref_norm, 1.0)
                    r = replace(r, weights=clip_update(r.weights, p.task.weights, bound))
                    logger.warning("clipped update from %s for %s: its norm was %.3g x the weights' norm, above "
                                   "%g (schedule.max_update_norm)", r.device_id, node_name(self.tree, p.node),
                                   ratio, rules.max_update_norm)
            stream = self.streams.get(p.node)
            if stream is not None:
                stream.add(r.weights, r.num_examples)  # folded into the running sum: not kept
                r = replace(r, weights={})
        except InvalidUpdate as e:
            self._settle(p, "invalid", str(e))
            logger.warning("rejected update from %s for %s: %s", r.device_id, node_name(self.tree, p.node), e)
            return
        self._settle(p, "ok", result=r)

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
        self._by_device = {}
        for p in self.pending.values():
            self._by_device.setdefault(p.device_id, []).append(p)
        self._left = len(self.pending)
        self._lost, self._expiry_s = {}, expiry_s
        self.bytes_out = self.bytes_in = 0
        self._ref_norms = {}
        # FedAvg without clipping to the round's median change folds each result into a running
        # sum as it arrives; the robust rules need every update at once.
        streaming = self.rules.aggregation == "fedavg" and self.rules.clip_factor <= 0
        self.streams = {t.node: FedAvgStream(t.weights) for t in tasks.values()} if streaming else {}
        self.open = True
        t_start = t_published = time.monotonic()
        try:
            # One serialised copy of each expert's weights for all its tasks, encoded one at a time;
            # no round trip per task: while more than PUBLISH_WINDOW tasks wait for the broker's
            # acknowledgement, the answers of the first devices are handled (memory stays bounded).
            unacked = getattr(self.transport, "unacked", None)
            devs = list(tasks)
            for dev, payload in zip(devs, wire.iter_encode(tasks[d] for d in devs)):
                self.bytes_out += len(payload)
                try:
                    self.transport.publish(self.topics.task(dev), payload, qos=1, expiry_s=expiry_s, wait=False)
                except (TimeoutError, MqttError) as e:
                    # Not sent (broker away): paho keeps it queued and resends it after the
                    # reconnect; the device's answer is awaited until the deadline as usual.
                    logger.warning("round %d: task for %s not acknowledged yet (%s)", rnd, dev, e)
                del payload
                if unacked is not None:
                    end = time.monotonic() + 30.0  # a broker that is away: paho keeps the rest queued
                    while unacked() > PUBLISH_WINDOW and time.monotonic() < end and not self.stop.is_set():
                        self.pump(0.02)
            t_published = time.monotonic()
            while not self.stop.is_set():
                if self._left == 0:
                    break
                self.pump(0.5)
                self._expire_lost()
                if self._left == 0:
                    break
                if self.clock() > deadline:
                    for p in self.pending.values():
                        if p.answered:
                            continue
                        if p.device_id in self._lost:  # its will arrived, and it did not come back
                            self._settle(p, "offline", "went offline (not back before the deadline)")
                        else:
                            self._settle(p, "timeout", "no answer before the deadline")
                            logger.warning("round %d: %s did not answer before the deadline", rnd, p.device_id)
                    break
        finally:
            self.open = False
        if self._left:
            return None  # stopped mid-round
        logger.info("round %d: %d task(s) published in %.0f ms (%.1f MB), answers collected %.0f ms later "
                    "(%.1f MB)", rnd, len(tasks), (t_published - t_start) * 1000, self.bytes_out / 1e6,
                    (time.monotonic() - t_published) * 1000, self.bytes_in / 1e6)
        for p in self.pending.values():
            if p.outcome in MISSED:
                self.registry.on_missed(p.device_id)
            elif p.outcome != "offline":
                self.registry.on_answer(p.device_id)
        return list(self.pending.values())


def _size(payload: object) -> str:
    return str(len(payload)) if hasattr(payload, "__len__") else "?"


def aggregate(pending: Iterable[Pending], rules: UpdateRules | None = None,
              streams: Mapping[int, FedAvgStream] | None = None) -> dict[int, Weights]:
    """Aggregate per expert the ``ok`` results with ``rules.aggregation`` (default FedAvg weighted
    by ``num_examples``; dtypes of the task; float64, checked finite).

    ``streams``: the round's FedAvg running sums by node (:attr:`RoundRunner.streams`); a node
    that has one is averaged from it (its results no longer hold weights), the others from their
    results. An expert whose aggregate cannot be used (not finite in its dtype, which validation
    should already have made impossible) is left out with a logged reason: it keeps its weights.
    """
    rules = rules if rules is not None else UpdateRules()
    streams = streams or {}
    by_node: dict[int, list] = {}
    templates: dict[int, Weights] = {}
    out: dict[int, Weights] = {}
    for node, stream in streams.items():
        if stream.count:
            try:
                out[node] = stream.result()
            except InvalidUpdate as e:
                logger.error("expert %s not updated this round: %s", node, e)
    for p in pending:
        if p.outcome == "ok" and p.result is not None and p.node not in streams:
            by_node.setdefault(p.node, []).append((p.result.weights, p.result.num_examples))
            templates[p.node] = p.task.weights
    for node, updates in by_node.items():
        try:
            out.update(aggregate_per_expert({node: updates}, templates, method=rules.aggregation,
                                            trim_fraction=rules.trim_fraction, clip_factor=rules.clip_factor))
        except InvalidUpdate as e:
            logger.error("expert %s not updated this round: %s", node, e)
    return out


def metrics_row(rnd: int, kind: str, tree: Hierarchy, pending: list[Pending], updated: Iterable[int], *,
                lr: float, aggregation_ms: float, round_wall_s: float, time_unix: float,
                aggregation: str = "fedavg", bytes_out: int | None = None, bytes_in: int | None = None) -> dict:
    """The ``metrics.jsonl`` row of a round (validation metrics are added by the caller).

    Keys: ``round``, ``kind``, ``nodes``/``experts`` (asked), ``updated`` (aggregated),
    ``devices_asked``/``devices_answered`` (valid results), ``outcomes`` (device -> outcome),
    ``rejected`` (device -> reason, for results received but not used: invalid or late),
    ``tasks`` (device -> node asked), ``reasons`` (device -> reason of every outcome but ok:
    refused, error, offline, timeout, invalid, late),
    ``per_device`` (measurements of the valid results), ``per_node`` (the same summarised per
    expert: devices, examples, and min/median/p95/max/sum of ``round_time_ms``, ``round_mem_mb``,
    ``peak_rss_mb``), ``aggregation`` (the rule), ``aggregation_ms``, ``round_wall_s``, ``lr``,
    ``time_unix``, and ``bytes_out``/``bytes_in`` (payload bytes of the tasks sent and the
    results received) when given.

    Above :data:`DETAIL_LIMIT` asked devices the row is compact (``detail: "summary"``):
    ``per_device`` is empty (``per_node`` has the figures) and, when every device was asked for
    the same expert, ``tasks`` is empty too (``nodes`` names it); ``outcomes``, ``reasons`` and
    ``rejected`` stay complete.
    """
    ok = sorted((p for p in pending if p.outcome == "ok"), key=lambda p: p.device_id)
    nodes = {int(p.node) for p in pending}
    compact = len(pending) > DETAIL_LIMIT
    extra = {"bytes_out": int(bytes_out), "bytes_in": int(bytes_in)} if bytes_out is not None else {}
    if compact:
        extra["detail"] = "summary"
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
        "tasks": {} if compact and len(nodes) == 1 else {p.device_id: int(p.node) for p in pending},
        "reasons": {p.device_id: p.reason for p in pending if p.outcome != "ok" and p.reason},
        "per_device": [
            {"device": p.device_id, "node": p.node, "num_examples": p.result.num_examples,
             "round_time_ms": p.result.round_time_ms, "round_mem_mb": p.result.round_mem_mb,
             "peak_rss_mb": p.result.peak_rss_mb, "loss": p.result.loss}
            for p in ok
        ] if not compact else [],
        "per_node": per_node_summary(ok),
        "aggregation": aggregation,
        "aggregation_ms": aggregation_ms,
        "round_wall_s": round_wall_s,
        "lr": lr,
        "time_unix": time_unix,
        **extra,
    }


def _stats(values: list[float]) -> dict:
    v = np.asarray(values, dtype=np.float64)
    return {"min": float(v.min()), "median": float(np.median(v)), "p95": float(np.percentile(v, 95)),
            "max": float(v.max()), "sum": float(v.sum())}


def per_node_summary(ok: Iterable[Pending]) -> dict[str, dict]:
    """``{"<node>": {devices, num_examples, round_time_ms, round_mem_mb, peak_rss_mb, loss}}`` of valid
    results: statistics (min/median/p95/max/sum) per measurement, the mean loss."""
    by_node: dict[int, list] = {}
    for p in ok:
        if p.result is not None:
            by_node.setdefault(int(p.node), []).append(p.result)
    return {
        str(n): {"devices": len(rs), "num_examples": int(sum(r.num_examples for r in rs)),
                 "round_time_ms": _stats([r.round_time_ms for r in rs]),
                 "round_mem_mb": _stats([r.round_mem_mb for r in rs]),
                 "peak_rss_mb": _stats([r.peak_rss_mb for r in rs]),
                 "loss": float(sum(r.loss for r in rs) / len(rs))}
        for n, rs in sorted(by_node.items())
    }
