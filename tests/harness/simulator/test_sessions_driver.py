"""The real-time driver: the executor on the wall clock and a thread pool, against fake
invokers. Temper's rules themselves are tested in virtual time (test_executor_rules.py);
these check what only real threads and a real clock can break: outcomes posted back from
many threads, batches, stopping, and the host-keeps-up watch (issue 16).

Replaced with the move to Temper's rules: the old driver's wake-up test (Temper has no
wake-up: test_executor_rules.py checks that nothing wakes a queued entity) and its
retry-of-retryable-failures test (Temper does not retry a SandboxFailed; the spec sends it
to Failed, which releases)."""

from __future__ import annotations

import json
import random
import threading
import time
from collections import Counter
from dataclasses import dataclass, field

import pytest

from harness.simulator import DriverSettings, Job, RunResult, SessionDriver, SessionEvent
from harness.simulator.spec import Spec, packaged_spec, packaged_spec_text, parse_spec
from provisioner.model import Failure, Invocation, Outcome, failed
from tests.harness.simulator import answers

MODULE = "sandbox_provisioner"


def spec_with(**after: int) -> Spec:
    """The example spec with some states' first timers set to `after` seconds."""
    text = packaged_spec_text("temper_agent.ioa.toml")
    defaults = {"Queued": 2, "Provisioning": 180}
    for state, seconds in after.items():
        old = f'state = "{state}"\nafter_seconds = {defaults[state]}\n'
        assert old in text
        text = text.replace(old, f'state = "{state}"\nafter_seconds = {seconds}\n')
    return parse_spec(text, source="test")


def jobs(n: int, tenants: int = 1) -> list[Job]:
    return [Job(id=f"job-{i}", tenant=f"t{i % tenants}") for i in range(n)]


def run_with_watchdog(driver: SessionDriver, work: list[Job], limit_s: float = 30.0) -> RunResult:
    """Runs the driver in a thread so a hang fails the test instead of wedging it."""
    box: dict[str, RunResult] = {}
    thread = threading.Thread(target=lambda: box.update(result=driver.run(work)))
    thread.start()
    thread.join(limit_s)
    if thread.is_alive():
        driver.stop()
        thread.join(5)
        pytest.fail("the driver did not finish")
    driver.close()
    return box["result"]


@dataclass
class FakeAdmission:
    """A provisioner with `permits` sandboxes and a FIFO queue, thread-safe."""

    permits: int
    lock: threading.Lock = field(default_factory=threading.Lock)
    holders: set[str] = field(default_factory=set)
    queue: list[str] = field(default_factory=list)
    max_held: int = 0
    released: Counter[str] = field(default_factory=Counter)

    def invoke(self, invocation: Invocation) -> Outcome:
        entity = invocation.entity_id
        with self.lock:
            if answers.operation(invocation) == "release":
                self.holders.discard(entity)
                self.released[entity] += 1
                return answers.released(invocation, entity)
            if entity not in self.holders:
                if entity not in self.queue:
                    self.queue.append(entity)
                if self.queue.index(entity) >= self.permits - len(self.holders):
                    return answers.queued(position=self.queue.index(entity) + 1, reason="capacity")
                self.queue.remove(entity)
                self.holders.add(entity)
                self.max_held = max(self.max_held, len(self.holders))
            return answers.ready(f"sb-{entity}")


def test_queued_sessions_are_polled_by_the_spec_timer_and_all_complete() -> None:
    """Bug caught: outcomes from worker threads lost or applied twice; a queued session
    never asked again. 6 jobs, 2 permits, a 1 s poll: the last waits two polls."""
    admission = FakeAdmission(permits=2)
    settings = DriverSettings(turns=3, turn_s=0.05, sim_per_real=600, workers=4)
    driver = SessionDriver(spec_with(Queued=1), {MODULE: admission}, settings)
    result = run_with_watchdog(driver, jobs(6))
    assert [r.state for r in result.results] == ["Completed"] * 6
    assert admission.max_held <= 2
    assert max(r.queued_outcomes for r in result.results) >= 2, "nobody waited two polls"
    assert all(r.turns == 3 for r in result.results)
    assert all(admission.released[j.id] == 1 for j in jobs(6))


