"""Waiting, up to a deadline, until what a reader returns holds."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def wait_until(
    read: Callable[[], T],
    holds: Callable[[T], bool],
    timeout: float,
    pause: Callable[[float], object],
    timed_out: Callable[[T], Exception],
) -> T:
    """Calls ``read()`` until ``holds`` its value and returns that value; between reads
    ``pause(seconds left)`` waits for a change (a condition's wait, a queue's get). After
    ``timeout`` seconds raises ``timed_out(last value)``."""
    deadline = time.monotonic() + timeout
    while True:
        value = read()
        if holds(value):
            return value
        left = deadline - time.monotonic()
        if left <= 0:
            raise timed_out(value)
        pause(left)
