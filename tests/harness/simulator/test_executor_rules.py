"""Each Temper rule the executor implements, in virtual time, with a spec that breaks it.

Every test runs the executor on detsim's virtual loop with a scripted module, so what it
checks is the rule and not the timing of a machine: the contract check (`check_spec`) must
flag the broken spec, and the executor must do what Temper does with it.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest

from harness.simulator.contract import check_spec
from harness.simulator.detsim import VirtualLoop
from harness.simulator.executor import Entity, Executor, overlay_config
from harness.simulator.fake_e2b import START_MS
from harness.simulator.model import Job, SessionEvent
from harness.simulator.simulated_ports import VirtualClock
from harness.simulator.spec import Spec, SpecError, packaged_spec, packaged_spec_text, parse_spec
from provisioner.failures import FailureCode
from provisioner.model import Failure, Invocation, Outcome, failed
from tests.harness.simulator import answers

EXAMPLE = "temper_agent.ioa.toml"
QUEUED = answers.queued_for_a_slot(position=2, queue_length=3, retry_after_ms=500, eta_ms=900)


def example_text() -> str:
    return packaged_spec_text(EXAMPLE)


def legacy_text() -> str:
    """The example with upstream's legacy on_failure = "Fail" on its provisioning triggers in
    place of their typed failure routes (Temper refuses the two mixed)."""
    route = r'\n\[\[action\.triggers\.failure_routes\]\]\ncategory = "\w+"\naction = "\w+"\n'
    text = re.sub(route, "", example_text())
    provision = (
        'module = "sandbox_provisioner"\n\n[action.triggers.config]\noperation = "provision"'
    )
    assert provision in text
    return text.replace(provision, provision.replace("\n\n", '\non_failure = "Fail"\n\n', 1))


def variant(old: str, new: str, *, count: int = 1) -> Spec:
    text = legacy_text()
    assert text.count(old) >= count, f"the example no longer contains {old!r}"
    return parse_spec(text.replace(old, new, count), source="variant")


def rules(spec: Spec) -> set[str]:
    return {finding.rule for finding in check_spec(spec)}


@dataclass
class Scripted:
    """Module `sandbox_provisioner`: answers provisions from `answers` (the last one
    repeats), after `latency_s`, and releases at once; records every invocation."""

    loop: VirtualLoop
    answers: list[Outcome]
    latency_s: float = 1.0
    calls: list[tuple[float, str, str]] = field(default_factory=list)
    configs: list[dict[str, str]] = field(default_factory=list)
    in_flight: int = 0
    max_in_flight: int = 0

    def start(self, invocation: Invocation, done: Callable[[Outcome], None]) -> None:
        operation = answers.operation(invocation)
        self.calls.append((self.loop.now(), invocation.entity_id, operation))
        self.configs.append(dict(invocation.config))
        if operation == "release":
            done(answers.released(invocation, "sbx"))
            return
        outcome = self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)

        def answer() -> None:
            self.in_flight -= 1
            done(outcome)

        self.loop.call_later(self.latency_s, answer)


def harness(
    spec: Spec, answers: list[Outcome], latency_s: float = 1.0
) -> tuple[Executor, VirtualLoop, Scripted, list[SessionEvent]]:
    # A rule broken into an endless loop fails fast instead of hanging the suite.
    loop = VirtualLoop(VirtualClock(START_MS), max_events=20_000)
    module = Scripted(loop, answers, latency_s)
    loop.modules = {"sandbox_provisioner": module}
    events: list[SessionEvent] = []
    executor = Executor(spec, loop, on_event=events.append)
    return executor, loop, module, events


def start(executor: Executor, job_id: str = "job-1") -> Entity:
    entity = executor.create(Job(job_id, "tenant-a"))
    assert executor.dispatch(entity, "Provision", {"user_message": "hi"}) is None
    return entity


def run_until(loop: VirtualLoop, predicate: Callable[[], bool]) -> None:
    loop.run(predicate)


def dispatch_at(
    loop: VirtualLoop, when: float, executor: Executor, entity: Entity, name: str
) -> None:
    """Dispatches `name` on `entity` at virtual time `when`. The rejection reason is dropped:
    the tests observe the entity's state instead."""

    def dispatch() -> None:
        executor.dispatch(entity, name)

    loop.call_at(when, dispatch)


def ready(sandbox: str = "sbx-1") -> Outcome:
    return answers.ready(sandbox, sandbox_url=f"https://{sandbox}", undeclared="smuggled")


