"""Per-round time and memory of every expert and of the flat model (the seed paper's Table 1).

For one simulated client (``--samples-per-client`` images drawn class-balanced and seeded
from the training split) this trains exactly one federated client round of the flat model
and of every expert of the class tree, each in a **fresh subprocess** (so every measurement
starts from the same clean baseline: interpreter + torch + edgehmoe imported, data loaded),
``--repeats`` times, and reports the median and spread of ``round_time_ms``,
``round_mem_mb`` and ``peak_rss_mb`` as defined in docs/design.md ("Measurement
definitions"). The round itself is :func:`edgehmoe.measure.rounds.measured_local_round`, the very
call the device client makes per task; nothing here re-implements training, and the memory is
read by the one meter, :mod:`edgehmoe.measure.meter`.

The client's data for a node is its samples under that node (relabelled with
``Hierarchy.label_map(node)``): the flat model and the root expert see all N samples, an
expert near the leaves only the few under it, so the amount of work per expert follows the
tree, as in the paper.

Each child (``python -m edgehmoe.measure.worker train-round JOB``, running
:func:`train_round_job`) first runs one tiny warm-up round (width-4 network, 4 images) so that
torch's one-time lazy initialisation on the first forward/backward pass (hundreds of MB and
about a second with some torch builds) is paid before the measured round, as it is on a device
whose client process has already trained once; ``--cold`` skips the warm-up. The warm-up's
own cost is reported as ``first_round_overhead``.

``--memory-limit-mb M`` then runs every model once more under a limit of M MB for the whole
child process (:mod:`edgehmoe.measure.limits`: a cgroup v2 ``memory.max``, a ``systemd-run``
scope, or, where neither is available, a watchdog that kills the child when its RSS or kernel
high-water mark exceeds M) and reports which of them still train on such a device.

Usage (``edgehmoe-profile``, ``python -m edgehmoe.measure.profile`` and
``python tools/profile_round.py`` are the same command)::

    edgehmoe-profile --dataset cifar100:../shared/data/cifar100/train.npz \\
        --samples-per-client 500 --threads 1 --repeats 3 --json prof.json --plot prof.png

All output keys are documented in docs/profiling.md.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import logging
import math
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgehmoe.errors import RunError
from edgehmoe.measure.limits import Mechanism, limit_mechanism, run_child
from edgehmoe.measure.meter import RoundMeter, device_facts, peak_rss_mb, rss_mb
from edgehmoe.measure.worker import worker_command, worker_env

__all__ = [
    "JSON_VERSION",
    "ProfileError",
    "client_sample",
    "format_tables",
    "profile",
    "read_info_f1",
    "train_round_job",
    "write_plot",
]

logger = logging.getLogger(__name__)

JSON_VERSION = 1


class ProfileError(RunError):
    """A profile that cannot complete (unloadable dataset, failed child): printed as one line,
    exit status 1."""


# ---------------------------------------------------------------------- arguments
# ---------------------------------------------------------------------- client data
def client_sample(y: np.ndarray, num_classes: int, n: int, seed: int) -> np.ndarray:
    """Indices of a class-balanced, seeded draw of ``n`` samples from labels ``y`` (sorted).

    Every class gets ``n // C`` samples and a seeded choice of ``n % C`` classes one more; a
    class with too few samples gives all it has (so the result may be shorter than ``n``).
    """
    y = np.asarray(y, dtype=np.int64)
    rng = np.random.default_rng(seed)
    want = np.full(num_classes, n // num_classes, dtype=np.int64)
    if n % num_classes:
        want[rng.choice(num_classes, n % num_classes, replace=False)] += 1
    picked = []
    for c in range(num_classes):
        members = np.flatnonzero(y == c)
        k = min(int(want[c]), len(members))
        if k:
            picked.append(rng.choice(members, k, replace=False))
    return np.sort(np.concatenate(picked)) if picked else np.zeros(0, dtype=np.int64)


def _load_client(spec: str, n: int, seed: int):
    """Load the training split (only as much as needed) and draw the client's samples."""
    try:
        from edgehmoe.data import channel_stats, load_dataset
    except ImportError as e:  # pragma: no cover - the package is part of edgehmoe
        raise ProfileError(f"cannot import edgehmoe.data ({e})") from None
    # Learn the number of classes cheaply first, then load just enough per class (twice what
    # the draw needs, so the seed chooses among them) - Tiny ImageNet decodes JPEGs lazily.
    probe = _call_loader(load_dataset, spec, 1)
    per_class = 2 * math.ceil(n / probe.num_classes)
    ds = _call_loader(load_dataset, spec, per_class)
    idx = client_sample(ds.y, ds.num_classes, n, seed)
    if len(idx) < 2:
        raise ProfileError(f"the dataset {spec!r} gives only {len(idx)} training samples; need at least 2")
    x, y = ds.x[idx], ds.y[idx]
    mean, std = channel_stats(x)
    return ds, x, y, np.asarray(mean, dtype=np.float64), np.asarray(std, dtype=np.float64)


