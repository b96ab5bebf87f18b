"""The tiny CNN family used for every expert and for the flat baseline.

One architecture (conv-BN-ReLU ×3 at widths w, 2w, 4w with 2×2 max-pooling after the
first two blocks, global average pooling, linear) sized by its width ``w``. It has no
data-dependent control flow, so every member exports to ONNX with a dynamic batch axis.

An expert's width follows its task: with ``L`` leaves in the tree and a node with ``k``
children, ``w = flat_width * sqrt(k / L)`` (rounded to a multiple of 4, clipped to
``[min_width, flat_width]``). Compute per sample grows with ``w**2``, so a ``k``-way expert
costs about ``k / L`` of the flat model per sample: on CIFAR-100 the root (20-way) gets
w=16 and each 5-way superclass expert w=8 when the flat model has w=32.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import nn

from edgehmoe.core.hierarchy import Hierarchy
from edgehmoe.errors import EdgeHmoeError

__all__ = [
    "ArchSpec",
    "TinyCNN",
    "build_model",
    "count_params",
    "expert_width",
    "expert_specs",
    "flat_spec",
    "estimate_train_memory_mb",
]


class ModelError(EdgeHmoeError, ValueError):
    """An architecture spec, weight set or model that cannot work together."""


@dataclass(frozen=True)
class ArchSpec:
    """Architecture of one network (JSON-able; travels in train tasks and manifests)."""

    width: int  # channels of the first conv block; later blocks use 2w and 4w
    num_outputs: int  # children of the node (expert) or leaves (flat model)
    input_size: int = 32  # square input side in pixels
    in_channels: int = 3
    kind: str = "cnn3"  # architecture family; only "cnn3" exists today

    def __post_init__(self) -> None:
        if self.kind != "cnn3":
            raise ModelError(f"unknown architecture kind {self.kind!r}; valid: 'cnn3'")
        for name in ("width", "num_outputs", "input_size", "in_channels"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ModelError(f"ArchSpec.{name} must be a positive integer, got {v!r}")
        if self.num_outputs < 2:
            raise ModelError(f"a classifier needs at least 2 outputs, got {self.num_outputs}")
        if self.input_size < 4:
            raise ModelError(f"input_size must be >= 4 (two 2x2 poolings), got {self.input_size}")
        if self.width > 1024:
            raise ModelError(f"width {self.width} is implausibly large (max 1024)")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ArchSpec":
        known = {"width", "num_outputs", "input_size", "in_channels", "kind"}
        unknown = set(d) - known
        if unknown:
            raise ModelError(f"unknown architecture keys {sorted(unknown)}; valid: {sorted(known)}")
        return cls(**d)


def _block(cin: int, cout: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


class TinyCNN(nn.Module):
    """conv-BN-ReLU(w) → pool → conv-BN-ReLU(2w) → pool → conv-BN-ReLU(4w) → GAP → linear."""

    def __init__(self, spec: ArchSpec):
        super().__init__()
        self.spec = spec
        w = spec.width
        self.features = nn.Sequential(
            *_block(spec.in_channels, w),
            nn.MaxPool2d(2),
            *_block(w, 2 * w),
            nn.MaxPool2d(2),
            *_block(2 * w, 4 * w),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.classifier = nn.Linear(4 * w, spec.num_outputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def build_model(spec: ArchSpec | dict) -> nn.Module:
    if isinstance(spec, dict):
        spec = ArchSpec.from_dict(spec)
    return TinyCNN(spec)


def count_params(model_or_spec: nn.Module | ArchSpec) -> int:
    model = build_model(model_or_spec) if isinstance(model_or_spec, ArchSpec) else model_or_spec
    return sum(p.numel() for p in model.parameters())


def expert_width(num_children: int, num_leaves: int, flat_width: int = 32, min_width: int = 4) -> int:
    """Width rule ``flat_width * sqrt(k / L)`` rounded to a multiple of 4 and clipped."""
    w = flat_width * math.sqrt(num_children / max(num_leaves, 1))
    w = 4 * max(1, round(w / 4))
    return int(min(max(w, min_width), flat_width))


def expert_specs(
    tree: Hierarchy,
    input_size: int = 32,
    flat_width: int = 32,
    min_width: int = 4,
    fixed_width: int | None = None,
    root_width: int | None = None,
) -> dict[int, ArchSpec]:
    """Architecture of every expert (internal node) of ``tree``.

    ``fixed_width`` gives every expert the same width; ``root_width`` overrides the root's.
    """
    specs = {}
    for node in tree.internal_nodes:
        k = int(tree.num_children[node])
        w = fixed_width or expert_width(k, tree.num_leaves, flat_width, min_width)
        if node == 0 and root_width:
            w = root_width
        specs[int(node)] = ArchSpec(width=int(w), num_outputs=k, input_size=input_size)
    return specs


def flat_spec(tree: Hierarchy, input_size: int = 32, width: int = 32) -> ArchSpec:
    return ArchSpec(width=width, num_outputs=tree.num_leaves, input_size=input_size)


def estimate_train_memory_mb(spec: ArchSpec | dict, batch_size: int) -> float:
    """Rough extra memory (MiB) one training round of ``spec`` needs beyond the idle process.

    Counts weights, gradients and SGD momentum (3 copies of the parameters), the activations
    autograd keeps for one batch (conv, BN and ReLU outputs of each block, plus pooling)
    twice over for their gradients, and 16 MiB of allocator slack. Used by the scheduler and
    the client to refuse tasks that would not fit a device's memory budget; the real number
    is measured (``round_mem_mb``) and reported with every result.
    """
    if isinstance(spec, dict):
        spec = ArchSpec.from_dict(spec)
    w, s = spec.width, spec.input_size
    params = count_params(spec)
    per_sample = (
        spec.in_channels * s * s
        + 3 * w * s * s + w * (s // 2) ** 2
        + 3 * 2 * w * (s // 2) ** 2 + 2 * w * (s // 4) ** 2
        + 3 * 4 * w * (s // 4) ** 2
    )
    act_bytes = 4 * per_sample * batch_size * 2
    return (3 * 4 * params + act_bytes) / (1024 * 1024) + 16.0
