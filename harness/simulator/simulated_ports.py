"""The ports a deterministic simulation runs the guest on: virtual time, seeded
randomness and an in-memory event log, so a run replays exactly from its seed.

`harness.simulator.detsim` drives the guest natively on these; tests reuse them for the same
reason (a clock that moves only when the test says so).
"""

from __future__ import annotations

import random
import threading
from dataclasses import dataclass, field
from typing import Any

from provisioner.ports import LogLevel


class VirtualClock:
    """Simulated time: it moves only when the simulation advances it, never backwards."""

    def __init__(self, start_ms: int = 1_700_000_000_000) -> None:
        self._now = start_ms
        self._lock = threading.Lock()

    def now_ms(self) -> int:
        with self._lock:
            return self._now

    def advance(self, ms: int) -> None:
        if ms < 0:
            raise ValueError("a clock does not go back")
        with self._lock:
            self._now += ms

    def set(self, now_ms: int) -> None:
        with self._lock:
            self._now = max(self._now, now_ms)


class SeededRandom:
    """The randomness port drawn from a seeded generator, so a run replays from its seed."""

    def __init__(self, seed: int) -> None:
        self._rng = random.Random(seed)
        self._lock = threading.Lock()

    def next_u64(self) -> int:
        with self._lock:
            return self._rng.getrandbits(64)


@dataclass
class EventLog:
    """The telemetry port keeping every log line and progress event of a simulation."""

    logs: list[tuple[LogLevel, str]] = field(default_factory=list)
    events: list[dict[str, Any]] = field(default_factory=list)

    def log(self, level: LogLevel, message: str) -> None:
        self.logs.append((level, message))

    def progress(self, event: dict[str, Any]) -> None:
        self.events.append(event)
