"""The one memory meter (:mod:`edgehmoe.measure.meter`): a block that allocates and touches a
known number of MB must measure that many, through each of its three peak sources — the
reset kernel high-water mark (VmHWM), the psutil sampler alone, and getrusage where there is
no /proc — and the process helpers must agree with the kernel's own numbers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from edgehmoe.measure import meter
from edgehmoe.measure.meter import RoundMeter

MB = 2**20
ALLOC_MB = 100
# The block may also hold a few MB of its own (numpy temporaries, page tables, thread stack).
TOLERANCE_MB = 8


def _touch(n_mb: int, hold_s: float = 0.0) -> None:
    a = np.ones(n_mb * MB, dtype=np.uint8)  # np.ones writes every page: all of it is resident
    time.sleep(hold_s)
    del a


def test_round_memory_of_a_known_allocation_via_the_high_water_mark(monkeypatch):
    # Prepare: no psutil samples inside the block, so only VmHWM can see the peak
    if not meter.reset_peak():
        pytest.skip("this kernel does not let the process reset its high-water mark")
    monkeypatch.setattr(RoundMeter, "_sample", lambda self: None)
    # Execute
    with RoundMeter() as m:
        _touch(ALLOC_MB)  # freed again before the block ends: only a peak reading sees it
    r = m.result
    # Assert
    assert r.hwm_used
    assert ALLOC_MB - 1 <= r.round_mem_mb <= ALLOC_MB + TOLERANCE_MB
    assert r.peak_rss_mb == pytest.approx(r.rss_before_mb + r.round_mem_mb)
    assert r.round_time_ms > 0


def test_round_memory_of_a_known_allocation_via_psutil_samples(monkeypatch):
    # Prepare: no kernel peak at all (as on a system without /proc or getrusage)
    monkeypatch.setattr(meter, "peak_rss_mb", lambda: None)
    # Execute
    with RoundMeter(interval_s=0.002) as m:
        _touch(ALLOC_MB, hold_s=0.2)  # held long enough for many 2 ms samples
    r = m.result
    # Assert
    assert not r.hwm_used
    assert ALLOC_MB - 1 <= r.round_mem_mb <= ALLOC_MB + TOLERANCE_MB


def test_getrusage_fallback_without_proc(monkeypatch, tmp_path):
    # Prepare: point the meter at a /proc that does not exist
    import resource

    monkeypatch.setattr(meter, "_PROC", tmp_path / "no-proc")
    # Execute
    peak = meter.peak_rss_mb()
    reset = meter.reset_peak()
    rss = meter.rss_mb()  # psutil instead of VmRSS
    # Assert
    maxrss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (MB if sys.platform == "darwin" else 1024)
    assert peak is not None and peak > 0
    assert peak == pytest.approx(maxrss_mb, abs=1.0)
    assert not reset
    assert rss > 0 and rss == pytest.approx(meter._psutil().Process().memory_info().rss / MB, abs=5.0)


def test_round_meter_uses_getrusage_when_it_rises_during_the_block():
    # A fresh interpreter, so that the allocation raises the process's lifetime peak (which
    # getrusage cannot reset); no psutil samples inside the block, no /proc. Linux carries
    # ru_maxrss across fork + exec (a python started by this process would begin with the
    # test process's peak), so the child is forked by a small shell instead.
    code = textwrap.dedent(f"""
        import json
        from pathlib import Path
        import numpy as np
        from edgehmoe.measure import meter
        meter._PROC = Path("/nonexistent-proc")
        meter.RoundMeter._sample = lambda self: None
        with meter.RoundMeter() as m:
            a = np.ones({ALLOC_MB} * 2**20, dtype=np.uint8)
            del a
        print(json.dumps(m.result.to_dict()))
    """)
    # Execute
    p = subprocess.run(["/bin/sh", "-c", '"$@"; exit $?', "sh", sys.executable, "-c", code],
                       capture_output=True, text=True, timeout=120)
    # Assert
    assert p.returncode == 0, p.stderr

    r = json.loads(p.stdout.strip().splitlines()[-1])
    assert r["hwm_used"], r
    assert ALLOC_MB - 1 <= r["round_mem_mb"] <= ALLOC_MB + TOLERANCE_MB


def test_process_helpers_agree_with_the_kernel():
    # Prepare: a child that holds a known amount of memory
    child = subprocess.Popen(
        [sys.executable, "-c", f"import sys, numpy as np; a = np.ones({ALLOC_MB} * 2**20, dtype=np.uint8); "
                               "print('ready', flush=True); sys.stdin.read()"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )
    try:
        assert child.stdout.readline().strip() == "ready"
        # Execute
        held = meter.process_mem_mb(child.pid)
    finally:
        child.stdin.close()
        child.wait(timeout=60)
    gone = meter.process_mem_mb(child.pid)
    # Assert
    assert held is not None and held >= ALLOC_MB
    assert gone is None
    own = meter.process_mem_mb(os.getpid())
    assert own is not None and own >= meter.rss_mb() - 1.0  # max(VmRSS, VmHWM) >= VmRSS
    assert meter.peak_rss_mb() >= meter.rss_mb() - 1.0


def test_release_free_memory_reports_glibc():
    # glibc's malloc_trim exists on this Linux; elsewhere the call is a harmless no-op.
    import platform

    expected = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"
    assert meter.release_free_memory() is expected
