"""The aggregation server's device registry: who announced itself, who is online, what each holds.

Devices announce themselves with a retained :class:`~edgehmoe.fl.wire.Hello` (data per class,
memory budget, platform) and report their state with a retained
:class:`~edgehmoe.fl.wire.Status`; the broker publishes their last will (``offline``) when they
vanish. The registry keeps the facts the scheduler needs (:meth:`DeviceRegistry.views`) and is
saved in ``state.json`` (``devices``) at every commit. No I/O: the round runner
(:mod:`edgehmoe.server.rounds`) feeds it decoded messages.

One bad device (docs/security.md): a hello with absurd class counts is refused; hellos are
logged at most once per device per minute; a device that misses ``max_missed`` deadlines in
a row is not scheduled until it says hello again or answers.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, fields

import numpy as np
from edgehmoe.server.scheduler import DeviceView

from edgehmoe.fl import wire

__all__ = ["HELLO_LOG_INTERVAL_S", "MAX_CLASS_COUNT", "Device", "DeviceRegistry"]

logger = logging.getLogger(__name__)


#: Hello facts above these are refused as absurd (a shard of one device, a Raspberry Pi's memory).
MAX_CLASS_COUNT = 10_000_000
#: Seconds between two log lines about the hellos of one device.
HELLO_LOG_INTERVAL_S = 60.0


@dataclass
class Device:
    """What the server knows about one device (one entry of ``state.json`` ``devices``)."""

    device_id: str
    class_counts: np.ndarray  # int64 (num_classes,): samples per dataset class id
    memory_budget_mb: float  # 0 = no limit
    ram_mb: float = 0.0
    cores: int = 0
    platform: str = ""
    software_version: str = ""
    online: bool = True
    busy: bool = False
    last_seen: float = field(default_factory=time.time)
    missed: int = 0  # deadlines missed in a row (timeout or late); reset by a hello or an answer

    def to_json(self) -> dict:
        d = {k: v for k, v in vars(self).items() if k != "class_counts"}
        d["class_counts"] = self.class_counts.tolist()
        return d

    @classmethod
    def from_json(cls, d: dict) -> Device:
        """One ``state.json`` row; unknown keys are ignored. Raises ``TypeError``/``ValueError``/
        ``KeyError``/``OverflowError`` for a malformed row."""
        known = {f.name for f in fields(cls)}
        d = {k: v for k, v in dict(d).items() if k in known}
        if not isinstance(d["device_id"], str):
            raise TypeError("device_id is not a string")
        d["class_counts"] = np.asarray(d["class_counts"], dtype=np.int64)
        if d["class_counts"].ndim != 1:
            raise ValueError("class_counts is not a list of integers")
        return cls(**d)


class DeviceRegistry:
    """Devices of one run by id, updated from ``hello`` and ``status`` messages.

    Args:
        num_classes: classes of the run's dataset; a ``hello`` with another count is ignored
            (the device holds a shard of another dataset).
        clock: wall-clock time source (``last_seen``, log rate limit); tests pass a fake.
        max_class_count: a ``hello`` claiming more samples of one class is refused (logged):
            nobody's shard holds that, and such counts would decide the schedule.
        max_missed: a device that missed this many deadlines in a row (:meth:`on_missed`) is
            left out of :meth:`views` until it says hello again or answers (:meth:`on_answer`);
            ``0`` never drops a device.
        log_interval_s: at most one log line per device per this many seconds about its hellos
            (a device re-announcing itself in a loop cannot fill the log).
    """

    def __init__(self, num_classes: int, clock: Callable[[], float] = time.time, *,
                 max_class_count: int = MAX_CLASS_COUNT, max_missed: int = 3,
                 log_interval_s: float = HELLO_LOG_INTERVAL_S):
        self.num_classes = int(num_classes)
        self.clock = clock
        self.max_class_count = int(max_class_count)
        self.max_missed = int(max_missed)
        self.log_interval_s = float(log_interval_s)
        self.devices: dict[str, Device] = {}
        self._hello_log: dict[str, tuple[float, int]] = {}  # device -> (time of last line, hellos not logged)
        #: device -> clock time its last will arrived, while it stays offline (not saved).
        self.went_offline: dict[str, float] = {}

    @classmethod
    def from_json(cls, num_classes: int, rows: Iterable[dict], clock: Callable[[], float] = time.time,
                  **kwargs) -> DeviceRegistry:
        """The registry saved in ``state.json``; every device is offline until it speaks again.

        A malformed row is skipped with a warning (that device is added again by its next hello).
        """
        reg = cls(num_classes, clock, **kwargs)
        for i, d in enumerate(rows):
            try:
                dev = Device.from_json(d)
            except (TypeError, ValueError, KeyError, OverflowError, AttributeError) as e:
                logger.warning("state.json devices[%d] is malformed (%s: %s); skipped until that device says "
                               "hello again", i, type(e).__name__, e)
                continue
            dev.online = dev.busy = False
            reg.devices[dev.device_id] = dev
        return reg

    def to_json(self) -> list[dict]:
        """Devices sorted by id, as saved in ``state.json``."""
        return [d.to_json() for d in sorted(self.devices.values(), key=lambda d: d.device_id)]

    def __len__(self) -> int:
        return len(self.devices)

    def __contains__(self, device_id: object) -> bool:
        return device_id in self.devices

    def online(self) -> list[Device]:
        return [d for d in self.devices.values() if d.online]

    def returning(self, grace_s: float) -> list[str]:
        """Devices whose last will arrived less than ``grace_s`` ago and that have not spoken since.

        A broker restart sends the will of every connected device; they reconnect a few seconds
        later. The server waits for these before it plans a round without them.
        """
        now = self.clock()
        return sorted(dev for dev, t in self.went_offline.items()
                      if now - t < grace_s and dev in self.devices and not self.devices[dev].online
                      and not self.dropped(self.devices[dev]))

    def dropped(self, d: Device) -> bool:
        """``True`` if ``d`` missed too many deadlines in a row to be asked again (see ``max_missed``)."""
        return self.max_missed > 0 and d.missed >= self.max_missed

    def views(self) -> list[DeviceView]:
        """What the scheduler needs of every online device that is not dropped for missed deadlines."""
        return [DeviceView(d.device_id, d.class_counts, d.memory_budget_mb) for d in self.online()
                if not self.dropped(d)]

    def samples_under(self, device_id: str, label_map: np.ndarray) -> int:
        """Samples ``device_id`` announced for the classes ``label_map`` uses (``>= 0``); 0 if unknown.

        The bound of a result's ``num_examples`` (Python ints: no overflow).
        """
        d = self.devices.get(device_id)
        if d is None:
            return 0
        used = np.asarray(label_map)[: len(d.class_counts)] >= 0
        return sum(int(v) for v in d.class_counts[: len(used)][used])

    # ------------------------------------------------------------------ messages
    def _log_hello(self, device_id: str, level: int, msg: str, *args) -> None:
        """Log about a hello of ``device_id``, at most once per ``log_interval_s`` per device."""
        now = self.clock()
        last, skipped = self._hello_log.get(device_id, (-math.inf, 0))
        if now - last < self.log_interval_s:
            self._hello_log[device_id] = (last, skipped + 1)
            return
        if skipped:
            msg += " (%d more hello(s) from it in the last %.0f s not logged)"
            args += (skipped, now - last)
        self._hello_log[device_id] = (now, 0)
        logger.log(level, msg, *args)

    def check_hello(self, h: wire.Hello) -> str:
        """Why ``h`` is refused, or ``""`` if its facts are plausible."""
        counts = h.class_counts
        if len(counts) != self.num_classes:
            return f"reports {len(counts)} classes but the run has {self.num_classes} (wrong data shard?)"
        if counts.size and int(counts.max()) > self.max_class_count:
            c = int(np.argmax(counts))
            return (f"claims {int(counts[c])} samples of class {c}, more than the {self.max_class_count} a shard "
                    "may hold (schedule.max_class_count)")
        return ""

    def on_hello(self, h: wire.Hello) -> bool:
        """Add or refresh a device; ``False`` (and a rate-limited warning) if its hello is refused.

        A refused hello from a known device also takes that device out of scheduling (offline)
        until a plausible hello arrives.
        """
        why = self.check_hello(h)
        if why:
            self._log_hello(h.device_id, logging.WARNING, "device %s %s; hello refused", h.device_id, why)
            known = self.devices.get(h.device_id)
            if known is not None:
                known.online = known.busy = False
            return False
        self.went_offline.pop(h.device_id, None)
        known = h.device_id in self.devices
        self.devices[h.device_id] = Device(
            device_id=h.device_id, class_counts=np.asarray(h.class_counts, dtype=np.int64),
            memory_budget_mb=h.memory_budget_mb, ram_mb=h.ram_mb, cores=h.cores, platform=h.platform,
            software_version=h.software_version, online=True, last_seen=self.clock(),
        )
        self._log_hello(h.device_id, logging.INFO, "device %s %s: %d samples, budget %.0f MB, %s", h.device_id,
                        "re-announced" if known else "joined", sum(int(v) for v in h.class_counts),
                        h.memory_budget_mb, h.platform)
        return True

    def on_status(self, s: wire.Status) -> None:
        """Track online/offline/busy; a status from a device that never said hello is ignored."""
        d = self.devices.get(s.device_id)
        if d is None:
            return
        d.last_seen = self.clock()
        if s.state == "offline":
            if s.stopped:  # stopped on purpose: nothing to wait for
                if d.online:
                    logger.info("device %s stopped", s.device_id)
                self.went_offline.pop(s.device_id, None)
            elif d.online:
                logger.warning("device %s went offline", s.device_id)
                self.went_offline[s.device_id] = d.last_seen
            d.online = False
            d.busy = False
        else:
            self.went_offline.pop(s.device_id, None)
            d.online = True
            d.busy = s.state == "busy"

    def on_answer(self, device_id: str) -> None:
        """``device_id`` answered (a result, a refusal): its missed deadlines are forgiven."""
        d = self.devices.get(device_id)
        if d is None:
            return
        d.last_seen = self.clock()
        if self.dropped(d):
            logger.info("device %s answered again; it is asked again", device_id)
        d.missed = 0

    def on_missed(self, device_id: str) -> None:
        """``device_id`` missed a round's deadline; after ``max_missed`` in a row it is not asked again."""
        d = self.devices.get(device_id)
        if d is None:
            return
        d.missed += 1
        if self.max_missed > 0 and d.missed == self.max_missed:
            logger.warning("device %s missed %d deadlines in a row; not asked again until it says hello or answers "
                           "(schedule.max_missed_rounds)", device_id, d.missed)
