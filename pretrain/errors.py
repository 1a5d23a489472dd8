"""The project's user-facing errors: one base class, so every command line can tell an expected
failure (bad input, a corrupt file; printed as one line) from a bug (a traceback).

Each package keeps its own subclass (``ConfigError``, ``DataError``, ``CheckpointError``,
``ExportError``, ``TrainingError``); their messages are one line saying what to fix.
"""
from __future__ import annotations


class UserError(Exception):
    """An expected failure caused by the user's input or files; the message says what to fix."""


class CheckpointError(UserError, RuntimeError):
    """A checkpoint that cannot be read, verified or resumed from; the message names the file."""
