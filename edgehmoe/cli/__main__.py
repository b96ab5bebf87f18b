"""``python -m edgehmoe.cli``: the same as the ``edgehmoe`` command."""
import sys

from edgehmoe.cli.main import main

sys.exit(main())
