"""Errors the user can fix, reported as one line instead of a traceback."""

from __future__ import annotations

import functools
import sys

from omegaconf.errors import MissingMandatoryValue


class ConfigError(ValueError):
    """A config value or an input that cannot work, with a message saying what to change."""


def one_line_errors(task):
    """Wrap an entry point so that a ``ConfigError`` ends the program with its message alone.

    Hydra already reports its own config errors (a wrong option or key) this way; this does
    the same for the checks our code makes and for a required value left unset (``???``).
    Bugs still raise with their full traceback.
    """
    @functools.wraps(task)
    def wrapper(*args, **kwargs):
        try:
            return task(*args, **kwargs)
        except Exception as error:
            cause = error
            while cause is not None and not isinstance(cause, (ConfigError, MissingMandatoryValue)):
                cause = cause.__cause__  # hydra.utils.instantiate wraps what constructors raise
            if cause is None:
                raise
            message = str(cause).splitlines()[0]
            if isinstance(cause, MissingMandatoryValue):
                message += f" (give it on the command line: {cause.full_key}=...)"
            print(f"Error: {message}", file=sys.stderr)
            sys.exit(2)

    return wrapper
