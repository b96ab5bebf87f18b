"""The run dashboard: a read-only web page of one run directory, updated live.

::

    edgehmoe-server run --config run.toml --dashboard 127.0.0.1:8765
    edgehmoe-server simulate ... --dashboard 8765
    edgehmoe-server dashboard --run runs/NAME [--dashboard HOST:PORT] [--token T]

One source of truth: the page shows what the run directory holds, the files the server writes:

- ``state.json`` (the commit point: rounds done, the device registry, expert visits);
- ``metrics.jsonl`` (one row per round: experts, each device's outcome and its reason, round
  time and memory of every valid result, validation info-F1), read incrementally. Above
  ``rounds.DETAIL_LIMIT`` devices a row is compact (``detail: "summary"``): no ``per_device``
  list (the per-expert ``per_node`` statistics instead) and no ``tasks`` when one expert was
  asked (``nodes`` names it), so the devices' outcomes are counted but their last time and
  memory are not shown;
- ``model.json`` (the tree: expert names, depth, parameters) and ``summary.json`` (simulate's
  held-out Table 1, once written);
- ``live.json``, written by :class:`LiveStatus` in the server's process while it runs (about
  once a second when something changed, at least every 5 s): devices online or offline and
  since when, and the round in progress. It is not part of the commit; a run without it is
  shown from ``state.json`` alone.

A ``simulate`` directory holds one run directory per model (``hmoe/``, then ``flat/``); the
dashboard shows both, the one that ran last being the *active phase*. :class:`RunReader`
turns the files into the snapshot ``GET /api/state`` returns (schema in docs/dashboard.md),
rebuilt only when a file changed. :class:`DashboardServer` is the standard library's
``ThreadingHTTPServer`` serving that JSON (ETag, so an unchanged state costs a 304; gzip) and
the static page in ``static/`` (HTML, CSS, JS; Chart.js 4 vendored in ``static/vendor/`` with
its MIT licence, so no CDN is needed offline). The page polls the JSON every second.

Access: bound to a loopback address (the default, 127.0.0.1) no token is needed unless one is
given, and the ``Host`` header must name a loopback host (a DNS-rebinding page cannot read
it). Bound anywhere else, every request needs the token (``--token``, ``[dashboard]
token_file`` or a random one printed with the URL): ``Authorization: Bearer T``, or
``?token=T`` once, which sets an HttpOnly cookie and redirects to the bare URL so the token
leaves the address bar. Without it: 401. Nothing the page is sent holds a credential (no
token, no broker account or password file).
"""

from __future__ import annotations

import gzip
import hashlib
import hmac
import ipaddress
import json
import logging
import os
import secrets
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http import HTTPStatus
from http.cookies import SimpleCookie
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

from edgehmoe.server.scheduler import FLAT

from edgehmoe.core.checkpoint import atomic_write_bytes
from edgehmoe.errors import EdgeHmoeError, UsageError

__all__ = [
    "API_VERSION",
    "DEFAULT_LISTEN",
    "LIVE_FILE",
    "STATIC_DIR",
    "DashboardError",
    "DashboardServer",
    "LiveStatus",
    "RunReader",
    "is_loopback",
    "parse_listen",
]

logger = logging.getLogger(__name__)

API_VERSION = 1
LIVE_VERSION = 1
LIVE_FILE = "live.json"
DEFAULT_LISTEN = "127.0.0.1:8765"
STATIC_DIR = Path(__file__).resolve().parent / "static"
PHASES = ("hmoe", "flat")  # simulate's order
#: A live.json older than this means its server is gone (it is rewritten at least every 5 s).
LIVE_STALE_S = 15.0
PROBLEMS_KEPT = 3  # per device: its last refusals, timeouts, rejections
#: Outcomes (metrics.jsonl ``outcomes``) counted per device; invalid and late are "rejected".
COUNTED = ("ok", "refused", "error", "timeout", "offline", "rejected")
DEFAULT_REASONS = {"timeout": "no answer before the deadline", "offline": "went offline"}


class DashboardError(EdgeHmoeError, ValueError):
    """The dashboard cannot serve what it was asked to (bad address, missing run directory)."""


# ---------------------------------------------------------------------- addresses and tokens
def parse_listen(spec: str) -> tuple[str, int]:
    """``[HOST:]PORT`` -> ``(host, port)``; the host defaults to 127.0.0.1, ``[::1]:PORT`` for IPv6.

    Port 0 asks the system for a free port.
    """
    s = str(spec).strip()
    host, sep, port = s.rpartition(":")
    if not sep:
        host, port = "127.0.0.1", s
    host = host.strip("[]") or "127.0.0.1"
    try:
        p = int(port)
    except ValueError:
        p = -1
    if not 0 <= p <= 65535:
        raise UsageError(f"--dashboard {spec!r}: expected [HOST:]PORT with a port in 0..65535 "
                         f"(e.g. {DEFAULT_LISTEN}, 0.0.0.0:8765, or 8765)")
    return host, p


