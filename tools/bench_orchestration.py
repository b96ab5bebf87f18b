#!/usr/bin/env python
"""Orchestration benchmark: the real server and Mosquitto against an emulated fleet (and real clients).

A thin script: the command line is :mod:`edgehmoe.cli.bench_orchestration`, the benchmark
:mod:`edgehmoe.server.bench`, the emulator :mod:`edgehmoe.fl.fleet`; see docs/scale.md.
"""

import sys
from pathlib import Path

# From a checkout that is not pip-installed, import the package next to this folder.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from edgehmoe.cli.bench_orchestration import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
