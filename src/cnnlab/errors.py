"""Errors the user can fix, reported as one line instead of a traceback."""

from __future__ import annotations

import functools
import signal
import sys

from omegaconf.errors import MissingMandatoryValue


class ConfigError(ValueError):
    """A config value or an input that cannot work, with a message saying what to change."""

    exit_code = 2  # like a command-line usage error: nothing was done


class RunFailed(RuntimeError):
    """A run that started and could not go on (a non-finite loss, a full disk), said in one line.

    What the run had finished is kept (its last whole checkpoint, its MLflow run marked FAILED).
    """

    exit_code = 1


ONE_LINE = (ConfigError, RunFailed, MissingMandatoryValue)


def one_line_errors(task):
    """Wrap an entry point so that a ``ConfigError`` or ``RunFailed`` ends the program with its message alone.

    Hydra already reports its own config errors (a wrong option or key) this way; this does
    the same for the checks our code makes and for a required value left unset (``???``). A script
    stopped by Ctrl-C or SIGTERM says so in one line too. Bugs still raise with their full traceback.
    """
    @functools.wraps(task)
    def wrapper(*args, **kwargs):
        try:
            return task(*args, **kwargs)
        except KeyboardInterrupt as stop:  # Ctrl-C, or SIGTERM (tracking.stop_signals_as_ctrl_c): asked for
            name = str(stop) or "SIGINT"
            print(f"Stopped ({name}).", file=sys.stderr)
            sys.exit(128 + signal.Signals[name])  # as the shell reports a process ended by that signal
        except Exception as error:
            cause = error
            while cause is not None and not isinstance(cause, ONE_LINE):
                cause = cause.__cause__  # hydra.utils.instantiate wraps what constructors raise
            if cause is None:
                raise
            message = str(cause).splitlines()[0]
            if isinstance(cause, MissingMandatoryValue):
                message += f" (give it on the command line: {cause.full_key}=...)"
            print(f"Error: {message}", file=sys.stderr)
            sys.exit(getattr(cause, "exit_code", 2))

    return wrapper
