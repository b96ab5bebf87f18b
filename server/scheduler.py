"""Which device trains which expert in a round (pure logic, no I/O).

Modes:

- ``paper``: every device of a round trains the same expert (as in the seed paper); experts
  are visited by smooth weighted round-robin, weights = training samples under each node
  (``weighting = "data"``), their square root (``"sqrt"``: the root, which holds all the
  data, is visited less often and the small experts more) or equal (``"uniform"``). Only devices holding samples under the
  chosen node, and whose memory budget fits it, are asked.
- ``parallel``: each device gets its own expert — the most "owed" one (largest round-robin
  credit) among those it holds data for and whose estimated memory fits its budget — so
  several experts advance in one round. Devices may share an expert when there are more
  devices than eligible experts; their updates are averaged.
- ``flat``: every device trains the flat model (node ``-1``).

Smooth weighted round-robin (as in nginx): each pick adds every node's weight to its
credit, takes the node with the largest credit and subtracts the total weight from it. Over
many picks each node is chosen in proportion to its weight, evenly spread; the credits are
saved in ``state.json`` so a resumed run continues the same sequence.

Counts are summed as Python ints or float64, never int64: a device claiming huge counts (the
registry refuses those, see docs/security.md) cannot wrap a sum around.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from edgehmoe.core import kinds
from edgehmoe.core.hierarchy import Hierarchy
from edgehmoe.errors import UsageError

__all__ = ["DeviceView", "Scheduler", "FLAT"]

FLAT = -1


@dataclass
class DeviceView:
    """What the scheduler needs to know about one available device."""

    device_id: str
    class_counts: np.ndarray  # samples per dataset class id
    memory_budget_mb: float  # 0 = no limit


class Scheduler:
    def __init__(
        self,
        tree: Hierarchy,
        kind: str,
        mode: str = "paper",
        weighting: str = "data",
        memory_need_mb: dict[int, float] | None = None,
        credits: dict[int, float] | None = None,
    ):
        if kind not in kinds.KINDS:
            raise UsageError(f"kind must be hmoe or flat, got {kind!r}")
        if mode not in ("paper", "parallel"):
            raise UsageError(f"mode must be paper or parallel, got {mode!r}")
        if weighting not in ("data", "sqrt", "uniform"):
            raise UsageError(f"weighting must be data, sqrt or uniform, got {weighting!r}")
        self.tree = tree
        self.kind = kind
        self.mode = mode
        self.weighting = weighting
        self.nodes = [FLAT] if kind == kinds.FLAT else [int(n) for n in tree.internal_nodes]
        self.memory_need_mb = memory_need_mb or {}
        self.credits = {n: float((credits or {}).get(n, 0.0)) for n in self.nodes}
        # samples-under-node matrix: under[node, class] (bool) for fast per-device counting
        leaves = tree.class_to_node
        self._under = {
            n: (np.ones(tree.num_classes, dtype=bool) if n == FLAT
                else tree.is_ancestor_or_self(np.full(tree.num_classes, n), leaves))
            for n in self.nodes
        }

    def samples_under(self, node: int, class_counts: np.ndarray) -> int:
        """Samples of ``class_counts`` under ``node``, summed as Python ints (never overflows int64)."""
        counts = np.asarray(class_counts)[self._under[node]]
        return sum(int(v) for v in counts.tolist())

    def _fits(self, dev: DeviceView, node: int) -> bool:
        need = self.memory_need_mb.get(node, 0.0)
        return dev.memory_budget_mb <= 0 or need <= dev.memory_budget_mb

    def weights(self, devices: list[DeviceView]) -> dict[int, float]:
        if self.weighting == "uniform":
            return {n: 1.0 for n in self.nodes}
        # float64 sums of per-device counts (each device's hello is bounded by the registry);
        # no int64 arithmetic that could wrap around to "0 samples".
        counts = [np.asarray(d.class_counts, dtype=np.float64) for d in devices]
        w = {n: float(sum(float(c[self._under[n]].sum()) for c in counts)) for n in self.nodes}
        if self.weighting == "sqrt":
            w = {n: float(np.sqrt(v)) for n, v in w.items()}
        return w

    def _pick(self, weights: dict[int, float], eligible: list[int]) -> int:
        total = sum(weights.values())
        for n in self.nodes:
            self.credits[n] += weights[n]
        best = max(eligible, key=lambda n: (self.credits[n], -n))
        self.credits[best] -= total
        return best

    def plan(self, devices: list[DeviceView], max_devices: int = 0, rng: np.random.Generator | None = None) -> dict[str, int]:
        """Assign nodes to devices for one round: ``{device_id: node}`` (may be empty)."""
        devices = sorted(devices, key=lambda d: d.device_id)
        if rng is not None:
            devices = [devices[i] for i in rng.permutation(len(devices))]
        weights = self.weights(devices)
        has_data = {}
        for d in devices:
            c = np.asarray(d.class_counts, dtype=np.float64)
            has_data[d.device_id] = {n for n in self.nodes if c[self._under[n]].sum() > 0 and self._fits(d, n)}
        if self.kind == kinds.FLAT or self.mode == "paper":
            eligible = [n for n in self.nodes if weights[n] > 0 and any(n in has_data[d.device_id] for d in devices)]
            if not eligible:
                return {}
            node = self._pick(weights, eligible)
            chosen = [d for d in devices if node in has_data[d.device_id]]
            if max_devices > 0:
                chosen = chosen[:max_devices]
            return {d.device_id: node for d in chosen}
        plan: dict[str, int] = {}
        taken: set[int] = set()
        for d in devices:
            if max_devices > 0 and len(plan) >= max_devices:
                break
            options = [n for n in self.nodes if n in has_data[d.device_id] and weights[n] > 0]
            if not options:
                continue
            fresh = [n for n in options if n not in taken]
            node = self._pick(weights, fresh or options)
            plan[d.device_id] = node
            taken.add(node)
        return plan
