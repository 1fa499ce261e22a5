"""Errors caused by what the user gave us (a file, a value, a checkpoint).

The CLI prints each as one line and exits with code 2; anything else is a bug and keeps its traceback.
Messages name the thing (file, field or value) and say what is wrong with it.
"""


class UserError(Exception):
    """Base class: a problem with the user's input, reported as one line, exit code 2."""


class ConfigError(UserError):
    """A configuration key, type or value is not acceptable."""


class DataError(UserError):
    """A data file or folder cannot be used (missing, unreadable, malformed, mislabelled)."""


class CheckpointError(UserError):
    """A checkpoint or run directory cannot be loaded, resumed or written."""


class TrainingAborted(UserError):
    """Training stopped on a fault it must not continue past (a non-finite loss or gradient)."""


class DistributedFailure(TrainingAborted):
    """A rank crashed or was killed: the whole run stopped (exit code 3, like any aborted training)."""
