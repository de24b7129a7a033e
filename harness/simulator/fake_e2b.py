"""An in-process E2B on a virtual clock: answers creates, counts what admission control must
bound (creates in flight, sandboxes), and throttles the way E2B does (its route limiter, the
concurrent-sandbox cap, 429 storms, 5xx). Used by the deterministic simulation and the
guest's admission tests."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

from harness.mocks.e2b.limits import Gcra
from provisioner.gates.results import (
    CapacityExhausted,
    Created,
    CreateResult,
    RateLimited,
    Unavailable,
)

START_MS = 1_700_000_000_000


@dataclass(frozen=True)
class Storm:
    """Every create arriving in [start_ms, end_ms) (relative) gets a 429 with Retry-After
    pointing at the storm's end."""

    start_ms: int
    end_ms: int


@dataclass(frozen=True)
class FakeE2BConfig:
    create_latency_ms: int = 3_000
    latency_jitter_ms: int = 0
    error_latency_ms: int = 100
    # E2B's own route limiter (GCRA per team): a 429 with Retry-After beyond it.
    rate_per_s: float | None = None
    # Creates the limiter lets through at once (GCRA burst; 1: none).
    rate_burst: int = 1
    # Create requests E2B serves at once: a 429 past it.
    create_slots: int | None = None
    # The account's concurrent-sandbox cap, shared with `foreign_sandboxes` of others.
    sandbox_cap: int | None = None
    foreign_sandboxes: int = 0
    storms: tuple[Storm, ...] = ()
    # Probability that a create answers 5xx (it then created nothing).
    error_rate: float = 0.0
    sandbox_timeout_ms: int = 3_600_000


class FakeE2B:
    """An in-process E2B: answers creates, counts what admission control must bound."""

    def __init__(self, config: FakeE2BConfig, rng: random.Random) -> None:
        self.config = config
        self._rng = rng
        self.in_flight = 0
        self.max_in_flight = 0
        self.sandboxes: set[str] = set()
        self.max_sandboxes = 0
        self.create_times: list[int] = []
        self.answers: dict[str, int] = {}
        # The mock E2B's route limiter, on this fake's clock: milliseconds since START_MS, so
        # the rate is per millisecond. Whole-millisecond arrivals and intervals stay exact
        # there; in seconds the sum of 0.2 s intervals drifts above a create that arrives
        # exactly on its turn, and refuses it.
        self._rate = (
            None
            if config.rate_per_s is None
            else Gcra(config.rate_per_s / 1000, max(1, config.rate_burst))
        )
        self._next = 0

    def begin_create(self, now: int) -> tuple[CreateResult, int]:
        """Take a create request; return its answer and how long it takes to arrive."""
        config = self.config
        rel = now - START_MS
        self.create_times.append(rel)
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        if config.create_slots is not None and self.in_flight > config.create_slots:
            return self._answer("429_concurrency", RateLimited(None))
        for storm in config.storms:
            if storm.start_ms <= rel < storm.end_ms:
                return self._answer("429_storm", RateLimited(storm.end_ms - rel))
        if self._rate is not None:
            decision = self._rate.take(float(rel))
            if not decision.allowed:
                return self._answer("429_rate", RateLimited(math.ceil(decision.retry_after_s)))
        if config.sandbox_cap is not None and (
            len(self.sandboxes) + config.foreign_sandboxes + self.in_flight - 1
            >= config.sandbox_cap
        ):
            return self._answer("429_cap", CapacityExhausted(config.sandbox_cap))
        if config.error_rate > 0 and self._rng.random() < config.error_rate:
            return self._answer("503", Unavailable(503))
        self._next += 1
        latency = config.create_latency_ms
        if config.latency_jitter_ms:
            latency += self._rng.randrange(config.latency_jitter_ms + 1)
        self.answers["201"] = self.answers.get("201", 0) + 1
        return Created(f"sbx-{self._next}", config.sandbox_timeout_ms), latency

    def _answer(self, kind: str, result: CreateResult) -> tuple[CreateResult, int]:
        self.answers[kind] = self.answers.get(kind, 0) + 1
        return result, self.config.error_latency_ms

    def end_create(self, result: CreateResult) -> None:
        self.in_flight -= 1
        if isinstance(result, Created):
            self.sandboxes.add(result.sandbox_id)
            self.max_sandboxes = max(self.max_sandboxes, len(self.sandboxes))

    @property
    def throttled(self) -> int:
        """Creates answered 429, whatever the limit."""
        return sum(n for kind, n in self.answers.items() if kind.startswith("429"))

    def kill(self, sandbox_id: str) -> None:
        self.sandboxes.discard(sandbox_id)
