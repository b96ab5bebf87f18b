"""Central (non-federated) training of the hierarchical model and of the flat baseline.

Each expert is trained on the samples under its node, relabelled to the node's child index
(or, for a leaf-head expert, to the leaf below the node: :func:`edgehmoe.model.arch.expert_label_map`),
with the same :class:`edgehmoe.model.training.Trainer` loop the federated client runs.
All experts advance together, one epoch at a time, so the whole hierarchical model can be
validated after every epoch; since each expert keeps its own seeded generator and
optimiser, the result is the same as training them one after another.

Options of :func:`fit_hmoe` (each an ``edgehmoe fit`` flag; measured in ``docs/accuracy.md``):

- **distillation** from a flat teacher: ``teacher_probs`` (the teacher's softmax at
  temperature τ over every training image) become soft targets, summed over each child's
  sub-tree (:func:`soft_targets`);
- **temperature calibration**: after training, each expert's temperature is fitted on
  held-out ``calibration`` images and folded into its last layer, so model directories and
  ONNX bundles keep their format.

Progress goes to the log: one line per epoch with the loss, the validation info-F1 (when a
validation set is given) and the time left, plus a line a minute inside long epochs; a
tqdm bar when ``progress`` is set (an interactive terminal).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from edgehmoe.core.checkpoint import ModelDir
from edgehmoe.core.hierarchy import Hierarchy
from edgehmoe.errors import UsageError
from edgehmoe.model.arch import (
    ArchSpec,
    build_model,
    count_params,
    expert_label_map,
    expert_specs,
    flat_spec,
    scale_logits,
)
from edgehmoe.model.cost import cnn3_macs, train_macs
from edgehmoe.model.training import (
    TrainConfig,
    Trainer,
    fit_temperature,
    predict_logits,
    relabel_samples,
    state_arrays,
)

__all__ = ["fit_hmoe", "fit_flat", "new_model_dir", "soft_targets", "teacher_probs"]

logger = logging.getLogger(__name__)


def new_model_dir(out: Path, tree: Hierarchy, input_size: int, mean, std, dataset: str, extra=None) -> ModelDir:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    return ModelDir(
        path=out, hierarchy=tree, input_size=input_size, mean=list(map(float, mean)), std=list(map(float, std)),
        dataset=dataset, extra=extra or {},
    )


def _fmt_s(s: float) -> str:
    s = max(0, int(round(s)))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


class _Progress:
    """Work-based progress (units: MACs of the steps taken) for log lines and a tqdm bar."""

    def __init__(self, desc: str, total: float, bar: bool, log_every_s: float = 60.0):
        self.desc, self.total, self.done = desc, max(float(total), 1.0), 0.0
        self.t0 = self.last_log = time.monotonic()
        self.log_every_s = log_every_s
        self.bar = None
        if bar:
            try:
                from tqdm.auto import tqdm
            except ImportError:  # pragma: no cover
                tqdm = None
            if tqdm is not None:
                self.bar = tqdm(total=100.0, desc=desc, leave=False, dynamic_ncols=True,
                                bar_format="{l_bar}{bar}| {n:.0f}% [{elapsed}<{remaining}]")

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    def eta(self) -> float:
        f = self.done / self.total
        return self.elapsed * (1 - f) / f if f > 0 else float("nan")

    def advance(self, work: float, what: str = "") -> None:
        before = self.done
        self.done = min(self.total, self.done + work)
        if self.bar is not None:
            self.bar.update(100.0 * (self.done - before) / self.total)
        now = time.monotonic()
        if now - self.last_log >= self.log_every_s:
            self.last_log = now
            logger.info("%s: %.0f%% done%s, %s elapsed, about %s left", self.desc, 100 * self.done / self.total,
                        f" ({what})" if what else "", _fmt_s(self.elapsed), _fmt_s(self.eta()))

    def epoch_line(self, epoch: int, epochs: int, msg: str) -> None:
        self.last_log = time.monotonic()
        line = (f"{self.desc} epoch {epoch}/{epochs}: {msg}; {_fmt_s(self.elapsed)} elapsed, "
                f"about {_fmt_s(self.eta()) if epoch < epochs else '0m00s'} left")
        if self.bar is not None:
            self.bar.write(line)
        logger.info("%s", line)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


@torch.no_grad()
def teacher_probs(model: torch.nn.Module, x: np.ndarray, mean, std, temperature: float = 1.0,
                  batch_size: int = 512) -> np.ndarray:
    """A flat teacher's softmax at ``temperature`` over ``x`` (float32, one column per class)."""
    out = []
    for i in range(0, len(x), batch_size):
        z = torch.from_numpy(predict_logits(model, x[i : i + batch_size], np.asarray(mean), np.asarray(std)))
        out.append(torch.softmax(z / temperature, dim=1).numpy().astype(np.float32))
    return np.concatenate(out) if out else np.zeros((0, 0), np.float32)


