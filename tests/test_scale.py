"""What makes the server scale to a thousand devices (issue #12), checked piece by piece.

- ``wire.encode_many``: the tasks of a round share one serialised copy of the expert's weights;
  every payload still decodes to its own message.
"""

from __future__ import annotations

import numpy as np
import pytest

from edgehmoe.fl import wire


def _task(i: int, weights: dict, label_map: np.ndarray, node: int = 1) -> wire.TrainTask:
    return wire.TrainTask(run="r", round=3, task_id=f"r3-t{i}", node=node, arch={"kind": "expert", "width": 8},
                          label_map=label_map, weights=weights, epochs=1, batch_size=16, lr=0.05, momentum=0.9,
                          weight_decay=5e-4, deadline_unix=1_000_000.0 + i, seed=100 + i,
                          preprocess={"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]})


def test_encode_many_shares_the_tensors_and_decodes_like_encode():
    # Prepare: 5 tasks of one expert (same arrays), then 2 of another expert
    rng = np.random.default_rng(0)
    w1 = {"conv.weight": rng.standard_normal((8, 3, 3, 3)).astype(np.float32),
          "bn.num_batches_tracked": np.array(4, np.int64)}
    w2 = {"conv.weight": rng.standard_normal((4, 3, 3, 3)).astype(np.float32)}
    lm1, lm2 = np.array([0, 1, -1, -1], np.int64), np.array([-1, -1, 0, 1], np.int64)
    tasks = [_task(i, w1, lm1) for i in range(5)] + [_task(5 + i, w2, lm2, node=2) for i in range(2)]
    # Execute
    many = wire.encode_many(tasks)
    # Assert: each payload decodes to its own task, with the right arrays
    assert len(many) == 7
    for t, blob in zip(tasks, many):
        d = wire.decode(blob, expect=wire.TrainTask)
        assert (d.task_id, d.seed, d.deadline_unix, d.node, d.preprocess) == (t.task_id, t.seed, t.deadline_unix,
                                                                               t.node, t.preprocess)
        assert np.array_equal(d.label_map, t.label_map)
        assert d.weights.keys() == t.weights.keys()
        for k in t.weights:
            assert d.weights[k].dtype == t.weights[k].dtype and np.array_equal(d.weights[k], t.weights[k])
        assert len(blob) == len(wire.encode(t)) or abs(len(blob) - len(wire.encode(t))) <= 8  # header padding
    # the tensor bytes are shared: everything after the header is the same for one expert
    def data(b: bytes) -> bytes:
        return b[8 + int.from_bytes(b[:8], "little"):]

    assert data(many[0]) == data(many[4]) and data(many[5]) == data(many[6]) and data(many[0]) != data(many[5])


def test_encode_many_still_checks_every_message():
    w = {"conv.weight": np.zeros((2, 2), np.float32)}
    lm = np.array([0, -1], np.int64)
    good = _task(0, w, lm)
    bad = wire.TrainTask(**{**vars(_task(1, w, lm)), "task_id": "bad/id"})  # not an id: a topic separator
    with pytest.raises(wire.WireError, match="task_id"):
        wire.encode_many([good, bad])
    with pytest.raises(wire.WireError, match="NaN"):
        wire.encode_many([_task(2, {"conv.weight": np.full((2, 2), np.nan, np.float32)}, lm)])
