"""serve's pacing in the session simulator (virtual time) and Temper's external dispatch.

The scenario is the pace contract's (docs/simulate-pace.md): E2B serves 4 creates at once,
5 creates/s with no burst, 20 sandboxes, 2 s per create; 5 s sessions; 5 tenants. Every
figure checked here is a count (completions, E2B's limits, orphans, answers), never a
speed: makespan thresholds live in benchmarks/pace.py.
"""

from __future__ import annotations

from dataclasses import replace

import pytest

from harness.simulator import detsim
from harness.simulator.detsim import VirtualLoop
from harness.simulator.executor import Entity, Executor, ExternalAccess
from harness.simulator.fake_e2b import SIMULATED_E2B, START_MS
from harness.simulator.model import Job
from harness.simulator.simulated_ports import VirtualClock
from harness.simulator.spec import Spec, packaged_spec
from harness.simulator.virtual_serve import VirtualServe
from host.serve.pace import PaceSettings
from provisioner.config import AdmissionConfig
from tests.harness.simulator import answers
from tests.harness.simulator.test_executor_rules import QUEUED as SHORT_QUEUED
from tests.harness.simulator.test_executor_rules import Scripted, variant

SPEC = "temper_agent.ioa.toml"
SLOTS, RATE, CAP = 4, 5.0, 20


def scenario(
    jobs: int, poll_s: int, pace: PaceSettings, **changes: object
) -> detsim.VirtualScenario:
    base = detsim.VirtualScenario(
        jobs=jobs,
        tenants=5,
        turns=10,
        turn_s=5 / 11,
        poll_s=poll_s,
        admission=AdmissionConfig(create_slots=SLOTS, create_rate_per_s=RATE, max_sandboxes=CAP),
        e2b=SIMULATED_E2B.replace(
            create_latency_ms=2_000,
            create_rate_per_s=RATE,
            max_sandboxes=CAP,
            max_concurrent_creates=SLOTS,
        ),
        pace=pace,
    )
    return replace(base, **changes)  # type: ignore[arg-type]


def run(scene: detsim.VirtualScenario, spec: Spec | None = None) -> dict[str, object]:
    return detsim.run_virtual(spec or packaged_spec(SPEC), scene).summary()


def assert_clean(summary: dict[str, object], jobs: int) -> None:
    assert summary["completed"] == jobs, summary
    assert summary["failed"] == 0
    assert summary["throttled"] == 0, summary["answers"]
    assert isinstance(summary["max_concurrent_creates_seen"], int)
    assert summary["max_concurrent_creates_seen"] <= SLOTS
    assert isinstance(summary["max_running_sandboxes_seen"], int)
    assert summary["max_running_sandboxes_seen"] <= CAP
    assert summary["orphaned_sandboxes"] == 0
    assert summary["duplicate_sandboxes"] == 0


def test_held_answers_complete_every_job_within_e2b_limits() -> None:
    summary = run(scenario(100, 2, PaceSettings(hold_ms=1_500)))
    assert_clean(summary, 100)
    # Precondition: requests were held and the provisioner asked again, and each re-ask
    # counts as an invocation on top of the executor's.
    assert isinstance(summary["max_held_at_once"], int) and summary["max_held_at_once"] > 1
    assert isinstance(summary["reasks"], int) and summary["reasks"] > 0
    unheld = run(scenario(100, 2, PaceSettings(hold_ms=0)))
    assert unheld["max_held_at_once"] == 0 and unheld["reasks"] == 0


def test_held_requests_stay_within_max_held() -> None:
    summary = run(scenario(100, 2, PaceSettings(hold_ms=1_500, max_held=7)))
    assert_clean(summary, 100)
    assert summary["max_held_at_once"] == 7


def test_push_wakes_queued_entities_and_completes_every_job() -> None:
    summary = run(scenario(100, 30, PaceSettings(hold_ms=1_500, push=True)))
    assert_clean(summary, 100)
    wakes = summary["wake_ups"]
    assert isinstance(wakes, dict) and wakes.get("200", 0) > 0, wakes


def test_invocations_are_temper_s_and_component_calls_add_the_re_asks() -> None:
    # Without held answers each provisioner call is one the executor started (a wake-up's
    # included: WakeProvision's trigger); with them, the re-asks come on top of Temper's
    # invocations, as component calls.
    pushed = detsim.run_virtual(
        packaged_spec(SPEC), scenario(20, 30, PaceSettings(hold_ms=0, push=True))
    )
    assert pushed.serve.figures.wakes["200"] > 0
    assert pushed.invocations == sum(r.invocations for r in pushed.run.results)
    assert pushed.serve.figures.calls == pushed.invocations
    held = detsim.run_virtual(
        packaged_spec(SPEC), scenario(20, 30, PaceSettings(hold_ms=1_500, push=True))
    )
    assert held.serve.figures.reasks > 0
    assert held.invocations == sum(r.invocations for r in held.run.results)
    assert held.serve.figures.calls == held.invocations + held.serve.figures.reasks
    assert held.summary()["component_calls"] == held.serve.figures.calls


