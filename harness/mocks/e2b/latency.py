"""Seeded create latency: lognormal around a median, optionally capped, plus an optional
uniform jitter."""

from __future__ import annotations

import math
import random


class LatencySampler:
    """Draws create latencies from its own seeded stream, so faults do not shift it."""

    def __init__(self, seed: int) -> None:
        self._rng = random.Random(f"latency:{seed}")

    def sample_ms(
        self, median_ms: float, sigma: float, max_ms: float | None, jitter_ms: float = 0.0
    ) -> float:
        if median_ms <= 0 and jitter_ms <= 0:
            return 0.0
        value = median_ms if sigma <= 0 else median_ms * math.exp(self._rng.gauss(0.0, sigma))
        value = value if max_ms is None else min(value, max_ms)
        return value + self._rng.uniform(0.0, jitter_ms) if jitter_ms > 0 else value
