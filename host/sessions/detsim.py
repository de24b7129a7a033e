"""A deterministic discrete-event simulation of admission control in front of a fake E2B.

Everything runs on one virtual clock (`VirtualClock`) and seeded randomness, over the
in-memory storage backend, so a run replays exactly from its seed and thousands of
sessions take seconds. Each session behaves like an agent session driven by the Temper
runtime: it invokes Provision (a fresh `AdmissionController` every time), and on
`SandboxQueued` invokes again after `retry_after_ms`; a granted invocation sends one
create to the fake E2B and settles it when the answer comes back; a created sandbox is
held for a while, then released.
"""

from __future__ import annotations

import heapq
import math
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from host.runtime.native import native_ports
from host.sessions.simulated_ports import EventLog, SeededRandom, VirtualClock
from host.storage.memory import MemoryBackend
from provisioner.admission import (
    AdmissionConfig,
    AdmissionController,
    CapacityExhausted,
    Created,
    CreateResult,
    Grant,
    Queued,
    RateLimited,
    Rejected,
    Unavailable,
    Waiter,
)
from provisioner.ports import HttpRequest, HttpResponse

START_MS = 1_700_000_000_000
ACCOUNT = "sim-account"


class _NoHttp:
    def send(self, request: HttpRequest) -> HttpResponse:
        raise AssertionError("admission control never calls HTTP itself")


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
        self._tat = 0.0
        self._next = 0

    def begin_create(self, now: int) -> tuple[CreateResult, int]:
        """Take a create request; return its answer and how long it takes to arrive."""
        config = self.config
        rel = now - START_MS
        self.create_times.append(rel)
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        for storm in config.storms:
            if storm.start_ms <= rel < storm.end_ms:
                return self._answer("429_storm", RateLimited(storm.end_ms - rel))
        if config.rate_per_s is not None:
            interval = 1000.0 / config.rate_per_s
            if self._tat - rel > 0:
                return self._answer("429_rate", RateLimited(math.ceil(self._tat - rel)))
            self._tat = max(self._tat, float(rel)) + interval
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

    def kill(self, sandbox_id: str) -> None:
        self.sandboxes.discard(sandbox_id)


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


class Simulation:
    def __init__(
        self,
        sessions: list[SessionSpec],
        *,
        admission: AdmissionConfig,
        e2b: FakeE2BConfig | None = None,
        seed: int = 0,
        max_events: int = 2_000_000,
    ) -> None:
        self.specs = sessions
        self.admission = admission
        self.seed = seed
        self.clock = VirtualClock(START_MS)
        self.backend = MemoryBackend(self.clock.now_ms)
        self.random = SeededRandom(seed)
        self.telemetry = EventLog()
        self.e2b = FakeE2B(e2b or FakeE2BConfig(), random.Random(seed ^ 0x5EED))
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
        ports = native_ports(
            self.backend,
            tenant=tenant,
            account=ACCOUNT,
            http=_NoHttp(),
            clock=self.clock,
            random=self.random,
            telemetry=self.telemetry,
        )
        self.invocations += 1
        return AdmissionController(ports, self.admission)

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


class Harness:
    """Shared storage and virtual clock, with a fresh controller per invocation: the
    building block of the unit, stateful and concurrency tests."""

    def __init__(
        self,
        config: AdmissionConfig | None = None,
        *,
        seed: int = 0,
        backend: Any = None,
    ) -> None:
        self.config = config or AdmissionConfig()
        self.clock = VirtualClock(START_MS)
        self.backend = backend if backend is not None else MemoryBackend(self.clock.now_ms)
        self.random = SeededRandom(seed)
        self.telemetry = EventLog()

    def controller(self, tenant: str, config: AdmissionConfig | None = None) -> AdmissionController:
        ports = native_ports(
            self.backend,
            tenant=tenant,
            account=ACCOUNT,
            http=_NoHttp(),
            clock=self.clock,
            random=self.random,
            telemetry=self.telemetry,
        )
        return AdmissionController(ports, config or self.config)

    def admit(self, waiter: Waiter) -> Grant | Queued | Rejected:
        return self.controller(waiter.tenant).admit(waiter)

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
    e2b: FakeE2BConfig | None = None,
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


def main() -> None:
    import argparse
    import json
    import time

    parser = argparse.ArgumentParser(description="Run the admission-control simulation.")
    parser.add_argument("--sessions", type=int, default=10)
    parser.add_argument("--tenants", type=int, default=1)
    parser.add_argument("--slots", type=int, default=4)
    parser.add_argument("--rate", type=float, default=1.0)
    parser.add_argument("--capacity", type=int, default=20)
    parser.add_argument("--latency-ms", type=int, default=3_000)
    parser.add_argument("--hold-ms", type=int, default=20_000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    sessions = [
        SessionSpec(f"tenant-{i % args.tenants}", f"CurationJob/{i}", hold_ms=args.hold_ms)
        for i in range(args.sessions)
    ]
    config = AdmissionConfig(
        create_slots=args.slots, create_rate_per_s=args.rate, max_sandboxes=args.capacity
    )
    started = time.perf_counter()
    report = run(
        sessions,
        admission=config,
        e2b=FakeE2BConfig(create_latency_ms=args.latency_ms),
        seed=args.seed,
    )
    figures = summary(report)
    figures["wall_s"] = round(time.perf_counter() - started, 3)
    if args.capacity >= args.sessions:
        bound = lower_bound_ms(args.sessions, args.slots, args.latency_ms, args.rate, args.hold_ms)
        figures["makespan_over_lower_bound"] = round(report.makespan_ms / bound, 4)
    print(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
