"""Issue 15, acceptance 4: in examples/llm_gated_agent.ioa.toml a waiting session's
queued answer (LlmPermitQueued, the component's ResourceQueued) resets its state's timer,
under the Temper rules the session executor implements (harness/simulator/executor.py), in
virtual time.

The LLM gate is closed for five minutes: the provider's first answer is a 529 with
`retry-after: 300`, which the settle turns into the account's cooldown, so every acquire
meanwhile answers LlmPermitQueued (reason backoff). WaitingForLlm has one timer, the 2 s
poll (one active timer per entity: arming.rs, tracker.rs). The poll's own action does not
re-arm it; only the queued answer, a self-loop named in reset_on, does. With the reset the
session polls through the whole cooldown and completes; without it (the control) the timer
is gone after the first poll, nothing asks the component again, and the session is lost.
"""

from __future__ import annotations

from itertools import pairwise

from harness.mocks.llm.config import MockLLMConfig
from harness.simulator.executor import Entity, Executor
from harness.simulator.llm_sessions import SPEC_NAME, LlmRun, LlmScenario, run_gated
from harness.simulator.spec import Spec, packaged_spec

COOLDOWN_S = 300
POLL_S = 2
SCENARIO = LlmScenario(jobs=1, turns=2, latency_s=1.0)


def closed_gate_provider() -> MockLLMConfig:
    """Tier 1, whose first request is answered 529 with retry-after: 300."""
    return SCENARIO.mock_config().replace(
        overload_first=1, overload_last=1, overload_retry_after_s=float(COOLDOWN_S)
    )


def without_reset(spec: Spec) -> Spec:
    timeouts = tuple(
        t.model_copy(update={"reset_on": ()}) if t.state == "WaitingForLlm" else t
        for t in spec.timeouts
    )
    return spec.model_copy(update={"timeouts": timeouts})


class TimerWatch:
    """After each LlmPermitQueued: whether the entity's one timer is armed, and when."""

    def __init__(self) -> None:
        self.rearmed: list[tuple[float, float | None]] = []
        self.executor: Executor | None = None

    def __call__(self, executor: Executor) -> None:
        self.executor = executor
        executor.on_transition(self._transition)

    def _transition(self, entity: Entity, action: str, before: str, after: str) -> None:
        if action == "LlmPermitQueued":
            assert self.executor is not None
            self.rearmed.append((self.executor.loop.now(), entity.timer_deadline))


def waited_in(run: LlmRun, state: str) -> float:
    assert run.run is not None
    history = run.run.results[0].history
    total = 0.0
    for (at, status), (left, _next) in pairwise(history):
        if status == state:
            total += left - at
    return total


def test_the_spec_declares_one_poll_timer_on_the_llm_gate_reset_by_the_queued_answer() -> None:
    """The precondition of the test below: the timer the reset keeps alive is the spec's."""
    spec = packaged_spec(SPEC_NAME)
    (timer,) = spec.timeouts_of("WaitingForLlm")
    assert timer.after_seconds == POLL_S
    assert timer.on_timeout == "PollLlmPermit"
    assert timer.reset_on == ("LlmPermitQueued",)
    queued = spec.action("LlmPermitQueued")
    assert queued is not None and queued.target("WaitingForLlm") == "WaitingForLlm"


def test_queued_answers_keep_a_session_alive_through_a_long_closed_gate() -> None:
    """Bug caught: a queued answer that does not re-arm the waiting state's timer (a
    spec without the reset, or an executor that re-arms only on entry): the session would
    stop asking after one poll and never get its permit."""
    watch = TimerWatch()
    run = run_gated(SCENARIO, provider=closed_gate_provider(), observe=watch)
    assert run.run is not None
    (result,) = run.run.results
    assert result.completed, result.reason
    assert run.provider.stats().overloaded == 1
    # It waited the whole cooldown at the gate: 150 times the poll timer's 2 s.
    assert waited_in(run, "WaitingForLlm") >= COOLDOWN_S
    # Every queued answer re-armed the one timer, a poll interval ahead.
    assert len(watch.rearmed) >= COOLDOWN_S // POLL_S
    assert all(deadline == at + POLL_S for at, deadline in watch.rearmed)
    assert run.provider.stats().messages_ok == SCENARIO.turns


def test_control_without_the_reset_the_waiting_session_is_lost() -> None:
    """The control: the same closed gate with reset_on removed from WaitingForLlm's timer.
    The poll fires once, its answer re-arms nothing, and the session is never asked
    about again: it ends the run stranded in WaitingForLlm, with no timer."""
    spec = without_reset(packaged_spec(SPEC_NAME))
    watch = TimerWatch()
    run = run_gated(SCENARIO, spec, provider=closed_gate_provider(), observe=watch, check=False)
    assert run.run is not None
    (result,) = run.run.results
    assert not result.completed
    assert result.state == "WaitingForLlm"
    assert run.completed == 0
    assert watch.executor is not None
    entity = next(iter(watch.executor.entities.values()))
    assert entity.timer is None
    # The settle's acquire was answered queued with the timer entry armed; the one poll's
    # answer found no timer and armed none.
    (first_at, first_deadline), (poll_at, poll_deadline) = watch.rearmed
    assert first_deadline == first_at + POLL_S
    assert poll_at == first_deadline and poll_deadline is None
    assert run.provider.stats().messages_ok == 0
