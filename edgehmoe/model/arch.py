"""The tiny CNN family used for every expert and for the flat baseline.

One architecture (conv-BN-ReLU ×3 at widths w, 2w, 4w with 2×2 max-pooling after the
first two blocks, global average pooling, linear) sized by its width ``w``. It has no
data-dependent control flow, so every member exports to ONNX with a dynamic batch axis.

An expert's width follows its task: with ``L`` leaves in the tree and a node with ``k``
children, ``w = flat_width * sqrt(k / L)`` (rounded to a multiple of 4, clipped to
``[min_width, flat_width]``). Compute per sample grows with ``w**2``, so a ``k``-way expert
costs about ``k / L`` of the flat model per sample: on CIFAR-100 the root (20-way) gets
w=16 and each 5-way superclass expert w=8 when the flat model has w=32.

A **leaf-head** expert (``ArchSpec.leaf_groups``, ``expert_specs(head="leaves")``) is trained
on the leaves below its node instead of on its children (Valmadre 2022, Chen et al. 2019:
a coarse classifier trained on fine labels and summed to the coarse classes is the better
coarse classifier). Its last linear layer has one logit per leaf below the node, and the
network ends with the leaf → child grouping ``child logit = logsumexp(logits of its
leaves)``, so its softmax over children equals the summed leaf probabilities and its
output is still one logit per child: routing, ONNX export and bundles are unchanged.
:meth:`TinyCNN.head_logits` gives the leaf logits that training targets index;
:func:`expert_label_map` gives the matching targets (class id → leaf index below the node).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import nn

from edgehmoe.core.hierarchy import Hierarchy
from edgehmoe.errors import EdgeHmoeError

__all__ = [
    "ArchSpec",
    "HEADS",
    "TinyCNN",
    "build_model",
    "count_params",
    "expert_label_map",
    "expert_width",
    "expert_specs",
    "flat_spec",
    "estimate_train_memory_mb",
    "leaf_groups",
    "scale_logits",
]

HEADS = ("children", "leaves")  # what an expert is trained on (see the module docstring)


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
    # Leaf head: child index (0..num_outputs-1) of each leaf below the node, in leaf order;
    # None for a network whose last layer has one logit per output (the default).
    leaf_groups: tuple[int, ...] | None = None
    # Stride of the first convolution: 2 runs the whole network at half resolution (a
    # quarter of the activations and multiply-accumulates per width).
    stem_stride: int = 1

    def __post_init__(self) -> None:
        if self.kind != "cnn3":
            raise ModelError(f"unknown architecture kind {self.kind!r}; valid: 'cnn3'")
        for name in ("width", "num_outputs", "input_size", "in_channels"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ModelError(f"ArchSpec.{name} must be a positive integer, got {v!r}")
        if self.leaf_groups is not None:
            g = tuple(int(v) for v in self.leaf_groups)
            object.__setattr__(self, "leaf_groups", g)
            if sorted(set(g)) != list(range(self.num_outputs)):
                raise ModelError(
                    f"leaf_groups must name every output 0..{self.num_outputs - 1} at least once "
                    f"(one child index per leaf), got {list(g)[:12]}"
                )
        if self.num_outputs < 2:
            raise ModelError(f"a classifier needs at least 2 outputs, got {self.num_outputs}")
        if self.stem_stride not in (1, 2):
            raise ModelError(f"stem_stride must be 1 or 2, got {self.stem_stride!r}")
        if self.input_size // self.stem_stride < 4:
            raise ModelError(
                f"input_size / stem_stride must be >= 4 (two 2x2 poolings), got {self.input_size}/{self.stem_stride}; "
                "for images this small use a stride-1 root (--root-stem-stride 1, [model] root_stem_stride = 1)"
            )
        if self.width > 1024:
            raise ModelError(f"width {self.width} is implausibly large (max 1024)")

    @property
    def num_head_outputs(self) -> int:
        """Logits of the last linear layer: leaves below the node (leaf head) or outputs."""
        return len(self.leaf_groups) if self.leaf_groups else self.num_outputs

    def to_dict(self) -> dict:
        d = asdict(self)
        # Options at their defaults are left out: the dict of a plain network is exactly what
        # it always was (older readers, manifests and train tasks know only those keys).
        if self.leaf_groups is None:
            del d["leaf_groups"]
        else:
            d["leaf_groups"] = list(self.leaf_groups)
        if self.stem_stride == 1:
            del d["stem_stride"]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "ArchSpec":
        known = {"width", "num_outputs", "input_size", "in_channels", "kind", "leaf_groups", "stem_stride"}
        unknown = set(d) - known
        if unknown:
            raise ModelError(f"unknown architecture keys {sorted(unknown)}; valid: {sorted(known)}")
        return cls(**d)


def _block(cin: int, cout: int, stride: int = 1) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


class TinyCNN(nn.Module):
    """conv-BN-ReLU(w) → pool → conv-BN-ReLU(2w) → pool → conv-BN-ReLU(4w) → GAP → linear."""

    def __init__(self, spec: ArchSpec):
        super().__init__()
        self.spec = spec
        w = spec.width
        self.features = nn.Sequential(
            *_block(spec.in_channels, w, spec.stem_stride),
            nn.MaxPool2d(2),
            *_block(w, 2 * w),
            nn.MaxPool2d(2),
            *_block(2 * w, 4 * w),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.classifier = nn.Linear(4 * w, spec.num_head_outputs)
        if spec.leaf_groups:
            # (leaves, children) 0/1 matrix; not persistent, so weights files keep their keys
            g = torch.zeros(len(spec.leaf_groups), spec.num_outputs)
            g[torch.arange(len(spec.leaf_groups)), torch.tensor(spec.leaf_groups)] = 1.0
            self.register_buffer("leaf_to_child", g, persistent=False)
        else:
            self.leaf_to_child = None

    def head_logits(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of the last linear layer (over leaves for a leaf head): what training targets index."""
        return self.classifier(self.features(x))

    def group(self, head: torch.Tensor) -> torch.Tensor:
        """Child logits from head logits: ``log Σ exp`` over each child's leaves (identity
        without a leaf head). Written with ReduceMax/Exp/MatMul/Log so it exports to plain
        ONNX; the clamp keeps a child whose leaves all underflow finite (log 1e-30 ≈ -69)."""
        if self.leaf_to_child is None:
            return head
        m = head.amax(dim=1, keepdim=True)
        return torch.log(torch.clamp_min(torch.exp(head - m) @ self.leaf_to_child, 1e-30)) + m

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.group(self.head_logits(x))


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
    head: str = "children",
    root_stem_stride: int = 1,
    expert_stem_stride: int = 1,
) -> dict[int, ArchSpec]:
    """Architecture of every expert (internal node) of ``tree``.

    ``fixed_width`` gives every expert the same width; ``root_width`` overrides the root's;
    ``root_stem_stride=2`` gives the root a strided first convolution (the expert that sees
    every sample is the one whose round memory matters most); ``expert_stem_stride=2`` does
    the same for every other expert (for large inputs, e.g. Tiny ImageNet's 64 px).
    ``head="leaves"`` gives every expert with an internal child a leaf head
    (:func:`leaf_groups`); an expert whose children are all leaves is the same either way and
    keeps the plain head.
    """
    if head not in HEADS:
        raise ModelError(f"unknown expert head {head!r}; valid: {', '.join(HEADS)}")
    specs = {}
    for node in tree.internal_nodes:
        k = int(tree.num_children[node])
        w = fixed_width or expert_width(k, tree.num_leaves, flat_width, min_width)
        if node == 0 and root_width:
            w = root_width
        groups = None
        if head == "leaves" and int(tree.leaves_under[node]) > k:
            groups = tuple(int(g) for g in leaf_groups(tree, int(node)))
        specs[int(node)] = ArchSpec(width=int(w), num_outputs=k, input_size=input_size, leaf_groups=groups,
                                    stem_stride=root_stem_stride if node == 0 else expert_stem_stride)
    return specs


