"""Typed errors. Each names the offending field or file and what was expected."""


class BockdError(Exception):
    """Base class for every error bockd raises on purpose."""


class ConfigError(BockdError, ValueError):
    """A configuration value is unknown, missing or impossible."""


class DataError(BockdError, ValueError):
    """A dataset is missing, corrupt, unsafe or inconsistent."""


class CheckpointError(BockdError, ValueError):
    """A checkpoint or exported student cannot be read or does not match."""