@pytest.mark.parametrize("fault", ["409", "403", "503", "down"])
def test_a_failing_push_still_completes_every_job_through_the_timer(fault: str) -> None:
    summary = run(scenario(30, 30, PaceSettings(hold_ms=1_500, push=True), wake_fault=fault))
    assert_clean(summary, 30)
    wakes = summary["wake_ups"]
    # Precondition: wake-ups were due, and every one failed the way the fault says.
    assert isinstance(wakes, dict) and set(wakes) == {fault} and wakes[fault] > 0, wakes


def test_a_spec_without_the_wake_action_is_refused_with_409() -> None:
    summary = run(scenario(20, 30, PaceSettings(hold_ms=0, push=True), wake_action="NoSuchWake"))
    assert_clean(summary, 20)
    assert summary["wake_ups"] == {"409": summary["wake_ups"]["409"]}  # type: ignore[index]


# -- external dispatch: Temper's rules ---------------------------------------------------

TOKENS = {"token-a": "tenant-a", "token-b": "tenant-b"}


def executor_with(outcomes: list[object]) -> tuple[Executor, VirtualLoop, Scripted]:
    loop = VirtualLoop(VirtualClock(START_MS), max_events=10_000)
    module = Scripted(loop, outcomes, 1.0)  # type: ignore[arg-type]
    loop.modules = {"sandbox_provisioner": module}
    spec = packaged_spec(SPEC)
    executor = Executor(spec, loop, access=ExternalAccess("TemperAgents", TOKENS))
    return executor, loop, module


def queued_entity(executor: Executor, loop: VirtualLoop) -> Entity:
    entity = executor.create(Job("job-1", "tenant-a"))
    assert executor.dispatch(entity, "Provision", {"user_message": "hi"}) is None
    loop.run(lambda: entity.status == "Queued" and entity.in_flight == 0)
    return entity


QUEUED = answers.queued_for_a_minute()


def wake(executor: Executor, **changes: str | None) -> int:
    call: dict[str, str | None] = {
        "tenant": "tenant-a",
        "entity_set": "TemperAgents",
        "entity_id": "job-1",
        "action": "WakeProvision",
        "credential": "token-a",
    }
    call.update(changes)
    return executor.dispatch_external(
        str(call["tenant"]),
        str(call["entity_set"]),
        str(call["entity_id"]),
        str(call["action"]),
        {},
        call["credential"],
    ).status


def test_external_dispatch_refuses_what_temper_refuses() -> None:
    executor, loop, module = executor_with([QUEUED])
    entity = queued_entity(executor, loop)
    calls = len(module.calls)
    assert wake(executor, entity_id="job-404") == 404
    assert wake(executor, entity_set="Orders") == 404
    assert wake(executor, credential=None) == 401
    assert wake(executor, credential="stolen") == 401
    assert wake(executor, credential="token-b") == 403
    # tenant-b's own credential, but the entity is tenant-a's: not found in tenant-b.
    assert wake(executor, tenant="tenant-b", credential="token-b") == 404
    assert wake(executor, action="SandboxReleased") == 409  # not enabled in Queued
    assert wake(executor, action="NoSuchAction") == 409
    assert entity.status == "Queued" and len(module.calls) == calls  # nothing ran


def test_external_dispatch_runs_the_action_and_its_triggers() -> None:
    executor, loop, module = executor_with([QUEUED, answers.ready("sbx-9")])
    entity = queued_entity(executor, loop)
    calls, invocations = len(module.calls), entity.invocations
    assert wake(executor) == 200
    # A self-loop on Queued: still Queued, its trigger in flight, the poll timer kept.
    assert entity.status == "Queued" and entity.in_flight == 1
    assert entity.invocations == invocations + 1 and len(module.calls) == calls + 1
    assert entity.timer is not None
    loop.run(lambda: entity.in_flight == 0)
    assert entity.status == "Thinking" and entity.fields["sandbox_id"] == "sbx-9"
    assert wake(executor) == 409  # no longer Queued