def soft_targets(probs: np.ndarray, label_map: np.ndarray, num_outputs: int) -> np.ndarray:
    """Teacher class probabilities summed into an expert's outputs and renormalised.

    ``label_map[c]`` is the expert's output for class ``c`` (-1: not below the node), as in
    :func:`edgehmoe.model.arch.expert_label_map`: a child sums the probabilities of every
    class in its sub-tree; a leaf head keeps each leaf's own probability. Rows are
    renormalised over the node's classes (the teacher's belief *given* the node).
    """
    label_map = np.asarray(label_map, dtype=np.int64)
    m = np.zeros((len(label_map), num_outputs), dtype=np.float32)
    keep = label_map >= 0
    m[np.flatnonzero(keep), label_map[keep]] = 1.0
    s = np.asarray(probs, dtype=np.float32) @ m
    return s / np.clip(s.sum(axis=1, keepdims=True), 1e-12, None)


def _evaluate_hmoe(tree: Hierarchy, models: dict, mean, std, val) -> dict:
    from edgehmoe.model.inference import HierarchicalModel, evaluate_models

    hm = HierarchicalModel(tree, models, mean, std)
    return evaluate_models(hm, None, val[0], val[1], which="hmoe")


def _val_summary(m: dict) -> dict:
    acc = m.get("accuracy_per_level", {})
    return {"val_info_f1": round(float(m["info_f1"]), 4), "val_top1": round(float(m["top1"]), 4),
            **({"val_depth1": round(float(acc["1"]), 4)} if "1" in acc else {})}


def fit_hmoe(
    md: ModelDir,
    x: np.ndarray,
    y: np.ndarray,
    cfg: TrainConfig,
    specs: dict[int, ArchSpec] | None = None,
    progress: bool = False,
    epochs_for=None,
    *,
    teacher: np.ndarray | None = None,
    distill_weight: float = 0.0,
    distill_temperature: float = 4.0,
    calibration: tuple[np.ndarray, np.ndarray] | None = None,
    val: tuple[np.ndarray, np.ndarray] | None = None,
    val_every: int = 1,
    history: list | None = None,
) -> dict[int, dict]:
    """Train every expert of ``md.hierarchy``; returns per-expert stats and writes weights.

    ``epochs_for(node, num_samples) -> epochs`` may vary epochs per expert (default: cfg.epochs).
    ``teacher`` (teacher probabilities at ``distill_temperature``, one row per image of ``x``)
    with ``distill_weight`` > 0 distils; ``calibration = (x, y)`` fits each expert's
    temperature on those images after training; ``val = (x, y)`` is evaluated (greedy) every
    ``val_every`` epochs and at the end, each point appended to ``history`` when given.
    Per-expert stats: name, samples, loss, steps, params, ``train_macs`` (training
    multiply-accumulates, :func:`edgehmoe.model.cost.train_macs`) and ``temperature``.
    """
    tree = md.hierarchy
    specs = expert_specs(tree, md.input_size) if specs is None else specs
    mean, std = np.asarray(md.mean), np.asarray(md.std)
    if distill_weight > 0 and (teacher is None or len(teacher) != len(x)):
        raise UsageError("distillation needs the teacher's probabilities for every training image")
    trainers: dict[int, Trainer] = {}
    for node, spec in specs.items():
        lmap = expert_label_map(tree, node, spec)
        keep, targets = relabel_samples(lmap, y)
        if len(keep) == 0:
            raise UsageError(f"no training samples under node {tree.names[node]!r}")
        torch.manual_seed(cfg.seed + node)
        model = build_model(spec)
        ecfg = replace(cfg, seed=cfg.seed + node, epochs=epochs_for(node, len(keep)) if epochs_for else cfg.epochs)
        soft = soft_targets(teacher[keep], lmap, spec.num_head_outputs) if distill_weight > 0 else None
        trainers[node] = Trainer(model, x, targets, ecfg, mean, std, index=keep, soft_targets=soft,
                                 distill_weight=distill_weight, distill_temperature=distill_temperature)
    epochs = max(1, math.ceil(max(t.total / t.steps_per_epoch for t in trainers.values()) - 1e-9))
    step_cost = {n: cnn3_macs(specs[n].to_dict()) * min(cfg.batch_size, t.n) for n, t in trainers.items()}
    prog = _Progress("hmoe", sum(step_cost[n] * t.total for n, t in trainers.items()), progress)
    try:
        for e in range(1, epochs + 1):
            for node, tr in trainers.items():
                name = tree.names[node]
                tr.run(until=round(tr.total * e / epochs),
                       on_step=lambda s, tot, loss, n=node, nm=name: prog.advance(step_cost[n], nm))
            loss = float(np.average([t.mean_loss for t in trainers.values()], weights=[t.n for t in trainers.values()]))
            point = {"epoch": e, "loss": round(loss, 4)}
            msg = f"loss {loss:.3f} (sample-weighted over {len(trainers)} experts)"
            if val is not None and (e % max(1, val_every) == 0 or e == epochs):
                point.update(_val_summary(_evaluate_hmoe(tree, {n: t.model for n, t in trainers.items()}, mean, std, val)))
                msg += f", val info-F1 {point['val_info_f1']:.4f} top-1 {point['val_top1']:.4f}"
            if history is not None:
                history.append(point)
            prog.epoch_line(e, epochs, msg)
    finally:
        prog.close()
    stats = {}
    for node, tr in trainers.items():
        spec, model = specs[node], tr.model
        temp = 1.0
        if calibration is not None:
            ck, ct = relabel_samples(tree.label_map(node), calibration[1])
            if len(ck):
                temp = fit_temperature(model, calibration[0][ck], ct, mean, std)
                scale_logits(model, 1.0 / temp)
        params = count_params(model)
        md.write_expert(node, spec.to_dict(), state_arrays(model), params)
        stats[node] = {"name": tree.names[node], "samples": int(tr.n), "loss": tr.mean_loss, "steps": tr.step,
                       "params": params, "train_macs": train_macs(spec.to_dict(), tr.seen), "temperature": temp}
        logger.info("expert %s (%s): %d samples, %d steps, loss %.3f%s", node, tree.names[node], tr.n, tr.step,
                    tr.mean_loss, f", temperature {temp:.3f}" if calibration is not None else "")
    md.save_json()
    return stats