def _call_loader(load_dataset, spec: str, limit: int):
    try:
        return load_dataset(spec, split="train", limit_per_class=limit)
    except (ValueError, KeyError, OSError) as e:  # DatasetError is a ValueError
        msg = str(e).strip().strip('"') or type(e).__name__
        raise ProfileError(f"cannot load dataset {spec!r}: {msg}") from None


# ---------------------------------------------------------------------- child side
def train_round_job(job: dict) -> dict:
    """One measured client round, run in a fresh child process (see :mod:`edgehmoe.measure.worker`).

    Imports torch first (part of the baseline), loads the client's data, runs the warm-up
    unless ``job["warmup"]`` is false, then :func:`~edgehmoe.measure.rounds.measured_local_round`
    exactly once. Returns the measurement, the CPU time of the call, samples, steps,
    parameters, RSS before the round and the start-up peak RSS.
    """
    import torch  # noqa: F401  (imported before measuring: part of the baseline)

    torch.set_num_threads(int(job["threads"]))
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:
        pass
    from edgehmoe.measure.rounds import measured_local_round
    from edgehmoe.model.arch import ArchSpec, count_params
    from edgehmoe.model.training import TrainConfig

    with np.load(job["data"], allow_pickle=False) as d:
        x, y, mean, std = d["x"], d["y"], d["mean"], d["std"]
    arch = ArchSpec.from_dict(job["arch"])
    label_map = np.asarray(job["label_map"], dtype=np.int64)
    cfg = TrainConfig(**job["train"])
    warm = None
    if job.get("warmup", True):
        # The device client calls warm_up() once at start-up, so torch's lazy first-pass
        # initialisation (kernels, thread pools, library pages) is not charged to a round.
        from edgehmoe.model.training import warm_up

        with RoundMeter() as wm:
            warm_up()
        warm = wm.result.to_dict()
    import gc

    # RoundMeter starts with gc.collect(); with torch loaded a full collection walks
    # ~10^5 objects (~0.1-0.2 s of CPU, outside the timed window). Freezing the survivors
    # makes it cheap, so the CPU time taken around the call below is the round's own.
    params = count_params(arch)
    gc.collect()
    gc.freeze()
    baseline = rss_mb()
    # Peak of start-up (imports, data, warm-up) before the meter resets the high-water
    # mark: a device must fit this as well as the round's peak.
    startup_peak = peak_rss_mb()
    cpu0 = time.process_time()
    out, m = measured_local_round(arch, None, label_map, x, y, cfg, mean, std)
    # CPU time of the same call (all threads of this process): robust when other
    # processes compete for the cores, which inflates wall time but not CPU time.
    cpu_ms = (time.process_time() - cpu0) * 1000.0
    return {
        "measurement": dict(m.to_dict(), round_cpu_ms=cpu_ms),
        "samples": int(out.num_examples),
        "steps": int(out.steps),
        "loss": float(out.loss) if math.isfinite(out.loss) else None,
        "params": int(params),
        "baseline_rss_mb": baseline,
        "startup_peak_rss_mb": startup_peak,
        "warmup": warm,
    }


# ---------------------------------------------------------------------- parent side
@dataclass
class Model:
    key: str  # "flat" or the node index as a string
    node: int | None
    name: str
    depth: int | None
    children: int | None
    samples: int
    arch: dict
    label_map: list[int]


