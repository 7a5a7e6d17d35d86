"""Exceptions that carry a message meant for the user (shown as one line, no traceback)."""


class CTSynthError(Exception):
    """Base class: the message names the file, label or option at fault and what to do."""


class InputError(CTSynthError):
    """An input file or value cannot be used (missing, wrong kind, bad geometry, NaN, ...)."""


class CheckpointError(CTSynthError):
    """A model folder is missing, corrupt, or does not match its config."""


class OutputExistsError(CTSynthError):
    """The output path exists and overwriting was not requested."""


class Cancelled(CTSynthError):
    """The caller asked to stop; nothing was written."""
