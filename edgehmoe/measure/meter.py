"""Per-round time and memory of this process, measured the way a device reports them.

Definitions (also in docs/design.md):

- ``round_time_ms``: wall time of the measured block (local training: data loading,
  forward, backward, optimiser step), excluding network transfer.
- ``round_mem_mb``: peak resident set size (RSS) during the block minus RSS just before it.
  The peak is the maximum of psutil samples taken by a background thread every few
  milliseconds and, on Linux, of the kernel's high-water mark ``VmHWM``, which is reset at
  the start of the block through ``/proc/self/clear_refs`` where permitted.
- ``peak_rss_mb``: the absolute peak RSS during the block.
"""

from __future__ import annotations

import logging
import os
import platform
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from edgehmoe.errors import MissingDependency

__all__ = ["RoundMeasurement", "RoundMeter", "rss_mb", "device_facts", "release_free_memory"]

logger = logging.getLogger(__name__)
_MB = 1024.0 * 1024.0


def _psutil():
    try:
        import psutil
    except ImportError as e:  # pragma: no cover - depends on install
        raise MissingDependency("measuring rounds needs psutil: pip install 'edgehmoe[edge]'") from e
    return psutil


def rss_mb() -> float:
    return _psutil().Process().memory_info().rss / _MB


def _read_hwm_mb() -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return float(line.split()[1]) / 1024.0
    except OSError:
        return None
    return None


def release_free_memory() -> bool:
    """Return freed heap memory to the OS (glibc ``malloc_trim``), so the next measurement
    starts from the idle process and not from what an earlier, larger round left cached."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        libc.malloc_trim(0)
        return True
    except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to do
        return False


def _reset_hwm() -> bool:
    # Writing "5" to clear_refs resets the peak RSS counter (Linux >= 4.0).
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


@dataclass
class RoundMeasurement:
    round_time_ms: float
    round_mem_mb: float
    peak_rss_mb: float
    rss_before_mb: float
    hwm_used: bool  # whether the kernel high-water mark contributed

    def to_dict(self) -> dict:
        return asdict(self)


class RoundMeter:
    """Context manager measuring wall time and peak RSS of a block.

    >>> with RoundMeter() as m:
    ...     work()
    >>> m.result.round_time_ms
    """

    def __init__(self, interval_s: float = 0.002):
        self.interval_s = interval_s
        self.result: RoundMeasurement | None = None
        self._proc = _psutil().Process()
        self._stop = threading.Event()
        self._peak = 0

    def _sample(self) -> None:
        while not self._stop.is_set():
            try:
                rss = self._proc.memory_info().rss
            except Exception:  # pragma: no cover - process vanishing is not our concern here
                return
            if rss > self._peak:
                self._peak = rss
            self._stop.wait(self.interval_s)

    def __enter__(self) -> "RoundMeter":
        import gc

        gc.collect()
        release_free_memory()
        self._hwm_reset = _reset_hwm()
        self._before = self._proc.memory_info().rss
        self._peak = self._before
        self._thread = threading.Thread(target=self._sample, name="rss-sampler", daemon=True)
        self._thread.start()
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        elapsed = time.perf_counter() - self._t0
        self._stop.set()
        self._thread.join()
        peak = max(self._peak, self._proc.memory_info().rss)
        hwm_used = False
        if self._hwm_reset:
            hwm = _read_hwm_mb()
            if hwm is not None and hwm * _MB > peak:
                peak = int(hwm * _MB)
                hwm_used = True
        self.result = RoundMeasurement(
            round_time_ms=elapsed * 1000.0,
            round_mem_mb=max(0.0, (peak - self._before) / _MB),
            peak_rss_mb=peak / _MB,
            rss_before_mb=self._before / _MB,
            hwm_used=hwm_used,
        )


def device_facts() -> dict:
    """RAM, cores and platform of this device (for the hello message)."""
    psutil = _psutil()
    return {
        "ram_mb": psutil.virtual_memory().total / _MB,
        "available_mb": psutil.virtual_memory().available / _MB,
        "cores": os.cpu_count() or 1,
        "platform": f"{platform.system()}-{platform.machine()}",
    }
