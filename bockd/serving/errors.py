"""Errors of the local model server and its client."""

from bockd.errors import BockdError


class ServingError(BockdError, RuntimeError):
    """A local model server cannot start, stop or be reached, or it refused a request."""
