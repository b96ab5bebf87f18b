"""The server's run directory under damaged or foreign files (issue #10, "files").

Each damaged file gives one :class:`~edgehmoe.server.store.RunDirError` naming the file and the
fix (a one-line error through ``run_main``), never a traceback; a torn last line of
``metrics.jsonl`` is repaired on ``--resume``; a new run refuses a directory that is not a run
directory, and ``--resume`` refuses another run's directory. Runs come from the fake transport
of ``tests/test_rounds.py``.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
from test_rounds import const_like, make_server

from edgehmoe.errors import EdgeHmoeError


def finished_run(tmp_path, rounds: int = 2, **cfg_kw):
    """A run directory after ``rounds`` committed rounds, and a function making a resumer."""
    from edgehmoe.server.app import AggregationServer

    def reply(dev, task):
        return [fake.result(dev, task, const_like(task.weights, 1.0, 1), 60 if task.node == 0 else 30)]

    server, fake, clock = make_server(tmp_path, reply, ["a"], rounds=rounds, eval_every=0, **cfg_kw)
    server.run()

    def resumer(**cfg_changes):
        for k, v in cfg_changes.items():
            setattr(server.cfg.run, k, v)
        fake.inbox.put(fake.hello("a"))
        return AggregationServer(server.cfg, resume=True, transport=fake, clock=clock)

    return Path(server.cfg.run.out), server, resumer


@pytest.mark.parametrize("damage, message", [
    (lambda out: (out / "state.json").write_text("[1, 2]"), "state.json holds a JSON list, not an object"),
    (lambda out: _edit_state(out, lambda d: d.pop("files")), r"state.json lacks the key\(s\) files"),
    (lambda out: _edit_state(out, lambda d: d.update(round="two")), "state.json is malformed"),
    (lambda out: _edit_state(out, lambda d: d["files"].update({"0": "/etc/passwd"})), "outside experts/"),
    (lambda out: (out / "state.json").write_text("[" * 5000 + "]" * 5000), "not valid JSON"),
    (lambda out: _root_file(out).write_bytes(b"PK\x03\x04 a zip, not safetensors"), "is not a safetensors weight file"),
    (lambda out: _root_file(out).write_bytes(_nan_weights(out)), "holds NaN or inf"),
    (lambda out: (out / "metrics.jsonl").write_text('{"round": 0}\nnot json\n{"round": 1}\n'),
     "metrics.jsonl line 2 is not a metrics row"),
], ids=["list", "missing-key", "bad-round", "path-escape", "deep", "not-safetensors", "nan", "bad-middle-row"])
def test_damaged_run_directory_gives_one_clear_error(tmp_path, damage, message):
    from edgehmoe.server.store import RunDirError

    out, _, resumer = finished_run(tmp_path)
    damage(out)
    with pytest.raises(RunDirError, match=message) as err:
        resumer().prepare()
    assert isinstance(err.value, EdgeHmoeError) and "\n" not in str(err.value)
    assert str(out) in str(err.value)


def _edit_state(out: Path, change) -> None:
    d = json.loads((out / "state.json").read_text())
    change(d)
    (out / "state.json").write_text(json.dumps(d))


def _root_file(out: Path) -> Path:
    return out / json.loads((out / "state.json").read_text())["files"]["0"]


def _nan_weights(out: Path) -> bytes:
    from safetensors.numpy import load_file, save

    w = load_file(str(_root_file(out)))
    w["classifier.bias"] = np.full_like(w["classifier.bias"], np.nan)
    return save(w)


def test_torn_last_metrics_line_is_repaired_on_resume(tmp_path, caplog):
    # Prepare: a crash while appending round 2's row left half a line (round 2 was not committed)
    out, _, resumer = finished_run(tmp_path)
    rows = (out / "metrics.jsonl").read_text()
    (out / "metrics.jsonl").write_text(rows + '{"round": 2, "kind": "hm')
    caplog.set_level(logging.WARNING)
    # Execute
    s = resumer()
    s.prepare()
    # Assert: the torn line is gone, the committed rows are byte for byte the same
    assert (out / "metrics.jsonl").read_text() == rows
    assert [r["round"] for r in s.history] == [0, 1]
    assert "metrics.jsonl: its last line was cut short (a crash while appending); removed it" in caplog.text


def test_weights_that_do_not_fit_the_config_are_refused_on_resume(tmp_path):
    from edgehmoe.server.store import RunDirError

    out, server, resumer = finished_run(tmp_path)
    server.cfg.model.flat_width = 16  # other expert widths than the run was made with
    with pytest.raises(RunDirError, match="does not fit the network of node 0"):
        resumer().prepare()


def test_new_run_refuses_a_model_directory_and_keeps_its_model_json(tmp_path):
    from edgehmoe.server.store import RunDirError

    # Prepare: run.out points at an existing model directory (model.json, no state.json)
    out, server, _ = finished_run(tmp_path / "first")
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "model.json").write_text(before := (out / "model.json").read_text())
    from edgehmoe.server.app import AggregationServer

    server.cfg.run.out = str(model_dir)
    # Execute / Assert
    with pytest.raises(RunDirError, match="is a model directory, not a run directory"):
        AggregationServer(server.cfg).prepare()
    assert (model_dir / "model.json").read_text() == before
    # ... and any directory holding other files
    other = tmp_path / "home"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    server.cfg.run.out = str(other)
    with pytest.raises(RunDirError, match=r"is not empty and not a run directory \(it holds notes.txt\)"):
        AggregationServer(server.cfg).prepare()
    # a file is not a directory at all
    server.cfg.run.out = str(other / "notes.txt")
    with pytest.raises(RunDirError, match="is a file, not a directory"):
        AggregationServer(server.cfg).prepare()


def test_resume_refuses_a_run_directory_of_another_run(tmp_path):
    from edgehmoe.server.store import RunDirError

    out, _, resumer = finished_run(tmp_path)
    with pytest.raises(RunDirError, match="holds run 't-rounds', not 'other-run'"):
        resumer(name="other-run").prepare()



def test_resume_keeps_the_architecture_the_run_was_created_with(tmp_path, caplog):
    """A run created before [model] expert_head / root_stem_stride existed (its config.toml does
    not name them) trained plain heads at full resolution. --resume with today's defaults (leaf
    heads, strided root) keeps the run's networks with a warning instead of failing, or worse:
    a stride change keeps every weight shape, so the weight check alone would let another
    network train on from these weights."""
    import re

    from edgehmoe.server.config import RunConfig, run_architecture

    # Prepare: a run as an older version wrote it (plain heads, stride 1, keys absent)
    out, server, resumer = finished_run(tmp_path, model={"expert_head": "children", "root_stem_stride": 1})
    text = (out / "config.toml").read_text()
    assert 'expert_head = "children"' in text and "root_stem_stride = 1" in text
    (out / "config.toml").write_text(re.sub(r"(?m)^(expert_head|root_stem_stride|expert_stem_stride|tree_groups) = .*\n", "", text))
    assert run_architecture(out / "config.toml") == {"expert_head": "children", "root_stem_stride": 1,
                                                     "expert_stem_stride": 1, "tree_groups": 0}
    today = RunConfig().model
    assert (today.expert_head, today.root_stem_stride) == ("leaves", 2)
    server.cfg.model.expert_head, server.cfg.model.root_stem_stride = today.expert_head, today.root_stem_stride
    caplog.set_level(logging.WARNING, logger="edgehmoe.server.app")
    # Execute
    r = resumer()
    r.prepare()
    # Assert: the run's own networks, and the user is told
    assert (r.cfg.model.expert_head, r.cfg.model.root_stem_stride) == ("children", 1)
    assert "leaf_groups" not in r.specs[0] and r.specs[0].get("stem_stride", 1) == 1
    warned = " ".join(rec.getMessage() for rec in caplog.records)
    assert "model.root_stem_stride = 1" in warned and "model.expert_head = 'children'" in warned
    # a run that names them keeps what it names
    out2, _, _ = finished_run(tmp_path / "new")
    assert run_architecture(out2 / "config.toml") == {"expert_head": "leaves", "root_stem_stride": 2,
                                                      "expert_stem_stride": 2, "tree_groups": "auto"}
