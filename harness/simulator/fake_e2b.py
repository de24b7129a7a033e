"""An in-process E2B on a virtual clock: the mock's model of a team (``E2BTeam``) spoken to
in the guest's result types, with no HTTP between. Used by the deterministic simulation and
the guest's admission tests."""

from __future__ import annotations

from collections.abc import Callable, Set
from dataclasses import dataclass

from harness.mocks.e2b.config import FaultRule, MockE2BConfig, Storm
from harness.mocks.e2b.team import Admitted, E2BTeam, Refused, SandboxSpec
from provisioner.gates.results import (
    CapacityExhausted,
    Created,
    CreateResult,
    RateLimited,
    Unavailable,
)

START_MS = 1_700_000_000_000

__all__ = ["START_MS", "FakeE2B", "FakeE2BConfig", "Storm"]


@dataclass(frozen=True)
class FakeE2BConfig:
    """The limits a simulation sets, in its own words; ``team_config`` says them as the
    mock's config, which is what the fake runs on."""

    create_latency_ms: int = 3_000
    latency_jitter_ms: int = 0
    # How long a refusal takes to arrive: the network's round trip, which the mock gets
    # from its real transport.
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
    # Relative to START_MS.
    storms: tuple[Storm, ...] = ()
    # Probability that a create answers 5xx (it then created nothing).
    error_rate: float = 0.0
    sandbox_timeout_ms: int = 3_600_000

    def team_config(self, seed: int) -> MockE2BConfig:
        faults = (FaultRule(status=503, probability=self.error_rate),) if self.error_rate else ()
        timeout_s = -(-self.sandbox_timeout_ms // 1000)
        return MockE2BConfig(
            seed=seed,
            create_latency_ms=self.create_latency_ms,
            create_latency_jitter_ms=self.latency_jitter_ms,
            create_rate_per_s=self.rate_per_s,
            create_burst=max(1, self.rate_burst),
            max_concurrent_creates=self.create_slots,
            max_sandboxes=self.sandbox_cap,
            foreign_sandboxes=self.foreign_sandboxes,
            storms=self.storms,
            faults=faults,
            default_timeout_s=timeout_s,
            max_timeout_s=max(timeout_s, MockE2BConfig.max_timeout_s),
        )


_ANSWER_OF_REFUSAL = {
    "storm": "429_storm",
    "rate": "429_rate",
    "concurrency": "429_concurrency",
    "capacity": "429_cap",
}


class FakeE2B:
    """The team model on ``clock`` (virtual milliseconds): answers creates, counts what
    admission control must bound (creates in flight, sandboxes)."""

    def __init__(self, config: FakeE2BConfig, clock: Callable[[], int], seed: int = 0) -> None:
        self.config = config
        self._clock = clock
        self._team = E2BTeam(config.team_config(seed), START_MS)
        self.create_times: list[int] = []
        self.answers: dict[str, int] = {}
        self._asked: dict[str, SandboxSpec] = {}

    def begin_create(self, now: int, spec: SandboxSpec | None = None) -> tuple[CreateResult, int]:
        """Take a create request (asking for ``spec``); return its answer and how long it
        takes to arrive, when ``end_create`` must be called with it."""
        team = self._team
        self.create_times.append(now - START_MS)
        team.begin_create()
        ordinal = team.count_request("create", now)
        fault = team.pick_fault("create", ordinal, after_create=False)
        if fault is not None:
            return self._refused(str(fault.status), Unavailable(fault.status))
        verdict = team.admit_create(now)
        if isinstance(verdict, Refused):
            kind = _ANSWER_OF_REFUSAL[verdict.kind]
            if verdict.kind == "capacity":
                return self._refused(kind, CapacityExhausted(verdict.cap))
            return self._refused(kind, RateLimited(verdict.retry_after_ms))
        if not isinstance(verdict, Admitted):
            raise ValueError("the fake E2B answers 429 past its create slots; it never waits")
        self._count("201")
        self._asked[verdict.sandbox_id] = spec or SandboxSpec()
        latency_ms = round(team.create_latency_ms())
        return Created(verdict.sandbox_id, self.config.sandbox_timeout_ms), latency_ms

    def end_create(self, result: CreateResult) -> None:
        """The answer arrives: a created sandbox exists from now on."""
        self._team.end_create()
        if isinstance(result, Created):
            spec = self._asked.pop(result.sandbox_id)
            self._team.commit(self._clock(), result.sandbox_id, spec)

    def _refused(self, kind: str, result: CreateResult) -> tuple[CreateResult, int]:
        self._count(kind)
        return result, self.config.error_latency_ms

    def _count(self, kind: str) -> None:
        self.answers[kind] = self.answers.get(kind, 0) + 1

    @property
    def sandboxes(self) -> Set[str]:
        """The running sandboxes' ids."""
        return frozenset(self.listed())

    def listed(self, metadata: dict[str, str] | None = None) -> list[str]:
        """The running sandboxes whose metadata has ``metadata``, oldest first."""
        running = self._team.listed(frozenset({"running"}), self._clock())
        return [r.sandbox_id for r in running if r.has_metadata(metadata or {})]

    @property
    def max_in_flight(self) -> int:
        return self._team.counters.max_concurrent_creates

    @property
    def max_sandboxes(self) -> int:
        return self._team.counters.max_running_sandboxes

    @property
    def throttled(self) -> int:
        """Creates answered 429, whatever the limit."""
        return sum(n for kind, n in self.answers.items() if kind.startswith("429"))

    def kill(self, sandbox_id: str) -> None:
        self._team.kill(sandbox_id, self._clock())
