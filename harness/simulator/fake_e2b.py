"""An in-process E2B on a virtual clock: the mock's model of a team (``E2BTeam``) spoken to
in the guest's result types, with no HTTP between. Used by the deterministic simulation and
the guest's admission tests."""

from __future__ import annotations

from collections.abc import Callable, Set

from harness.mocks.e2b.config import MockE2BConfig, Storm
from harness.mocks.e2b.team import Admitted, E2BTeam, Refused, SandboxSpec
from provisioner.gates.results import (
    CapacityExhausted,
    Created,
    CreateResult,
    RateLimited,
    Unavailable,
)

START_MS = 1_700_000_000_000

# The account a simulation meets unless it says otherwise: creates take 3 s, and sandboxes
# outlive any simulated session (the mock's own defaults, an idle account with E2B's 15 s
# sandbox timeout, suit its HTTP tests). Scenarios change it with `.replace(...)`.
SIMULATED_E2B = MockE2BConfig(create_latency_ms=3_000, default_timeout_s=3_600)

# How long a refusal takes to arrive: the network's round trip, which the mock gets from
# its real transport; not E2B's decision, so not in its config.
REFUSAL_LATENCY_MS = 100

__all__ = ["REFUSAL_LATENCY_MS", "SIMULATED_E2B", "START_MS", "FakeE2B", "Storm"]


_ANSWER_OF_REFUSAL = {
    "storm": "429_storm",
    "rate": "429_rate",
    "concurrency": "429_concurrency",
    "capacity": "429_cap",
}


class FakeE2B:
    """The team model configured by ``config`` (its seed included) on ``clock`` (virtual
    milliseconds): answers creates, counts what admission control must bound (creates in
    flight, sandboxes). Only the mock's "reject" overload mode applies: nothing waits."""

    def __init__(self, config: MockE2BConfig, clock: Callable[[], int]) -> None:
        self.config = config
        self._clock = clock
        self._team = E2BTeam(config, START_MS)
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
        return Created(verdict.sandbox_id, self.config.default_timeout_s * 1000), latency_ms

    def end_create(self, result: CreateResult) -> None:
        """The answer arrives: a created sandbox exists from now on."""
        self._team.end_create()
        if isinstance(result, Created):
            spec = self._asked.pop(result.sandbox_id)
            self._team.commit(self._clock(), result.sandbox_id, spec)

    def _refused(self, kind: str, result: CreateResult) -> tuple[CreateResult, int]:
        self._count(kind)
        return result, REFUSAL_LATENCY_MS

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
