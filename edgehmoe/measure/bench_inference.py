"""Inference latency and resident memory of an ONNX bundle: the chain of experts vs the flat model.

Each model is measured in a **fresh subprocess** (``python -m edgehmoe.measure.worker
inference CFG``, running :func:`inference_job`) that imports numpy, onnxruntime and
:mod:`edgehmoe.edge.runtime` only (no torch), loads its input images, records its RSS
(``baseline``), then creates the predictor, warms up, and times ``--repeats`` predictions
per batch size. Reported per model and batch size:

- ``p50_ms`` / ``p95_ms``: wall-clock latency **per image** (call time / batch size), the
  whole call: uint8 → preprocessing → every expert on the path → routing;
- ``cpu_p50_ms``: process CPU time per image (less sensitive to a busy machine);
- ``experts_per_call``: mean number of expert runs per call (chain only);
- ``mmacs_per_image``: millions of multiply-accumulates per image, from the cost model
  :func:`edgehmoe.model.cost.cnn3_macs` of every expert actually run;

and per model: ``rss_mb`` (absolute RSS after the runs), ``rss_delta_mb`` (minus the
baseline: what the model itself holds), ``peak_rss_mb`` (kernel high-water mark) and
``peak_delta_mb``, plus ``sessions_created`` / ``sessions_alive``. Memory is read by the one
meter, :mod:`edgehmoe.measure.meter`.

Inputs are random uint8 images of the bundle's size, or real images with ``--dataset SPEC``
(so the chain routes as it would in use). ``--threads 1`` mimics one Raspberry Pi core.
``--sweep`` also measures ONNX Runtime session options (arena, memory pattern, graph
optimisation level, threads) for both models; ``--make-cifar-bundle DIR`` first writes a
randomly initialised CIFAR-100-sized bundle (flat w=32 over 100 classes; root w=16 + 20
experts w=8), which needs torch.

Usage (``edgehmoe-bench-inference``, ``python -m edgehmoe.cli.bench_inference`` and
``python tools/bench_inference.py`` are the same command)::

    edgehmoe-bench-inference --make-cifar-bundle /tmp/cifar-bundle
    edgehmoe-bench-inference --bundle /tmp/cifar-bundle --threads 1 \\
        --dataset cifar100:../shared/data/cifar100/train.npz --json bench.json
"""

from __future__ import annotations

import logging
import os
import statistics
import time
from pathlib import Path

import numpy as np

from edgehmoe.errors import RunError
from edgehmoe.measure.limits import run_child
from edgehmoe.measure.meter import peak_rss_mb, release_free_memory, reset_peak, rss_mb
from edgehmoe.measure.worker import worker_command, worker_env
from edgehmoe.model.cost import cnn3_macs  # the cost model lives with the networks; re-exported here

__all__ = ["CHAIN_OPTIONS", "INT8_VARIANT", "SWEEP", "BenchError", "bundle_sizes", "cnn3_macs", "inference_job",
           "chain_over_flat", "int8_over_fp32", "make_cifar_bundle", "run_worker", "table"]

logger = logging.getLogger(__name__)

# Session option variants for --sweep: name -> keyword arguments of make_session_options.
SWEEP = {
    "default (arena off, pattern off, opt all)": {},
    "fused off (one session per expert)": {"fused": "off"},
    "fused on (path + tree graphs)": {"fused": "on"},
    "max_batch 8": {"max_batch": 8},
    "arena on": {"mem_arena": True},
    "pattern on": {"mem_pattern": True},
    "arena+pattern on (ORT default)": {"mem_arena": True, "mem_pattern": True},
    "opt extended (no NCHWc layout)": {"optimization": "extended"},
    "opt basic": {"optimization": "basic"},
    "opt disable": {"optimization": "disable"},
    "2 threads": {"threads": 2},
}


# The variant name of the rows measured on --int8-bundle.
INT8_VARIANT = "int8"
# Options of BundlePredictor (not of the ONNX Runtime session) a variant may set.
CHAIN_OPTIONS = ("fused", "max_batch")


class BenchError(RunError):
    """A benchmark that cannot complete (a worker failed, inputs do not fit the bundle)."""


def _mb(v: float | None) -> float:
    return float("nan") if v is None else v