def test_the_example_specs_break_no_rule() -> None:
    """Bug caught: an example spec that Temper would run differently than intended."""
    assert check_spec(packaged_spec(EXAMPLE)) == []
    assert check_spec(packaged_spec("curation_job.ioa.toml")) == []


def test_without_on_success_the_modules_action_is_dispatched() -> None:
    """Bug caught: SandboxQueued treated as SandboxReady (or dropped) when no static
    on_success is declared; its params must reach the declared fields."""
    executor, loop, _module, _ = harness(packaged_spec(EXAMPLE), [QUEUED])
    entity = start(executor)
    run_until(loop, lambda: entity.status == "Queued")
    assert entity.status == "Queued"
    assert entity.fields["position"] == 2 and entity.fields["reason"] == "create_slots"


def test_a_static_on_success_wins_over_the_modules_action_and_swallows_queued() -> None:
    """Temper rule (invocation.rs): the static on_success is preferred over the module's
    action. Bug caught: a spec with on_success = "SandboxReady" moving every queued job to
    Thinking without a sandbox, and the check not flagging it."""
    spec = variant(
        'module = "sandbox_provisioner"\non_failure = "Fail"',
        'module = "sandbox_provisioner"\non_success = "SandboxReady"\non_failure = "Fail"',
    )
    assert "static-on-success" in rules(spec)
    executor, loop, _module, _ = harness(spec, [QUEUED])
    entity = start(executor)
    run_until(loop, lambda: entity.status != "Provisioning")
    assert entity.status == "Thinking"
    assert entity.fields["sandbox_id"] == ""  # "ready" without a sandbox


def test_a_failed_invocation_dispatches_on_failure_with_temper_params_only() -> None:
    """Temper rule (handle_wasm_failure): on_failure gets {error, error_message,
    integration}; the module's action and params are lost. Bug caught: a failure's code
    or retryable reaching the entity, or the failure dispatched as the module's action."""
    failure = Failure("guest_trap", "wasm trap: unreachable", retryable=True)
    legacy = parse_spec(legacy_text(), source="legacy")
    executor, loop, _module, events = harness(legacy, [failed(failure)])
    entity = start(executor)
    run_until(loop, lambda: entity.status == "Failed")
    fail = [e for e in events if e.kind == "transition" and e.detail["action"] == "Fail"]
    assert len(fail) == 1
    assert set(fail[0].detail["params"]) == {"error", "error_message", "integration"}
    assert fail[0].detail["params"]["integration"] == "provision_sandbox"
    assert entity.fields["error_message"] == "guest_trap: wasm trap: unreachable"
    assert "code" not in entity.fields and "retryable" not in entity.fields


def test_a_failed_invocation_takes_the_permanent_failure_route_with_only_failure() -> None:
    """Temper rule (failure_routing.rs): with typed routes, an untyped failure (a trap)
    counts as `permanent` and its route's callback gets `{failure}` only. Bug caught: the
    shipped spec's trap going nowhere (no on_failure any more) or to the transient retry."""
    trap = failed(Failure(FailureCode.GUEST_TRAP, "unreachable", False))
    executor, loop, _module, events = harness(packaged_spec(EXAMPLE), [trap])
    entity = start(executor)
    run_until(loop, lambda: entity.status == "Failed")
    refused = [
        e for e in events if e.kind == "transition" and e.detail["action"] == "ProvisionRefused"
    ]
    assert len(refused) == 1
    assert entity.fields["failure"]["category"] == "permanent"
    assert "error_message" not in refused[0].detail["params"]


def test_failure_routes_follow_temper_rules() -> None:
    """failure_routes.rs: never mixed with on_failure; the callback declares exactly the
    param `failure` of type failure_v1. Bug caught: a spec Temper's reader refuses running."""
    routed = 'name = "provision_sandbox"\nkind = "wasm"\nmodule = "sandbox_provisioner"\n'
    with pytest.raises(SpecError, match="cannot mix"):
        parse_spec(example_text().replace(routed, routed + 'on_failure = "Fail"\n', 1), source="x")
    callback = 'params = [{ name = "failure", type = "failure_v1" }]'
    with pytest.raises(SpecError, match="failure_v1"):
        parse_spec(example_text().replace(callback, 'params = ["failure"]', 1), source="x")


