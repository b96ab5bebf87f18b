"""Typed run configuration for the aggregation server, read from TOML.

Every section is a dataclass with commented defaults; unknown sections or keys are
rejected with the list of valid ones, and the resolved configuration is saved in the run
directory as ``config.toml``. Example (``server/run.example.toml``)::

    [run]
    name = "cifar"
    out = "runs/cifar"
    dataset = "cifar100:/data/cifar100/train.npz"

    [broker]
    url = "mqtt://127.0.0.1:1883"

    [schedule]
    mode = "paper"
    rounds = 200
"""

from __future__ import annotations

import dataclasses
import math
import sys
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from edgehmoe.core.kinds import FLAT, HMOE
from edgehmoe.errors import EdgeHmoeError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

__all__ = ["ConfigError", "RunConfig", "load_config", "dump_config", "config_from_dict"]


class ConfigError(EdgeHmoeError, ValueError):
    """The configuration file is malformed; the message names the key and the fix."""


@dataclass
class RunSection:
    name: str = "edgehmoe"  # run name: MQTT topic level edgehmoe/<name>/... (clients default to it too)
    out: str = ""  # run directory (default runs/<name>)
    dataset: str = "synthetic"  # dataset SPEC the server evaluates on (its held-out split)
    eval_split: str = "val"  # split used for validation during the run
    val_fraction: float = 0.1  # share of train held out as validation
    seed: int = 0


@dataclass
class BrokerSection:
    url: str = "mqtt://127.0.0.1:1883"  # mqtt://HOST:PORT or mqtts://HOST:PORT
    username: str = ""  # the server's broker account ("" = anonymous)
    password_file: str = ""  # file holding the password
    cafile: str = ""  # CA certificate for TLS (mqtts://)
    client_id: str = ""  # default: the broker user name (the broker binds ids to user names), else edgehmoe-server-<run>


@dataclass
class ModelSection:
    kind: str = HMOE  # hmoe | flat
    flat_width: int = 32  # width of the flat model; experts are sized relative to it
    expert_width: int = 0  # 0 = size each expert to its node (flat_width * sqrt(k / L))
    root_width: int = 0  # 0 = sized like the other experts
    min_width: int = 4
    # What each expert is trained on: "children" (its child index) or "leaves" (every leaf
    # below it, summed into children by the network; docs/accuracy.md). Same bundle format.
    expert_head: str = "leaves"
    root_stem_stride: int = 2  # 2: the root's first convolution is strided (1/4 of its activations)
    expert_stem_stride: int = 2  # the same for every other expert (1: full-resolution experts)
    # > 0: route through a two-level tree whose root chooses among groups of at most this many
    # classes (a cut of the dataset's tree; metrics still on the full tree). 0: the dataset's
    # tree. "auto": trees deeper than two levels are cut to groups of at most 30 classes.
    tree_groups: int | str = "auto"


# What a run directory created before [model] expert_head / root_stem_stride existed trained;
# a config that does not name them gets the defaults above (measured best, docs/accuracy.md).
LEGACY_ARCHITECTURE = {"expert_head": "children", "root_stem_stride": 1, "expert_stem_stride": 1, "tree_groups": 0}


@dataclass
class ScheduleSection:
    mode: str = "paper"  # paper: one expert per round for all devices | parallel: one per device
    rounds: int = 20
    weighting: str = "data"  # how often each expert is visited: data (samples under it) | sqrt (of that) | uniform
    min_devices: int = 1  # wait for this many devices before the first round
    devices_per_round: int = 0  # 0 = every available device
    round_timeout_s: float = 300.0  # deadline: results after it are dropped
    wait_for_devices_s: float = 120.0  # give up if not enough devices announce themselves
    retries: int = 1  # extra attempts for a round in which no device answered
    offline_grace_s: float = 10.0  # a device whose last will arrives (connection lost, e.g. a broker restart) has
    #                               this long to reconnect: its task is re-sent, not given up, and the next round
    #                               waits for it; 0 = give its task up at once
    # --- one bad device (docs/security.md) ---
    aggregation: str = "fedavg"  # fedavg (weighted by num_examples) | median | trimmed_mean (coordinate-wise, robust)
    trim_fraction: float = 0.2  # trimmed_mean: share of values cut at each end of every coordinate, in [0, 0.5)
    clip_factor: float = 0.0  # > 0: clip each update's change to this x the round's median change norm (any rule)
    max_update_norm: float = 10.0  # refuse (or clip) a change larger than this x the expert's weight norm; 0 = off
    update_norm_action: str = "reject"  # what max_update_norm does: reject | clip (scale the change down to the bound)
    max_missed_rounds: int = 3  # a device that misses this many deadlines in a row is not asked again until it
    #                             says hello or answers (0 = never drop)
    max_class_count: int = 10_000_000  # a hello claiming more samples of one class is refused (absurd shard)