def test_batches_run_four_at_a_time_and_wait_for_the_last_of_each() -> None:
    """Bug caught: the manual workaround replayed wrongly (overlapping batches)."""
    lock = threading.Lock()
    active: set[str] = set()
    order: list[str] = []
    together: list[int] = []

    class Recorder:
        def invoke(self, invocation: Invocation) -> Outcome:
            with lock:
                active.add(invocation.entity_id)
                order.append(invocation.entity_id)
                together.append(len(active))
            return answers.ready(f"sb-{invocation.entity_id}")

    def on_event(event: SessionEvent) -> None:
        if event.phase in ("Completed", "Failed"):
            with lock:
                active.discard(event.job.id)

    settings = DriverSettings(turns=1, turn_s=0.02, batch_size=4, workers=8)
    driver = SessionDriver(
        packaged_spec("temper_agent_upstream.ioa.toml"),
        {MODULE: Recorder()},
        settings,
        on_event=on_event,
    )
    result = run_with_watchdog(driver, jobs(10))
    assert result.completed == 10
    assert max(together) <= 4
    assert set(order[:4]) == {f"job-{i}" for i in range(4)}
    assert set(order[4:8]) == {f"job-{i}" for i in range(4, 8)}


def test_a_sandbox_failed_answer_fails_the_job_and_releases() -> None:
    """Bug caught: SandboxFailed retried by the host (Temper does not) or a failed job
    leaving what the component holds behind."""
    released: list[str] = []

    class Refuses:
        def invoke(self, invocation: Invocation) -> Outcome:
            if answers.operation(invocation) == "release":
                released.append(invocation.entity_id)
                return answers.released(invocation, "", released=False)
            outcome = failed(Failure("queue_timeout", "waited too long", retryable=False))
            # The component's shape: a success result naming SandboxFailed (issue 12).
            return Outcome(outcome.action, outcome.params, success=True)

    driver = SessionDriver(
        packaged_spec("temper_agent.ioa.toml"), {MODULE: Refuses()}, DriverSettings(workers=2)
    )
    result = run_with_watchdog(driver, jobs(2))
    assert [(r.state, r.reason) for r in result.results] == [
        ("Failed", "SandboxFailed: queue_timeout: waited too long")
    ] * 2
    assert sorted(released) == ["job-0", "job-1"]
    assert all(r.invocations == 2 for r in result.results)


def test_stop_ends_the_run_and_marks_unfinished_sessions_interrupted() -> None:
    """Bug caught: stop() ignored while sessions wait on long timers (Ctrl-C hangs)."""
    started = threading.Event()

    def on_event(event: SessionEvent) -> None:
        if event.kind == "transition" and event.detail.get("action") == "SandboxQueued":
            started.set()

    driver = SessionDriver(
        spec_with(Queued=3600),
        {MODULE: FakeAdmission(permits=0)},
        DriverSettings(workers=2),
        on_event=on_event,
    )
    box: dict[str, RunResult] = {}
    thread = threading.Thread(target=lambda: box.update(result=driver.run(jobs(3))))
    thread.start()
    assert started.wait(10)
    driver.stop()
    thread.join(10)
    assert not thread.is_alive()
    driver.close()
    result = box["result"]
    assert result.interrupted and result.overloaded is None
    assert {r.outcome for r in result.results} == {"interrupted"}


