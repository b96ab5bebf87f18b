"""Cost model of the ``cnn3`` network family: multiply-accumulates per image and per training run.

Torch-free (numpy is not even needed), so the inference bench worker, the ONNX side and
central training share one count. :func:`cnn3_macs` counts one forward pass of an
architecture dict (``ArchSpec.to_dict()``, as stored in model directories and bundle
manifests); :func:`train_macs` turns forward passes into training cost with the usual
rule that a backward pass costs about twice a forward pass (gradients with respect to the
activations and to the weights), so one training step on one image is 3 forward passes.

The counts are what ``edgehmoe fit --equal-compute`` balances: the hierarchical model gets
as many training MACs as the flat model's ``--epochs`` cost (:func:`equal_compute_epochs`).
"""

from __future__ import annotations

from collections.abc import Mapping

__all__ = ["TRAIN_STEP_FACTOR", "cnn3_macs", "train_macs", "equal_compute_epochs"]

# forward + backward (activation and weight gradients) ≈ 3 forward passes
TRAIN_STEP_FACTOR = 3


def cnn3_macs(arch: Mapping) -> int:
    """Multiply-accumulates per image of the ``cnn3`` family (conv w, 2w, 4w; pools; linear).

    Counts the three 3x3 convolutions (padding 1) at sides s, s/2 and s/4 (s = input side /
    ``stem_stride``, the side of the first convolution's output) and the final
    linear layer (over the leaves below the node for a leaf-head expert, whose
    ``leaf_groups`` lists one child index per leaf; the grouping into children is a sum of
    exponentials and not counted). BatchNorm (folded into the convolutions on export), ReLU
    and pooling are not multiply-accumulates. Takes the ``arch`` dict of a manifest or model
    directory (``ArchSpec.to_dict()``).
    """
    s = int(arch["input_size"]) // int(arch.get("stem_stride", 1))  # side after the first convolution
    w, c = int(arch["width"]), int(arch.get("in_channels", 3))
    groups = arch.get("leaf_groups")
    k = len(groups) if groups else int(arch["num_outputs"])
    return s * s * 9 * c * w + (s // 2) ** 2 * 9 * w * 2 * w + (s // 4) ** 2 * 9 * 2 * w * 4 * w + 4 * w * k


def train_macs(arch: Mapping, sample_epochs: float) -> float:
    """Training MACs of ``sample_epochs`` image presentations (samples × epochs) of ``arch``."""
    return float(TRAIN_STEP_FACTOR * cnn3_macs(arch) * sample_epochs)


def equal_compute_epochs(flat_arch: Mapping, flat_samples: int, flat_epochs: float,
                         experts: Mapping[int, tuple[Mapping, int]]) -> float:
    """Epochs for every expert so the hierarchical model trains with the flat model's MACs.

    ``experts`` maps node → ``(arch, samples under the node)``. Every expert runs the same
    number of epochs ``e`` over its own samples, so ``e = flat MACs / Σ samples · MACs``.
    """
    per_epoch = sum(cnn3_macs(a) * n for a, n in experts.values())
    if per_epoch <= 0:
        raise ValueError("no expert has training samples")
    return cnn3_macs(flat_arch) * flat_samples * flat_epochs / per_epoch
