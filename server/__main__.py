"""``python -m edgehmoe.server`` (and, from the repository root, ``python -m server``): the same
as the ``edgehmoe-server`` command, whose code is :mod:`edgehmoe.cli.server`."""

import sys

from edgehmoe.cli.server import main

sys.exit(main())
