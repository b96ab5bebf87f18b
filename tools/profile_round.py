#!/usr/bin/env python
"""Per-round time and memory of every expert and of the flat model (the seed paper's Table 1).

A thin script: the command line is :mod:`edgehmoe.cli.profile` (console script
``edgehmoe-profile``), the profiler :mod:`edgehmoe.measure.profile`; see docs/profiling.md.
"""

import sys
from pathlib import Path

# From a checkout that is not pip-installed, import the package next to this folder.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from edgehmoe.cli.profile import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
