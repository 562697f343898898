"""Errors a user can cause and fix. The CLI prints them without a traceback (exit code 2)."""


class UserError(Exception):
    """Base class: the message says what was wrong, where, and what to do."""


class ConfigError(UserError):
    """A config value is missing, unknown or out of range."""


class DataError(UserError):
    """A dataset is unusable (missing label column, NaN, empty cells, one cell type, ...)."""


class DownloadError(UserError):
    """A download failed or did not verify (size, checksum, format)."""
