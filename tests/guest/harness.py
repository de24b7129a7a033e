"""The guest's admission tests' harness: shared storage on a virtual clock with a fresh
AdmissionController per call (`Harness`), and a small discrete-event simulation of clients
that obey `retry_after_ms` in front of the fake E2B (`Simulation`, `run`).

The simulation tests the admission algorithm itself (how close to the limits it serves
clients that come back when told); how Temper drives sessions (fixed poll timers, one timer
per entity) is the session executor's job, `harness/simulator/detsim.py`.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from harness.mocks.e2b.config import MockE2BConfig
from harness.simulator.fake_e2b import SIMULATED_E2B, START_MS, FakeE2B, Storm
from harness.simulator.simulated_ports import EventLog, SeededRandom, VirtualClock
from host.runtime.native import native_ports
from host.storage.memory import MemoryBackend
from provisioner.config import AdmissionConfig
from provisioner.gates.controller import AdmissionController
from provisioner.gates.document import DEFAULT_SANDBOX_TIMEOUT_MS
from provisioner.gates.results import (
    Created,
    CreateResult,
    Grant,
    Queued,
    RateLimited,
    Rejected,
    Waiter,
)
from provisioner.ports import HttpRequest, HttpResponse, Ports

__all__ = [
    "ACCOUNT",
    "SIMULATED_E2B",
    "START_MS",
    "FakeE2B",
    "Harness",
    "Storm",
    "grant_of",
    "queued_of",
    "retry_promised_the_free_slot",
]

ACCOUNT = "sim-account"


class _NoHttp:
    def send(self, request: HttpRequest) -> HttpResponse:
        raise AssertionError("admission control never calls HTTP itself")


class VirtualAccount:
    """One account's shared storage on a virtual clock, with seeded randomness and a
    telemetry log: the native ports every guest decision of a test runs on (admission and
    resource gates alike), one per invocation. `backend` may be replaced (a test's
    interleaving or failing storage)."""

    def __init__(self, *, seed: int = 0, backend: Any = None) -> None:
        self.clock = VirtualClock(START_MS)
        self.backend = backend if backend is not None else MemoryBackend(self.clock.now_ms)
        self.random = SeededRandom(seed)
        self.telemetry = EventLog()

    def ports(self, tenant: str) -> Ports:
        return native_ports(
            self.backend,
            tenant=tenant,
            account=ACCOUNT,
            http=_NoHttp(),
            clock=self.clock,
            random=self.random,
            telemetry=self.telemetry,
        )


@dataclass(frozen=True)
class SessionSpec:
    tenant: str
    entity: str
    arrive_ms: int = 0
    hold_ms: int = 20_000
    # The session's invocation dies after sending its create: it never settles it.
    vanish_mid_create: bool = False
    # The session stops polling after this many queued answers (its agent died).
    stop_polling_after: int | None = None


@dataclass
class SessionResult:
    spec: SessionSpec
    polls: int = 0
    attempts: int = 0
    granted_ms: list[int] = field(default_factory=list)
    created_ms: int | None = None
    released_ms: int | None = None
    failure: str | None = None
    vanished: bool = False
    reasons: dict[str, int] = field(default_factory=dict)


@dataclass
class SimReport:
    seed: int
    sessions: list[SessionResult]
    e2b: FakeE2B
    grants: list[tuple[int, str, str]]
    trace: list[tuple[int, str, str, str]]
    end_ms: int
    invocations: int

    @property
    def completed(self) -> int:
        return sum(1 for s in self.sessions if s.released_ms is not None)

    @property
    def makespan_ms(self) -> int:
        return max((s.released_ms or 0) for s in self.sessions)

    def failures(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for session in self.sessions:
            if session.failure is not None:
                counts[session.failure] = counts.get(session.failure, 0) + 1
        return counts


def lower_bound_ms(
    sessions: int, slots: int, latency_ms: int, rate_per_s: float, hold_ms: int
) -> float:
    """No schedule that respects C slots and R creates/s finishes N sessions sooner."""
    return (
        max(
            math.ceil(sessions / slots) * latency_ms,
            (sessions - 1) * 1000.0 / rate_per_s + latency_ms,
        )
        + hold_ms
    )


class Simulation(VirtualAccount):
    def __init__(
        self,
        sessions: list[SessionSpec],
        *,
        admission: AdmissionConfig,
        e2b: MockE2BConfig = SIMULATED_E2B,
        seed: int = 0,
        max_events: int = 2_000_000,
    ) -> None:
        self.specs = sessions
        self.seed = seed
        super().__init__(seed=seed)
        self.admission = admission
        self.e2b = FakeE2B(e2b.replace(seed=seed ^ 0x5EED), self.clock.now_ms)
        self.max_events = max_events
        self._heap: list[tuple[int, int, Callable[[], None]]] = []
        self._seq = 0
        self.results = [SessionResult(spec) for spec in sessions]
        self.grants: list[tuple[int, str, str]] = []
        self.trace: list[tuple[int, str, str, str]] = []
        self.invocations = 0

    # -- event plumbing

    def at(self, when_ms: int, action: Callable[[], None]) -> None:
        self._seq += 1
        heapq.heappush(self._heap, (when_ms, self._seq, action))

    def now_rel(self) -> int:
        return self.clock.now_ms() - START_MS

    def controller(self, tenant: str) -> AdmissionController:
        self.invocations += 1
        return AdmissionController(self.ports(tenant), self.admission)

    def run(self) -> SimReport:
        for result in self.results:
            self.at(START_MS + result.spec.arrive_ms, self._poller(result))
        events = 0
        while self._heap:
            when, _, action = heapq.heappop(self._heap)
            self.clock.set(when)
            action()
            events += 1
            if events >= self.max_events:
                raise RuntimeError(f"simulation did not settle after {events} events")
        # Telemetry is only kept to prove it is emitted; drop it so long runs stay small.
        self.telemetry.events.clear()
        return SimReport(
            seed=self.seed,
            sessions=self.results,
            e2b=self.e2b,
            grants=self.grants,
            trace=self.trace,
            end_ms=self.now_rel(),
            invocations=self.invocations,
        )

    # -- sessions

    def _note(self, result: SessionResult, what: str, detail: str = "") -> None:
        self.trace.append((self.now_rel(), result.spec.entity, what, detail))

    def _poller(self, result: SessionResult) -> Callable[[], None]:
        return lambda: self._poll(result)

    def _poll(self, result: SessionResult) -> None:
        spec = result.spec
        waiter = Waiter(spec.tenant, spec.entity)
        result.polls += 1
        self._decided(result, self.controller(spec.tenant).admit(waiter))

    def _decided(self, result: SessionResult, decision: Grant | Queued | Rejected | None) -> None:
        spec = result.spec
        if isinstance(decision, Grant):
            self._granted(result, decision)
        elif isinstance(decision, Queued):
            result.reasons[decision.reason] = result.reasons.get(decision.reason, 0) + 1
            self._note(result, "queued", f"{decision.reason}@{decision.position}")
            if spec.stop_polling_after is not None and result.polls >= spec.stop_polling_after:
                result.vanished = True
                self._note(result, "stopped_polling")
                return
            self.at(self.clock.now_ms() + max(1, decision.retry_after_ms), self._poller(result))
        elif isinstance(decision, Rejected):
            result.failure = decision.failure.code
            self._note(result, "rejected", decision.failure.code)

    def _granted(self, result: SessionResult, grant: Grant) -> None:
        spec = result.spec
        now = self.clock.now_ms()
        result.attempts += 1
        result.granted_ms.append(now - START_MS)
        self.grants.append((now - START_MS, spec.tenant, spec.entity))
        self._note(result, "granted", f"attempt {grant.attempt}")
        answer, duration = self.e2b.begin_create(now)
        if spec.vanish_mid_create and result.attempts == 1:
            result.vanished = True
            self._note(result, "vanished")
            self.at(now + duration, lambda: self.e2b.end_create(answer))
            return
        self.at(now + duration, lambda: self._answered(result, grant, answer))

    def _answered(self, result: SessionResult, grant: Grant, answer: CreateResult) -> None:
        spec = result.spec
        self.e2b.end_create(answer)
        waiter = Waiter(spec.tenant, spec.entity)
        decision = self.controller(spec.tenant).settle(waiter, grant, answer)
        self._note(result, "settled", type(answer).__name__)
        if isinstance(answer, Created) and decision is None:
            result.created_ms = self.now_rel()
            self.at(self.clock.now_ms() + spec.hold_ms, lambda: self._release(result, answer))
            return
        self._decided(result, decision)

    def _release(self, result: SessionResult, created: Created) -> None:
        spec = result.spec
        self.e2b.kill(created.sandbox_id)
        self.controller(spec.tenant).release(Waiter(spec.tenant, spec.entity))
        result.released_ms = self.now_rel()
        self._note(result, "released")


class Harness(VirtualAccount):
    """Shared storage and virtual clock, with a fresh controller per invocation: the
    building block of the unit, stateful and concurrency tests."""

    def __init__(
        self,
        config: AdmissionConfig | None = None,
        *,
        seed: int = 0,
        backend: Any = None,
        sandbox_timeout_ms: int = DEFAULT_SANDBOX_TIMEOUT_MS,
    ) -> None:
        super().__init__(seed=seed, backend=backend)
        self.config = config or AdmissionConfig()
        # The E2B timeout of the sandboxes the creates make (bounds an unsettled create).
        self.sandbox_timeout_ms = sandbox_timeout_ms

    def controller(self, tenant: str, config: AdmissionConfig | None = None) -> AdmissionController:
        return AdmissionController(self.ports(tenant), config or self.config)

    def admit(self, waiter: Waiter) -> Grant | Queued | Rejected:
        return self.controller(waiter.tenant).admit(waiter, self.sandbox_timeout_ms)

    def settle(
        self, waiter: Waiter, grant: Grant, result: CreateResult
    ) -> Grant | Queued | Rejected | None:
        return self.controller(waiter.tenant).settle(waiter, grant, result)

    def release(self, waiter: Waiter) -> bool:
        return self.controller(waiter.tenant).release(waiter)

    def status(self, tenant: str = "tenant-a") -> dict[str, Any]:
        return self.controller(tenant).status(tenant)

    def advance(self, ms: int) -> None:
        self.clock.advance(ms)


# A rate and burst high enough that the rate gate holds back none of the few creates a
# test makes: the tests that use it are about the other gates.
FAST = AdmissionConfig(create_rate_per_s=1000.0, create_burst=1000)


def grant_of(decision: object) -> Grant:
    """`decision`, which the test expects to be a grant (it fails showing it otherwise)."""
    assert isinstance(decision, Grant), decision
    return decision


def queued_of(decision: object) -> Queued:
    """`decision`, which the test expects to be a queued answer."""
    assert isinstance(decision, Queued), decision
    return decision


def retry_promised_the_free_slot() -> tuple[Harness, Waiter, Waiter, Queued]:
    """One create slot; tenant-a's create is refused with a 429 and becomes a retry; once its
    cooldown is over, tenant-b's waiter asks, and that decision promises the free slot to the
    retry. Returns the harness, the retrying waiter, the later one and the later's answer."""
    harness = Harness(AdmissionConfig(create_slots=1, create_rate_per_s=1000.0))
    retrying, later = Waiter("tenant-a", "Job/a"), Waiter("tenant-b", "Job/b")
    grant = grant_of(harness.admit(retrying))
    queued_of(harness.settle(retrying, grant, RateLimited(retry_after_ms=1_000)))
    harness.advance(3_000)
    return harness, retrying, later, queued_of(harness.admit(later))


