"""Waiting for a condition: the one poll loop every wait of the platform layer uses.

InferenceService rollouts, TrainJobs, the embedded services' health checks, local model servers becoming
ready and processes exiting all wait the same way: ask, stop at the first truthy answer, otherwise sleep
and ask again until a deadline on the monotonic clock. Each caller raises its own error on a timeout, since
only it knows what the last state was.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def poll_until(check: Callable[[], T], timeout_s: float, interval_s: float) -> T | None:
    """The first truthy value ``check()`` returns, or None once ``timeout_s`` seconds have passed.

    ``check`` runs at least once, and once more after the last sleep before the deadline; it may raise to
    stop early (a failure it sees). ``interval_s``: seconds slept between two calls.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() >= deadline:
            return None
        time.sleep(interval_s)