def test_a_run_overlay_reaches_every_trigger_but_each_keeps_its_operation() -> None:
    """What simulate and multihost lay over the spec's integration config. Bug caught: the
    run's settings (E2B URL, admission) missing from an invocation, or the overlay's
    `operation` replacing the trigger's, so that the release on Failed provisions again."""
    loop = VirtualLoop(VirtualClock(START_MS), max_events=20_000)
    failure = Failure("queue_timeout", "waited too long", retryable=False)
    module = Scripted(loop, [failed(failure)], latency_s=0.0)
    loop.modules = {"sandbox_provisioner": module}
    overlay = overlay_config({"e2b_api_url": "http://127.0.0.1:9", "operation": "status"})
    executor = Executor(packaged_spec(EXAMPLE), loop, configure=overlay)
    entity = start(executor)
    run_until(loop, lambda: entity.status == "Failed" and entity.in_flight == 0)
    assert [op for _, _, op in module.calls] == ["provision", "release"]
    assert all(config["e2b_api_url"] == "http://127.0.0.1:9" for config in module.configs)


def test_an_on_failure_that_expects_the_modules_params_is_flagged() -> None:
    """Bug caught: on_failure = "SandboxFailed" (which declares code, message, retryable)
    passing the check, though a failed invocation never carries them."""
    spec = variant(
        'module = "sandbox_provisioner"\non_failure = "Fail"',
        'module = "sandbox_provisioner"\non_failure = "SandboxFailed"',
    )
    assert "failure-params" in rules(spec)


def test_a_failure_without_on_failure_changes_nothing() -> None:
    """ADR-0152: with no on_failure, a failed invocation is an error, not a transition.
    Bug caught: treating it as success, or inventing a transition. The failure is a host
    one (a trap): a failure the guest decides is a Temper success (SandboxFailed)."""
    spec = parse_spec(
        legacy_text().replace(
            'on_failure = "Fail"\n\n[action.triggers.config]', "\n[action.triggers.config]", 1
        ),
        source="variant",
    )
    trap = failed(Failure(FailureCode.GUEST_TRAP, "unreachable", False))
    assert not trap.success
    executor, loop, _module, _ = harness(spec, [trap])
    entity = start(executor)
    run_until(loop, lambda: entity.in_flight == 0 and entity.invocations == 1)
    assert entity.status == "Provisioning" and entity.unhandled_failures == 1


def test_only_declared_params_reach_fields() -> None:
    """Temper rule (declared_params.rs). Bug caught: an undeclared param ("undeclared")
    written to the entity, or a spec whose SandboxReady does not declare sandbox_id
    passing the check while the sandbox id never reaches its field."""
    executor, loop, _module, _ = harness(packaged_spec(EXAMPLE), [ready()])
    entity = start(executor)
    run_until(loop, lambda: entity.status == "Thinking")
    assert entity.fields["sandbox_id"] == "sbx-1"
    assert "undeclared" not in entity.fields

    spec = variant('params = ["sandbox_url", "sandbox_id", ', 'params = ["sandbox_url", ')
    assert "declared-params" in rules(spec)
    executor, loop, _module, _ = harness(spec, [ready()])
    entity = start(executor)
    run_until(loop, lambda: entity.status == "Thinking")
    assert entity.fields["sandbox_id"] == ""


def test_entering_a_state_arms_only_its_first_timer() -> None:
    """Temper rule (arming.rs, tracker.rs): one timer per entity; entry arms the first
    declaration only. Bug caught: two timers on one state running side by side (a 3 s
    liveness beside a 10 s poll would fire at 3 s)."""
    spec = variant(
        '[[state_timeout]]\nstate = "Queued"\nafter_seconds = 2\non_timeout = "PollSandbox"',
        '[[state_timeout]]\nstate = "Queued"\nafter_seconds = 10\non_timeout = "PollSandbox"\n'
        'max_occurrences = 1000\n\n[[state_timeout]]\nstate = "Queued"\nafter_seconds = 3\n'
        'on_timeout = "Fail"\nargs = { error_message = "\'queued too long\'" }\n#',
    )
    assert "one-timer-per-entity" in rules(spec)
    executor, loop, module, _ = harness(spec, [QUEUED, ready()], latency_s=0.0)
    entity = start(executor)
    run_until(loop, lambda: entity.status == "Thinking")
    # Queued at 0 s; the 3 s timer never fired; the 10 s poll asked again at 10 s.
    provisions = [t for t, _, op in module.calls if op == "provision"]
    assert provisions == [0.0, 10.0]


