"""The hand-checkable 9-node tree used across tests.

    0 root
    ├── 1 A
    │   ├── 3 a1   (class 0)
    │   └── 4 a2   (class 1)
    └── 2 B
        ├── 5 b1   (class 2)
        └── 6 C
            ├── 7 c1 (class 3)
            └── 8 c2 (class 4)

Leaves under: root 5, A 2, B 3, C 2. Heights: root 3, A 1, B 2, C 1, leaves 0.
"""

from edgehmoe.core.hierarchy import Hierarchy

PARENTS = [-1, 0, 0, 1, 1, 2, 2, 6, 6]
NAMES = ["root", "A", "B", "a1", "a2", "b1", "C", "c1", "c2"]
LEAF_CLASS = [-1, -1, -1, 0, 1, 2, -1, 3, 4]


def tree9() -> Hierarchy:
    return Hierarchy(PARENTS, NAMES, LEAF_CLASS)
