"""When the aggregation server evaluates on the validation split: one pure decision.

``eval.every = k`` asks for an evaluation every k rounds (0 = only after the last round), and
the last round is always evaluated. That grid is in rounds, but rounds of the two models cost
very different amounts of client compute: a flat round trains the whole network on every
device, about 20 times an expert round on CIFAR-100. A flat run is therefore short (say 8
rounds against 200 for HMoE), and with ``every = 4`` its curve of info-F1 against cumulative
client compute — the axis the equal-compute comparison uses — would have two points. So the
flat model's grid is refined until its run has at least :data:`MIN_FLAT_POINTS` evaluations
(every round when it has that many rounds or fewer). Evaluation costs server time only, never
client compute, and the flat model is one network, so the extra points are cheap.
"""

from __future__ import annotations

__all__ = ["MIN_FLAT_POINTS", "eval_step", "eval_due"]

#: Evaluations the flat model's run gets at least (when it has that many rounds).
MIN_FLAT_POINTS = 8


def eval_step(kind: str, total_rounds: int, every: int) -> int:
    """Rounds between evaluations for a ``kind`` (``hmoe`` | ``flat``) run; 0 = only at the end."""
    if every <= 0:
        return 0
    if kind == "flat":
        return max(1, min(every, total_rounds // MIN_FLAT_POINTS))
    return every


def eval_due(kind: str, rounds_done: int, total_rounds: int, every: int) -> bool:
    """True when the run should evaluate after completing ``rounds_done`` rounds (1-based)."""
    if rounds_done >= total_rounds:
        return True
    step = eval_step(kind, total_rounds, every)
    return step > 0 and rounds_done % step == 0