def _leaves_below(tree: Hierarchy, node: int) -> np.ndarray:
    """Leaf nodes below ``node`` in node order: the leaf order of a leaf head."""
    leaves = np.flatnonzero(tree.is_leaf)
    return leaves[tree.is_ancestor_or_self(np.full(len(leaves), node), leaves)]


def leaf_groups(tree: Hierarchy, node: int) -> np.ndarray:
    """Child index of ``node`` above each leaf below it (leaves in node order)."""
    leaves = _leaves_below(tree, node)
    return tree.child_index[tree.ancestor_matrix[leaves, tree.depths[node] + 1]]


def expert_label_map(tree: Hierarchy, node: int, spec: ArchSpec | dict) -> np.ndarray:
    """Training targets of ``node``'s expert for every dataset class (``-1``: not below the node).

    The child index (``tree.label_map(node)``) for a plain expert; the index of the class's
    leaf among the leaves below the node for a leaf head, after checking that the head's
    ``leaf_groups`` fit this tree. This is the ``label_map`` a train task carries.
    """
    if isinstance(spec, dict):
        spec = ArchSpec.from_dict(spec)
    if not spec.leaf_groups:
        return tree.label_map(node)
    groups = leaf_groups(tree, node)
    if tuple(int(g) for g in groups) != spec.leaf_groups:
        raise ModelError(
            f"the leaf head of expert {node} ({tree.names[node]!r}) groups {len(spec.leaf_groups)} leaves "
            f"but the tree has {len(groups)} leaves below it grouped differently; rebuild the spec "
            "with expert_specs(tree, head='leaves') for this tree"
        )
    out = np.full(tree.num_classes, -1, dtype=np.int64)
    out[tree.leaf_class[_leaves_below(tree, node)]] = np.arange(len(groups))
    return out


@torch.no_grad()
def scale_logits(model: nn.Module, factor: float) -> nn.Module:
    """Multiply the last layer's logits by ``factor`` in place (temperature ``1/factor``),
    folded into the classifier's weights so an exported network needs no extra operator."""
    model.classifier.weight.mul_(float(factor))
    model.classifier.bias.mul_(float(factor))
    return model


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
    w, s = spec.width, spec.input_size // spec.stem_stride
    params = count_params(spec)
    per_sample = (
        spec.in_channels * spec.input_size**2
        + 3 * w * s * s + w * (s // 2) ** 2
        + 3 * 2 * w * (s // 2) ** 2 + 2 * w * (s // 4) ** 2
        + 3 * 4 * w * (s // 4) ** 2
    )
    act_bytes = 4 * per_sample * batch_size * 2
    return (3 * 4 * params + act_bytes) / (1024 * 1024) + 16.0