def _models(ds, y: np.ndarray, flat_width: int, head: str = "children", root_stem_stride: int = 1,
            expert_stem_stride: int = 1, tree_groups: int | str = "auto") -> list[Model]:
    from edgehmoe.core.hierarchy import routing_tree
    from edgehmoe.model.arch import expert_label_map, expert_specs, flat_spec

    tree = routing_tree(ds.hierarchy, tree_groups)
    size = int(ds.x.shape[1])
    flat = flat_spec(tree, input_size=size, width=flat_width)
    models = [Model("flat", None, "Flat Softmax", None, None, len(y), flat.to_dict(), list(range(tree.num_classes)))]
    specs = expert_specs(tree, input_size=size, flat_width=flat_width, head=head, root_stem_stride=root_stem_stride,
                         expert_stem_stride=expert_stem_stride)
    for node, spec in specs.items():
        lm = expert_label_map(tree, node, spec)  # a leaf head's targets are the leaves below it
        models.append(Model(
            str(node), int(node), tree.names[node], int(tree.depths[node]), int(tree.num_children[node]),
            int(np.count_nonzero(lm[y] >= 0)), spec.to_dict(), lm.tolist(),
        ))
    return models


def _child_env(threads: int) -> dict:
    env = worker_env()
    # Keep OpenMP/MKL pools at the requested size from the start (each thread has a stack).
    for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[k] = str(threads)
    return env


def _job_cmd(model: Model, data: str, args, repeat: int) -> list[str]:
    job = {
        "data": data,
        "arch": model.arch,
        "label_map": model.label_map,
        "threads": args.threads,
        "warmup": not args.cold,
        "train": {"epochs": args.epochs, "batch_size": args.batch_size, "seed": args.seed},
        "model": model.key,
        "repeat": repeat,
    }
    return worker_command("train-round", job)


class _Progress:
    def __init__(self, total: int, quiet: bool):
        self.total, self.done, self.quiet = total, 0, quiet
        self.lock = threading.Lock()
        self.t0 = time.monotonic()

    def __call__(self, text: str) -> None:
        with self.lock:
            self.done += 1
            if not self.quiet:
                el = time.monotonic() - self.t0
                print(f"[{self.done}/{self.total} {el:5.0f}s] {text}", file=sys.stderr, flush=True)


def _label(m: Model) -> str:
    return "flat" if m.node is None else f"expert {m.node} {m.name!r}"


def _measure(models: list[Model], data: str, args) -> dict[str, list[dict]]:
    """Run R fresh children per model; returns model key -> list of child results."""
    jobs = [(r, m) for r in range(args.repeats) for m in models if m.samples > 0]
    prog = _Progress(len(jobs), args.quiet)
    env = _child_env(args.threads)
    results: dict[str, list[dict]] = {m.key: [] for m in models}
    failure: list[str] = []

    def one(r: int, m: Model) -> None:
        if failure:
            return
        o = run_child(_job_cmd(m, data, args, r), env=env, timeout_s=args.timeout_s)
        if o.result is None or not o.result.get("ok"):
            why = "timed out" if o.timed_out else (o.result or {}).get("error") or o.stderr_tail or f"exit code {o.returncode}"
            failure.append(f"{_label(m)} (repeat {r + 1}) failed: {why}")
            return
        if o.result["samples"] != m.samples:
            failure.append(f"{_label(m)} trained on {o.result['samples']} samples, expected {m.samples}")
            return
        results[m.key].append(o.result)
        me = o.result["measurement"]
        prog(f"{_label(m)} repeat {r + 1}/{args.repeats}: {me['round_time_ms']:.1f} ms, "
             f"{me['round_mem_mb']:.1f} MB (peak RSS {me['peak_rss_mb']:.0f} MB), {m.samples} samples")

    _run_pool(jobs, one, args.jobs)
    if failure:
        raise ProfileError(failure[0])
    return results


def _run_pool(jobs, fn, n: int) -> None:
    if n <= 1:
        for j in jobs:
            fn(*j)
        return
    with cf.ThreadPoolExecutor(max_workers=n) as ex:
        for f in [ex.submit(fn, *j) for j in jobs]:
            f.result()


