"""The aggregation server's device registry: who announced itself, who is online, what each holds.

Devices announce themselves with a retained :class:`~edgehmoe.fl.wire.Hello` (data per class,
memory budget, platform) and report their state with a retained
:class:`~edgehmoe.fl.wire.Status`; the broker publishes their last will (``offline``) when they
vanish. The registry keeps the facts the scheduler needs (:meth:`DeviceRegistry.views`) and is
saved in ``state.json`` (``devices``) at every commit. No I/O: the round runner
(:mod:`edgehmoe.server.rounds`) feeds it decoded messages.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import numpy as np
from edgehmoe.server.scheduler import DeviceView

from edgehmoe.fl import wire

__all__ = ["Device", "DeviceRegistry"]

logger = logging.getLogger(__name__)


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

    def to_json(self) -> dict:
        d = {k: v for k, v in vars(self).items() if k != "class_counts"}
        d["class_counts"] = self.class_counts.tolist()
        return d

    @classmethod
    def from_json(cls, d: dict) -> Device:
        d = dict(d)
        d["class_counts"] = np.asarray(d["class_counts"], dtype=np.int64)
        return cls(**d)


class DeviceRegistry:
    """Devices of one run by id, updated from ``hello`` and ``status`` messages.

    Args:
        num_classes: classes of the run's dataset; a ``hello`` with another count is ignored
            (the device holds a shard of another dataset).
        clock: wall-clock time source (``last_seen``); tests pass a fake.
    """

    def __init__(self, num_classes: int, clock: Callable[[], float] = time.time):
        self.num_classes = int(num_classes)
        self.clock = clock
        self.devices: dict[str, Device] = {}

    @classmethod
    def from_json(cls, num_classes: int, rows: Iterable[dict], clock: Callable[[], float] = time.time
                  ) -> DeviceRegistry:
        """The registry saved in ``state.json``; every device is offline until it speaks again."""
        reg = cls(num_classes, clock)
        for d in rows:
            dev = Device.from_json(d)
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

    def views(self) -> list[DeviceView]:
        """What the scheduler needs of every online device."""
        return [DeviceView(d.device_id, d.class_counts, d.memory_budget_mb) for d in self.online()]

    def on_hello(self, h: wire.Hello) -> bool:
        """Add or refresh a device; ``False`` (and a warning) if its shard has the wrong classes."""
        if len(h.class_counts) != self.num_classes:
            logger.warning("device %s reports %d classes but the run has %d; ignored (wrong data shard?)",
                           h.device_id, len(h.class_counts), self.num_classes)
            return False
        known = h.device_id in self.devices
        self.devices[h.device_id] = Device(
            device_id=h.device_id, class_counts=np.asarray(h.class_counts, dtype=np.int64),
            memory_budget_mb=h.memory_budget_mb, ram_mb=h.ram_mb, cores=h.cores, platform=h.platform,
            software_version=h.software_version, online=True, last_seen=self.clock(),
        )
        logger.info("device %s %s: %d samples, budget %.0f MB, %s", h.device_id, "re-announced" if known else "joined",
                    int(h.class_counts.sum()), h.memory_budget_mb, h.platform)
        return True

    def on_status(self, s: wire.Status) -> None:
        """Track online/offline/busy; a status from a device that never said hello is ignored."""
        d = self.devices.get(s.device_id)
        if d is None:
            return
        d.last_seen = self.clock()
        if s.state == "offline":
            if d.online:
                logger.warning("device %s went offline", s.device_id)
            d.online = False
            d.busy = False
        else:
            d.online = True
            d.busy = s.state == "busy"
