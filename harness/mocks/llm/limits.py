"""A token bucket that refills continuously and can run into debt.

The bucket holds ``level`` units, at most ``capacity``, and gains ``rate_per_s`` every
second. A request is admitted when the level covers what it needs up front; a cost known
only afterwards (output tokens) is charged in full even when that takes the level below
zero, so the debt delays later requests instead of being forgotten.

A need larger than the whole capacity is admitted once the bucket is full (and leaves it
in debt): otherwise such a request could never pass, while Anthropic's rate limits are
per minute and a large prompt is still served.
"""

from __future__ import annotations

import math

_EPSILON = 1e-9


class TokenBucket:
    """One bucket. Not thread-safe: the caller serialises every call."""

    def __init__(self, limit_per_minute: int, capacity: int | None, now: float) -> None:
        if limit_per_minute < 1 or (capacity is not None and capacity < 1):
            raise ValueError("a token bucket needs a limit >= 1 and a capacity >= 1")
        self.limit = limit_per_minute
        self.capacity = float(capacity if capacity is not None else limit_per_minute)
        self.rate_per_s = limit_per_minute / 60.0
        self._level = self.capacity
        self._at = now

    def level(self, now: float) -> float:
        """Units available at ``now`` (negative while in debt)."""
        self._refill(now)
        return self._level

    def need_for(self, amount: float) -> float:
        """What the level must reach before ``amount`` is admitted."""
        return min(amount, self.capacity)

    def wait_for(self, amount: float, now: float) -> float:
        """Seconds until ``amount`` would be admitted (0 when it would be now)."""
        missing = self.need_for(amount) - self.level(now)
        # The tolerance absorbs float error in the refill (20 s at 3/min is 1.0, not 0.999…).
        return 0.0 if missing <= _EPSILON else missing / self.rate_per_s

    def admits(self, amount: float, now: float) -> bool:
        return self.wait_for(amount, now) <= 0.0

    def charge(self, amount: float, now: float) -> None:
        """Takes ``amount`` whatever the level: the caller checked ``admits`` first, or the
        cost is known only now and may leave the bucket in debt."""
        self._refill(now)
        self._level -= amount

    def until_full(self, now: float) -> float:
        """Seconds until the bucket is full again (what Anthropic's ``-reset`` headers say)."""
        return max(0.0, (self.capacity - self.level(now)) / self.rate_per_s)

    def remaining(self, now: float) -> int:
        """Whole units available now, never below zero (for ``-remaining`` headers)."""
        return max(0, math.floor(self.level(now) + _EPSILON))

    def _refill(self, now: float) -> None:
        if now > self._at:
            self._level = min(self.capacity, self._level + (now - self._at) * self.rate_per_s)
            self._at = now
