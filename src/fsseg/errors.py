"""Errors raised on bad input, before any long work starts. Messages name the file, value or option."""


class FsSegError(Exception):
    """Base class of fsseg's input errors."""


class DataError(FsSegError, ValueError):
    """A dataset file or folder is missing, unreadable, or holds unexpected values."""


class ConfigError(FsSegError, ValueError):
    """A configuration value is out of range or names something unknown."""


class WeightsError(FsSegError, RuntimeError):
    """Pretrained weights could not be found or loaded."""


class OutputError(FsSegError, OSError):
    """A result file cannot be written: full disk, read-only or unwritable output folder."""


class RunError(FsSegError, RuntimeError):
    """A run cannot go on as asked: nothing to train, non-finite weights, a resume that does not match."""
