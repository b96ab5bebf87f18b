"""One measured client round: what the device client runs per task and the profiler measures.

:func:`measured_local_round` is :func:`edgehmoe.model.training.local_round` inside the one
:class:`~edgehmoe.measure.meter.RoundMeter`, so a device's reported ``round_time_ms`` /
``round_mem_mb`` and the profiler's Table 1 are the same measurement of the same code.
"""

from __future__ import annotations

from edgehmoe.measure.meter import RoundMeasurement, RoundMeter

__all__ = ["measured_local_round"]


def measured_local_round(*args, **kwargs):
    """:func:`~edgehmoe.model.training.local_round` (same arguments) inside a
    :class:`RoundMeter`. Returns ``(RoundOutput, RoundMeasurement)``."""
    from edgehmoe.model.training import local_round

    with RoundMeter() as meter:
        out = local_round(*args, **kwargs)
    result: RoundMeasurement = meter.result
    return out, result
