"""Entry point of the fresh child processes that the profiler and the inference bench start.

Every measurement runs in a new process, so each starts from the same clean baseline and no
model sees memory an earlier one left behind::

    python -m edgehmoe.measure.worker train-round JOBJSON   # one measured client round (torch)
    python -m edgehmoe.measure.worker inference CFGJSON     # one model's inference bench (no torch)

The child prints exactly one line, :data:`edgehmoe.measure.limits.RESULT_TAG` followed by
``{"ok": true, ...the job's result...}`` or ``{"ok": false, "error": "..."}``, and leaves with
``os._exit`` without interpreter teardown: unloading torch (at least its CUDA build) maps
~150 MB more at exit, which a memory limit would wrongly charge to the job. The parent starts
it with :func:`worker_command` and :func:`worker_env` and collects the line with
:func:`edgehmoe.measure.limits.run_child`.

This module imports nothing heavy itself: a job imports what it measures (torch or
onnxruntime) as part of the child's baseline.
"""

from __future__ import annotations

import importlib
import json
import os
import sys
import traceback
from pathlib import Path
from typing import NoReturn

from edgehmoe.errors import EdgeHmoeError, UsageError
from edgehmoe.measure.limits import RESULT_TAG

__all__ = ["JOBS", "main", "run_job", "worker_command", "worker_env"]

_MODULE = "edgehmoe.measure.worker"  # not __name__, which is "__main__" under python -m

# Job kind -> (module, function taking the job dict and returning a JSON-able dict).
JOBS = {
    "train-round": ("edgehmoe.measure.profile", "train_round_job"),
    "inference": ("edgehmoe.measure.bench_inference", "inference_job"),
}


def worker_command(kind: str, job: dict) -> list[str]:
    """The command line that runs job ``kind`` with ``job`` in a fresh interpreter."""
    _check_kind(kind)
    return [sys.executable, "-m", _MODULE, kind, json.dumps(job)]


def _check_kind(kind: str) -> None:
    if kind not in JOBS:
        raise UsageError(f"unknown worker job {kind!r}; valid: {', '.join(JOBS)}")


def worker_env(base: dict | None = None) -> dict:
    """``base`` (default: this process's environment) with the folder holding this very
    ``edgehmoe`` package first on ``PYTHONPATH``, so the child imports the same code as the
    parent, also from a checkout that is not pip-installed."""
    env = dict(os.environ if base is None else base)
    here = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = here + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def _finish(result: dict) -> NoReturn:
    print(RESULT_TAG + json.dumps(result), flush=True)
    sys.stderr.flush()
    os._exit(0 if result.get("ok") else 1)


def run_job(kind: str, job: dict | str) -> NoReturn:
    """Run one job, print its tagged result line and end the process (never returns: call it
    only in a child process)."""
    try:
        if isinstance(job, str):
            job = json.loads(job)
        _check_kind(kind)
        module, func = JOBS[kind]
        out = getattr(importlib.import_module(module), func)(job)
        result = {"ok": True, **out}
    except Exception as e:  # report, the parent prints one line
        if not isinstance(e, (EdgeHmoeError, OSError)):
            traceback.print_exc()  # a bug: keep the traceback on stderr for the parent to show
        result = {"ok": False, "error": f"{type(e).__name__}: {e}"}
    _finish(result)


def main(argv: list[str] | None = None) -> NoReturn:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2:
        print(f"usage: python -m {_MODULE} {{{','.join(JOBS)}}} JOBJSON", file=sys.stderr)
        sys.exit(2)
    run_job(argv[0], argv[1])


if __name__ == "__main__":
    main()
