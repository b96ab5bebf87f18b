#!/usr/bin/env python
"""Inference latency and resident memory of an ONNX bundle: the chain of experts vs the flat model.

A thin script: the command line is :mod:`edgehmoe.cli.bench_inference` (console script
``edgehmoe-bench-inference``), the bench :mod:`edgehmoe.measure.bench_inference`; see
docs/inference.md.
"""

import sys
from pathlib import Path

# From a checkout that is not pip-installed, import the package next to this folder.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from edgehmoe.cli.bench_inference import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
