"""The session driver against fake invokers: transitions, liveness, batches, wake-ups and
concurrency. No component, no network: each test takes well under a second."""

from __future__ import annotations

import json
import random
import threading
import time
from collections import Counter
from dataclasses import dataclass, field

import pytest

from host.sessions import DriverSettings, Job, Phase, RunResult, SessionDriver, SessionEvent
from host.sessions.invokers import LEGACY_CREATE_FAILED
from host.sessions.model import INTERRUPTED, LIVENESS_TIMEOUT
from provisioner.model import (
    SANDBOX_QUEUED,
    SANDBOX_READY,
    SANDBOX_RELEASED,
    Failure,
    Invocation,
    Outcome,
    failed,
)

FAST = DriverSettings(turns=2, turn_s=0.01, liveness_s=0.3, workers=8,
                      failure_retry_delay_s=0.01)


def jobs(n: int, tenants: int = 1) -> list[Job]:
    return [Job(id=f"job-{i}", tenant=f"t{i % tenants}") for i in range(n)]


def operation(invocation: Invocation) -> str:
    return dict(invocation.config).get("operation", "provision")


def run_with_watchdog(
    driver: SessionDriver, work: list[Job], limit_s: float = 20.0
) -> RunResult:
    """Runs the driver in a thread so a hang fails the test instead of wedging it."""
    box: dict[str, RunResult] = {}

    def target() -> None:
        box["result"] = driver.run(work)

    thread = threading.Thread(target=target)
    thread.start()
    thread.join(limit_s)
    if thread.is_alive():
        driver.stop()
        thread.join(5)
        pytest.fail("the driver did not finish: a session was never woken or never ended")
    driver.close()
    return box["result"]


@dataclass
class FakeAdmission:
    """A provisioner with `permits` sandboxes and a FIFO queue, thread-safe, that answers
    SandboxQueued with `retry_after_ms` while no permit is free."""

    permits: int
    retry_after_ms: int = 50
    lock: threading.Lock = field(default_factory=threading.Lock)
    holders: set[str] = field(default_factory=set)
    queue: list[str] = field(default_factory=list)
    max_held: int = 0
    released: Counter[str] = field(default_factory=Counter)
    calls: Counter[str] = field(default_factory=Counter)

    def invoke(self, invocation: Invocation) -> Outcome:
        entity = invocation.entity_id
        with self.lock:
            self.calls[entity] += 1
            if operation(invocation) == "release":
                self.holders.discard(entity)
                self.released[entity] += 1
                return Outcome(SANDBOX_RELEASED, {"released": True})
            if entity in self.holders:
                return Outcome(SANDBOX_READY, {"sandbox_id": f"sb-{entity}"})
            if entity not in self.queue:
                self.queue.append(entity)
            position = self.queue.index(entity) + 1
            if position <= self.permits - len(self.holders):
                self.queue.remove(entity)
                self.holders.add(entity)
                self.max_held = max(self.max_held, len(self.holders))
                return Outcome(SANDBOX_READY, {"sandbox_id": f"sb-{entity}"})
            return Outcome(
                SANDBOX_QUEUED,
                {"position": position, "queue_length": len(self.queue),
                 "in_use": len(self.holders), "limit": self.permits, "reason": "capacity",
                 "retry_after_ms": self.retry_after_ms, "eta_ms": self.retry_after_ms,
                 "waited_ms": 0},
            )


def test_queued_sessions_outlive_the_liveness_timeout_because_queued_resets_it() -> None:
    """Bug caught: SandboxQueued not counted as progress, so waiting sessions die (the
    incident). 12 jobs, 2 permits, each session holding its sandbox ~0.2 s: the last
    waits several liveness periods (0.3 s) and must still complete."""
    admission = FakeAdmission(permits=2, retry_after_ms=40)
    settings = DriverSettings(turns=4, turn_s=0.05, liveness_s=0.3, workers=4)
    driver = SessionDriver(admission, settings)
    result = run_with_watchdog(driver, jobs(12))
    assert [r.state for r in result.results] == [Phase.COMPLETED] * 12
    assert admission.max_held <= 2
    waits = [r.waited_ms for r in result.results]
    assert max(w or 0 for w in waits) > 300, "the scenario must make someone wait > liveness"
    assert all(r.turns == 4 for r in result.results)
    assert all(admission.released[j.id] == 1 for j in jobs(12))


