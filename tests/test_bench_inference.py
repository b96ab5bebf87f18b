"""Tests of the inference bench (:mod:`edgehmoe.measure.bench_inference`,
``edgehmoe-bench-inference``, ``tools/bench_inference.py``): its cost model against the real
network, and a real (tiny) bench run through the thin tools/ script.

The bundle has random weights over ``synthetic:coarse=2,fine=2`` at 16 px::

    0 root ─ 1 super0 ─ 3 (class 0), 4 (class 1)
           └ 2 super1 ─ 5 (class 2), 6 (class 3)

root w=8 (2-way), super0/super1 w=4 (2-way each), flat w=8 (4-way). Greedy routing runs the
root and exactly one superclass expert per image.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from edgehmoe.measure.bench_inference import cnn3_macs
from edgehmoe.measure.limits import run_child
from edgehmoe.measure.worker import worker_command, worker_env

ROOT = Path(__file__).resolve().parents[1]
SIZE = 16

ROW_KEYS = {
    "model", "threads", "options", "interpreter_rss_mb", "baseline_rss_mb", "open_ms", "batches", "malloc_env",
    "rss_mb", "rss_delta_mb", "rss_over_interpreter_mb", "peak_rss_mb", "peak_delta_mb", "live_delta_mb",
    "sessions_created", "sessions_alive", "variant", "fused_graphs", "precision", "bundle",
}
BATCH_KEYS = {"p50_ms", "p95_ms", "mean_ms", "cpu_p50_ms", "experts_per_call", "mmacs_per_image", "session_runs_per_call"}
CONFIG_KEYS = {"bundle", "threads", "batch_sizes", "repeats", "warmup", "max_sessions", "dataset", "split", "pool",
               "mmap_threshold"}


def _torch_macs(arch: dict) -> int:
    """Multiply-accumulates of one image through the real torch network, counted by hooks."""
    import torch

    from edgehmoe.model.arch import build_model

    model = build_model(arch).eval()
    total = [0]

    def conv(m, inp, out):
        total[0] += out.numel() * (m.in_channels // m.groups) * m.kernel_size[0] * m.kernel_size[1]

    def linear(m, inp, out):
        total[0] += out.numel() * m.in_features

    for m in model.modules():
        if isinstance(m, torch.nn.Conv2d):
            m.register_forward_hook(conv)
        elif isinstance(m, torch.nn.Linear):
            m.register_forward_hook(linear)
    with torch.no_grad():
        model(torch.zeros(1, arch.get("in_channels", 3), arch["input_size"], arch["input_size"]))
    return total[0]


@pytest.mark.parametrize("arch", [
    {"width": 4, "num_outputs": 2, "input_size": 16},
    {"width": 16, "num_outputs": 20, "input_size": 32},
    {"width": 32, "num_outputs": 100, "input_size": 32},
    {"width": 8, "num_outputs": 5, "input_size": 64, "in_channels": 3},
])
def test_cost_model_counts_the_networks_macs(arch):
    assert cnn3_macs(arch) == _torch_macs(arch)


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    """A random-weight bundle (no training: the bench measures cost, not accuracy)."""
    import torch

    from edgehmoe.data.synthetic import make_synthetic
    from edgehmoe.export.bundle import export_bundle
    from edgehmoe.model.arch import ArchSpec, build_model, count_params
    from edgehmoe.model.central import new_model_dir
    from edgehmoe.model.training import state_arrays

    tmp = tmp_path_factory.mktemp("bench")
    _, _, _, tree = make_synthetic(coarse=2, fine=2, per_class=2, size=SIZE, seed=0)
    torch.manual_seed(0)
    md = new_model_dir(tmp / "model", tree, SIZE, [0.5] * 3, [0.25] * 3, "synthetic")
    for node in tree.internal_nodes.tolist():
        spec = ArchSpec(width=8 if node == 0 else 4, num_outputs=int(tree.num_children[node]), input_size=SIZE)
        m = build_model(spec)
        md.write_expert(node, spec.to_dict(), state_arrays(m), count_params(m))
    spec = ArchSpec(width=8, num_outputs=tree.num_leaves, input_size=SIZE)
    m = build_model(spec)
    md.write_flat(spec.to_dict(), state_arrays(m), count_params(m))
    md.save_json()
    return export_bundle(md.path, tmp / "bundle").parent


@pytest.mark.slow
def test_bench_through_the_tools_script(bundle, tmp_path):
    # Execute
    out = tmp_path / "bench.json"
    p = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "bench_inference.py"), "--bundle", str(bundle), "--repeats", "5",
         "--warmup", "1", "--pool", "20", "--batch-sizes", "1,4", "--json", str(out)],
        capture_output=True, text=True, timeout=600,
    )
    # Assert
    assert p.returncode == 0, p.stderr
    lines = p.stdout.splitlines()
    assert lines[0] == f"bundle {bundle}, threads 1, inputs: random uint8, repeats 5, max_sessions 32"
    assert lines[1].startswith("model | options | b=1 p50/p95 ms | b=4 p50/p95 ms | b=1 cpu ms | b=4 cpu ms | MMAC/img")
    assert [ln.split(" | ")[0] for ln in lines[3:5]] == ["chain", "flat"]
    assert p.stderr.splitlines() == ["measured chain [default]", "measured flat [default]"]
    res = json.loads(out.read_text())
    assert set(res) == {"config", "results", "chain_over_flat", "bundles"}
    assert set(res["config"]) == CONFIG_KEYS and res["config"]["batch_sizes"] == [1, 4]
    chain, flat = res["results"]
    assert set(chain) == ROW_KEYS and set(flat) == ROW_KEYS
    manifest = json.loads((bundle / "manifest.json").read_text())
    root, super0 = manifest["experts"]["0"]["arch"], manifest["experts"]["1"]["arch"]
    flat_arch = manifest["flat"]["arch"]
    for b in ("1", "4"):
        assert set(chain["batches"][b]) == BATCH_KEYS
        # Greedy runs the root and one superclass expert per image (both superclass experts cost the same).
        assert chain["batches"][b]["mmacs_per_image"] == pytest.approx((cnn3_macs(root) + cnn3_macs(super0)) / 1e6)
        assert flat["batches"][b]["mmacs_per_image"] == pytest.approx(cnn3_macs(flat_arch) / 1e6)
        assert flat["batches"][b]["experts_per_call"] == 1.0
        assert 1.0 <= chain["batches"][b]["experts_per_call"] <= 3.0  # root + the superclass experts reached
        assert 0 < chain["batches"][b]["p50_ms"] <= chain["batches"][b]["p95_ms"]
    assert flat["sessions_alive"] == 1 and 2 <= chain["sessions_alive"] <= 3
    for r in (chain, flat):
        assert r["peak_rss_mb"] >= r["baseline_rss_mb"] and r["peak_delta_mb"] == pytest.approx(
            r["peak_rss_mb"] - r["baseline_rss_mb"])
        assert r["rss_delta_mb"] == pytest.approx(r["rss_mb"] - r["baseline_rss_mb"])
    ratio = res["chain_over_flat"]["default"]
    assert set(ratio) == {"latency_ratio_b1", "latency_ratio_b4", "rss_delta_ratio", "peak_delta_ratio",
                          "live_delta_ratio"}
    assert ratio["latency_ratio_b1"] == pytest.approx(chain["batches"]["1"]["p50_ms"] / flat["batches"]["1"]["p50_ms"])


def test_bench_worker_runs_without_torch(bundle):
    # Prepare: the worker command, in an interpreter where importing torch fails
    cfg = {"bundle": str(bundle), "threads": 1, "batch_sizes": [2], "repeats": 2, "warmup": 1, "max_sessions": 32,
           "dataset": None, "split": "train", "pool": 8, "mmap_threshold": None, "model": "chain", "options": {}}
    cmd = worker_command("inference", cfg)
    blocker = textwrap.dedent("""
        import sys
        class NoTorch:
            def find_spec(self, name, path=None, target=None):
                if name == "torch" or name.startswith("torch."):
                    raise ImportError("torch is blocked in this test")
        sys.meta_path.insert(0, NoTorch())
        from edgehmoe.measure.worker import main
        main()
    """)
    # Execute
    o = run_child([cmd[0], "-c", blocker, *cmd[3:]], env=worker_env(), timeout_s=300)
    # Assert
    assert o.returncode == 0, o.stderr
    assert o.result["ok"] is True and o.result["model"] == "chain"
    assert o.result["batches"]["2"]["experts_per_call"] >= 1.0


def test_bench_bad_arguments_are_one_line_errors(capsys):
    from edgehmoe.cli.bench_inference import main

    assert main([]) == 2
    assert capsys.readouterr().err == "bench_inference: error: give --bundle BUNDLE (or --make-cifar-bundle DIR)\n"
    assert main(["--bundle", "x", "--batch-sizes", "1,a"]) == 2
    assert capsys.readouterr().err == "bench_inference: error: --batch-sizes must be integers like 1,32; got '1,a'\n"
    assert main(["--bundle", "/does/not/exist", "--repeats", "1", "--models", "flat"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("bench_inference: error: benchmark worker for flat failed:\nBundleError: ")
    assert "/does/not/exist" in err and "Traceback" not in err


@pytest.mark.slow
def test_bench_int8_bundle_and_fused_variants(bundle, tmp_path):
    """--int8-bundle measures the int8 copy of the same model (rows of variant "int8") and
    reports int8 / float32 ratios; the fused variants run the chain through its fused graphs
    (one ONNX Runtime call per batch) or one session per expert."""
    import numpy as np

    from edgehmoe.export.bundle import export_bundle

    # Prepare: the same random-weight model, int8 (calibrated on random images) with fused graphs.
    model = json.loads((bundle / "manifest.json").read_text())["source"]["model_dir"]
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, size=(64, SIZE, SIZE, 3), dtype=np.uint8)
    int8 = export_bundle(model, tmp_path / "int8", quantize="int8", calibration=(x, rng.integers(0, 4, size=64)),
                         calibration_size=64, fused=("path", "tree")).parent
    out = tmp_path / "bench.json"
    # Execute
    p = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "bench_inference.py"), "--bundle", str(int8), "--int8-bundle", str(int8),
         "--repeats", "5", "--warmup", "1", "--pool", "20", "--batch-sizes", "1,4", "--json", str(out),
         "--variants", "default,fused off (one session per expert)"],
        capture_output=True, text=True, timeout=600,
    )
    # Assert
    assert p.returncode == 0, p.stderr
    res = json.loads(out.read_text())
    rows = {(r["variant"], r["model"]): r for r in res["results"]}
    assert sorted(rows) == sorted((v, m) for v in ("default", "fused off (one session per expert)", "int8")
                                  for m in ("chain", "flat"))
    fused, off = rows[("default", "chain")], rows[("fused off (one session per expert)", "chain")]
    assert fused["fused_graphs"] == ["path", "tree"] and off["fused_graphs"] == []
    for b in ("1", "4"):
        assert fused["batches"][b]["session_runs_per_call"] == 1.0  # the whole descent in one call
        assert off["batches"][b]["session_runs_per_call"] == off["batches"][b]["experts_per_call"] >= 2.0
        assert fused["batches"][b]["mmacs_per_image"] == pytest.approx(off["batches"][b]["mmacs_per_image"])
    assert all(r["precision"] == "int8" for r in res["results"])
    assert set(res["chain_over_flat"]) == {"default", "fused off (one session per expert)", "int8"}
    sizes = res["bundles"][str(int8)]
    assert sizes["precision"] == "int8" and sizes["fused"] > 0
    assert sizes["total"] == sizes["experts"] + sizes["flat"] + sizes["fused"]
    ratio = res["int8_over_fp32"]
    # The same bundle on both sides: bytes ratios are exactly 1, latency ratios are measured.
    assert ratio["bytes_ratio"] == {"experts": 1.0, "flat": 1.0, "fused": 1.0, "total": 1.0}
    assert ratio["chain"]["latency_ratio_b1"] == pytest.approx(
        rows[("int8", "chain")]["batches"]["1"]["p50_ms"] / fused["batches"]["1"]["p50_ms"])