def hold_release_and_hold_again(harness: Harness, holder: Waiter, *, create_ms: int = 0) -> None:
    """`holder` creates sandbox sbx-b, holds it for a second, releases it and creates sbx-b2
    (that create taking `create_ms`): a measured hold time, and a sandbox held now."""
    held = grant_of(harness.admit(holder))
    assert harness.settle(holder, held, Created("sbx-b", 600_000)) is None
    harness.advance(1_000)
    harness.release(holder)
    held = grant_of(harness.admit(holder))
    harness.advance(create_ms)
    assert harness.settle(holder, held, Created("sbx-b2", 600_000)) is None


def uniform_sessions(
    count: int, *, tenant: str = "tenant-a", hold_ms: int = 20_000, arrive_ms: int = 0
) -> list[SessionSpec]:
    return [
        SessionSpec(tenant, f"CurationJob/{tenant}-{index}", arrive_ms=arrive_ms, hold_ms=hold_ms)
        for index in range(count)
    ]


def run(
    sessions: list[SessionSpec],
    *,
    admission: AdmissionConfig,
    e2b: MockE2BConfig = SIMULATED_E2B,
    seed: int = 0,
) -> SimReport:
    return Simulation(sessions, admission=admission, e2b=e2b, seed=seed).run()


def summary(report: SimReport) -> dict[str, Any]:
    return {
        "seed": report.seed,
        "sessions": len(report.sessions),
        "completed": report.completed,
        "failures": report.failures(),
        "makespan_ms": report.makespan_ms,
        "max_concurrent_creates": report.e2b.max_in_flight,
        "max_sandboxes": report.e2b.max_sandboxes,
        "answers": dict(sorted(report.e2b.answers.items())),
        "invocations": report.invocations,
    }