# ---------------------------------------------------------------------- worker
def _load_inputs(cfg: dict, image_shape: tuple[int, int, int]) -> np.ndarray:
    n = int(cfg["pool"])
    if cfg.get("dataset"):
        from edgehmoe.data import load_dataset

        ds = load_dataset(cfg["dataset"], cfg.get("split", "train"), limit_per_class=max(1, n // 10))
        rng = np.random.default_rng(0)
        x = ds.x[rng.permutation(len(ds.x))[:n]]
        if x.shape[1:] != image_shape:
            raise BenchError(f"dataset images are {x.shape[1:]}, the bundle takes {image_shape}; "
                             "give a --dataset with the bundle's image size")
        return np.ascontiguousarray(x)
    return np.random.default_rng(0).integers(0, 256, size=(n, *image_shape), dtype=np.uint8)


def inference_job(cfg: dict) -> dict:
    """Measure one model (``cfg["model"]``: ``chain`` or ``flat``) of a bundle; run in a fresh
    child process (see :mod:`edgehmoe.measure.worker`). Returns one row of the JSON ``results``."""
    from edgehmoe.edge.manifest import read_manifest
    from edgehmoe.edge.runtime import (
        BundlePredictor,
        FlatPredictor,
        make_session_options,
    )

    manifest = read_manifest(cfg["bundle"])
    shape = tuple(manifest["input"]["image_shape"])
    x = _load_inputs(cfg, shape)
    opts = dict(cfg.get("options", {}))
    threads = int(opts.pop("threads", cfg["threads"]))
    # Predictor options (not session options); the chain's defaults are BundlePredictor's.
    chain_opts = {k: opts.pop(k) for k in CHAIN_OPTIONS if k in opts}
    so = make_session_options(threads, **opts)
    import gc

    gc.collect()
    release_free_memory()  # loading a dataset leaves freed temporaries in the heap
    rss_interp = rss_mb()
    # Warm ONNX Runtime up (environment, kernel registry, first-session costs: ~18 MB on
    # x86-64, the same for every model) with the smallest expert, then drop that session:
    # the "model" deltas below are then what the model itself adds.
    smallest = min(manifest["experts"].values(), key=lambda e: e["bytes"])
    warm = BundlePredictor(cfg["bundle"], max_sessions=1, threads=threads, session_options=so, verify=False)
    node = int(next(k for k, e in manifest["experts"].items() if e is smallest))
    warm.expert_logits(node, warm.preprocess(x[:1]))
    warm.close()
    del warm
    release_free_memory()
    rss0 = rss_mb()
    reset_peak()
    t_load = time.perf_counter()
    macs = {"total": 0, "images": 0}
    if cfg["model"] == "chain":
        pred = BundlePredictor(cfg["bundle"], max_sessions=cfg["max_sessions"], threads=threads, session_options=so,
                               **chain_opts)
        run = pred.predict_greedy
        node_macs = {int(k): cnn3_macs(e["arch"]) for k, e in manifest["experts"].items()}
    else:
        pred = FlatPredictor(cfg["bundle"], threads=threads, session_options=so)
        pred.session()
        run = pred.predict
        flat_macs = cnn3_macs(manifest["flat"]["arch"])
    load_ms = (time.perf_counter() - t_load) * 1e3
    out: dict = {"model": cfg["model"], "threads": threads, "options": cfg.get("options", {}),
                 "interpreter_rss_mb": rss_interp, "baseline_rss_mb": rss0, "open_ms": load_ms, "batches": {},
                 "malloc_env": {k: v for k, v in os.environ.items() if k.startswith(("MALLOC_", "GLIBC_TUNABLES"))}}
    rng = np.random.default_rng(1)
    for b in cfg["batch_sizes"]:
        for _ in range(cfg["warmup"]):
            run(x[rng.integers(0, len(x), size=b)])
        calls0 = getattr(pred, "expert_calls", 0)
        runs0 = getattr(pred, "session_runs", 0)
        samples0 = dict(getattr(pred, "expert_samples", {}))
        wall, cpu = [], []
        macs["total"] = 0
        for _ in range(cfg["repeats"]):
            xb = x[rng.integers(0, len(x), size=b)]
            c0, t0 = time.process_time(), time.perf_counter()
            run(xb)
            if cfg["model"] == "flat":
                macs["total"] += flat_macs * b
            wall.append((time.perf_counter() - t0) * 1e3 / b)
            cpu.append((time.process_time() - c0) * 1e3 / b)
        if cfg["model"] == "chain":  # every expert evaluation, whether in its own session or a fused graph
            macs["total"] = sum(node_macs[n] * (v - samples0.get(n, 0)) for n, v in pred.expert_samples.items())
        wall.sort()
        out["batches"][str(b)] = {
            "p50_ms": statistics.median(wall),
            "p95_ms": wall[min(len(wall) - 1, int(round(0.95 * (len(wall) - 1))))],
            "mean_ms": statistics.fmean(wall),
            "cpu_p50_ms": statistics.median(cpu),
            "experts_per_call": (getattr(pred, "expert_calls", 0) - calls0) / cfg["repeats"] if cfg["model"] == "chain" else 1.0,
            "mmacs_per_image": macs["total"] / (cfg["repeats"] * b) / 1e6,
            "session_runs_per_call": (pred.session_runs - runs0) / cfg["repeats"] if cfg["model"] == "chain" else 1.0,
        }
    out["rss_mb"] = rss_mb()
    out["rss_delta_mb"] = out["rss_mb"] - rss0  # model + what the allocator keeps after the runs
    out["rss_over_interpreter_mb"] = out["rss_mb"] - rss_interp
    out["peak_rss_mb"] = _mb(peak_rss_mb())
    out["peak_delta_mb"] = out["peak_rss_mb"] - rss0
    release_free_memory()
    out["live_delta_mb"] = rss_mb() - rss0  # after release_free_memory(): what is really held
    out["sessions_created"] = int(getattr(pred, "sessions_created", 1))
    out["sessions_alive"] = len(pred.loaded_experts) + len(pred.loaded_fused) if cfg["model"] == "chain" else 1
    out["fused_graphs"] = pred.loaded_fused if cfg["model"] == "chain" else []
    out["precision"] = manifest.get("precision", "float32")
    return out


def run_worker(cfg: dict) -> dict:
    env = worker_env()
    # One thread for numpy's BLAS too, so the measurement is ONNX Runtime's thread setting.
    env.setdefault("OMP_NUM_THREADS", "1")
    env.setdefault("OPENBLAS_NUM_THREADS", "1")
    if cfg.get("mmap_threshold"):
        env["MALLOC_MMAP_THRESHOLD_"] = str(int(cfg["mmap_threshold"]))
    o = run_child(worker_command("inference", cfg), env=env, timeout_s=None)
    if o.result is None or not o.result.get("ok"):
        why = (o.result or {}).get("error", "")
        detail = "\n".join(s for s in (why, o.stderr.strip()[-3000:]) if s) or f"exit code {o.returncode}"
        raise BenchError(f"benchmark worker for {cfg['model']} failed:\n{detail}")
    row = dict(o.result)
    del row["ok"]
    return row


# ---------------------------------------------------------------------- bundle for benchmarks
def make_cifar_bundle(out: str | Path, seed: int = 0, root_width: int = 16, expert_width: int = 8, flat_width: int = 32) -> Path:
    """A randomly initialised CIFAR-100-sized bundle (needs torch): root w=16, 20 experts w=8, flat w=32."""
    import tempfile

    import torch

    from edgehmoe.data.taxonomy import cifar100_hierarchy
    from edgehmoe.export.bundle import export_bundle
    from edgehmoe.model.arch import ArchSpec, build_model, count_params, flat_spec
    from edgehmoe.model.central import new_model_dir
    from edgehmoe.model.training import state_arrays

    fine = [f"fine{i}" for i in range(100)]
    coarse = [f"coarse{i}" for i in range(20)]
    tree = cifar100_hierarchy(fine, coarse, [i // 5 for i in range(100)])
    torch.manual_seed(seed)
    with tempfile.TemporaryDirectory() as tmp:
        md = new_model_dir(Path(tmp) / "model", tree, 32, [0.507, 0.487, 0.441], [0.267, 0.256, 0.276], "random-cifar100")
        for node in tree.internal_nodes.tolist():
            spec = ArchSpec(width=root_width if node == 0 else expert_width, num_outputs=int(tree.num_children[node]))
            m = build_model(spec)
            md.write_expert(node, spec.to_dict(), state_arrays(m), count_params(m))
        spec = flat_spec(tree, 32, flat_width)
        m = build_model(spec)
        md.write_flat(spec.to_dict(), state_arrays(m), count_params(m))
        md.save_json()
        return export_bundle(md.path, out, overwrite=True).parent


# ---------------------------------------------------------------------- table
def table(rows: list[dict], batch_sizes: list[int]) -> str:
    head = ["model", "options"] + [f"b={b} p50/p95 ms" for b in batch_sizes] + [f"b={b} cpu ms" for b in batch_sizes] + [
        "MMAC/img", "RSS MB", "ΔRSS MB", "peak Δ MB", "live Δ MB", "sessions"]
    lines = [" | ".join(head), " | ".join("---" for _ in head)]
    for r in rows:
        opts = ", ".join(f"{k}={v}" for k, v in r["options"].items()) or "default"
        if r.get("variant") == INT8_VARIANT:
            opts = f"int8 bundle ({opts})"
        cells = [r["model"], opts]
        cells += [f"{r['batches'][str(b)]['p50_ms']:.3f} / {r['batches'][str(b)]['p95_ms']:.3f}" for b in batch_sizes]
        cells += [f"{r['batches'][str(b)]['cpu_p50_ms']:.3f}" for b in batch_sizes]
        cells += [f"{r['batches'][str(batch_sizes[0])]['mmacs_per_image']:.2f}", f"{r['rss_mb']:.1f}",
                  f"{r['rss_delta_mb']:.2f}", f"{r['peak_delta_mb']:.2f}", f"{r['live_delta_mb']:.2f}",
                  f"{r['sessions_alive']}/{r['sessions_created']}"]
        lines.append(" | ".join(cells))
    return "\n".join(lines)


def bundle_sizes(bundle: str | Path) -> dict:
    """Bytes of a bundle's files: ``experts``, ``flat``, ``fused`` graphs and ``total``, plus
    its ``precision``."""
    from edgehmoe.edge.manifest import read_manifest

    m = read_manifest(bundle)
    experts = sum(int(e["bytes"]) for e in m["experts"].values())
    flat = int(m["flat"]["bytes"]) if m.get("flat") else 0
    fused = sum(int(g["bytes"]) for g in ((m.get("fused") or {}).get("graphs") or {}).values())
    return {"experts": experts, "flat": flat, "fused": fused, "total": experts + flat + fused,
            "precision": m.get("precision", "float32")}


def int8_over_fp32(rows: list[dict], variant: str, batch_sizes: list[int], fp32: dict, int8: dict) -> dict:
    """Per model: int8 / float32 ratios of p50 latency per batch size and of memory (the int8
    bundle's rows are the ``int8`` variant, the float32 ones ``variant``), and of bundle bytes."""
    out: dict = {}
    for model in ("chain", "flat"):
        a = next((r for r in rows if r["variant"] == INT8_VARIANT and r["model"] == model), None)
        b = next((r for r in rows if r["variant"] == variant and r["model"] == model), None)
        if a is None or b is None:
            continue
        out[model] = {
            **{f"latency_ratio_b{n}": a["batches"][str(n)]["p50_ms"] / b["batches"][str(n)]["p50_ms"] for n in batch_sizes},
            **{f"cpu_ratio_b{n}": a["batches"][str(n)]["cpu_p50_ms"] / b["batches"][str(n)]["cpu_p50_ms"] for n in batch_sizes},
            "rss_delta_ratio": a["rss_delta_mb"] / max(b["rss_delta_mb"], 1e-9),
        }
    out["bytes_ratio"] = {k: int8[k] / fp32[k] if fp32[k] else None for k in ("experts", "flat", "fused", "total")}
    return out


def chain_over_flat(rows: list[dict], variants, batch_sizes: list[int]) -> dict:
    """Per variant: chain / flat ratios of p50 latency per batch size and of memory."""
    summary = {}
    for name in variants:
        by = {r["model"]: r for r in rows if r["variant"] == name}
        if "chain" in by and "flat" in by:
            summary[name] = {
                **{f"latency_ratio_b{b}": by["chain"]["batches"][str(b)]["p50_ms"] / by["flat"]["batches"][str(b)]["p50_ms"]
                   for b in batch_sizes},
                "rss_delta_ratio": by["chain"]["rss_delta_mb"] / max(by["flat"]["rss_delta_mb"], 1e-9),
                "peak_delta_ratio": by["chain"]["peak_delta_mb"] / max(by["flat"]["peak_delta_mb"], 1e-9),
                "live_delta_ratio": by["chain"]["live_delta_mb"] / max(by["flat"]["live_delta_mb"], 1e-9),
            }
    return summary
