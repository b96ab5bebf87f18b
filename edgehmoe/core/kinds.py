"""The two model kinds every layer talks about, spelled once.

``HMOE`` is the hierarchical mixture of experts (one expert per internal node, top-down
routing); ``FLAT`` is the flat softmax baseline over all leaves. They are also the keys of
``model.json``'s ``models``, ``summary.json`` and the ``--model`` choices, so their values are
part of the file formats and must not change.
"""

from __future__ import annotations

__all__ = ["FLAT", "HMOE", "KINDS"]

HMOE = "hmoe"
FLAT = "flat"
KINDS = (HMOE, FLAT)
