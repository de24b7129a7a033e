"""The route rate limiter: GCRA (generic cell rate algorithm), as E2B's API uses per team.

GCRA keeps one number, the theoretical arrival time (TAT) of the next request. A request
at ``now`` conforms when ``TAT - now <= tau``, where ``tau = (burst - 1) * T`` and ``T`` is
the emission interval ``1 / rate``; a conforming request moves TAT to ``max(TAT, now) + T``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class RateDecision:
    """The limiter's answer, with what the ``RateLimit-*`` and ``Retry-After`` headers say."""

    allowed: bool
    limit: int
    remaining: int
    reset_s: float
    retry_after_s: float

    def headers(self) -> dict[str, str]:
        values = {
            "RateLimit-Limit": str(self.limit),
            "RateLimit-Remaining": str(self.remaining),
            "RateLimit-Reset": str(math.ceil(self.reset_s)),
        }
        if not self.allowed:
            # Delta-seconds is the only form the SDK parses; never 0, or it would retry at once.
            values["Retry-After"] = str(max(1, math.ceil(self.retry_after_s)))
        return values


class Gcra:
    """One GCRA bucket. Not thread-safe: the caller serialises ``take``."""

    def __init__(self, rate_per_s: float, burst: int) -> None:
        if rate_per_s <= 0 or burst < 1:
            raise ValueError("GCRA needs rate_per_s > 0 and burst >= 1")
        self.rate_per_s = rate_per_s
        self.burst = burst
        self._interval = 1.0 / rate_per_s
        self._tau = (burst - 1) * self._interval
        self._tat: float | None = None

    def take(self, now: float) -> RateDecision:
        tat = now if self._tat is None else max(self._tat, now)
        if tat - now > self._tau:
            return RateDecision(
                allowed=False,
                limit=self.burst,
                remaining=0,
                reset_s=tat - now,
                retry_after_s=tat - self._tau - now,
            )
        self._tat = tat + self._interval
        backlog = self._tat - now
        remaining = max(0, math.floor((self._tau + self._interval - backlog) / self._interval))
        return RateDecision(
            allowed=True,
            limit=self.burst,
            remaining=remaining,
            reset_s=backlog,
            retry_after_s=0.0,
        )