def test_a_host_that_cannot_keep_up_stops_with_the_figures_not_a_mass_kill() -> None:
    """Issue 16. One worker, each invocation 0.4 s, twelve jobs, and a 2 s guard on
    Provisioning: invocations queue for the worker past a quarter of that guard. Bug caught:
    the run carrying on until the guard kills sessions that a host keeping up would have
    served, or stopping without saying what was due and served."""

    class Slow:
        def invoke(self, invocation: Invocation) -> Outcome:
            time.sleep(0.4)
            return answers.ready(f"sb-{invocation.entity_id}")

    driver = SessionDriver(
        spec_with(Provisioning=2), {MODULE: Slow()}, DriverSettings(turns=1, turn_s=0.01, workers=1)
    )
    result = run_with_watchdog(driver, jobs(12), limit_s=60)
    assert result.host["max_invocation_lag_s"] > 0.5, "the precondition: invocations lagged"
    assert result.overloaded is not None
    assert "cannot keep up" in result.overloaded and "invocations were due" in result.overloaded
    assert "Provisioning's ProvisionTimeout timer" in result.overloaded
    assert not any(r.killed_by_timer for r in result.results)


@dataclass
class ChaosInvoker:
    """Random latency and outcomes; checks that no entity has two provisions (or two
    releases) in flight at once."""

    seed: int
    lock: threading.Lock = field(default_factory=threading.Lock)
    in_flight: Counter[tuple[str, str]] = field(default_factory=Counter)
    violations: list[str] = field(default_factory=list)
    parallel: int = 0
    max_parallel: int = 0
    ready: set[str] = field(default_factory=set)
    released: Counter[str] = field(default_factory=Counter)

    def invoke(self, invocation: Invocation) -> Outcome:
        entity, op = invocation.entity_id, answers.operation(invocation)
        state = json.loads(invocation.entity_state)
        rng = random.Random(f"{self.seed}:{entity}:{invocation.trace_id}")
        with self.lock:
            self.in_flight[(entity, op)] += 1
            self.parallel += 1
            self.max_parallel = max(self.max_parallel, self.parallel)
            if self.in_flight[(entity, op)] > 1:
                self.violations.append(f"two {op}s at once for {entity} ({state['status']})")
        try:
            time.sleep(rng.random() * 0.003)
            if op == "release":
                with self.lock:
                    self.released[entity] += 1
                return answers.released(invocation, entity)
            roll = rng.random()
            if roll < 0.4:
                return answers.queued(position=rng.randint(1, 9))
            if roll < 0.5:
                return failed(Failure("guest_trap", "trap", retryable=True))
            if roll < 0.53:
                raise RuntimeError("an invoker bug")
            with self.lock:
                self.ready.add(entity)
            return answers.ready(f"sb-{entity}")
        finally:
            with self.lock:
                self.in_flight[(entity, op)] -= 1
                self.parallel -= 1


@pytest.mark.parametrize("seed", [1, 2])
def test_many_sessions_with_concurrent_random_invocations_all_end_consistently(seed: int) -> None:
    """Bug caught: races between the worker threads and the scheduler (lost results,
    double invocations, sessions never ending, sandboxes never released)."""
    chaos = ChaosInvoker(seed)
    # No keep-up watch: it stops a run on a machine too loaded to keep up (tested on its
    # own above), and this test is about the races whatever the machine's speed.
    settings = DriverSettings(turns=2, turn_s=0.002, sim_per_real=600, workers=16, keep_up=False)
    work = jobs(200, tenants=7)
    result = run_with_watchdog(
        SessionDriver(spec_with(Queued=1), {MODULE: chaos}, settings), work, limit_s=90
    )
    assert not chaos.violations
    assert chaos.max_parallel > 1, "the pool never ran invocations concurrently"
    assert all(r.outcome in ("completed", "failed") for r in result.results)
    completed = {r.job.id for r in result.results if r.completed}
    assert completed and completed <= chaos.ready
    assert all(chaos.released[entity] == 1 for entity in completed)
    assert all(chaos.released[r.job.id] == 1 for r in result.results if r.failed)
    assert sum(r.invocations for r in result.results) > len(work)
