import pytest
from edgehmoe.server.config import (
    ConfigError,
    RunConfig,
    config_from_dict,
    dump_config,
    load_config,
)


def test_defaults_round_trip_through_toml(tmp_path):
    cfg = RunConfig()
    cfg.run.name = "t1"
    cfg.schedule.rounds = 7
    p = tmp_path / "c.toml"
    p.write_text(dump_config(cfg))
    again = load_config(p)
    assert again == cfg


@pytest.mark.parametrize(
    "d, message",
    [
        ({"runn": {}}, r"unknown section \[runn\]; valid sections: run, broker"),
        ({"run": {"nmae": "x"}}, r"unknown key run.nmae; valid keys in \[run\]: name"),
        ({"schedule": {"rounds": "ten"}}, r"schedule.rounds = 'ten' should be a int"),
        ({"schedule": {"mode": "serial"}}, r"schedule.mode must be 'paper' or 'parallel'"),
        ({"train": {"lr": -1.0}}, r"train.lr must be a positive number"),
        ({"run": {"name": "a/b"}}, r"run.name 'a/b'"),
        ({"schedule": {"aggregation": "mean"}}, r"schedule.aggregation must be one of fedavg, median, trimmed_mean"),
        ({"schedule": {"trim_fraction": 0.5}}, r"schedule.trim_fraction must be in \[0, 0.5\)"),
        ({"schedule": {"max_update_norm": -1.0}}, r"schedule.max_update_norm must be >= 0"),
        ({"schedule": {"update_norm_action": "warn"}}, r"schedule.update_norm_action must be 'reject' or 'clip'"),
        ({"schedule": {"max_missed_rounds": -1}}, r"schedule.max_missed_rounds must be >= 0"),
        ({"schedule": {"max_class_count": 0}}, r"schedule.max_class_count must be in 1 .. 2\*\*40"),
        ({"schedule": {"clip_factor": -2}}, r"schedule.clip_factor must be >= 0"),
        ({"model": {"expert_head": "leaf"}}, r"model.expert_head must be 'children' or 'leaves', not 'leaf'"),
        ({"model": {"root_stem_stride": 4}}, r"model.root_stem_stride must be 1 or 2, not 4"),
        ({"model": {"expert_stem_stride": 3}}, r"model.expert_stem_stride must be 1 or 2, not 3"),
        ({"model": {"tree_groups": -1}}, r"model.tree_groups must be \"auto\", 0 \(the dataset's tree\) or a positive"),
        ({"model": {"tree_groups": "deep"}}, r"model.tree_groups must be \"auto\""),
        ({"model": {"tree_groups": 2.5}}, r"model.tree_groups = 2.5 should be a whole number or a word"),
    ],
)
def test_bad_config_names_the_key(d, message):
    with pytest.raises(ConfigError, match=message):
        config_from_dict(d)


def test_malformed_toml_is_reported(tmp_path):
    p = tmp_path / "bad.toml"
    p.write_text("[run\nname = 1")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(p)
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.toml")


def test_int_accepted_for_float_key():
    cfg = config_from_dict({"train": {"lr": 1}})
    assert cfg.train.lr == 1.0 and isinstance(cfg.train.lr, float)


def test_example_config_loads_with_the_security_knobs():
    from pathlib import Path

    cfg = load_config(Path(__file__).resolve().parents[1] / "server" / "run.example.toml")
    s = cfg.schedule
    assert (s.aggregation, s.trim_fraction, s.clip_factor, s.max_update_norm, s.update_norm_action,
            s.max_missed_rounds, s.max_class_count) == ("fedavg", 0.2, 0.0, 10.0, "reject", 3, 10_000_000)
    assert (RunConfig().schedule.max_update_norm, RunConfig().schedule.max_missed_rounds) == (10.0, 3)