def test_an_unhandled_failure_leaves_the_session_waiting_until_liveness_kills_it() -> None:
    """Bug caught: the old provisioner's failure treated as progress or as a transition;
    in the incident those sessions sat silent until the liveness timeout."""

    class Legacy:
        def invoke(self, invocation: Invocation) -> Outcome:
            if operation(invocation) == "release":
                return Outcome(SANDBOX_RELEASED, {"released": False})
            if invocation.entity_id == "job-0":
                return Outcome(SANDBOX_READY, {"sandbox_id": "sb-0"})
            return Outcome(LEGACY_CREATE_FAILED, {}, success=False,
                           error=Failure("e2b_error", "429", retryable=False))

    events: list[SessionEvent] = []
    driver = SessionDriver(Legacy(), FAST, on_event=events.append)
    result = run_with_watchdog(driver, jobs(3))
    states = {r.job.id: (r.state, r.reason) for r in result.results}
    assert states["job-0"] == (Phase.COMPLETED, None)
    assert states["job-1"] == (Phase.FAILED, LIVENESS_TIMEOUT)
    assert states["job-2"] == (Phase.FAILED, LIVENESS_TIMEOUT)
    ignored = [e for e in events if e.kind == "ignored"]
    assert {e.job.id for e in ignored} == {"job-1", "job-2"}
    # Silence means one create and nothing more until the kill (then the cleanup release).
    assert all(r.invocations == 2 for r in result.results[1:])


def test_retryable_failures_are_retried_then_fail_with_the_reason() -> None:
    """Bug caught: retryable SandboxFailed retried forever, or a permanent one retried."""
    calls: Counter[str] = Counter()

    class Flaky:
        def invoke(self, invocation: Invocation) -> Outcome:
            entity = invocation.entity_id
            if operation(invocation) == "release":
                return Outcome(SANDBOX_RELEASED, {"released": False})
            calls[entity] += 1
            if entity == "job-0":
                return failed(Failure("e2b_unavailable", "503", retryable=True))
            if entity == "job-1":
                return failed(Failure("e2b_unauthorized", "401", retryable=False))
            if calls[entity] < 3:
                return failed(Failure("e2b_unavailable", "503", retryable=True))
            return Outcome(SANDBOX_READY, {"sandbox_id": "sb"})

    driver = SessionDriver(Flaky(), FAST)
    result = run_with_watchdog(driver, jobs(3))
    by_id = {r.job.id: r for r in result.results}
    assert by_id["job-0"].state is Phase.FAILED
    assert by_id["job-0"].reason == "e2b_unavailable: 503"
    assert calls["job-0"] == 1 + FAST.failure_retries
    assert by_id["job-1"].reason == "e2b_unauthorized: 401"
    assert calls["job-1"] == 1
    assert by_id["job-2"].state is Phase.COMPLETED


def test_batches_run_four_at_a_time_and_wait_for_the_last_of_each() -> None:
    """Bug caught: the manual workaround replayed wrongly (overlapping batches)."""
    lock = threading.Lock()
    active: set[str] = set()
    seen_together: list[int] = []
    order: list[str] = []

    class Recorder:
        def invoke(self, invocation: Invocation) -> Outcome:
            with lock:
                if operation(invocation) == "release":
                    active.discard(invocation.entity_id)
                    return Outcome(SANDBOX_RELEASED, {"released": True})
                active.add(invocation.entity_id)
                order.append(invocation.entity_id)
                seen_together.append(len(active))
            return Outcome(SANDBOX_READY, {"sandbox_id": f"sb-{invocation.entity_id}"})

    settings = DriverSettings(turns=1, turn_s=0.02, liveness_s=1, workers=8, batch_size=4)
    result = run_with_watchdog(SessionDriver(Recorder(), settings), jobs(10))
    assert result.completed == 10
    assert max(seen_together) <= 4
    assert set(order[:4]) == {f"job-{i}" for i in range(4)}
    assert set(order[4:8]) == {f"job-{i}" for i in range(4, 8)}


def test_a_freed_permit_wakes_the_head_of_the_queue_without_waiting_out_retry_after() -> None:
    """Bug caught: queued sessions only ever woken by retry_after_ms. Here retry_after is
    an hour (and liveness longer), so without wake-ups the run could not finish."""
    admission = FakeAdmission(permits=2, retry_after_ms=3_600_000)
    settings = DriverSettings(turns=1, turn_s=0.01, liveness_s=7200, workers=4,
                              wake_per_permit=1)
    result = run_with_watchdog(SessionDriver(admission, settings), jobs(8))
    assert result.completed == 8