@dataclass
class TrainSection:
    epochs: int = 1  # local epochs per round (the flat model and the root expert)
    expert_epochs: int = 0  # local epochs for non-root experts (0 = epochs); they see 1/k of the data
    batch_size: int = 32
    lr: float = 0.05
    lr_schedule: str = "cosine"  # across rounds: constant | cosine
    lr_min_factor: float = 0.05  # cosine floor as a fraction of lr
    momentum: float = 0.9
    weight_decay: float = 5e-4


@dataclass
class EvalSection:
    every: int = 5  # evaluate on the validation split every k rounds (0 = only at the end)
    max_examples: int = 5000  # cap on validation examples per evaluation


@dataclass
class DashboardSection:
    listen: str = ""  # [HOST:]PORT of the run's web dashboard ("" = off unless --dashboard); see docs/dashboard.md
    token_file: str = ""  # file holding the dashboard token (needed off loopback; "" = random, printed)


@dataclass
class RunConfig:
    run: RunSection = field(default_factory=RunSection)
    broker: BrokerSection = field(default_factory=BrokerSection)
    model: ModelSection = field(default_factory=ModelSection)
    schedule: ScheduleSection = field(default_factory=ScheduleSection)
    train: TrainSection = field(default_factory=TrainSection)
    eval: EvalSection = field(default_factory=EvalSection)
    dashboard: DashboardSection = field(default_factory=DashboardSection)

    @property
    def out_dir(self) -> Path:
        return Path(self.run.out or f"runs/{self.run.name}")

    def validate(self) -> "RunConfig":
        from edgehmoe.fl.wire import ID_PATTERN

        def need(cond: bool, msg: str) -> None:
            if not cond:
                raise ConfigError(msg)

        need(bool(ID_PATTERN.fullmatch(self.run.name)), f"run.name {self.run.name!r}: use letters, digits, '-', '_', '.'")
        need(self.model.kind in (HMOE, FLAT), f"model.kind must be 'hmoe' or 'flat', not {self.model.kind!r}")
        need(self.schedule.mode in ("paper", "parallel"), f"schedule.mode must be 'paper' or 'parallel', not {self.schedule.mode!r}")
        need(self.schedule.weighting in ("data", "sqrt", "uniform"), "schedule.weighting must be 'data', 'sqrt' or 'uniform'")
        need(self.schedule.rounds >= 1, "schedule.rounds must be >= 1")
        need(self.schedule.min_devices >= 1, "schedule.min_devices must be >= 1")
        need(self.schedule.round_timeout_s > 0, "schedule.round_timeout_s must be > 0")
        need(math.isfinite(self.schedule.offline_grace_s) and self.schedule.offline_grace_s >= 0,
             "schedule.offline_grace_s must be a number of seconds >= 0 (0 = give up a lost device's task at once)")
        need(self.train.epochs >= 1 and self.train.batch_size >= 1, "train.epochs and train.batch_size must be >= 1")
        need(self.train.expert_epochs >= 0, "train.expert_epochs must be >= 0 (0 = same as train.epochs)")
        need(math.isfinite(self.train.lr) and self.train.lr > 0, "train.lr must be a positive number")
        need(self.train.lr_schedule in ("constant", "cosine"), "train.lr_schedule must be 'constant' or 'cosine'")
        need(self.run.eval_split in ("val", "test", "train", "all"), "run.eval_split must be val, test, train or all")
        need(0 <= self.run.val_fraction < 1, "run.val_fraction must be in [0, 1)")
        need(self.model.flat_width >= 1, "model.flat_width must be >= 1")
        need(self.model.expert_head in ("children", "leaves"),
             f"model.expert_head must be 'children' or 'leaves', not {self.model.expert_head!r}")
        need(self.model.root_stem_stride in (1, 2), f"model.root_stem_stride must be 1 or 2, not {self.model.root_stem_stride!r}")
        need(self.model.expert_stem_stride in (1, 2),
             f"model.expert_stem_stride must be 1 or 2, not {self.model.expert_stem_stride!r}")
        need(self.model.tree_groups == "auto" or (type(self.model.tree_groups) is int and self.model.tree_groups >= 0),
             f"model.tree_groups must be \"auto\", 0 (the dataset's tree) or a positive number of classes, "
             f"not {self.model.tree_groups!r}")
        need(self.eval.every >= 0, "eval.every must be >= 0")
        from edgehmoe.fl.aggregation import AGGREGATIONS

        s = self.schedule
        need(s.aggregation in AGGREGATIONS,
             f"schedule.aggregation must be one of {', '.join(AGGREGATIONS)}, not {s.aggregation!r}")
        need(0 <= s.trim_fraction < 0.5, "schedule.trim_fraction must be in [0, 0.5)")
        need(math.isfinite(s.clip_factor) and s.clip_factor >= 0, "schedule.clip_factor must be >= 0 (0 = off)")
        need(math.isfinite(s.max_update_norm) and s.max_update_norm >= 0,
             "schedule.max_update_norm must be >= 0 (0 = off)")
        need(s.update_norm_action in ("reject", "clip"), "schedule.update_norm_action must be 'reject' or 'clip'")
        need(s.max_missed_rounds >= 0, "schedule.max_missed_rounds must be >= 0 (0 = never drop a device)")
        need(1 <= s.max_class_count <= 2**40, "schedule.max_class_count must be in 1 .. 2**40")
        return self