def _limit_pass(models: list[Model], data: str, args, mech: Mechanism) -> dict:
    jobs = [(m,) for m in models if m.samples > 0]
    prog = _Progress(len(jobs), args.quiet)
    env = _child_env(args.threads)
    res: dict[str, dict] = {}

    def one(m: Model) -> None:
        o = run_child(_job_cmd(m, data, args, 0), env=env, limit_mb=args.memory_limit_mb, mechanism=mech,
                      timeout_s=args.timeout_s)
        peak = None
        if o.result and o.result.get("ok"):
            peak = o.result["measurement"]["peak_rss_mb"]
        if o.killed:
            r = {"status": "killed", "killed_at_mb": o.killed_at_mb, "detail": "killed by the memory limit"}
        elif o.result and o.result.get("ok") and peak is not None and peak > args.memory_limit_mb:
            # The watchdog polls; a spike just before exit can slip through. It would not fit.
            r = {"status": "killed", "killed_at_mb": peak,
                 "detail": "peak RSS exceeded the limit between two watchdog polls"}
        elif o.result and o.result.get("ok"):
            r = {"status": "fits", "peak_rss_mb": peak, "detail": ""}
        else:
            why = "timed out" if o.timed_out else (o.result or {}).get("error") or o.stderr_tail or f"exit code {o.returncode}"
            if o.returncode in (-9, 137) and o.result is None:
                # SIGKILL we did not send: the kernel OOM killer under the limit.
                r = {"status": "killed", "killed_at_mb": args.memory_limit_mb, "detail": f"SIGKILL ({why})"}
            else:
                r = {"status": "error", "detail": why}
        res[m.key] = r
        at = f" at ~{r['killed_at_mb']:.0f} MB" if r["status"] == "killed" else ""
        prog(f"limit {args.memory_limit_mb:g} MB: {_label(m)}: {r['status']}{at}")

    _run_pool(jobs, one, args.jobs)
    return res


def _stats(runs: list[dict], key: str) -> tuple[float, list[float]]:
    vals = [r["measurement"][key] for r in runs]
    return float(statistics.median(vals)), [float(min(vals)), float(max(vals))]


def _entry(m: Model, runs: list[dict]) -> dict:
    e: dict = {}
    if m.node is not None:
        e.update({"node": m.node, "name": m.name, "depth": m.depth, "children": m.children})
    e["samples"] = m.samples
    e["width"] = m.arch["width"]
    e["num_outputs"] = m.arch["num_outputs"]
    if not runs:  # no samples under this node on this client: nothing to train
        e.update({k: None for k in ("round_time_ms", "round_mem_mb", "peak_rss_mb", "round_cpu_ms", "params",
                                    "rss_before_mb", "startup_peak_rss_mb", "steps")})
        return e
    for key in ("round_time_ms", "round_mem_mb", "peak_rss_mb", "round_cpu_ms", "rss_before_mb"):
        med, spread = _stats(runs, key)
        e[key] = med
        if key != "rss_before_mb":
            e[key + "_spread"] = spread
    startup = [r["startup_peak_rss_mb"] for r in runs if r.get("startup_peak_rss_mb") is not None]
    e["startup_peak_rss_mb"] = float(statistics.median(startup)) if startup else None
    e["params"] = runs[0]["params"]
    e["steps"] = runs[0]["steps"]
    e["hwm_used"] = any(r["measurement"]["hwm_used"] for r in runs)
    return e


def _pct(a: float | None, b: float | None) -> float | None:
    return None if a is None or not b else 100.0 * a / b


# (value key, its percentage-of-flat key, key naming the expert it came from)
_SUMMARY_COLUMNS = (
    ("round_time_ms", "round_time_pct_of_flat", "time_node"),
    ("round_mem_mb", "round_mem_pct_of_flat", "mem_node"),
    ("round_cpu_ms", "round_cpu_pct_of_flat", "cpu_node"),
    ("params", "params_pct_of_flat", "params_node"),
)


