"""Central (non-federated) training of the hierarchical model and of the flat baseline.

Each expert is trained on the samples under its node, relabelled to the node's child
index, with the same :func:`edgehmoe.model.training.train_epochs` the federated client uses.
"""

from __future__ import annotations

import logging
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
    expert_specs,
    flat_spec,
)
from edgehmoe.model.training import (
    TrainConfig,
    relabel_samples,
    state_arrays,
    train_epochs,
)

__all__ = ["fit_hmoe", "fit_flat", "new_model_dir"]

logger = logging.getLogger(__name__)


def new_model_dir(out: Path, tree: Hierarchy, input_size: int, mean, std, dataset: str, extra=None) -> ModelDir:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    return ModelDir(
        path=out, hierarchy=tree, input_size=input_size, mean=list(map(float, mean)), std=list(map(float, std)),
        dataset=dataset, extra=extra or {},
    )


def _progress(total: int, desc: str, enabled: bool):
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover
        return None
    return tqdm(total=total, desc=desc, disable=not enabled, leave=False, dynamic_ncols=True)


def fit_hmoe(
    md: ModelDir,
    x: np.ndarray,
    y: np.ndarray,
    cfg: TrainConfig,
    specs: dict[int, ArchSpec] | None = None,
    progress: bool = False,
    epochs_for=None,
) -> dict[int, dict]:
    """Train every expert of ``md.hierarchy``; returns per-expert stats and writes weights.

    ``epochs_for(node, num_samples) -> epochs`` may vary epochs per expert (default: cfg.epochs).
    """
    tree = md.hierarchy
    specs = expert_specs(tree, md.input_size) if specs is None else specs
    stats = {}
    bar = _progress(len(specs), "experts", progress)
    for node, spec in specs.items():
        keep, targets = relabel_samples(tree.label_map(node), y)
        if len(keep) == 0:
            raise UsageError(f"no training samples under node {tree.names[node]!r}")
        torch.manual_seed(cfg.seed + node)
        model = build_model(spec)
        ecfg = replace(cfg, seed=cfg.seed + node, epochs=epochs_for(node, len(keep)) if epochs_for else cfg.epochs)
        loss, steps = train_epochs(model, x, targets, ecfg, np.asarray(md.mean), np.asarray(md.std), index=keep)
        params = count_params(model)
        md.write_expert(node, spec.to_dict(), state_arrays(model), params)
        stats[node] = {"name": tree.names[node], "samples": int(len(keep)), "loss": loss, "steps": steps, "params": params}
        logger.info("expert %s (%s): %d samples, %d steps, loss %.3f", node, tree.names[node], len(keep), steps, loss)
        if bar is not None:
            bar.set_postfix_str(f"{tree.names[node][:20]} loss={loss:.3f}")
            bar.update(1)
    if bar is not None:
        bar.close()
    md.save_json()
    return stats


def fit_flat(
    md: ModelDir, x: np.ndarray, y: np.ndarray, cfg: TrainConfig, width: int = 32, progress: bool = False
) -> dict:
    tree = md.hierarchy
    spec = flat_spec(tree, md.input_size, width)
    torch.manual_seed(cfg.seed)
    model = build_model(spec)
    n_steps = int(np.ceil(cfg.epochs * np.ceil(len(x) / cfg.batch_size)))
    bar = _progress(n_steps, "flat", progress)

    def on_step(step: int, total: int, loss: float) -> None:
        if bar is not None:
            bar.update(1)
            if step % 20 == 0:
                bar.set_postfix_str(f"loss={loss:.3f}")

    loss, steps = train_epochs(model, x, np.asarray(y, dtype=np.int64), cfg, np.asarray(md.mean), np.asarray(md.std), on_step)
    if bar is not None:
        bar.close()
    params = count_params(model)
    md.write_flat(spec.to_dict(), state_arrays(model), params)
    md.save_json()
    logger.info("flat model: %d samples, %d steps, loss %.3f", len(x), steps, loss)
    return {"samples": int(len(x)), "loss": loss, "steps": steps, "params": params}
