"""One error base for everything edgehmoe raises on purpose.

Every domain error (a bad tree, dataset, shard, model directory, bundle, wire message, update,
config, broker, run) derives from :class:`EdgeHmoeError`. Command lines catch only it and
``OSError`` and print one line (see :func:`edgehmoe.cli.common.run_main`); anything else is a
bug and keeps its traceback. ``exit_code`` says how a command ends: 2 for bad input (the
default), 1 for a run that could not complete.

Domain errors also derive from the builtin they refine (``ValueError`` for bad values,
``ImportError`` for a missing optional dependency, ``RuntimeError`` for a failed run), so code
that catches the builtin keeps working.
"""

from __future__ import annotations

__all__ = ["EdgeHmoeError", "UsageError", "MissingDependency", "RunError"]


class EdgeHmoeError(Exception):
    """Base of every error edgehmoe raises on purpose; the message says how to fix it."""

    exit_code = 2


class UsageError(EdgeHmoeError, ValueError):
    """An option or argument value that cannot work (the message names the valid choices)."""


class MissingDependency(EdgeHmoeError, ImportError):
    """An optional dependency is not installed; the message gives the pip command."""


class RunError(EdgeHmoeError, RuntimeError):
    """A run, broker or worker could not complete (not the user's input): exit status 1."""

    exit_code = 1