def config_from_dict(d: dict[str, Any], source: str = "config") -> RunConfig:
    cfg = RunConfig()
    sections = {f.name: f for f in fields(RunConfig)}
    for sec_name, values in d.items():
        if sec_name not in sections:
            raise ConfigError(f"{source}: unknown section [{sec_name}]; valid sections: {', '.join(sections)}")
        if not isinstance(values, dict):
            raise ConfigError(f"{source}: [{sec_name}] must be a table of key = value lines")
        sec = getattr(cfg, sec_name)
        valid = {f.name: f for f in fields(sec)}
        for key, value in values.items():
            if key not in valid:
                raise ConfigError(
                    f"{source}: unknown key {sec_name}.{key}; valid keys in [{sec_name}]: {', '.join(valid)}"
                )
            default = getattr(sec, key)
            kind = type(default).__name__
            if (sec_name, key) in _INT_OR_WORD:  # a number or a word; validate() checks which
                ok, kind = isinstance(value, (int, str)) and not isinstance(value, bool), "whole number or a word"
            elif isinstance(default, bool) or not isinstance(default, (int, float, str)):
                ok = isinstance(value, type(default))
            elif isinstance(default, float):
                ok = isinstance(value, (int, float)) and not isinstance(value, bool)
                value = float(value) if ok else value
            elif isinstance(default, int):
                ok = isinstance(value, int) and not isinstance(value, bool)
            else:
                ok = isinstance(value, str)
            if not ok:
                raise ConfigError(
                    f"{source}: {sec_name}.{key} = {value!r} should be a {kind} "
                    f"(e.g. {sec_name}.{key} = {default!r})"
                )
            setattr(sec, key, value)
    return cfg.validate()


# Keys whose value is an int or a word ("auto").
_INT_OR_WORD = {("model", "tree_groups")}


def run_architecture(saved_config: str | Path) -> dict[str, Any]:
    """``expert_head``, ``root_stem_stride``, ``expert_stem_stride``, ``tree_groups`` of the run whose ``config.toml`` this is (the
    legacy values when it predates them): on ``--resume`` the run's networks are fixed by it."""
    try:
        model = tomllib.loads(Path(saved_config).read_text()).get("model", {})
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise ConfigError(f"{saved_config}: cannot read the run's own config: {e}") from None
    return {k: model.get(k, v) if isinstance(model, dict) else v for k, v in LEGACY_ARCHITECTURE.items()}


def load_config(path: str | Path) -> RunConfig:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} not found (see server/run.example.toml)")
    try:
        d = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from None
    return config_from_dict(d, str(path))


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    s = str(v).replace("\\", "\\\\").replace('"', '\\"')
    return f'"{s}"'


def dump_config(cfg: RunConfig) -> str:
    """The resolved configuration as TOML (what ``config.toml`` in the run directory holds)."""
    lines = []
    for sec in fields(RunConfig):
        lines.append(f"[{sec.name}]")
        for k, v in dataclasses.asdict(getattr(cfg, sec.name)).items():
            lines.append(f"{k} = {_toml_value(v)}")
        lines.append("")
    return "\n".join(lines)
