"""The errors delinea reports to users as one line (``delinea: error: ...``, exit code 2) instead of a traceback."""

from __future__ import annotations


class UserError(ValueError):
    """A bad input or option; the message names the file or value and what was expected."""


class DatasetError(UserError):
    """A dataset or input file is missing, unreadable or inconsistent; the message names the file and the fix."""


class OptionError(UserError):
    """An option (a value in a config or on the command line) that cannot work; the message names it."""


class CheckpointError(UserError):
    """A checkpoint or model folder that cannot be read, or that does not fit the model; the message names it."""


class OutputError(UserError):
    """An output that cannot be written (a full disk, a read-only or missing folder) or that would replace an input;
    the message names it and says what was kept."""


class NonFiniteLossError(UserError):
    """Training met a NaN or infinite loss; the message names the step and the batch's cases."""
