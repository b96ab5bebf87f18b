"""Run a job in a fresh child process, optionally under a memory limit for the whole process.

A child is any command that prints its result as one line ``RESULT_TAG + json`` on stdout
(:mod:`edgehmoe.measure.worker` does). :func:`run_child` starts it, enforces the limit and a
timeout, and returns a :class:`ChildOutcome`: the parsed result, whether the limit killed it
and at how many MB.

Limits, in the order ``limit_mechanism("auto")`` tries them:

1. ``cgroup``: a cgroup v2 child group with ``memory.max = M`` and ``memory.swap.max = 0`` in a
   writable cgroup v2 directory whose ``cgroup.subtree_control`` enables ``memory``; a kill is
   read from ``memory.events`` (``oom_kill``).
2. ``systemd``: ``systemd-run --scope -p MemoryMax=M -p MemorySwapMax=0``.
3. ``watchdog``: the parent polls the child's RSS and kernel high-water mark
   (:func:`edgehmoe.measure.meter.process_mem_mb`) every 2 ms and sends SIGKILL above M.

``setrlimit(RLIMIT_AS)`` is not used: torch reserves far more address space than it touches,
so it fails at import under any realistic limit.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from edgehmoe.errors import RunError
from edgehmoe.measure.meter import PROCESS_MEM_SOURCE, process_mem_mb

__all__ = [
    "RESULT_TAG",
    "ChildOutcome",
    "LimitError",
    "Mechanism",
    "limit_mechanism",
    "parse_result",
    "run_child",
]

logger = logging.getLogger(__name__)

#: Prefix of the one stdout line a child prints its JSON result on.
RESULT_TAG = "EDGEHMOE_PROFILE_RESULT "
_MB = 1024.0 * 1024.0
_WATCHDOG_INTERVAL_S = 0.002


class LimitError(RunError):
    """A memory limit that cannot be set up here; the message names the mechanism to use instead."""


@dataclass
class Mechanism:
    """How a memory limit is enforced on a child."""

    kind: str  # "cgroup" | "systemd" | "watchdog"
    description: str
    cgroup_parent: Path | None = None


def _cgroup2_parent() -> Path | None:
    """A writable cgroup v2 directory whose children may use the memory controller."""
    try:
        mounts = [ln.split() for ln in Path("/proc/mounts").read_text().splitlines()]
    except OSError:
        return None
    own = ""
    try:
        for ln in Path("/proc/self/cgroup").read_text().splitlines():
            if ln.startswith("0::"):
                own = ln[3:].strip().lstrip("/")
    except OSError:
        pass
    for f in mounts:
        if len(f) < 3 or f[2] != "cgroup2":
            continue
        root = Path(f[1])
        # Children of our own cgroup first; the root is exempt from the no-internal-process rule.
        for cand in ([root / own] if own else []) + [root]:
            try:
                enabled = (cand / "cgroup.subtree_control").read_text().split()
            except OSError:
                continue
            if "memory" in enabled and os.access(cand, os.W_OK):
                return cand
    return None


def limit_mechanism(choice: str = "auto") -> Mechanism:
    """Pick how to enforce a memory limit; raises :class:`LimitError` if ``choice`` is unavailable."""
    if choice in ("auto", "cgroup"):
        parent = _cgroup2_parent()
        if parent is not None:
            return Mechanism("cgroup", f"cgroup v2 memory.max (child groups under {parent})", parent)
        if choice == "cgroup":
            raise LimitError(
                "no writable cgroup v2 hierarchy with the memory controller enabled in "
                "cgroup.subtree_control; use --limit-mechanism watchdog"
            )
    if choice in ("auto", "systemd"):
        if shutil.which("systemd-run") and Path("/run/systemd/system").is_dir():
            return Mechanism("systemd", "systemd-run --scope -p MemoryMax=M -p MemorySwapMax=0")
        if choice == "systemd":
            raise LimitError("systemd-run is not usable here (systemd is not running); use --limit-mechanism watchdog")
    return Mechanism(
        "watchdog",
        f"RSS watchdog: the parent reads the child's {PROCESS_MEM_SOURCE} every "
        f"{_WATCHDOG_INTERVAL_S * 1000:g} ms and sends SIGKILL above the limit",
    )


@dataclass
class ChildOutcome:
    returncode: int | None
    result: dict | None  # the child's JSON line, if it printed one
    stderr_tail: str
    killed: bool = False  # killed by the memory limit
    killed_at_mb: float | None = None
    timed_out: bool = False
    extra: dict = field(default_factory=dict)
    stderr: str = ""  # all the child wrote to stderr


def parse_result(stdout: str) -> dict | None:
    """The JSON result a child printed after :data:`RESULT_TAG` (the last such line), or None."""
    result = None
    for ln in stdout.splitlines():
        if ln.startswith(RESULT_TAG):
            try:
                result = json.loads(ln[len(RESULT_TAG):])
            except json.JSONDecodeError:
                result = None
    return result


def run_child(
    cmd: list[str],
    env: dict | None = None,
    limit_mb: float | None = None,
    mechanism: Mechanism | None = None,
    timeout_s: float | None = 1800.0,
) -> ChildOutcome:
    """Run ``cmd``; optionally under a memory limit; collect its tagged JSON result line.

    ``timeout_s=None`` waits for as long as the child runs.
    """
    cg: Path | None = None
    if limit_mb is not None and mechanism is None:
        mechanism = limit_mechanism("auto")
    if limit_mb is not None and mechanism.kind == "cgroup":
        cg = mechanism.cgroup_parent / f"edgehmoe-profile-{os.getpid()}-{threading.get_ident()}-{time.monotonic_ns()}"
        try:
            cg.mkdir()
            (cg / "memory.max").write_text(str(int(limit_mb * _MB)))
            if (cg / "memory.swap.max").exists():
                (cg / "memory.swap.max").write_text("0")
        except OSError as e:
            if cg.is_dir():
                _cgroup_finish(cg)
            raise LimitError(f"cannot set up cgroup {cg}: {e}; use --limit-mechanism watchdog") from None
        # Move the shell into the group, then exec the child: no preexec_fn in a threaded parent.
        cmd = ["/bin/sh", "-c", 'echo $$ > "$0/cgroup.procs" && exec "$@"', str(cg)] + cmd
    elif limit_mb is not None and mechanism.kind == "systemd":
        cmd = ["systemd-run", "--scope", "--quiet", "--collect", "-p", f"MemoryMax={int(limit_mb * _MB)}",
               "-p", "MemorySwapMax=0", "--"] + cmd
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, env=env, stdin=subprocess.DEVNULL)
        killed_at = None
        timed_out = False
        t0 = time.monotonic()
        try:
            if limit_mb is not None and mechanism.kind == "watchdog":
                while proc.poll() is None:
                    mem = process_mem_mb(proc.pid)
                    if mem is not None and mem > limit_mb:
                        proc.send_signal(signal.SIGKILL)
                        killed_at = mem
                        break
                    if timeout_s is not None and time.monotonic() - t0 > timeout_s:
                        proc.kill()
                        timed_out = True
                        break
                    time.sleep(_WATCHDOG_INTERVAL_S)
                proc.wait()
            else:
                try:
                    proc.wait(timeout=timeout_s)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
                    timed_out = True
        except BaseException:
            proc.kill()
            proc.wait()
            raise
        finally:
            extra: dict = {}
            if cg is not None:
                extra = _cgroup_finish(cg)
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    result = parse_result(stdout)
    killed = killed_at is not None
    if limit_mb is not None and mechanism.kind == "cgroup" and extra.get("oom_kill", 0) > 0:
        killed = True
        killed_at = extra.get("peak_mb") or limit_mb
    if limit_mb is not None and mechanism.kind == "systemd" and proc.returncode in (-9, 137) and result is None:
        killed = True
        killed_at = limit_mb
    tail = [ln for ln in stderr.strip().splitlines() if ln.strip()]
    return ChildOutcome(proc.returncode, result, tail[-1] if tail else "", killed, killed_at, timed_out, extra, stderr)


def _cgroup_finish(cg: Path) -> dict:
    info: dict = {}
    try:
        for ln in (cg / "memory.events").read_text().splitlines():
            k, v = ln.split()
            info[k] = int(v)
        if (cg / "memory.peak").exists():
            info["peak_mb"] = int((cg / "memory.peak").read_text().strip()) / _MB
    except (OSError, ValueError):
        pass
    for _ in range(50):  # the group can only be removed once the kernel has reaped the child
        try:
            cg.rmdir()
            break
        except OSError:
            time.sleep(0.02)
    return info
