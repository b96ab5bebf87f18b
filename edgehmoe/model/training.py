"""The one training code path: central training, the federated client and the profiler.

:func:`local_round` is what a device does for one federated round (take the task's
weights, relabel its samples to the node's children, train ``epochs`` local epochs, return
new weights). :func:`train_epochs` is the loop underneath it (a :class:`Trainer` run to the
end), also used by central training (``edgehmoe fit``) and by ``tools/profile_round.py``, so
the three measure the same work. :class:`Trainer` adds distillation from soft targets and
can run in pieces; :func:`fit_temperature` calibrates a trained network on held-out data.

Images stay uint8 NHWC in memory; each batch is converted, normalised and augmented
(random horizontal flip, ±4 px shift with zero padding) on the fly.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from edgehmoe.model.arch import ArchSpec, ModelError, build_model

__all__ = [
    "TrainConfig",
    "RoundOutput",
    "preprocess",
    "augment",
    "train_epochs",
    "Trainer",
    "fit_temperature",
    "local_round",
    "predict_logits",
    "predict_proba",
    "state_arrays",
    "load_state_arrays",
    "relabel_samples",
    "warm_up",
]

logger = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    """Hyper-parameters of one training call (a federated round or a central run)."""

    epochs: float = 1.0  # passes over the local data (fractions allowed: partial last epoch)
    batch_size: int = 64
    lr: float = 0.05  # peak learning rate
    momentum: float = 0.9
    weight_decay: float = 5e-4
    schedule: str = "constant"  # "constant" | "onecycle" | "cosine" within this call
    augment: bool = True  # flips and ±4 px shifts
    label_smoothing: float = 0.0
    seed: int = 0
    # NHWC memory layout for convolutions: ~1.5x faster training of these small networks on
    # x86 CPUs (same arithmetic, other kernels); central training turns it on.
    channels_last: bool = False

    def __post_init__(self) -> None:
        if self.schedule not in ("constant", "onecycle", "cosine"):
            raise ModelError(f"schedule must be constant, onecycle or cosine, got {self.schedule!r}")
        if self.batch_size < 1 or self.epochs <= 0 or not math.isfinite(self.lr) or self.lr <= 0:
            raise ModelError(f"invalid training config {self}")


@dataclass
class RoundOutput:
    weights: dict[str, np.ndarray]
    num_examples: int
    loss: float
    steps: int = 0
    extra: dict = field(default_factory=dict)


def preprocess(x: np.ndarray, mean: np.ndarray, std: np.ndarray) -> torch.Tensor:
    """uint8 NHWC → float32 NCHW, scaled to [0, 1] and normalised per channel."""
    t = torch.from_numpy(np.ascontiguousarray(x)).permute(0, 3, 1, 2).float().div_(255.0)
    m = torch.as_tensor(np.asarray(mean, dtype=np.float32)).view(1, -1, 1, 1)
    s = torch.as_tensor(np.asarray(std, dtype=np.float32)).view(1, -1, 1, 1)
    return (t - m) / s


def augment(x: torch.Tensor, gen: torch.Generator, pad: int = 4) -> torch.Tensor:
    """Random horizontal flip and ±``pad`` px translation (zero fill), vectorised."""
    b, c, h, w = x.shape
    flip = torch.rand(b, generator=gen) < 0.5
    x = torch.where(flip.view(b, 1, 1, 1), x.flip(3), x)
    padded = torch.nn.functional.pad(x, (pad, pad, pad, pad))
    dy = torch.randint(0, 2 * pad + 1, (b,), generator=gen)
    dx = torch.randint(0, 2 * pad + 1, (b,), generator=gen)
    wp = w + 2 * pad
    rows = (dy.view(b, 1, 1, 1) + torch.arange(h).view(1, 1, h, 1)).expand(b, c, h, wp)
    cols = (dx.view(b, 1, 1, 1) + torch.arange(w).view(1, 1, 1, w)).expand(b, c, h, w)
    return padded.gather(2, rows).gather(3, cols)


def _lr_at(cfg: TrainConfig, step: int, total: int) -> float:
    if cfg.schedule == "constant" or total <= 1:
        return cfg.lr
    t = step / (total - 1)
    if cfg.schedule == "cosine":
        return cfg.lr * 0.5 * (1 + math.cos(math.pi * t))
    # one-cycle: linear warm-up over the first 25%, cosine down to ~0 after.
    warm = 0.25
    if t < warm:
        return cfg.lr * (0.1 + 0.9 * t / warm)
    return cfg.lr * 0.5 * (1 + math.cos(math.pi * (t - warm) / (1 - warm)))


class Trainer:
    """The training loop as an object that can stop and resume: :func:`train_epochs` runs it
    to the end in one call; central training advances many experts in step (``run(until)``)
    so the whole hierarchical model can be validated after every epoch.

    Trains ``model`` in place on uint8 images ``x`` with integer ``targets`` (indices into the
    network's head logits: :meth:`TinyCNN.head_logits` when it has them, else its output).
    With ``index``, trains on ``x[index]`` (``targets`` aligned with ``index``) without copying
    those images. With ``soft_targets`` (rows aligned with ``targets``, probabilities over the
    head's outputs at temperature ``distill_temperature``) and ``distill_weight`` α > 0, the
    loss is ``(1 - α) · CE + α · τ² · KL(soft ‖ softmax(head / τ))`` (Hinton et al. 2015).
    """

    def __init__(
        self,
        model: nn.Module,
        x: np.ndarray,
        targets: np.ndarray,
        cfg: TrainConfig,
        mean: np.ndarray,
        std: np.ndarray,
        index: np.ndarray | None = None,
        soft_targets: np.ndarray | None = None,
        distill_weight: float = 0.0,
        distill_temperature: float = 1.0,
    ):
        self.index = np.arange(len(x)) if index is None else np.asarray(index, dtype=np.int64)
        self.n = n = len(self.index)
        if n == 0:
            raise ModelError("no training samples")
        if len(targets) != n:
            raise ModelError(f"{n} images but {len(targets)} targets")
        if not 0.0 <= distill_weight <= 1.0:
            raise ModelError(f"distill_weight must lie in [0, 1], got {distill_weight}")
        if distill_weight > 0:
            if soft_targets is None or len(soft_targets) != n:
                raise ModelError("distillation needs one row of soft targets per training sample")
            if not distill_temperature > 0:
                raise ModelError(f"distill_temperature must be > 0, got {distill_temperature}")
        self.model, self.x, self.cfg = model, x, cfg
        self.mean, self.std = mean, std
        self.gen = torch.Generator().manual_seed(int(cfg.seed))
        self.opt = torch.optim.SGD(
            model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
            nesterov=cfg.momentum > 0,
        )
        self.loss_fn = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
        self.steps_per_epoch = max(1, math.ceil(n / cfg.batch_size))
        self.total = max(1, math.ceil(cfg.epochs * self.steps_per_epoch))
        self.y = torch.from_numpy(np.asarray(targets, dtype=np.int64))
        self.soft = None if distill_weight <= 0 else torch.from_numpy(np.asarray(soft_targets, dtype=np.float32))
        self.alpha, self.tau = float(distill_weight), float(distill_temperature)
        if cfg.channels_last:
            model.to(memory_format=torch.channels_last)
        self.head = getattr(model, "head_logits", model)
        self.step = 0
        self.seen = 0  # images presented so far (the training cost is proportional to it)
        self._perm: np.ndarray | None = None
        self._pos = 0
        self.recent: list[float] = []

    @property
    def done(self) -> bool:
        return self.step >= self.total

    @property
    def mean_loss(self) -> float:
        """Mean training loss over the last epoch's steps (``nan`` before the first step)."""
        return float(np.mean(self.recent[-self.steps_per_epoch :])) if self.recent else float("nan")

    def _loss(self, xb: torch.Tensor, idx: np.ndarray) -> torch.Tensor:
        out = self.head(xb)
        ce = self.loss_fn(out, self.y[idx])
        if self.soft is None:
            return ce
        logp = torch.log_softmax(out / self.tau, dim=1)
        soft = self.soft[idx]
        kl = (soft * (torch.log(soft.clamp_min(1e-12)) - logp)).sum(dim=1).mean()
        return (1 - self.alpha) * ce + self.alpha * self.tau**2 * kl

    def run(self, until: int | None = None, on_step: Callable[[int, int, float], None] | None = None) -> int:
        """Train up to step ``until`` (default: the end); returns the steps taken by this call."""
        until = self.total if until is None else min(int(until), self.total)
        cfg, n, first = self.cfg, self.n, self.step
        self.model.train()
        while self.step < until:
            if self._perm is None or self._pos >= n:
                self._perm = torch.randperm(n, generator=self.gen).numpy()
                self._pos = 0
                self.recent = self.recent[-self.steps_per_epoch :]
            idx = self._perm[self._pos : self._pos + cfg.batch_size]
            self._pos += cfg.batch_size
            if len(idx) < 2 and n >= 2:  # BatchNorm needs > 1 sample per batch
                continue
            xb = preprocess(self.x[self.index[idx]], self.mean, self.std)
            if cfg.augment:
                xb = augment(xb, self.gen)
            if cfg.channels_last:
                xb = xb.contiguous(memory_format=torch.channels_last)
            for g in self.opt.param_groups:
                g["lr"] = _lr_at(cfg, self.step, self.total)
            loss = self._loss(xb, idx)
            if not torch.isfinite(loss):
                raise FloatingPointError(
                    f"training loss became {loss.item()} at step {self.step}; lower the learning rate "
                    f"(now {cfg.lr}) or check the input data"
                )
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            self.opt.step()
            self.recent.append(loss.item())
            self.step += 1
            self.seen += len(idx)
            if on_step is not None:
                on_step(self.step, self.total, self.recent[-1])
        return self.step - first


def train_epochs(
    model: nn.Module,
    x: np.ndarray,
    targets: np.ndarray,
    cfg: TrainConfig,
    mean: np.ndarray,
    std: np.ndarray,
    on_step: Callable[[int, int, float], None] | None = None,
    index: np.ndarray | None = None,
) -> tuple[float, int]:
    """Train ``model`` in place on uint8 images ``x`` with integer ``targets``.

    With ``index``, train on ``x[index]`` (``targets`` aligned with ``index``) without copying
    those images: a device's samples under a node are gathered batch by batch, so the round
    needs no second copy of its data.

    Returns ``(mean training loss over the last epoch's steps, steps taken)``.
    """
    t = Trainer(model, x, targets, cfg, mean, std, index=index)
    steps = t.run(on_step=on_step)
    return t.mean_loss, steps


@torch.no_grad()
def fit_temperature(model: nn.Module, x: np.ndarray, targets: np.ndarray, mean: np.ndarray, std: np.ndarray,
                    batch_size: int = 512) -> float:
    """Temperature ``T`` minimising the negative log-likelihood of ``targets`` (output indices)
    under ``softmax(output)`` when the head logits are divided by ``T`` (Guo et al. 2017).

    For a leaf head the search runs through the leaf → child grouping, so the temperature is
    the one :func:`edgehmoe.model.arch.scale_logits` ``(model, 1 / T)`` folds into the
    network. A coarse-to-fine search over ``T`` in [0.05, 20]; returns 1.0 without samples.
    """
    if len(x) == 0:
        return 1.0
    model.eval()
    head_fn = getattr(model, "head_logits", model)
    group = getattr(model, "group", lambda h: h)
    head = torch.cat([head_fn(preprocess(x[i : i + batch_size], mean, std)) for i in range(0, len(x), batch_size)])
    y = torch.from_numpy(np.asarray(targets, dtype=np.int64))

    def nll(t: float) -> float:
        return float(nn.functional.cross_entropy(group(head / t), y))

    grid = np.exp(np.linspace(np.log(0.05), np.log(20.0), 61))
    best = min(grid, key=nll)
    fine = best * np.exp(np.linspace(-0.06, 0.06, 25))  # the coarse grid's step is ±0.1 in log T
    return float(min(fine, key=nll))


def state_arrays(model: nn.Module) -> dict[str, np.ndarray]:
    """A model's state dict as numpy arrays (what travels and what checkpoints hold)."""
    return {k: v.detach().cpu().numpy().copy() for k, v in model.state_dict().items()}


def load_state_arrays(model: nn.Module, arrays: dict[str, np.ndarray]) -> nn.Module:
    """Load numpy arrays into ``model``, checking names and shapes with clear errors."""
    sd = model.state_dict()
    missing = sorted(set(sd) - set(arrays))
    unexpected = sorted(set(arrays) - set(sd))
    if missing or unexpected:
        raise ModelError(f"weights do not fit the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    for k, v in sd.items():
        a = np.asarray(arrays[k])
        if tuple(a.shape) != tuple(v.shape):
            raise ModelError(f"weight {k!r} has shape {a.shape}, the model expects {tuple(v.shape)}")
        if a.dtype.kind == "f" and not np.all(np.isfinite(a)):
            raise ModelError(f"weight {k!r} contains NaN or infinite values")
    model.load_state_dict({k: torch.from_numpy(np.asarray(arrays[k]).astype(sd[k].numpy().dtype)) for k in sd})
    return model


def relabel_samples(label_map: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Indices of samples the task uses and their targets (``label_map[label]``, -1 dropped)."""
    label_map = np.asarray(label_map, dtype=np.int64)
    labels = np.asarray(labels, dtype=np.int64)
    if labels.size and (labels.min() < 0 or labels.max() >= len(label_map)):
        raise ModelError(f"labels must lie in 0..{len(label_map) - 1}; got {labels.min()}..{labels.max()}")
    t = label_map[labels]
    keep = np.flatnonzero(t >= 0)
    return keep, t[keep]


def local_round(
    arch: ArchSpec | dict,
    weights: dict[str, np.ndarray] | None,
    label_map: np.ndarray,
    x: np.ndarray,
    labels: np.ndarray,
    cfg: TrainConfig,
    mean: np.ndarray,
    std: np.ndarray,
) -> RoundOutput:
    """One client round: build the network, load ``weights``, train on the samples that
    ``label_map`` keeps, return the new weights. ``weights=None`` starts from the seeded
    initialisation (used by the profiler)."""
    torch.manual_seed(cfg.seed)
    model = build_model(arch)
    if weights:
        load_state_arrays(model, weights)
    keep, targets = relabel_samples(label_map, labels)
    if len(keep) == 0:
        raise ModelError("this device holds no samples under the task's node")
    loss, steps = train_epochs(model, x, targets, cfg, mean, std, index=keep)
    return RoundOutput(weights=state_arrays(model), num_examples=int(len(keep)), loss=loss, steps=steps)


@torch.no_grad()
def predict_logits(
    model: nn.Module, x: np.ndarray, mean: np.ndarray, std: np.ndarray, batch_size: int = 512
) -> np.ndarray:
    model.eval()
    out = [model(preprocess(x[i : i + batch_size], mean, std)).numpy() for i in range(0, len(x), batch_size)]
    if not out:
        return np.zeros((0, _num_outputs(model)), dtype=np.float32)
    return np.concatenate(out)


def _num_outputs(model: nn.Module) -> int:
    spec = getattr(model, "spec", None)
    return spec.num_outputs if isinstance(spec, ArchSpec) else 0


def predict_proba(model: nn.Module, x: np.ndarray, mean: np.ndarray, std: np.ndarray, batch_size: int = 512) -> np.ndarray:
    logits = predict_logits(model, x, mean, std, batch_size)
    logits = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(logits)
    return e / e.sum(axis=1, keepdims=True)


def warm_up() -> None:
    """One tiny forward/backward pass, so that torch's one-time initialisation (thread
    pools, kernels, autograd engine) is not charged to the first measured round."""
    torch.manual_seed(0)
    model = build_model(ArchSpec(width=4, num_outputs=2, input_size=8))
    x = np.zeros((4, 8, 8, 3), dtype=np.uint8)
    train_epochs(model, x, np.array([0, 1, 0, 1]), TrainConfig(epochs=1, batch_size=4), np.full(3, 0.5), np.full(3, 0.25))
