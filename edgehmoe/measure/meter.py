"""The one memory and time meter: what a round (or any block) of this process costs.

Everything in edgehmoe that reads resident memory goes through this module: the device client
(:func:`edgehmoe.measure.rounds.measured_local_round`), the per-round profiler
(:mod:`edgehmoe.measure.profile`), the memory-limit watchdog (:mod:`edgehmoe.measure.limits`)
and the inference bench (:mod:`edgehmoe.measure.bench_inference`).

Definitions (also in docs/design.md):

- ``round_time_ms``: wall time of the measured block (local training: data loading,
  forward, backward, optimiser step), excluding network transfer.
- ``round_mem_mb``: peak resident set size (RSS) during the block minus RSS just before it.
  The peak is the maximum of psutil samples taken by a background thread every few
  milliseconds and of the kernel's high-water mark: on Linux ``VmHWM`` from
  ``/proc/self/status``, reset at the start of the block through ``/proc/self/clear_refs``
  where permitted; without ``/proc`` (macOS) ``getrusage``'s ``ru_maxrss``, which cannot be
  reset and so counts only when it rose during the block.
- ``peak_rss_mb``: the absolute peak RSS during the block.

Before the "before" reading the meter runs ``gc.collect()`` and glibc ``malloc_trim(0)``
(:func:`release_free_memory`), so memory an earlier, larger block left cached in the
allocator does not hide this block's need.
"""

from __future__ import annotations

import logging
import os
import platform
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from edgehmoe.errors import MissingDependency

__all__ = [
    "PROCESS_MEM_SOURCE",
    "RoundMeasurement",
    "RoundMeter",
    "device_facts",
    "peak_rss_mb",
    "process_mem_mb",
    "release_free_memory",
    "reset_peak",
    "rss_mb",
]

logger = logging.getLogger(__name__)
_MB = 1024.0 * 1024.0
# Where the kernel's per-process counters live; a module attribute so tests can point it at
# an empty folder and exercise the fallbacks of a system without /proc.
_PROC = Path("/proc")

#: What :func:`process_mem_mb` reads of another process (named in the limit watchdog's description).
PROCESS_MEM_SOURCE = "VmRSS and kernel high-water mark VmHWM"


def _psutil():
    try:
        import psutil
    except ImportError as e:  # pragma: no cover - depends on install
        raise MissingDependency("measuring rounds needs psutil: pip install 'edgehmoe[edge]'") from e
    return psutil


def _status_mb(pid: int | str, *keys: str) -> float | None:
    """Largest of the ``keys`` fields (kB) of ``/proc/PID/status`` in MB; None without /proc.

    Raises FileNotFoundError when /proc exists but the process does not (it has exited).
    """
    path = _PROC / str(pid) / "status"
    if not _PROC.is_dir():
        return None
    value: float | None = None
    with open(path) as f:
        for line in f:
            if line.startswith(keys):
                v = float(line.split()[1]) / 1024.0
                value = v if value is None else max(value, v)
    return value


def rss_mb() -> float:
    """Resident set size of this process now, in MB (``VmRSS``; psutil where there is no /proc)."""
    try:
        v = _status_mb("self", "VmRSS:")
    except OSError:
        v = None
    if v is not None:
        return v
    return _psutil().Process().memory_info().rss / _MB


def _maxrss_mb() -> float | None:
    """``getrusage(RUSAGE_SELF).ru_maxrss`` in MB: the process's lifetime peak RSS.

    It cannot be reset, and Linux even carries it across fork + exec (a child starts with its
    parent's peak at the time of the fork), so it tells about a block only if it rises.
    """
    try:
        import resource
    except ImportError:  # pragma: no cover - Windows
        return None
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # Linux and the BSDs report kilobytes, macOS bytes.
    return r / _MB if sys.platform == "darwin" else r / 1024.0


def peak_rss_mb() -> float | None:
    """Peak RSS of this process in MB: the kernel high-water mark ``VmHWM`` (since the last
    :func:`reset_peak`), or ``getrusage``'s lifetime ``ru_maxrss`` without /proc; None if
    the system offers neither."""
    try:
        v = _status_mb("self", "VmHWM:")
    except OSError:
        v = None
    return v if v is not None else _maxrss_mb()


def reset_peak() -> bool:
    """Reset the kernel's high-water mark to the current RSS; False where not permitted.

    Writing "5" to ``/proc/self/clear_refs`` resets the peak RSS counter (Linux >= 4.0).
    """
    try:
        with open(_PROC / "self" / "clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


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


def process_mem_mb(pid: int) -> float | None:
    """max(VmRSS, VmHWM) of process ``pid`` in MB (Linux), its psutil RSS elsewhere; None
    once it has exited. The high-water mark is monotonic, so a poller sees spikes that
    happened between two polls."""
    if _PROC.is_dir():
        try:
            v = _status_mb(pid, "VmRSS:", "VmHWM:")
            return 0.0 if v is None else v  # a zombie has no memory fields left
        except FileNotFoundError:
            return None
        except OSError:  # not permitted: ask psutil
            pass
    try:
        import psutil

        return psutil.Process(pid).memory_info().rss / _MB
    except Exception:  # no psutil, or the process is gone
        return None


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
        self._hwm_reset = reset_peak()
        self._hwm_start = peak_rss_mb()
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
        hwm = peak_rss_mb()
        # A reset high-water mark is this block's peak. One that could not be reset (no
        # clear_refs permission, or getrusage without /proc) is the process's lifetime peak:
        # it says something about this block only if it rose during it.
        if hwm is not None and (self._hwm_reset or (self._hwm_start is not None and hwm > self._hwm_start)):
            if hwm * _MB > peak:
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
