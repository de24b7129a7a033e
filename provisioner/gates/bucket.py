"""A token bucket whose cost is settled after the call, and that runs into debt rather than
lying about it.

The bucket is GCRA with a variable cost, kept as one number per bucket: `tat_ms`, the
theoretical arrival time at which the bucket would be full again. With `interval_ms` per
token and a burst of `burst` tokens, the level at `now` is
`burst - max(0, tat_ms - now) / interval_ms` tokens; it is negative while in debt.

- A grant needs the level to cover its estimated cost (`fits`), then charges it (`charge`):
  `tat = max(tat, now) + cost * interval`. A cost above the burst could never fit; the
  callers refuse it up front.
- Settling with the actual cost charges what the estimate missed at once (`tat` moves on by
  the excess: the bucket goes into debt, and nothing else fits until it has refilled),
  and gives back what the estimate overcharged only as far as the bucket would really
  have held it: if the bucket had been charged the actual cost at the grant, the overcharge
  disappears wherever the bucket would have filled up to its burst since (its refill would
  have been lost). `Charge.slack_ms` tracks that: the least headroom `tat - t` the bucket
  had at any change since the grant, so the refund is `min(overcharge, slack)`. With it,
  the bucket after a settle is exactly (never less conservative than) a bucket that had
  been charged the actual cost at the grant.

What that buys (the property tests check it): over any window [a, b], the actual costs of
the requests granted in it sum to at most `rate * (b - a) + burst`, plus the estimation
errors (actual above estimate) of the requests still unsettled right after the window's
last grant — one request's error when calls do not overlap. The resource gates make that
one request's error under any overlap by reserving the declared worst-case errors of the
calls in flight (`resources.blocking`, its module docstring).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

_EPSILON = 1e-9


@dataclass(frozen=True, slots=True)
class Bucket:
    """A bucket's parameters: `interval_ms` per token, up to `burst` tokens banked."""

    interval_ms: float
    burst: float

    @classmethod
    def per_minute(cls, per_minute: float, burst: float | None = None) -> Bucket:
        return cls(60_000.0 / per_minute, per_minute if burst is None else burst)

    @property
    def per_minute_rate(self) -> float:
        return 60_000.0 / self.interval_ms

    def level(self, tat_ms: float, now_ms: int) -> float:
        """Tokens available now (negative: in debt)."""
        return self.burst - max(0.0, tat_ms - now_ms) / self.interval_ms

    def fits(self, tat_ms: float, now_ms: int, cost: float) -> bool:
        return self.level(tat_ms, now_ms) + _EPSILON >= cost

    def charge(self, tat_ms: float, now_ms: int, cost: float) -> float:
        """The new `tat_ms` after charging `cost` tokens now (also the debt of a settle)."""
        return max(tat_ms, float(now_ms)) + cost * self.interval_ms

    def wait_ms(self, tat_ms: float, now_ms: int, cost: float) -> int:
        """How long until `cost` tokens fit (0: now)."""
        missing = cost - self.level(tat_ms, now_ms)
        return 0 if missing <= _EPSILON else math.ceil(missing * self.interval_ms)


@dataclass(slots=True)
class Charge:
    """What one grant charged one bucket: `tokens` (the estimate, or 1 for a request) and
    the least headroom the bucket has had since (`slack_ms`, see the module docstring)."""

    bucket: str
    tokens: float
    slack_ms: float


def note_change(charges: list[Charge], bucket: str, tat_ms: float, now_ms: int) -> None:
    """Call before changing `bucket`: every open charge on it learns the headroom the
    bucket had until now."""
    headroom = tat_ms - now_ms
    for charge in charges:
        if charge.bucket == bucket and headroom < charge.slack_ms:
            charge.slack_ms = headroom


def settle_charge(
    bucket: Bucket, tat_ms: float, now_ms: int, charge: Charge, actual: float
) -> float:
    """The new `tat_ms` once the charge's actual cost is known (the charge itself must
    already be out of the open charges `note_change` sees)."""
    if actual > charge.tokens:
        return bucket.charge(tat_ms, now_ms, actual - charge.tokens)
    overcharge_ms = (charge.tokens - actual) * bucket.interval_ms
    refund_ms = min(overcharge_ms, charge.slack_ms, tat_ms - now_ms)
    return tat_ms - refund_ms if refund_ms > 0 else tat_ms