def is_loopback(host: str) -> bool:
    """True for ``localhost`` and addresses in 127.0.0.0/8 or ``::1``; other names count as remote."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def read_token_file(path: str | Path) -> str:
    """The dashboard token stored in ``path`` (``[dashboard] token_file``), stripped."""
    p = Path(path)
    try:
        token = p.read_text().strip()
    except OSError as e:
        raise DashboardError(f"dashboard token file {p}: {e.strerror}; create it, e.g. "
                             f"python -c 'import secrets; print(secrets.token_urlsafe(24))' > {p}") from None
    if not token:
        raise DashboardError(f"dashboard token file {p} is empty; write a token into it (at least 16 characters)")
    return token


# ---------------------------------------------------------------------- reading files
def _read_json(path: Path):
    """The JSON in ``path``, or ``None`` while it does not exist (or is being replaced)."""
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, NotADirectoryError):
        return None
    except (OSError, ValueError) as e:
        logger.debug("cannot read %s yet: %s", path, e)
        return None


def _signature(path: Path):
    try:
        st = path.stat()
    except OSError:
        return None
    return (st.st_ino, st.st_mtime_ns, st.st_size)


class _MetricsTail:
    """``metrics.jsonl`` read incrementally: only bytes appended since the last call.

    A file that shrank or was replaced (``--resume`` rewrites it atomically) is read again
    from the start; :attr:`generation` changes then.
    """

    def __init__(self, path: Path):
        self.path = path
        self.rows: list[dict] = []
        self.generation = 0
        self._ino = None
        self._pos = 0
        self._partial = b""

    def update(self) -> list[dict]:
        """Read what was appended; returns the new rows (all rows after a reset)."""
        try:
            st = self.path.stat()
        except OSError:
            if self.rows or self._pos:
                self._reset()
            return []
        if st.st_ino != self._ino or st.st_size < self._pos:
            self._reset()
            self._ino = st.st_ino
        if st.st_size == self._pos:
            return []
        try:
            with open(self.path, "rb") as f:
                f.seek(self._pos)
                data = f.read()
        except OSError:
            return []
        self._pos += len(data)
        lines = (self._partial + data).split(b"\n")
        self._partial = lines.pop()  # an unfinished last line waits for its newline
        new = []
        for ln in lines:
            if not ln.strip():
                continue
            try:
                new.append(json.loads(ln))
            except ValueError:
                logger.warning("%s: skipping a line that is not JSON (%d bytes)", self.path, len(ln))
        self.rows.extend(new)
        return new

    def _reset(self) -> None:
        self.rows, self._pos, self._partial, self._ino = [], 0, b"", None
        self.generation += 1


@dataclass
class _DeviceStats:
    """What the metrics rows say about one device (across phases)."""

    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(COUNTED, 0))
    last: dict | None = None  # {phase, round, expert, outcome, reason}
    last_time_ms: float | None = None
    last_mem_mb: float | None = None
    last_peak_mb: float | None = None
    problems: list[dict] = field(default_factory=list)  # newest last, at most PROBLEMS_KEPT


def _node_label(names: list[str] | None, node) -> str:
    if node is None:
        return ""
    node = int(node)
    if node == FLAT:
        return "flat"
    return f"{node}:{names[node]}" if names is not None and 0 <= node < len(names) else str(node)


class _Phase:
    """One server run directory (``hmoe/`` or ``flat/`` of a simulate run, or the run itself)."""

    def __init__(self, path: Path, label: str):
        self.path = path
        self.label = label  # the phase's model kind as far as the layout tells (hmoe/flat/run)
        self.metrics = _MetricsTail(path / "metrics.jsonl")
        self.names: list[str] | None = None
        self.tree = None
        self.params: dict[int, int] = {}
        self.devices: dict[str, _DeviceStats] = {}
        self._seen_generation = -1
        self._costs_key = None
        self._costs: dict[int, dict] = {}

    def exists(self) -> bool:
        return (self.path / "state.json").is_file() or (self.path / LIVE_FILE).is_file()

    def signature(self) -> tuple:
        return tuple(_signature(self.path / n) for n in ("state.json", "metrics.jsonl", LIVE_FILE, "model.json"))

    def load_tree(self) -> None:
        """Read the tree and parameter counts once (they do not change during a run)."""
        if self.tree is not None or not (self.path / "model.json").is_file():
            return
        from edgehmoe.core.checkpoint import CheckpointError, read_model_dir

        try:
            md = read_model_dir(self.path)
        except (CheckpointError, OSError) as e:
            logger.debug("model.json of %s not readable yet: %s", self.path, e)
            return
        self.tree = md.hierarchy
        self.names = list(md.hierarchy.names)
        self.params = {int(n): int(e.params) for n, e in md.experts.items()}
        if md.flat is not None:
            self.params[FLAT] = int(md.flat.params)

    def update_rows(self, kind: str) -> None:
        new = self.metrics.update()
        if self.metrics.generation != self._seen_generation:  # replaced: count again from the start
            self._seen_generation = self.metrics.generation
            self.devices = {}
            new = self.metrics.rows
        for row in new:
            self._count(row, kind)

    def _count(self, row: dict, kind: str) -> None:
        rnd = int(row.get("round", -1))
        nodes = row.get("nodes") or []
        tasks = row.get("tasks") or {}
        reasons = row.get("reasons") or {}
        rejected = row.get("rejected") or {}
        measured = {d.get("device"): d for d in row.get("per_device") or []}
        for dev, outcome in (row.get("outcomes") or {}).items():
            st = self.devices.setdefault(dev, _DeviceStats())
            counted = "rejected" if outcome in ("invalid", "late") else outcome
            if counted in st.counts:
                st.counts[counted] += 1
            m = measured.get(dev)
            node = tasks.get(dev, m.get("node") if m else (nodes[0] if len(nodes) == 1 else None))
            reason = reasons.get(dev) or rejected.get(dev) or DEFAULT_REASONS.get(outcome, "")
            st.last = {"phase": kind, "round": rnd + 1, "expert": _node_label(self.names, node),
                       "outcome": outcome, "reason": reason if outcome != "ok" else ""}
            if m:
                st.last_time_ms = m.get("round_time_ms")
                st.last_mem_mb = m.get("round_mem_mb")
                st.last_peak_mb = m.get("peak_rss_mb")
            if outcome != "ok":
                st.problems = [*st.problems, {"phase": kind, "round": rnd + 1, "outcome": outcome,
                                              "reason": reason}][-PROBLEMS_KEPT:]

    def costs(self) -> dict[int, dict]:
        """Median time and memory per node (:func:`edgehmoe.server.report.per_node_costs`)."""
        key = (self.metrics.generation, len(self.metrics.rows))
        if key != self._costs_key:
            from edgehmoe.server.report import per_node_costs

            self._costs = per_node_costs(self.metrics.rows)
            self._costs_key = key
        return self._costs


def _json_body(obj) -> bytes:
    return json.dumps(obj, separators=(",", ":"), allow_nan=False, default=_jsonable).encode()


def _jsonable(v):
    if hasattr(v, "tolist"):
        return v.tolist()
    raise TypeError(f"{type(v).__name__} is not JSON serialisable")


def _finite(v):
    """``v`` as a float, or ``None`` for missing, NaN and infinite values (JSON has no NaN)."""
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if f == f and abs(f) != float("inf") else None


class RunReader:
    """The dashboard's view of a run directory, rebuilt when one of its files changes.

    Args:
        path: a server run directory (``state.json`` inside) or a simulate directory
            (``hmoe/`` and/or ``flat/`` inside). It may not exist yet (a run about to start).
        clock: wall-clock time source (tests pass a fake).
    """

    def __init__(self, path: str | Path, clock: Callable[[], float] = time.time):
        self.path = Path(path)
        self.clock = clock
        self._lock = threading.Lock()
        self._phases: dict[str, _Phase] = {}
        self._key = None
        self._cached: tuple[bytes, str] | None = None

    # ------------------------------------------------------------------ layout
    def _phase_list(self) -> list[_Phase]:
        """The phases present now, in run order."""
        if (self.path / "state.json").is_file() or (self.path / LIVE_FILE).is_file():
            ph = self._phases.setdefault("run", _Phase(self.path, "run"))
            return [ph]
        out = []
        for kind in PHASES:
            ph = self._phases.setdefault(kind, _Phase(self.path / kind, kind))
            if ph.exists():
                out.append(ph)
        return out

    @property
    def is_simulate(self) -> bool:
        return not (self.path / "state.json").is_file() and not (self.path / LIVE_FILE).is_file()

    # ------------------------------------------------------------------ snapshot
    def snapshot(self) -> tuple[bytes, str]:
        """``(JSON body, ETag)`` of the current state; recomputed only when a file changed."""
        with self._lock:
            now = self.clock()
            phases = self._phase_list()
            lives = [_read_json(ph.path / LIVE_FILE) for ph in phases]
            key = (tuple(ph.signature() for ph in phases), _signature(self.path / "summary.json"),
                   tuple(self._alive(lv, now) for lv in lives))
            if key != self._key or self._cached is None:
                body = _json_body(self._build(phases, lives, now))
                self._cached = (body, '"' + hashlib.sha256(body).hexdigest()[:32] + '"')
                self._key = key
            return self._cached

    def state(self) -> dict:
        """The snapshot as a dict (what ``GET /api/state`` returns)."""
        return json.loads(self.snapshot()[0])

    @staticmethod
    def _alive(live: dict | None, now: float) -> bool:
        """The server writing ``live`` is running (it rewrites the file at least every 5 s)."""
        return bool(live) and not live.get("closed") and now - float(live.get("updated_unix", 0)) < LIVE_STALE_S

    def _build(self, phases: list[_Phase], lives: list[dict | None], now: float) -> dict:
        summary = _read_json(self.path / "summary.json") if self.is_simulate else None
        phase_info, devices, val = [], {}, {}
        hmoe_phase = flat_phase = None
        for ph, live in zip(phases, lives, strict=True):
            st = _read_json(ph.path / "state.json") or {}
            ph.load_tree()
            kind = st.get("kind") or (ph.label if ph.label != "run" else "")
            ph.update_rows(kind)
            if kind == "hmoe":
                hmoe_phase = (ph, st)
            elif kind == "flat":
                flat_phase = (ph, st)
            alive = self._alive(live, now)
            info = self._phase_info(ph, st, live, alive, kind, now)
            phase_info.append(info)
            val[kind or ph.label] = [[int(r["round"]) + 1, _finite(r["val_info_f1"])]
                                     for r in ph.metrics.rows if "val_info_f1" in r]
            self._merge_devices(devices, ph, st, live, alive, kind)
        active = phase_info[-1] if phase_info else None
        layout = "simulate" if self.is_simulate else "run"
        out = {
            "api_version": API_VERSION,
            "run": self._run_name(phases),
            "layout": layout,
            "status": self._status(layout, phase_info, summary, any(self._alive(lv, now) for lv in lives)),
            "phase": active["kind"] if active else None,
            "round": active["round"] if active else 0,
            "rounds": active["rounds"] if active else 0,
            "training": active["training"] if active else None,
            "last_experts": active["last_experts"] if active else [],
            "started_unix": min((p["started_unix"] for p in phase_info if p["started_unix"]), default=None),
            "finished_unix": self._finished(phase_info, summary),
            "eta_s": active["eta_s"] if active else None,
            "snapshot_unix": now,  # when eta_s was computed (the body is rebuilt only when a file changes)
            "phases": phase_info,
            "val_info_f1": val,
            "devices_online": sum(1 for d in devices.values() if d["online"]),
            "devices": [devices[k] for k in sorted(devices)],
        }
        out.update(self._experts(hmoe_phase, flat_phase))
        out["heldout"] = self._heldout(summary)
        return out

    def _run_name(self, phases: list[_Phase]) -> str:
        if not self.is_simulate and phases:
            st = _read_json(phases[0].path / "state.json") or _read_json(phases[0].path / LIVE_FILE) or {}
            if st.get("run"):
                return str(st["run"])
        return self.path.resolve().name

    @staticmethod
    def _status(layout: str, phase_info: list[dict], summary: dict | None, alive: bool) -> str:
        if summary is not None:
            return "finished"
        if not phase_info:
            return "starting"
        if all(p["status"] == "finished" for p in phase_info):
            if layout == "run":
                return "finished"
            # simulate between two models, or evaluating on the held-out split after the last
            return "running" if alive else "stopped"
        return phase_info[-1]["status"]

    @staticmethod
    def _finished(phase_info: list[dict], summary: dict | None) -> float | None:
        if phase_info and all(p["status"] == "finished" for p in phase_info):
            ends = [p["finished_unix"] for p in phase_info if p["finished_unix"]]
            return max(ends) if ends else None
        return None

    def _phase_info(self, ph: _Phase, st: dict, live: dict | None, alive: bool, kind: str, now: float) -> dict:
        rows = ph.metrics.rows
        rnd = int(st.get("round", 0))
        rounds = int(st.get("rounds", 0) or (live or {}).get("rounds", 0))
        if live and alive and int(live.get("round", rnd)) > rnd:
            rnd = int(live["round"])  # committed after state.json was read: live.json is written later
        if st and rounds and rnd >= rounds:
            status = "finished"
        elif alive:
            status = "running" if st else "starting"
        else:
            status = "stopped" if st else "starting"
        started = (live or {}).get("started_unix") or self._mtime(ph.path / "config.toml")
        training = None
        if alive and live and live.get("training"):
            t = live["training"]
            outcomes: dict[str, int] = {}
            for o in (t.get("outcomes") or {}).values():
                outcomes[o] = outcomes.get(o, 0) + 1
            training = {"round": int(t.get("round", rnd)) + 1, "experts": list(t.get("experts", [])),
                        "asked": int(t.get("asked", 0)), "answered": int(t.get("answered", 0)),
                        "outcomes": outcomes,  # of the devices done so far: ok, offline, refused, ...
                        "started_unix": t.get("started_unix"), "deadline_unix": t.get("deadline_unix")}
        last = rows[-1] if rows else None
        finished_unix = None
        if status == "finished" and last is not None:
            finished_unix = _finite(last.get("time_unix"))
        return {
            "kind": kind or ph.label,
            "run": st.get("run") or (live or {}).get("run", ""),
            "dir": ph.path.name if ph.path != self.path else ".",
            "status": status,
            "state": (live or {}).get("state", "") if alive else "",
            "round": rnd,
            "rounds": rounds,
            "started_unix": started,
            "finished_unix": finished_unix,
            "training": training,
            "last_experts": list(last.get("experts", [])) if last else [],
            "eta_s": self._eta(rows, rnd, rounds, started, now) if status == "running" else None,
            "visits": {str(k): int(v) for k, v in (st.get("visits") or {}).items()},
        }

    @staticmethod
    def _mtime(p: Path) -> float | None:
        try:
            return p.stat().st_mtime
        except OSError:
            return None

    @staticmethod
    def _eta(rows: list[dict], rnd: int, rounds: int, started: float | None, now: float) -> float | None:
        """Remaining rounds times the median of the last ten round durations, less time spent in this one."""
        times = [float(r["time_unix"]) for r in rows if "time_unix" in r]
        if not times or rounds <= rnd:
            return None
        stamps = ([started] if started else []) + times
        steps = [b - a for a, b in zip(stamps[:-1], stamps[1:], strict=True)][-10:]
        if not steps:
            return None
        per_round = sorted(steps)[len(steps) // 2]
        return max(0.0, (rounds - rnd) * per_round - max(0.0, now - times[-1]))

    def _merge_devices(self, devices: dict, ph: _Phase, st: dict, live: dict | None, alive: bool, kind: str) -> None:
        """Registry of this phase (live.json if any, else state.json) plus its metrics rows.

        Later phases (and a live registry) override earlier ones; counts add up across phases.
        """
        reg = (live or {}).get("devices") if live else None
        from_live = reg is not None
        tasks = ((live or {}).get("training") or {}).get("tasks") or {} if alive else {}
        if reg is None:
            reg = st.get("devices") or []
        for d in reg:
            dev_id = str(d.get("device_id", ""))
            if not dev_id:
                continue
            counts = d.get("class_counts")
            samples = d.get("samples", sum(counts) if counts else 0)
            classes = d.get("classes", sum(1 for c in counts if c) if counts else 0)
            online = bool(d.get("online")) and alive
            since = d.get("since_unix") if from_live and alive else d.get("last_seen")
            prev = devices.get(dev_id)
            entry = {
                "id": dev_id,
                "online": online,
                "busy": bool(d.get("busy")) and online,
                "since_unix": _finite(since),
                "last_seen_unix": _finite(d.get("last_seen")),
                "ram_mb": _finite(d.get("ram_mb")),
                "budget_mb": _finite(d.get("memory_budget_mb")),
                "cores": int(d.get("cores") or 0),
                "platform": str(d.get("platform", "")),
                "version": str(d.get("software_version", "")),
                "samples": int(samples),
                "classes": int(classes),
                "phase": kind,
                "task": tasks.get(dev_id),  # the expert it trains in the round in progress
            }
            if prev is not None:
                entry = {**prev, **{k: v for k, v in entry.items() if k not in _STAT_KEYS}}
            else:
                entry.update(_empty_stats())
            devices[dev_id] = entry
        for dev_id, s in ph.devices.items():
            entry = devices.get(dev_id)
            if entry is None:  # answered in a row but no longer in the registry (not expected)
                entry = devices[dev_id] = {"id": dev_id, "online": False, "busy": False, "since_unix": None,
                                           "last_seen_unix": None, "ram_mb": None, "budget_mb": None, "cores": 0,
                                           "platform": "", "version": "", "samples": 0, "classes": 0,
                                           "phase": kind, "task": None, **_empty_stats()}
            entry["counts"] = {k: entry["counts"].get(k, 0) + v for k, v in s.counts.items()}
            if s.last is not None:
                entry["last"] = s.last
            if s.last_time_ms is not None:
                entry["last_time_ms"] = _finite(s.last_time_ms)
                entry["last_mem_mb"] = _finite(s.last_mem_mb)
                entry["last_peak_mb"] = _finite(s.last_peak_mb)
            entry["problems"] = (entry["problems"] + s.problems)[-PROBLEMS_KEPT:]

    def _experts(self, hmoe_phase, flat_phase) -> dict:
        """Table 1 per expert: parameters, visits, median round time / memory, and flat's."""
        flat_cost = None
        if flat_phase is not None:
            c = flat_phase[0].costs().get(FLAT)
            flat_cost = {"round_time_ms": _finite(c["round_time_ms"]), "round_mem_mb": _finite(c["round_mem_mb"]),
                         "peak_rss_mb": _finite(c["peak_rss_mb"]), "device_rounds": int(c["device_rounds"]),
                         "params": flat_phase[0].params.get(FLAT)} if c else {
                "round_time_ms": None, "round_mem_mb": None, "peak_rss_mb": None, "device_rounds": 0,
                "params": flat_phase[0].params.get(FLAT)}
        experts = []
        if hmoe_phase is not None and hmoe_phase[0].tree is not None:
            ph, st = hmoe_phase
            tree, costs = ph.tree, ph.costs()
            visits = {int(k): int(v) for k, v in (st.get("visits") or {}).items()}
            for n in tree.internal_nodes:
                n = int(n)
                c = costs.get(n)
                experts.append({
                    "node": n,
                    "name": tree.names[n],
                    "depth": int(tree.depths[n]),
                    "children": int(tree.num_children[n]),
                    "params": ph.params.get(n),
                    "visits": visits.get(n, 0),
                    "device_rounds": int(c["device_rounds"]) if c else 0,
                    "round_time_ms": _finite(c["round_time_ms"]) if c else None,
                    "round_mem_mb": _finite(c["round_mem_mb"]) if c else None,
                    "peak_rss_mb": _finite(c["peak_rss_mb"]) if c else None,
                })
        return {"experts": experts, "flat_cost": flat_cost}

    @staticmethod
    def _heldout(summary: dict | None) -> dict | None:
        """Simulate's held-out results (Table 1's info-F1 column), once ``summary.json`` exists."""
        if not summary:
            return None
        out = {"split": summary.get("heldout_split"), "description": summary.get("heldout_description")}
        for kind in PHASES:
            if isinstance(summary.get(kind), dict):
                sk = summary[kind]
                out[kind] = {"info_f1": _finite(sk.get("info_f1")), "top1": _finite(sk.get("top1"))}
        if isinstance(summary.get("hmoe"), dict) and summary["hmoe"].get("info_f1_beam2") is not None:
            out["hmoe"]["info_f1_beam2"] = _finite(summary["hmoe"]["info_f1_beam2"])
        return out