def test_a_reset_rearms_only_on_a_self_loop_staying_in_the_state() -> None:
    """Temper rule (arming.rs): reset_on resets only on a self-loop that stays in the timed
    state. Bug caught: reset_on naming an action that leaves the state (SandboxReady)
    passing the check, or a heartbeat not pushing the liveness deadline out."""
    spec = variant('reset_on = ["Heartbeat"]', 'reset_on = ["Heartbeat", "SandboxReady"]')
    assert "reset-on-self-loop" in rules(spec)

    executor, loop, _module, _events = harness(packaged_spec(EXAMPLE), [ready()], latency_s=0.0)
    entity = start(executor)
    run_until(loop, lambda: entity.status == "Thinking")
    first = entity.timer_deadline
    assert first == 1800.0
    dispatch_at(loop, 600.0, executor, entity, "Heartbeat")
    run_until(loop, lambda: loop.now() >= 600.0)
    assert entity.timer_deadline == 2400.0  # re-armed from the heartbeat
    run_until(loop, lambda: entity.status == "Failed")
    # TimeoutFail at the re-armed deadline; its release is answered at once.
    assert entity.history[-2:] == [(2400.0, "Failing"), (2400.0, "Failed")]
    assert entity.fields["error_message"] == "no heartbeat for 30 minutes"  # the timer's args


def test_a_self_loop_not_in_reset_on_leaves_the_timer_alone() -> None:
    """Bug caught: any action re-arming the timer (then a busy entity never times out)."""
    spec = variant('reset_on = ["Heartbeat"]\nargs', "args")
    executor, loop, _module, _ = harness(spec, [ready()], latency_s=0.0)
    entity = start(executor)
    run_until(loop, lambda: entity.status == "Thinking")
    dispatch_at(loop, 600.0, executor, entity, "Heartbeat")
    run_until(loop, lambda: entity.status == "Failed")
    assert loop.now() == 1800.0 and entity.fields["turn_count"] == 1


@pytest.mark.parametrize(
    "poll",
    [
        # Re-armed by re-entry: PollSandbox leaves Queued, SandboxQueued enters it again.
        'on_timeout = "PollSandbox"\nmax_occurrences = 3',
        # Re-armed by reset_on: the poll stays in Queued and its answer resets the timer.
        'on_timeout = "WakeProvision"\nreset_on = ["SandboxQueued"]\nmax_occurrences = 3',
    ],
)
def test_a_re_armed_timer_fires_past_max_occurrences(poll: str) -> None:
    """Temper's timers never read max_occurrences (docs/temper-upstream.md): every entry
    and every reset_on arms a timer that fires. Bug caught: an executor that stops polling
    after max_occurrences fires, leaving a waiting entity queued with no timer where
    Temper would keep asking."""
    spec = variant('on_timeout = "PollSandbox"\nmax_occurrences = 1000', poll)
    executor, loop, module, _ = harness(spec, [QUEUED], latency_s=0.0)
    entity = start(executor)
    loop.call_at(21.0, lambda: None)  # look between two polls
    run_until(loop, lambda: loop.now() >= 21.0)
    assert entity.status == "Queued" and entity.timer is not None
    # Asked at 0 s, then every 2 s: ten polls by 21 s, past the budget of 3.
    assert [op for _, _, op in module.calls].count("provision") == 1 + 10


class ReleaseKeepsFailing(Scripted):
    """Answers every release with a retryable SandboxFailed, which Releasing drops."""

    def start(self, invocation: Invocation, done: Callable[[Outcome], None]) -> None:
        if answers.operation(invocation) != "release":
            super().start(invocation, done)
            return
        self.calls.append((self.loop.now(), invocation.entity_id, "release"))
        done(failed(Failure(FailureCode.STORAGE_UNAVAILABLE, "storage unavailable", True)))


def test_a_self_loop_retry_with_reset_on_keeps_firing_past_max_occurrences() -> None:
    """The example's Releasing: RetryRelease stays in Releasing and resets its own timer
    (reset_on), max_occurrences = 5. Temper re-arms it on every retry whatever the budget.
    Bug caught: the retry stopping after five fires (the simulator's old cap), which left
    the entity in Releasing with no timer where Temper keeps asking."""
    spec = packaged_spec(EXAMPLE)
    releasing = next(t for t in spec.timeouts if t.state == "Releasing")
    assert releasing.reset_on == ("RetryRelease",) and releasing.max_occurrences == 5
    loop = VirtualLoop(VirtualClock(START_MS), max_events=20_000)
    module = ReleaseKeepsFailing(loop, [ready()], latency_s=0.0)
    loop.modules = {"sandbox_provisioner": module}
    executor = Executor(spec, loop)
    entity = start(executor)
    run_until(loop, lambda: entity.status == "Thinking")
    dispatch_at(loop, 5.0, executor, entity, "RecordResult")
    loop.call_at(250.0, lambda: None)  # look between two retries
    run_until(loop, lambda: loop.now() >= 250.0)
    assert entity.status == "Releasing" and entity.timer is not None
    # Asked on entry at 5 s, then by each of the 8 retries, every 30 s: past 1 + 5.
    assert [op for _, _, op in module.calls].count("release") == 1 + 8