def _hmoe_summary(flat: dict, experts: list[dict]) -> dict:
    """Max, median and min over experts, each column on its own (as in the paper), plus the root.

    The median is the lower median, so every value is an actual expert's; ``<col>_node``
    names the expert it came from.
    """
    ok = [e for e in experts if e["round_time_ms"] is not None]
    out: dict = {}
    for stat in ("max", "median", "min"):
        row: dict = {}
        for key, pct, node in _SUMMARY_COLUMNS:
            order = sorted(ok, key=lambda e: e[key])
            e = {"max": order[-1], "min": order[0], "median": order[(len(order) - 1) // 2]}[stat]
            row[key], row[pct], row[node] = e[key], _pct(e[key], flat[key]), e["node"]
        out[stat] = row
    root = next((e for e in ok if e["node"] == 0), None)
    if root is None:
        out["root"] = None
    else:
        out["root"] = {}
        for key, pct, node in _SUMMARY_COLUMNS:
            out["root"][key], out["root"][pct], out["root"][node] = root[key], _pct(root[key], flat[key]), 0
    return out


def read_info_f1(run_dir: str | Path | None) -> dict:
    """info-F1 of the flat and the HMoE model from ``RUN/summary.json``; ``None`` + a note if absent."""
    out = {"flat": None, "hmoe": None, "source": None, "note": "no --run given"}
    if run_dir is None:
        return out
    path = Path(run_dir) / "summary.json"
    if not path.is_file():
        out["note"] = f"{path} not found (the run has not finished, or is not a run directory)"
        return out
    try:
        summary = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        out["note"] = f"{path} is unreadable: {e}"
        return out
    out["source"] = str(path)
    missing = []
    for k in ("flat", "hmoe"):
        v = summary.get(k, {}).get("info_f1") if isinstance(summary.get(k), dict) else None
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            out[k] = float(v)
        else:
            missing.append(f"{k}.info_f1")
    out["note"] = f"{path} lacks {', '.join(missing)}" if missing else ""
    return out


def _loadavg() -> list[float] | None:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except (OSError, AttributeError):  # pragma: no cover - not on Linux/macOS
        return None


def _machine() -> dict:
    import torch

    cpu = platform.processor() or ""
    try:
        for ln in Path("/proc/cpuinfo").read_text().splitlines():
            if ln.startswith("model name"):
                cpu = ln.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        ram = device_facts()["ram_mb"]
    except ImportError:  # pragma: no cover - psutil missing
        ram = None
    return {
        "cpu_count": os.cpu_count(),
        "cpu_model": cpu,
        "ram_mb": ram,
        "platform": f"{platform.system()}-{platform.release()}-{platform.machine()}",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": np.__version__,
    }


# ---------------------------------------------------------------------- output
def _fmt(v, spec: str, na: str = "n/a") -> str:
    return na if v is None else format(v, spec)


def format_tables(res: dict) -> str:
    flat, hs, f1 = res["flat"], res["hmoe_summary"], res["info_f1"]
    lines = [
        f"Per-round cost, {res['dataset_name']} ({res['dataset']}): {res['samples_per_client']} samples/client, "
        f"batch {res['batch_size']}, {res['epochs']:g} epoch(s), {res['threads']} thread(s), "
        f"median of {res['repeats']} fresh process(es){', cold' if not res['warmup'] else ''}"
        f", experts on {res.get('expert_head', 'children')}, root stem stride {res.get('root_stem_stride', 1)}",
        "",
        f"{'model':<14} {'time/round ms':>14} {'% flat':>7} {'memory/round MB':>16} {'% flat':>7} "
        f"{'params':>9} {'% flat':>7} {'info-F1':>8} {'cpu ms':>9} {'% flat':>7}",
    ]

    def row(label, h, f):
        lines.append(
            f"{label:<14} {_fmt(h['round_time_ms'], '14.1f')} {_fmt(h['round_time_pct_of_flat'], '7.1f')} "
            f"{_fmt(h['round_mem_mb'], '16.1f')} {_fmt(h['round_mem_pct_of_flat'], '7.1f')} "
            f"{_fmt(h['params'], '9d')} {_fmt(h['params_pct_of_flat'], '7.1f')} {_fmt(f, '8.3f'):>8} "
            f"{_fmt(h['round_cpu_ms'], '9.1f')} {_fmt(h['round_cpu_pct_of_flat'], '7.1f')}"
        )

    row("Flat Softmax", dict(flat, round_time_pct_of_flat=100.0, round_mem_pct_of_flat=100.0,
                             params_pct_of_flat=100.0, round_cpu_pct_of_flat=100.0), f1["flat"])
    for k in ("max", "median", "min", "root"):
        if hs.get(k):
            row(f"HMoE {k}", hs[k], f1["hmoe"])
    names = {e["node"]: e["name"] for e in res["experts"]}
    notes = [f"max/median/min are taken per column (time max: {names[hs['max']['time_node']]!r}, "
             f"memory max: {names[hs['max']['mem_node']]!r}); cpu ms = CPU time of the same round "
             "(less sensitive to other load than wall time)."]
    if f1["note"]:
        notes.append(f"info-F1 n/a: {f1['note']}." if f1["flat"] is None or f1["hmoe"] is None else f1["note"])
    base = flat.get("rss_before_mb")
    ov = res.get("first_round_overhead")
    if base is not None:
        s = f"process RSS before the round (python + torch + data, not counted): {base:.0f} MB"
        if ov:
            s += (f"; torch's first-round warm-up, also not counted: +{ov['round_mem_mb']:.0f} MB, "
                  f"{ov['round_time_ms']:.0f} ms")
        notes.append(s + ".")
        ok = [e for e in res["experts"] if e["peak_rss_mb"] is not None]
        if flat.get("startup_peak_rss_mb") is not None and ok:
            notes.append(
                f"whole-process peak RSS: start-up {flat['startup_peak_rss_mb']:.0f} MB; during the round "
                f"flat {flat['peak_rss_mb']:.0f} MB, experts {min(e['peak_rss_mb'] for e in ok):.0f}-"
                f"{max(e['peak_rss_mb'] for e in ok):.0f} MB."
            )
    lines += [""] + notes + [""]

    lim = res.get("memory_limit")
    lines.append(
        f"{'node':>5} {'name':<28} {'depth':>5} {'kids':>4} {'samples':>7} {'params':>8} "
        f"{'time ms [min-max]':>24} {'%':>6} {'cpu ms':>8} {'mem MB [min-max]':>22} {'%':>6}" + ("  limit" if lim else "")
    )
    entries = [("flat", dict(res["flat"], node=None, name="Flat Softmax", depth=None, children=None))]
    entries += [(str(e["node"]), e) for e in res["experts"]]
    for key, e in entries:
        if e["round_time_ms"] is None:
            t = m = "no samples"
            tp = mp = c = ""
        else:
            ts, ms = e["round_time_ms_spread"], e["round_mem_mb_spread"]
            t = f"{e['round_time_ms']:.1f} [{ts[0]:.1f}-{ts[1]:.1f}]"
            m = f"{e['round_mem_mb']:.1f} [{ms[0]:.1f}-{ms[1]:.1f}]"
            tp = f"{_pct(e['round_time_ms'], flat['round_time_ms']):.1f}"
            mp = f"{_pct(e['round_mem_mb'], flat['round_mem_mb']):.1f}"
            c = f"{e['round_cpu_ms']:.1f}"
        name = e["name"] if len(e["name"]) <= 28 else e["name"][:27] + "…"
        s = (f"{_fmt(e['node'], '5d', '-'):>5} {name:<28} {_fmt(e['depth'], '5d', '-'):>5} "
             f"{_fmt(e['children'], '4d', '-'):>4} {e['samples']:7d} {_fmt(e['params'], '8d', '-'):>8} "
             f"{t:>24} {tp:>6} {c:>8} {m:>22} {mp:>6}")
        if lim:
            r = lim["results"].get(key)
            if r is None:
                s += "  -"
            elif r["status"] == "killed":
                s += f"  killed at ~{r['killed_at_mb']:.0f} MB"
            else:
                s += f"  {r['status']}"
        lines.append(s)
    if lim:
        fits = [k for k, r in lim["results"].items() if r["status"] == "fits"]
        n_exp = sum(1 for k in lim["results"] if k != "flat")
        lines += ["", f"memory limit {lim['limit_mb']:g} MB ({lim['mechanism']}): flat "
                  f"{lim['results'].get('flat', {}).get('status', 'n/a')}; "
                  f"{sum(1 for k in fits if k != 'flat')}/{n_exp} experts fit."]
    return "\n".join(lines)


def write_plot(res: dict, path: str | Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    ex = [e for e in res["experts"] if e["round_time_ms"] is not None]
    flat = res["flat"]
    n = len(ex)
    fig, axes = plt.subplots(2, 1, figsize=(max(7.0, min(18.0, 0.16 * n + 4)), 8), constrained_layout=True)
    panels = (("round_time_ms", "time / round (ms)"), ("round_mem_mb", "memory / round (MB)"))
    for ax, (key, label) in zip(axes, panels):
        order = sorted(ex, key=lambda e: e[key], reverse=True)
        vals = np.array([e[key] for e in order])
        lo = np.array([e[key + "_spread"][0] for e in order])
        hi = np.array([e[key + "_spread"][1] for e in order])
        pos = np.arange(n)
        ax.bar(pos, vals, width=0.8 if n <= 40 else 0.9, color="tab:blue", label="expert (median)")
        if res["repeats"] > 1:
            ax.errorbar(pos, vals, yerr=[vals - lo, hi - vals], fmt="none", ecolor="black", elinewidth=0.7,
                        capsize=0 if n > 40 else 2, label="min-max over repeats")
        ax.axhline(flat[key], color="tab:red", linestyle="--", label=f"flat model: {flat[key]:.1f}")
        ax.axhline(0.25 * flat[key], color="tab:gray", linestyle=":", label="25% of flat")
        ax.set_yscale("log")
        # Room above the flat line for the legend; plain numbers on the log axis.
        ax.set_ylim(max(min(lo.min(), 0.25 * flat[key]) * 0.6, 1e-3), max(hi.max(), flat[key]) * 4)
        ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.yaxis.set_minor_formatter(NullFormatter())
        ax.set_ylabel(label + ", log scale")
        ax.set_xlim(-0.7, n - 0.3)
        # Name every bar when there are few; otherwise only the ten largest.
        shown = n if n <= 30 else 10
        ax.set_xticks(pos[:shown])
        ax.set_xticklabels([e["name"][:24] for e in order[:shown]], rotation=60, ha="right", fontsize=7)
        ax.legend(fontsize=7, loc="upper right", ncol=2)
        ax.set_title(f"{label} per expert, sorted ({n} experts" + (", 10 largest named)" if shown < n else ")"),
                     fontsize=9)
    fig.suptitle(f"{res['dataset_name']}: one client round, {res['samples_per_client']} samples, batch "
                 f"{res['batch_size']}, {res['threads']} thread(s), median of {res['repeats']}", fontsize=10)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def profile(args: argparse.Namespace) -> dict:
    """Run the whole profile for parsed ``args`` (see :func:`edgehmoe.cli.profile.get_args_parser`);
    the results dict."""
    mech = limit_mechanism(args.limit_mechanism) if args.memory_limit_mb is not None else None
    load_start = _loadavg()
    ds, x, y, mean, std = _load_client(args.dataset, args.samples_per_client, args.seed)
    head, stride = getattr(args, "expert_head", "leaves"), getattr(args, "root_stem_stride", 2)
    expert_stride, groups = getattr(args, "expert_stem_stride", 2), getattr(args, "tree_groups", "auto")
    models = _models(ds, y, args.flat_width, head, stride, expert_stride, groups)
    if not args.quiet:
        print(f"{ds.name}: {len(y)} client samples, {ds.num_classes} classes, {len(models) - 1} experts, "
              f"{args.repeats} repeat(s) -> {sum(1 for m in models if m.samples) * args.repeats} fresh processes",
              file=sys.stderr, flush=True)
    with tempfile.TemporaryDirectory(prefix="edgehmoe-profile-") as tmp:
        data = str(Path(tmp) / "client.npz")
        np.savez(data, x=x, y=y.astype(np.int64), mean=mean, std=std)
        runs = _measure(models, data, args)
        limit = _limit_pass(models, data, args, mech) if mech is not None else None
    flat = _entry(models[0], runs["flat"])
    experts = [_entry(m, runs[m.key]) for m in models[1:]]
    warm = [r["warmup"] for rs in runs.values() for r in rs if r.get("warmup")]
    res = {
        "version": JSON_VERSION,
        "dataset": args.dataset,
        "dataset_name": ds.name,
        "image_size": int(x.shape[1]),
        "num_classes": int(ds.num_classes),
        "samples_per_client": int(len(y)),
        "batch_size": args.batch_size,
        "epochs": args.epochs,
        "threads": args.threads,
        "repeats": args.repeats,
        "jobs": args.jobs,
        "seed": args.seed,
        "flat_width": args.flat_width,
        "expert_head": head,
        "root_stem_stride": stride,
        "expert_stem_stride": expert_stride,
        "tree_groups": groups,
        "warmup": not args.cold,
        "flat": flat,
        "experts": experts,
        "hmoe_summary": _hmoe_summary(flat, experts),
        "first_round_overhead": {
            "round_time_ms": float(statistics.median(w["round_time_ms"] for w in warm)),
            "round_mem_mb": float(statistics.median(w["round_mem_mb"] for w in warm)),
        } if warm else None,
        "info_f1": read_info_f1(args.run),
        "memory_limit": {
            "limit_mb": args.memory_limit_mb,
            "mechanism": mech.kind,
            "description": mech.description,
            "results": limit,
        } if limit is not None else None,
        # Other processes on the machine distort time (not memory): the load is recorded.
        "machine": dict(_machine(), loadavg_start=load_start, loadavg_end=_loadavg()),
    }
    return res

