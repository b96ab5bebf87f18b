"""`tools/compare_runs.py`: separately made flat and HMoE runs compared at equal client MACs."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
from test_rounds import const_like, make_server

ROOT = Path(__file__).resolve().parents[1]


def _tool():
    spec = importlib.util.spec_from_file_location("compare_runs", ROOT / "tools" / "compare_runs.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _run(tmp_path: Path, kind: str, rounds: int, n: int) -> Path:
    def reply(dev, task):
        return [fake.result(dev, task, const_like(task.weights, 0.0, 1), n)]

    server, fake, _ = make_server(tmp_path / kind, reply, ["a"], kind=kind, rounds=rounds, eval_every=1)
    server.run()
    return Path(server.cfg.run.out)


def test_compare_runs_reads_flat_at_the_hmoe_runs_macs(tmp_path, capsys):
    from edgehmoe.model.cost import train_macs

    tool = _tool()
    flat, hmoe = _run(tmp_path, "flat", 3, 20), _run(tmp_path, "hmoe", 4, 10)
    out = tmp_path / "cmp.json"
    assert tool.main([str(flat), str(hmoe), "--json", str(out), "--plot", str(tmp_path / "c.png")]) == 0
    c = json.loads(out.read_text())["comparisons"][0]
    # the cost model, by hand: every device round reports its examples; epochs are 1
    fm = json.loads((flat / "model.json").read_text())["models"]
    hm = json.loads((hmoe / "model.json").read_text())["models"]["hmoe"]["experts"]
    flat_rows = [json.loads(ln) for ln in (flat / "metrics.jsonl").read_text().splitlines()]
    hmoe_rows = [json.loads(ln) for ln in (hmoe / "metrics.jsonl").read_text().splitlines()]
    assert c["flat_total_tmac"] == pytest.approx(3 * train_macs(fm["flat"]["arch"], 20) / 1e12)
    assert c["hmoe_total_tmac"] == pytest.approx(sum(train_macs(hm[str(r["nodes"][0])]["arch"], 10) for r in hmoe_rows) / 1e12)
    # flat's validation curve interpolated at the HMoE's compute (from (0, 0))
    import numpy as np

    cum = np.cumsum([c["flat_total_tmac"] / 3] * 3)
    f1 = [r["val_info_f1"] for r in flat_rows]
    expected = np.interp(c["hmoe_total_tmac"], [0, *cum], [0, *f1])
    assert c["flat_val_info_f1_at_equal_macs"] == pytest.approx(expected)
    assert c["hmoe_val_info_f1"] == hmoe_rows[-1]["val_info_f1"]
    assert (tmp_path / "c.png").read_bytes()[:4] == b"\x89PNG"
    assert "flat at equal MACs" in capsys.readouterr().out
    # the wrong order, or a folder that is no run: one line, exit 2
    assert tool.main([str(hmoe), str(flat)]) == 2
    assert tool.main([str(flat), str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "give the flat run first" in err and "neither a simulate folder nor a run directory" in err