def test_a_queued_state_without_a_poll_timer_is_flagged_and_never_asks_again() -> None:
    """Temper has no wake-up. Bug caught: a spec whose Queued state has no timer (the
    entity waits for ever) passing the check."""
    text = example_text()
    start_at = text.index("# The poll.")
    end_at = text.index("# The guard:")
    spec = parse_spec(text[:start_at] + text[end_at:], source="no-poll")
    assert "poll-timer" in rules(spec)


def test_a_freed_permit_wakes_nobody_the_spec_timer_alone_polls() -> None:
    """Replaces the old driver's wake-up test: Temper never wakes a queued entity when a
    permit frees. Bug caught: a host-side wake-up (the second entity asking as soon as the
    first released, before its 30 s poll)."""
    spec = variant(
        'after_seconds = 2\non_timeout = "PollSandbox"',
        'after_seconds = 30\non_timeout = "PollSandbox"',
    )
    executor, loop, module, _ = harness(
        spec, [ready("sbx-1"), QUEUED, ready("sbx-2")], latency_s=0.5
    )
    first, second = start(executor, "job-1"), start(executor, "job-2")
    dispatch_at(loop, 5.0, executor, first, "RecordResult")
    run_until(loop, lambda: second.status == "Thinking")
    asks = [t for t, job, op in module.calls if job == "job-2" and op == "provision"]
    # Queued at 0.5 s; the first released at 5 s; the second asked again at 30.5 s only.
    assert asks == [0.0, 30.5]


def test_admission_holds_its_permit_across_the_ask_only() -> None:
    """Temper rule (admission.rs, ADR-0051): the permit covers the actor ask, not the WASM
    trigger. Bug caught: modelling [admission] max_concurrent_actions = {Provision = 1} as
    bounding concurrent creates (three provisions would then run one at a time)."""
    text = example_text().replace(
        "# --- state: the sandbox",
        '[admission]\nmax_concurrent_actions = { "Provision" = 1 }\n\n# --- state: the sandbox',
        1,
    )
    spec = parse_spec(text, source="admission")
    executor, loop, module, _ = harness(spec, [ready()], latency_s=5.0)
    entities = [start(executor, f"job-{i}") for i in range(3)]
    run_until(loop, lambda: all(e.status == "Thinking" for e in entities))
    assert module.max_in_flight == 3
    assert executor.admission.peak_held == 1
    assert loop.now() == 5.0


def test_an_answer_with_no_transition_is_rejected_and_changes_nothing() -> None:
    """Bug caught: a callback applied in a state its action is not enabled in. Also: the
    upstream spec (no SandboxQueued action) is flagged for the component's answers."""
    assert "answer-has-transition" in rules(packaged_spec("temper_agent_upstream.ioa.toml"))
    executor, _loop, _module, events = harness(packaged_spec(EXAMPLE), [ready()])
    entity = executor.create(Job("job-1", "t"))
    assert executor.dispatch(entity, "SandboxReady", {"sandbox_id": "x"}) is not None
    assert entity.status == "Created" and entity.fields["sandbox_id"] == ""
    assert [e.kind for e in events] == ["rejected"]


def test_a_release_into_a_state_without_a_timer_is_flagged() -> None:
    """Temper rule (arming.rs): nothing but a timer asks again. Bug caught: a way into
    Failed whose release is asked once (Failed final, no timer), so a release answered
    SandboxFailed (storage unavailable, a failed kill) leaves the permit held."""
    spec = variant(
        'from = ["Created", "Provisioning", "Queued", "Thinking"]\nto = "Failing"',
        'from = ["Created", "Provisioning", "Queued", "Thinking"]\nto = "Failed"',
    )
    findings = [f for f in check_spec(spec) if f.rule == "release-retried"]
    assert [f.where for f in findings] == ["action 'Fail' trigger 'release_sandbox'"]


def test_a_renamed_release_answer_must_be_declared_where_it_lands() -> None:
    """Bug caught: the contract reading a sandbox release's answer as SandboxReleased
    whatever its released_action says (the renamed answer's params never checked)."""
    spec = variant(
        'to = "Failed"\nparams = ["released", "sandbox_id"]',
        'to = "Failed"\nparams = ["released"]',
    )
    findings = [f for f in check_spec(spec) if f.rule == "declared-params"]
    assert findings and all(f.where == "action 'FailureReleased'" for f in findings)
