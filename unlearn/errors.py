"""Typed exceptions. The CLI turns every `UnlearnError` into one line and exit status 2."""


class UnlearnError(Exception):
    """Base class of every error that is the user's input, not a bug."""


class ConfigError(UnlearnError, ValueError):
    """A recipe, a method name, a hyperparameter or an override is not acceptable."""


class DataError(UnlearnError, ValueError):
    """A dataset, class id or forget set is not acceptable (out of range, empty, ...)."""


class CheckpointError(UnlearnError, ValueError):
    """A checkpoint cannot be read safely (corrupt, pickled code, wrong shapes)."""


class CheckpointNotFoundError(UnlearnError, FileNotFoundError):
    """A checkpoint or recipe path does not exist."""


class TrainingError(UnlearnError, RuntimeError):
    """Training diverged (a NaN or infinite loss)."""


class OutputError(UnlearnError, OSError):
    """An output cannot be written (no space left, read-only file system, permission denied)."""