_STAT_KEYS = ("counts", "last", "last_time_ms", "last_mem_mb", "last_peak_mb", "problems")


def _empty_stats() -> dict:
    return {"counts": dict.fromkeys(COUNTED, 0), "last": None, "last_time_ms": None, "last_mem_mb": None,
            "last_peak_mb": None, "problems": []}


# ---------------------------------------------------------------------- live.json (server side)
@dataclass
class _Followed:
    """One server :class:`LiveStatus` writes for, and what it last wrote."""

    server: object
    started: float
    since: dict[str, tuple[bool, float]] = field(default_factory=dict)  # device -> (online, since)
    last: dict | None = None
    last_write: float = 0.0

    @property
    def ready(self) -> bool:
        """The server has created (or resumed) its run directory."""
        return (Path(self.server.out) / "state.json").is_file()


class LiveStatus:
    """Writes ``live.json`` for the attached :class:`~edgehmoe.server.app.AggregationServer`.

    A background thread looks at the server's device registry and open round about once a
    second and rewrites ``<run dir>/live.json`` (atomically) when something changed, and at
    least every ``heartbeat_s`` so a reader can tell a running server from a stopped one.
    Nothing is written before the server created (or resumed) its run directory. It reads
    ``server.registry.devices``, ``server.runner.{open, round, deadline, pending}``,
    ``server.round``, ``server.tree``, ``server.cfg`` and ``server.out``, and changes nothing.

    ``simulate`` runs one server per model: :meth:`attach` the next one. The previous one keeps
    its heartbeat until the next has created its run directory, then its file gets its final
    state, so a reader sees no gap between two models. :meth:`close` writes the final state
    (``finished`` or ``stopped``, ``closed: true``) and stops the thread.
    """

    def __init__(self, interval_s: float = 1.0, heartbeat_s: float = 5.0, clock: Callable[[], float] = time.time):
        self.interval_s = interval_s
        self.heartbeat_s = heartbeat_s
        self.clock = clock
        self._current: _Followed | None = None
        self._previous: _Followed | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def attach(self, server) -> None:
        """Follow ``server`` from now on (see the class docstring for the hand-over)."""
        with self._lock:
            if self._current is not None and self._current.server is server:
                return
            if self._previous is not None:
                self._write(self._previous, final=True)
            self._previous = self._current
            self._current = _Followed(server, started=self.clock())

    def start(self) -> LiveStatus:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="edgehmoe-live-status", daemon=True)
            self._thread.start()
        return self

    def close(self) -> None:
        """Write the final state of the followed server(s) and stop the thread."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        with self._lock:
            for f in (self._previous, self._current):
                if f is not None:
                    self._write(f, final=True)
            self._previous = self._current = None

    def __enter__(self) -> LiveStatus:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    def tick(self) -> None:
        """One look at the server (the thread calls this every ``interval_s``)."""
        with self._lock:
            if self._previous is not None:
                if self._current is not None and self._current.ready:
                    self._write(self._previous, final=True)
                    self._previous = None
                else:
                    self._write(self._previous)
            if self._current is not None:
                self._write(self._current)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.tick()
            except Exception:  # noqa: BLE001 - the dashboard must never stop a run
                logger.debug("live status not written this time", exc_info=True)

    def snapshot(self, f: _Followed, final: bool = False) -> dict:
        """What ``live.json`` says about the followed server now (without ``updated_unix``)."""
        server = f.server
        cfg = server.cfg
        registry = getattr(server, "registry", None)
        runner = getattr(server, "runner", None)
        rounds = int(cfg.schedule.rounds)
        done = int(server.round)
        devices = []
        # list() of a dict's values is one step under the GIL: safe while the server adds devices
        for d in sorted(list(registry.devices.values()) if registry is not None else [], key=lambda d: d.device_id):
            prev = f.since.get(d.device_id)
            if prev is None or prev[0] != d.online:
                # the message that changed the flag also set last_seen: the change happened then
                f.since[d.device_id] = (bool(d.online), float(d.last_seen))
            counts = d.class_counts
            devices.append({
                "device_id": d.device_id, "online": bool(d.online), "busy": bool(d.busy),
                "since_unix": f.since[d.device_id][1], "last_seen": float(d.last_seen),
                "ram_mb": float(d.ram_mb), "memory_budget_mb": float(d.memory_budget_mb), "cores": int(d.cores),
                "platform": d.platform, "software_version": d.software_version,
                "samples": int(counts.sum()), "classes": int((counts > 0).sum()),
            })
        training = None
        if final:
            state = "finished" if done >= rounds else "stopped"
        elif runner is None:
            state = "starting"
        elif done >= rounds:
            state = "finished"
        elif runner.open:
            state = "training"
            training = self._training(server, runner)
        elif runner.round == done:
            state = "aggregating"  # collected; being aggregated, scored and committed
        else:
            state = "waiting"
        return {
            "live_version": LIVE_VERSION, "run": cfg.run.name, "kind": cfg.model.kind, "pid": os.getpid(),
            "started_unix": f.started, "state": state, "closed": final, "round": done, "rounds": rounds,
            "training": training, "devices": devices,
        }

    @staticmethod
    def _training(server, runner) -> dict:
        from edgehmoe.server.rounds import node_name

        pending = list(runner.pending.values())
        tree = getattr(server, "tree", None)
        tasks = {p.device_id: node_name(tree, p.node) if tree is not None else str(p.node) for p in pending}
        return {
            "round": int(runner.round), "experts": sorted(set(tasks.values())), "tasks": tasks,
            "asked": len(pending), "answered": sum(1 for p in pending if p.answered),
            "outcomes": {p.device_id: p.outcome for p in pending if p.answered},
            "deadline_unix": float(runner.deadline),
            "started_unix": float(runner.deadline) - float(server.cfg.schedule.round_timeout_s),
        }

    def _write(self, f: _Followed, final: bool = False) -> None:
        if not f.ready:
            return  # the run directory is not created (or resumed) yet
        snap = self.snapshot(f, final=final)
        now = self.clock()
        if not final and snap == f.last and now - f.last_write < self.heartbeat_s:
            return
        # A rename keeps the file whole for readers; no fsync: live.json is not part of the commit,
        # and at 1,000 devices an fsync a second costs the server's disk more than the page gains.
        # Compact: the C encoder (indent= runs the pure-Python one: ~50 ms a second at 1,000 devices).
        atomic_write_bytes(Path(f.server.out) / LIVE_FILE,
                           (json.dumps({**snap, "updated_unix": now}, separators=(",", ":")) + "\n").encode(),
                           durable=False)
        f.last, f.last_write = snap, now


# ---------------------------------------------------------------------- HTTP
_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
          ".css": "text/css; charset=utf-8", ".md": "text/markdown; charset=utf-8", ".png": "image/png",
          ".svg": "image/svg+xml", ".txt": "text/plain; charset=utf-8"}
_SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
                               "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
}


def _static_files() -> dict[str, Path]:
    """URL path -> file for everything under ``static/`` (a fixed map: no path is ever joined)."""
    files = {}
    for p in sorted(STATIC_DIR.rglob("*")):
        if p.is_file() and p.suffix in _TYPES:
            files["/static/" + p.relative_to(STATIC_DIR).as_posix()] = p
    if "/static/index.html" in files:
        files["/"] = files["/index.html"] = files["/static/index.html"]
    return files


class DashboardServer:
    """Serves the dashboard of ``run_dir`` on ``listen`` (``[HOST:]PORT``) from a daemon thread.

    Args:
        run_dir: the run (or simulate) directory; see :class:`RunReader`.
        listen: ``[HOST:]PORT``; 127.0.0.1 when no host is given; port 0 = any free port.
        token: required from every client when given; when ``None`` and the host is not a
            loopback address, a random one is generated (:attr:`token_generated`).
        clock: wall-clock time source of the reader.
    """

    def __init__(self, run_dir: str | Path, listen: str = DEFAULT_LISTEN, token: str | None = None,
                 clock: Callable[[], float] = time.time):
        host, port = parse_listen(listen)
        if token is not None and len(token) < 8:
            raise UsageError("--token: use at least 8 characters (a random one is generated when you give none)")
        self.reader = RunReader(run_dir, clock=clock)
        self.host = host
        self.token_required = token is not None or not is_loopback(host)
        self.token_generated = token is None and self.token_required
        self.token = token if token is not None else secrets.token_urlsafe(24) if self.token_required else None
        self.static = _static_files()
        if "/" not in self.static:
            raise DashboardError(f"{STATIC_DIR}/index.html is missing; reinstall edgehmoe (pip install -e .)")
        cls = _IPv6Server if ":" in host else _Server
        try:
            self.httpd = cls((host, port), _Handler)
        except OSError as e:
            raise DashboardError(f"cannot listen on {host}:{port} for the dashboard: {e.strerror or e}; "
                                 "choose another port with --dashboard HOST:PORT (port 0 = any free port)") from None
        self.httpd.dashboard = self
        self.port = int(self.httpd.server_address[1])
        self.cookie_name = f"edgehmoe_dashboard_{self.port}"
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        """The address to open (with ``?token=`` when one is needed)."""
        host = self.host
        if host in ("0.0.0.0", "::", ""):
            host = socket.gethostname()  # the wildcard is not an address a browser can open
        if ":" in host:
            host = f"[{host}]"
        base = f"http://{host}:{self.port}/"
        return f"{base}?token={self.token}" if self.token_required else base

    def start(self) -> DashboardServer:
        self._thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.2},
                                        name="edgehmoe-dashboard", daemon=True)
        self._thread.start()
        logger.info("dashboard of %s on %s:%d", self.reader.path, self.host, self.port)
        return self

    def close(self) -> None:
        if self._thread is not None:
            self.httpd.shutdown()
            self._thread.join(timeout=5)
            self._thread = None
        self.httpd.server_close()

    def __enter__(self) -> DashboardServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ checks
    def token_ok(self, given: str | None) -> bool:
        return bool(given) and self.token is not None and hmac.compare_digest(given.encode(), self.token.encode())

    def host_ok(self, host_header: str | None) -> bool:
        """Without a token, only a loopback Host header is served (DNS rebinding)."""
        if self.token_required:
            return True
        if not host_header:
            return False
        name = host_header.strip()
        if name.startswith("["):
            name = name[1:].partition("]")[0]
        else:
            name = name.rpartition(":")[0] if name.count(":") == 1 else name
        return is_loopback(name)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    dashboard: DashboardServer


class _IPv6Server(_Server):
    address_family = socket.AF_INET6


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    server_version = "edgehmoe-dashboard"
    sys_version = ""
    protocol_version = "HTTP/1.1"
    timeout = 60  # idle keep-alive connections end

    def log_message(self, fmt, *args) -> None:  # the standard library writes to stderr
        logger.debug("%s %s", self.address_string(), fmt % args)

    def do_GET(self) -> None:
        self._serve(head=False)

    def do_HEAD(self) -> None:
        self._serve(head=True)

    def _not_allowed(self) -> None:
        self._send(HTTPStatus.METHOD_NOT_ALLOWED, b"read-only: GET and HEAD only\n", "text/plain; charset=utf-8",
                   extra={"Allow": "GET, HEAD"})

    do_POST = do_PUT = do_DELETE = do_PATCH = _not_allowed

    # ------------------------------------------------------------------
    def _given_token(self, query: dict) -> tuple[str | None, bool]:
        """The token this request carries, and whether it came in the query string."""
        d = self.server.dashboard
        auth = self.headers.get("Authorization", "")
        if auth.lower().startswith("bearer "):
            return auth[7:].strip(), False
        if "token" in query:
            return query["token"][0], True
        cookie = SimpleCookie()
        try:
            cookie.load(self.headers.get("Cookie", ""))
        except Exception:  # noqa: BLE001 - a malformed cookie header is just no token
            return None, False
        morsel = cookie.get(d.cookie_name)
        return (morsel.value if morsel else None), False

    def _serve(self, head: bool) -> None:
        d = self.server.dashboard
        url = urlsplit(self.path)
        query = parse_qs(url.query)
        if not d.host_ok(self.headers.get("Host")):
            self._send(HTTPStatus.FORBIDDEN, b"forbidden: open the dashboard as http://127.0.0.1:PORT/\n",
                       "text/plain; charset=utf-8", head=head)
            return
        if d.token_required:
            given, in_query = self._given_token(query)
            if not d.token_ok(given):
                self._send(HTTPStatus.UNAUTHORIZED,
                           b"401: this dashboard needs its token: open the URL edgehmoe-server printed "
                           b"(http://HOST:PORT/?token=...), or send Authorization: Bearer TOKEN\n",
                           "text/plain; charset=utf-8", head=head,
                           extra={"WWW-Authenticate": 'Bearer realm="edgehmoe-dashboard"'})
                return
            if in_query and url.path in ("/", "/index.html"):
                # Keep the token out of the address bar and history: a cookie carries it from now on.
                self._send(HTTPStatus.SEE_OTHER, b"", "text/plain; charset=utf-8", head=head, extra={
                    "Location": "/",
                    "Set-Cookie": f"{d.cookie_name}={d.token}; HttpOnly; SameSite=Strict; Path=/",
                })
                return
        if url.path == "/api/state":
            self._state(head)
        elif url.path in d.static:
            self._static(d.static[url.path], head)
        else:
            self._send(HTTPStatus.NOT_FOUND, b"not found\n", "text/plain; charset=utf-8", head=head)

    def _state(self, head: bool) -> None:
        try:
            body, etag = self.server.dashboard.reader.snapshot()
        except Exception as e:  # noqa: BLE001 - a reader bug must not take the page down; it is logged
            logger.exception("dashboard: cannot read the run directory")
            self._send(HTTPStatus.INTERNAL_SERVER_ERROR, _json_body({"error": str(e)}), "application/json", head=head)
            return
        extra = {"ETag": etag, "Cache-Control": "no-cache", "X-Server-Time": f"{time.time():.3f}"}
        if self.headers.get("If-None-Match") == etag:
            self._send(HTTPStatus.NOT_MODIFIED, b"", None, head=True, extra=extra)
            return
        self._send(HTTPStatus.OK, body, "application/json", head=head, extra=extra, compress=True)

    def _static(self, path: Path, head: bool) -> None:
        body = path.read_bytes()
        etag = '"' + hashlib.sha256(body).hexdigest()[:32] + '"'
        extra = {"ETag": etag, "Cache-Control": "no-cache"}
        if self.headers.get("If-None-Match") == etag:
            self._send(HTTPStatus.NOT_MODIFIED, b"", None, head=True, extra=extra)
            return
        self._send(HTTPStatus.OK, body, _TYPES[path.suffix], head=head, extra=extra, compress=True)

    def _send(self, status: HTTPStatus, body: bytes, ctype: str | None, head: bool = False,
              extra: dict | None = None, compress: bool = False) -> None:
        if compress and len(body) > 1024 and "gzip" in self.headers.get("Accept-Encoding", ""):
            body = gzip.compress(body, compresslevel=5)
            extra = {**(extra or {}), "Content-Encoding": "gzip", "Vary": "Accept-Encoding"}
        self.send_response(status)
        for k, v in {**_SECURITY_HEADERS, **(extra or {})}.items():
            self.send_header(k, v)
        if ctype:
            self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)) if status != HTTPStatus.NOT_MODIFIED else "0")
        self.end_headers()
        if not head and body:
            self.wfile.write(body)
