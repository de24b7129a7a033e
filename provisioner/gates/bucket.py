"""GCRA with a variable cost settled after the call: one clock per bucket (`tat_ms`, when
it would be full again). docs/gates.md says why the bound holds."""

from __future__ import annotations

import math
from dataclasses import dataclass

# How far a float sum may miss a whole number of tokens and still count as it.
EPSILON = 1e-9


@dataclass(frozen=True, slots=True)
class Bucket:
    interval_ms: float
    burst: float

    @classmethod
    def per_minute(cls, per_minute: float, burst: float | None = None) -> Bucket:
        return cls(60_000.0 / per_minute, per_minute if burst is None else burst)

    @property
    def per_minute_rate(self) -> float:
        return 60_000.0 / self.interval_ms

    def level(self, tat_ms: float, now_ms: int) -> float:
        # Negative: in debt.
        return self.burst - max(0.0, tat_ms - now_ms) / self.interval_ms

    def fits(self, tat_ms: float, now_ms: int, cost: float) -> bool:
        return self.level(tat_ms, now_ms) + EPSILON >= cost

    def charge(self, tat_ms: float, now_ms: int, cost: float) -> float:
        return max(tat_ms, float(now_ms)) + cost * self.interval_ms

    def wait_ms(self, tat_ms: float, now_ms: int, cost: float) -> int:
        missing = cost - self.level(tat_ms, now_ms)
        return 0 if missing <= EPSILON else math.ceil(missing * self.interval_ms)


@dataclass(slots=True)
class Charge:
    """What one grant charged one bucket, and the least headroom it has had since."""

    bucket: str
    tokens: float
    slack_ms: float


def note_change(charges: list[Charge], bucket: str, tat_ms: float, now_ms: int) -> None:
    """Call before changing `bucket`: its open charges learn the headroom it had."""
    headroom = tat_ms - now_ms
    for charge in charges:
        if charge.bucket == bucket and headroom < charge.slack_ms:
            charge.slack_ms = headroom


def settle_charge(
    bucket: Bucket, tat_ms: float, now_ms: int, charge: Charge, actual: float
) -> float:
    """The new `tat_ms` once the charge's actual cost is known: what the estimate missed is
    charged at once, an overcharge refunded only as far as the bucket would have held it
    (the charge must be out of the open charges `note_change` sees)."""
    if actual > charge.tokens:
        return bucket.charge(tat_ms, now_ms, actual - charge.tokens)
    overcharge_ms = (charge.tokens - actual) * bucket.interval_ms
    refund_ms = min(overcharge_ms, charge.slack_ms, tat_ms - now_ms)
    return tat_ms - refund_ms if refund_ms > 0 else tat_ms
