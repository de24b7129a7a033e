"""Simulated time against real time: the incident's half-hour plays out in seconds.

Only the sessions' own clocks are scaled (turn lengths, the liveness timeout); E2B's
limits (create latency, create rate) stay in real time, because the mock E2B and the
component's admission control both run on the real clock.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class TimeScale:
    """`sim_per_real` simulated seconds pass per real second (600: ten minutes a second)."""

    sim_per_real: float = 600.0

    def __post_init__(self) -> None:
        if not self.sim_per_real > 0:
            raise ValueError(f"the time scale must be positive, got {self.sim_per_real}")

    def real_s(self, sim_s: float) -> float:
        return sim_s / self.sim_per_real

    def sim_s(self, real_s: float) -> float:
        return real_s * self.sim_per_real