def test_an_idempotency_key_replays_without_dispatching_again() -> None:
    executor, loop, module = executor_with([QUEUED])
    entity = queued_entity(executor, loop)
    first = executor.dispatch_external(
        "tenant-a", "TemperAgents", "job-1", "WakeProvision", {}, "token-a", idempotency_key="r-1"
    )
    calls = len(module.calls)
    again = executor.dispatch_external(
        "tenant-a", "TemperAgents", "job-1", "WakeProvision", {}, "token-a", idempotency_key="r-1"
    )
    other = executor.dispatch_external(
        "tenant-a", "TemperAgents", "job-1", "Fail", {}, "token-a", idempotency_key="r-1"
    )
    assert (first.status, again.status, other.status) == (200, 200, 409)
    assert len(module.calls) == calls and entity.status == "Queued"


# -- the guest's whole path in virtual time ------------------------------------------------

GUEST_CONFIG = (
    ("create_slots", str(SLOTS)),
    ("create_rate_per_s", f"{RATE:g}"),
    ("max_sandboxes", str(CAP)),
    ("sandbox_timeout_s", "600"),
)


@pytest.mark.parametrize(
    ("poll_s", "pace"),
    [(2, PaceSettings(hold_ms=1_500)), (30, PaceSettings(hold_ms=1_500, push=True))],
)
def test_the_guest_path_completes_every_job_within_e2b_limits(
    poll_s: int, pace: PaceSettings
) -> None:
    done = detsim.run_virtual(
        packaged_spec(SPEC),
        scenario(50, poll_s, pace, guest=True, integration=GUEST_CONFIG),
    )
    assert_clean(done.summary(), 50)
    # Precondition: the guest's own path ran (its E2B client's requests) and a create took
    # E2B's latency in virtual time, the invocation paused meanwhile.
    assert done.e2b.answers == {"201": 50}
    assert all(r.waited_ms is not None and r.waited_ms >= 2_000 for r in done.run.results)
    assert done.run.results[0].sandbox_id is not None


def test_simulate_virtual_reports_the_summary(capsys: pytest.CaptureFixture[str]) -> None:
    import argparse
    import json

    from harness.simulator.simulate import EXIT_OK, EXIT_USAGE, add_simulate_arguments, run_simulate

    parser = argparse.ArgumentParser()
    add_simulate_arguments(parser)
    args = parser.parse_args(
        ["--virtual", "--jobs", "20", "--tenants", "5", "--poll-s", "30", "--push", "--json"]
    )
    assert run_simulate(args) == EXIT_OK
    summary = json.loads(capsys.readouterr().out)["summary"]
    for key in (
        "completed",
        "makespan_s",
        "ideal_makespan_s",
        "invocations",
        "max_concurrent_creates_seen",
        "max_running_sandboxes_seen",
        "throttled",
        "orphaned_sandboxes",
        "duplicate_sandboxes",
    ):
        assert key in summary, key
    assert summary["completed"] == 20 and summary["push"] is True
    assert summary["wake_ups"].get("200", 0) > 0
    assert run_simulate(parser.parse_args(["--virtual", "--hold-ms", "-1"])) == EXIT_USAGE


def test_the_entity_timers_keep_running_while_a_request_is_held() -> None:
    # Provisioning's guard at 1 s, shorter than the 1.5 s hold: Temper's actor is not
    # blocked by a held call, so the guard fires while serve still holds the request.
    spec = variant("after_seconds = 180", "after_seconds = 1")
    loop = VirtualLoop(VirtualClock(START_MS), max_events=10_000)
    module = Scripted(loop, [SHORT_QUEUED], 0.1)
    serve = VirtualServe(loop, module, PaceSettings(hold_ms=1_500))
    loop.modules = {"sandbox_provisioner": serve}
    executor = Executor(spec, loop)
    entity = executor.create(Job("job-1", "tenant-a"))
    assert executor.dispatch(entity, "Provision", {"user_message": "hi"}) is None
    loop.run(lambda: entity.status == "Failed")
    assert serve.figures.holding == 1 and entity.in_flight >= 1  # still held
    # ProvisionTimeout into Failing at 1 s; its release confirmed at once.
    assert entity.history[-2] == (1.0, "Failing") and loop.now() == 1.0
    loop.run(lambda: entity.in_flight == 0)
    assert entity.status == "Failed"  # the held answer, when it came, changed nothing


def test_only_turns_near_the_front_are_held() -> None:
    # Catches: retry_at_ms estimates pulled inside the hold window for every waiter (for
    # instance while the create latency is unknown), so serve holds the whole queue open
    # instead of the few turns the limits can serve within the window.
    window_ms = 1_500
    summary = run(scenario(100, 2, PaceSettings(hold_ms=window_ms, max_held=1_000)))
    assert_clean(summary, 100)
    bound = RATE * window_ms / 1000 + SLOTS
    held = summary["max_held_at_once"]
    assert isinstance(held, int) and 0 < held <= bound, held