def fit_flat(
    md: ModelDir, x: np.ndarray, y: np.ndarray, cfg: TrainConfig, width: int = 32, progress: bool = False,
    *, val: tuple[np.ndarray, np.ndarray] | None = None, val_every: int = 1, history: list | None = None,
) -> dict:
    """Train the flat baseline; ``val`` is evaluated every ``val_every`` epochs and at the end
    (each point appended to ``history`` when given). Returns samples, loss, steps, params and
    ``train_macs``."""
    from edgehmoe.model.inference import FlatModel, evaluate_models

    tree = md.hierarchy
    spec = flat_spec(tree, md.input_size, width)
    torch.manual_seed(cfg.seed)
    model = build_model(spec)
    mean, std = np.asarray(md.mean), np.asarray(md.std)
    tr = Trainer(model, x, np.asarray(y, dtype=np.int64), cfg, mean, std)
    epochs = max(1, math.ceil(cfg.epochs - 1e-9))
    cost = cnn3_macs(spec.to_dict()) * min(cfg.batch_size, len(x))
    prog = _Progress("flat", cost * tr.total, progress)
    try:
        for e in range(1, epochs + 1):
            tr.run(until=round(tr.total * e / epochs), on_step=lambda s, tot, loss: prog.advance(cost))
            point = {"epoch": e, "loss": round(tr.mean_loss, 4)}
            msg = f"loss {tr.mean_loss:.3f}"
            if val is not None and (e % max(1, val_every) == 0 or e == epochs):
                point.update(_val_summary(evaluate_models(None, FlatModel(tree, model, mean, std), val[0], val[1], "flat")))
                msg += f", val info-F1 {point['val_info_f1']:.4f} top-1 {point['val_top1']:.4f}"
            if history is not None:
                history.append(point)
            prog.epoch_line(e, epochs, msg)
    finally:
        prog.close()
    params = count_params(model)
    md.write_flat(spec.to_dict(), state_arrays(model), params)
    md.save_json()
    logger.info("flat model: %d samples, %d steps, loss %.3f", len(x), tr.step, tr.mean_loss)
    return {"samples": int(len(x)), "loss": tr.mean_loss, "steps": tr.step, "params": params,
            "train_macs": train_macs(spec.to_dict(), tr.seen)}
