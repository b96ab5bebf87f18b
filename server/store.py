"""The run directory of a federated training job: committed state, metrics and weight files.

::

    runs/NAME/
      config.toml                         # the resolved configuration of the run
      state.json                          # the commit point: round, files, credits, devices, ...
      metrics.jsonl                       # one JSON row per committed round
      experts/<node>.r<k>.safetensors     # weights after k rounds (flat.r<k>... for the flat model)
      model.json                          # makes the run directory a model directory

A round is committed in this order (:meth:`RunStore.commit`): new weights go to *new* files
(never over the previous round's), a row is appended to ``metrics.jsonl`` (fsync), then
``state.json`` is replaced atomically (temp file, fsync, rename) — the commit point — and
``model.json`` is rewritten; only then are the previous files of the updated experts removed.
A crash at any instant leaves the last committed round intact; :meth:`RunStore.resume` drops
what an interrupted round left behind (rows and weight files past the commit) so no round is
lost or repeated. See docs/design.md, "Federated round".

Every file is checked when it is read back, and each problem is one :class:`RunDirError` that
names the file and the fix (no traceback): a ``state.json`` that is not an object or lacks a
key, a weight file that is not safetensors or holds NaN/inf, a metrics row that is not JSON. A
torn last line of ``metrics.jsonl`` (a crash mid-append) is repaired on ``--resume`` with a log
line. A new run refuses a directory that holds something else (a model directory, other
files), and ``--resume`` refuses a run directory of another run.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
from edgehmoe.server.scheduler import FLAT

from edgehmoe import __version__
from edgehmoe.core.checkpoint import (
    MODEL_JSON,
    ModelDir,
    NetworkEntry,
    atomic_write_bytes,
    contiguous_arrays,
)
from edgehmoe.core.hierarchy import Hierarchy
from edgehmoe.errors import EdgeHmoeError

__all__ = ["STATE_VERSION", "ModelInfo", "RunDirError", "RunState", "RunStore", "weights_file"]

logger = logging.getLogger(__name__)

STATE_VERSION = 1

Weights = dict[str, np.ndarray]


def dump_state_json(obj: dict) -> bytes:
    """``state.json`` text: one top-level key per line and one device per line.

    ``json.dumps(indent=...)`` runs the pure-Python encoder, 270 ms per commit for 1,000 devices
    with 100 class counts each (issue #12); each line here goes through the C encoder (~10 ms).
    """
    lines = []
    for key, value in obj.items():
        if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            body = "[\n" + ",\n".join("  " + json.dumps(v) for v in value) + "\n ]"
        else:
            body = json.dumps(value)
        lines.append(f" {json.dumps(key)}: {body}")
    return ("{\n" + ",\n".join(lines) + "\n}\n").encode()


class RunDirError(EdgeHmoeError, ValueError):
    """The run directory exists without --resume, or cannot be resumed."""


def weights_file(node: int, rounds_done: int) -> str:
    """Relative path of ``node``'s weights after ``rounds_done`` rounds (``experts/3.r5.safetensors``)."""
    return f"experts/{'flat' if node == FLAT else node}.r{rounds_done}.safetensors"


@dataclass
class RunState:
    """What ``state.json`` holds: everything needed to continue the run after the last commit."""

    run: str
    kind: str  # hmoe | flat
    round: int  # rounds committed = the next round to run
    rounds: int  # rounds the run is configured for
    mean: list[float]  # input normalisation (per channel), sent with every task
    std: list[float]
    files: dict[int, str] = field(default_factory=dict)  # node -> committed weights file (relative)
    credits: dict[int, float] = field(default_factory=dict)  # scheduler round-robin credits
    visits: dict[int, int] = field(default_factory=dict)  # node -> rounds in which it was updated
    devices: list[dict] = field(default_factory=list)  # DeviceRegistry.to_json()

    def to_json(self) -> dict:
        return {
            "state_version": STATE_VERSION,
            "run": self.run,
            "kind": self.kind,
            "round": self.round,
            "rounds": self.rounds,
            "mean": self.mean,
            "std": self.std,
            "files": {str(k): v for k, v in self.files.items()},
            "credits": {str(k): v for k, v in self.credits.items()},
            "visits": {str(k): v for k, v in self.visits.items()},
            "devices": self.devices,
            "software_version": __version__,
            "updated_unix": time.time(),
        }

    @classmethod
    def from_json(cls, d: dict, path: Path | str = "state.json") -> RunState:
        if not isinstance(d, dict):
            raise RunDirError(f"{path} holds a JSON {type(d).__name__}, not an object; restore it from a backup "
                              "or start a new run")
        if d.get("state_version") != STATE_VERSION:
            raise RunDirError(f"{path}: state_version {d.get('state_version')} is not {STATE_VERSION}; "
                              "this run was written by another edgehmoe version (start a new run)")
        missing = [k for k in ("kind", "round", "mean", "std", "files") if k not in d]
        if missing:
            raise RunDirError(f"{path} lacks the key(s) {', '.join(missing)}; restore it from a backup or start a "
                              "new run")
        try:
            state = cls(
                run=str(d.get("run", "")), kind=d["kind"], round=_int(d["round"]), rounds=_int(d.get("rounds", 0)),
                mean=[float(v) for v in d["mean"]], std=[float(v) for v in d["std"]],
                files={int(k): v for k, v in _obj(d["files"]).items()},
                credits={int(k): float(v) for k, v in _obj(d.get("credits", {})).items()},
                visits={int(k): _int(v) for k, v in _obj(d.get("visits", {})).items()},
                devices=list(d.get("devices", [])),
            )
        except (KeyError, TypeError, ValueError, OverflowError, AttributeError) as e:
            raise RunDirError(f"{path} is malformed ({type(e).__name__}: {e}); restore it from a backup or start "
                              "a new run") from None
        bad = [f for f in state.files.values()
               if not isinstance(f, str) or not f.startswith("experts/") or ".." in Path(f).parts]
        if state.kind not in ("hmoe", "flat") or state.round < 0 or bad:
            what = f"files {bad[:3]!r} outside experts/" if bad else f"kind {state.kind!r} / round {state.round}"
            raise RunDirError(f"{path} is malformed ({what}); restore it from a backup or start a new run")
        return state


def _int(v: object) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or v != int(v):
        raise TypeError(f"{v!r} is not an integer")
    return int(v)


def _obj(v: object) -> dict:
    if not isinstance(v, dict):
        raise TypeError(f"expected an object, got {type(v).__name__}")
    return v


@dataclass
class ModelInfo:
    """What ``model.json`` says besides the weight files and the normalisation."""

    tree: Hierarchy
    input_size: int
    dataset: str
    specs: dict[int, dict]  # node -> ArchSpec.to_dict()
    params: dict[int, int]  # node -> parameter count


class RunStore:
    """Reads and writes one run directory (see the module docstring for the layout and commit order).

    Args:
        out: the run directory.
        model: what ``model.json`` describes; needed by :meth:`create`, :meth:`resume` and
            :meth:`commit`.
    """

    def __init__(self, out: str | Path, model: ModelInfo | None = None):
        self.out = Path(out)
        self.model = model

    @property
    def state_path(self) -> Path:
        return self.out / "state.json"

    @property
    def metrics_path(self) -> Path:
        return self.out / "metrics.jsonl"

    #: What a run directory may hold before its ``state.json`` exists (a creation interrupted
    #: before its commit, the dashboard's live file, temp files of atomic writes).
    FRESH_ENTRIES = ("experts", "config.toml", "metrics.jsonl", "live.json")

    def check(self, resume: bool, run: str | None = None) -> None:
        """Refuse to start over an existing run or into a directory that holds something else, or
        to resume a missing run or another run (``run``: the configured run name) (:class:`RunDirError`)."""
        if self.out.exists() and not self.out.is_dir():
            raise RunDirError(f"run.out {self.out} is a file, not a directory; choose another out")
        if self.state_path.exists() and not resume:
            raise RunDirError(f"{self.out} already holds a run; pass --resume to continue it, or choose another out")
        if resume and not self.state_path.exists():
            raise RunDirError(f"cannot resume: {self.state_path} does not exist (start the run without --resume)")
        if not resume and self.out.is_dir():
            if (self.out / "model.json").exists():
                raise RunDirError(f"{self.out} is a model directory, not a run directory (model.json without "
                                  "state.json); a run there would overwrite its model.json: choose another out")
            other = sorted(p.name for p in self.out.iterdir()
                           if p.name not in self.FRESH_ENTRIES and not p.name.startswith("."))
            if other:
                raise RunDirError(f"{self.out} is not empty and not a run directory (it holds {', '.join(other[:5])}"
                                  f"{', ...' if len(other) > 5 else ''}); choose another out")
        if resume and run is not None:
            state = self.read_state()
            if state.run and state.run != run:
                raise RunDirError(f"{self.out} holds run {state.run!r}, not {run!r} (run.name); resume it with its "
                                  "own config, or choose another out")

    # ------------------------------------------------------------------ files
    def write_weights(self, node: int, rnd: int, arrays: Mapping[str, np.ndarray]) -> str:
        """Write the weights resulting from round ``rnd`` (-1 = initial) to a new file; its relative path."""
        from safetensors.numpy import save

        rel = weights_file(node, rnd + 1)
        name = "flat" if node == FLAT else str(node)
        atomic_write_bytes(self.out / rel, save(contiguous_arrays(dict(arrays)), metadata={"node": name, "round": str(rnd)}))
        return rel

    def load_weights(self, rel: str) -> Weights:
        """The arrays of a committed weight file; :class:`RunDirError` unless it is a safetensors
        file of finite values."""
        from safetensors import SafetensorError
        from safetensors.numpy import load_file

        f = self.out / rel
        if not f.is_file():
            raise RunDirError(f"{f} named in {self.state_path} is missing; restore it from a backup or start a new run")
        try:
            arrays = load_file(str(f))
        except (SafetensorError, ValueError, TypeError, OverflowError) as e:
            raise RunDirError(f"{f} is not a safetensors weight file ({e}); restore it from a backup or start a "
                              "new run") from None
        bad = [k for k, v in arrays.items() if v.dtype.kind == "f" and not np.isfinite(v).all()]
        if bad:
            raise RunDirError(f"{f}: parameter {bad[0]!r} holds NaN or inf; restore it from a backup or start a "
                              "new run")
        return arrays

    def read_state(self) -> RunState:
        try:
            d = json.loads(self.state_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
            raise RunDirError(f"{self.state_path} is not valid JSON ({e}); restore it from a backup") from None
        return RunState.from_json(d, self.state_path)

    def _metric_lines(self) -> tuple[list[str], list[dict], bool]:
        """``(lines, rows, torn)`` of ``metrics.jsonl``; ``torn``: the last line was cut short
        (a crash mid-append) and is not among them. Any other bad line is a :class:`RunDirError`."""
        p = self.metrics_path
        try:
            lines = [ln for ln in p.read_text().splitlines() if ln.strip()] if p.exists() else []
        except UnicodeDecodeError:
            raise RunDirError(f"{p} is not text; restore it from a backup or start a new run") from None
        rows: list[dict] = []
        for i, ln in enumerate(lines):
            try:
                row = json.loads(ln)
            except (json.JSONDecodeError, RecursionError):
                row = None
            if not isinstance(row, dict) or not isinstance(row.get("round", -1), int):
                if i == len(lines) - 1:
                    return lines[:-1], rows, True
                raise RunDirError(f"{p} line {i + 1} is not a metrics row; restore the file from a backup or "
                                  "remove that line")
            rows.append(row)
        return lines, rows, False

    def read_metrics(self) -> list[dict]:
        """The rows of ``metrics.jsonl`` (a torn last line is left out)."""
        return self._metric_lines()[1]

    def append_metrics(self, row: dict) -> None:
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(row) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def write_state(self, state: RunState) -> None:
        atomic_write_bytes(self.state_path, dump_state_json(state.to_json()))

    def write_model_json(self, state: RunState) -> None:
        m = self._need_model()
        md = ModelDir(path=self.out, hierarchy=m.tree, input_size=int(m.input_size), mean=state.mean, std=state.std,
                      dataset=m.dataset, extra={"run": state.run, "rounds_completed": state.round})
        for n, rel in state.files.items():
            entry = NetworkEntry(arch=m.specs[n], file=rel, name="flat" if n == FLAT else m.tree.names[n],
                                 params=m.params[n])
            if n == FLAT:
                md.flat = entry
            else:
                md.experts[n] = entry
        # Not fsynced (issue #12: one fsync less per round): model.json is derived from state.json
        # and rewritten by --resume; the rename keeps it whole for readers.
        atomic_write_bytes(self.out / MODEL_JSON, (json.dumps(md.to_json(), indent=1) + "\n").encode(), durable=False)

    def _need_model(self) -> ModelInfo:
        if self.model is None:
            raise RunDirError("RunStore.model is not set; construct RunStore(out, ModelInfo(...)) to write model.json")
        return self.model

    # ------------------------------------------------------------------ life cycle
    def create(self, state: RunState, weights: Mapping[int, Weights], config_toml: str) -> RunState:
        """Start a new run directory: initial weight files, ``config.toml``, ``state.json``, ``model.json``."""
        self.check(resume=False)
        self.out.mkdir(parents=True, exist_ok=True)
        files = {n: self.write_weights(n, -1, arrays) for n, arrays in weights.items()}
        (self.out / "config.toml").write_text(config_toml)
        state = replace(state, files=files)
        self.write_state(state)
        self.write_model_json(state)
        return state

    def resume(self, kind: str, run: str | None = None) -> tuple[RunState, dict[int, Weights], list[dict]]:
        """Open the last committed round: ``(state, weights by node, metric rows)``.

        Rows and weight files past the commit (left by a round interrupted between its first
        write and ``state.json``) are discarded, and ``model.json`` is rewritten from the
        committed state (a crash between ``state.json`` and ``model.json`` leaves it stale).
        """
        self.check(resume=True, run=run)
        state = self.read_state()
        if state.kind != kind:
            raise RunDirError(f"{self.state_path} is a {state.kind} run but the config says model.kind = {kind}")
        weights = {n: self.load_weights(rel) for n, rel in state.files.items()}
        rows = self.discard_uncommitted(state)
        self.write_model_json(state)
        logger.info("resuming %s at round %d (%d devices known)", self.out, state.round, len(state.devices))
        return state, weights, rows

    def discard_uncommitted(self, state: RunState) -> list[dict]:
        """Drop metric rows of rounds >= ``state.round`` and weight files ``state`` does not name."""
        p = self.metrics_path
        lines, rows, torn = self._metric_lines()
        if torn:
            logger.warning("%s: its last line was cut short (a crash while appending); removed it", p)
        kept = [ln for ln, row in zip(lines, rows) if row.get("round", -1) < state.round]
        dropped = len(lines) - len(kept)
        atomic_write_bytes(p, "".join(ln + "\n" for ln in kept).encode())  # rows stay byte for byte
        keep = set(state.files.values())
        stale = [f for f in (self.out / "experts").glob("*.safetensors") if f"experts/{f.name}" not in keep]
        for f in stale:
            f.unlink()
        if dropped or stale:
            logger.info("discarded what an interrupted round left: %d metric row(s), %d weight file(s)",
                        dropped, len(stale))
        return [row for row in rows if row.get("round", -1) < state.round]

    def commit(self, rnd: int, new: Mapping[int, Weights], row: dict, state: RunState) -> RunState:
        """Commit round ``rnd``: returns ``state`` naming the new weight files.

        ``state`` is the state after the round (``round = rnd + 1``, credits, visits, devices)
        whose ``files`` still name the previous weights. Order: new weight files, metrics row,
        ``state.json`` (atomic rename: the commit point), ``model.json``, then the previous
        files of the updated nodes are removed.
        """
        files = dict(state.files)
        # Several new weight files (parallel mode) are written and fsynced in parallel: one wait for
        # the disk instead of one per file (~20 ms each on a busy disk, issue #12).
        items = sorted(new.items())
        if len(items) == 1:
            (n, arrays), = items
            files[n] = self.write_weights(n, rnd, arrays)
        elif items:
            with ThreadPoolExecutor(max_workers=min(8, len(items)), thread_name_prefix="commit") as pool:
                written = [pool.submit(self.write_weights, n, rnd, arrays) for n, arrays in items]
                for (n, _), f in zip(items, written):
                    files[n] = f.result()
        committed = replace(state, files=files)
        self.append_metrics(row)
        self.write_state(committed)  # the commit point
        self.write_model_json(committed)
        for n in new:
            old = state.files.get(n)
            if old is not None and old != files[n]:
                (self.out / old).unlink(missing_ok=True)
        return committed
