"""Errors of the embedded local stack."""

from bockd.errors import BockdError


class ServiceError(BockdError, RuntimeError):
    """A local service cannot start, is unhealthy, or its port is taken. Never carries credentials."""