def test_a_sandbox_that_arrives_after_its_session_died_is_released() -> None:
    """Bug caught: a create outliving the liveness timeout leaves an orphaned sandbox."""
    released: list[str | None] = []
    slow_create = threading.Event()

    class SlowCreate:
        def invoke(self, invocation: Invocation) -> Outcome:
            if operation(invocation) == "release":
                released.append(json.loads(invocation.entity_state).get("sandbox_id"))
                return Outcome(SANDBOX_RELEASED, {"released": True})
            slow_create.wait(0.6)  # past the 0.3 s liveness timeout
            return Outcome(SANDBOX_READY, {"sandbox_id": "sb-late"})

    result = run_with_watchdog(SessionDriver(SlowCreate(), FAST), jobs(1))
    only = result.results[0]
    assert (only.state, only.reason) == (Phase.FAILED, LIVENESS_TIMEOUT)
    assert "sb-late" in released


def test_stop_ends_the_run_and_marks_unfinished_sessions_interrupted() -> None:
    """Bug caught: stop() ignored while sessions wait on long timers (Ctrl-C hangs)."""
    admission = FakeAdmission(permits=1, retry_after_ms=3_600_000)
    settings = DriverSettings(turns=1, turn_s=3600, liveness_s=7200, workers=2,
                              wake_per_permit=0)
    events: list[str] = []
    started = threading.Event()

    def on_event(event: SessionEvent) -> None:
        events.append(event.kind)
        if event.kind == "ready":
            started.set()

    driver = SessionDriver(admission, settings, on_event=on_event)
    box: dict[str, RunResult] = {}
    thread = threading.Thread(target=lambda: box.update(result=driver.run(jobs(3))))
    thread.start()
    assert started.wait(10)
    driver.stop()
    thread.join(10)
    assert not thread.is_alive()
    driver.close()
    result = box["result"]
    assert result.interrupted
    assert {r.reason for r in result.results} == {INTERRUPTED}


@dataclass
class ChaosInvoker:
    """Random latency and outcomes; checks that no session ever has two provisions or two
    releases in flight and that no release comes before its session's last provision."""

    seed: int
    lock: threading.Lock = field(default_factory=threading.Lock)
    in_flight: Counter[tuple[str, str]] = field(default_factory=Counter)
    violations: list[str] = field(default_factory=list)
    max_parallel: int = 0
    ready: set[str] = field(default_factory=set)
    released: Counter[str] = field(default_factory=Counter)
    parallel: int = 0

    def invoke(self, invocation: Invocation) -> Outcome:
        entity, op = invocation.entity_id, operation(invocation)
        rng = random.Random(f"{self.seed}:{entity}:{invocation.trigger_params}:{op}")
        with self.lock:
            self.in_flight[(entity, op)] += 1
            self.parallel += 1
            self.max_parallel = max(self.max_parallel, self.parallel)
            if self.in_flight[(entity, op)] > 1:
                self.violations.append(f"two {op}s at once for {entity}")
        try:
            time.sleep(rng.random() * 0.003)
            if op == "release":
                with self.lock:
                    self.released[entity] += 1
                return Outcome(SANDBOX_RELEASED, {"released": True})
            roll = rng.random()
            if roll < 0.5:
                return Outcome(SANDBOX_QUEUED, {"position": rng.randint(1, 9),
                                                "retry_after_ms": rng.randint(1, 20)})
            if roll < 0.6:
                return failed(Failure("e2b_unavailable", "503", retryable=True))
            if roll < 0.63:
                raise RuntimeError("an invoker bug")
            with self.lock:
                self.ready.add(entity)
            return Outcome(SANDBOX_READY, {"sandbox_id": f"sb-{entity}"})
        finally:
            with self.lock:
                self.in_flight[(entity, op)] -= 1
                self.parallel -= 1


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_many_sessions_with_concurrent_random_invocations_all_end_consistently(seed: int) -> None:
    """Bug caught: races between the worker threads and the scheduler (lost results,
    double invocations, sessions never ending, sandboxes never released)."""
    chaos = ChaosInvoker(seed)
    settings = DriverSettings(turns=2, turn_s=0.002, liveness_s=0.5, workers=16,
                              failure_retries=3, failure_retry_delay_s=0.002)
    work = jobs(300, tenants=7)
    result = run_with_watchdog(SessionDriver(chaos, settings), work, limit_s=60)
    assert not chaos.violations
    assert chaos.max_parallel > 1, "the pool never ran invocations concurrently"
    assert all(r.state.terminal for r in result.results)
    completed = {r.job.id for r in result.results if r.state is Phase.COMPLETED}
    assert completed and completed <= chaos.ready
    # Every session that got a sandbox was released (completed ones exactly once).
    assert all(chaos.released[entity] >= 1 for entity in chaos.ready)
    assert all(chaos.released[entity] == 1 for entity in completed)
    counted = sum(r.invocations for r in result.results)
    assert counted > len(work)
