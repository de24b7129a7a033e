"""Sessions over the executor: what the agent side of a run does, on any loop.

The spec decides everything Temper decides (transitions, timers, triggers). The runner plays
the caller: it creates the entities, dispatches the start action (all at once, or in batches),
and once an entity reaches the spec's working state it dispatches a turn every `turn_s` and
then the finish action, as an agent reporting progress would. A session has ended when its
entity is in a final state with no invocation in flight.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from harness.simulator.executor import Entity, Executor
from harness.simulator.model import (
    COMPLETED,
    FAILED,
    INTERRUPTED,
    UNFINISHED,
    Job,
    SessionResult,
)
from harness.simulator.spec import Spec, StateTimeout


@dataclass(frozen=True)
class SessionScript:
    """How the caller drives one entity of a spec."""

    start_action: str = "Provision"
    start_params: tuple[tuple[str, Any], ...] = (("user_message", "Curate the styles"),)
    working_state: str = "Thinking"
    turn_action: str = "Heartbeat"
    finish_action: str = "RecordResult"
    completed_states: tuple[str, ...] = ("Completed",)
    failed_states: tuple[str, ...] = ("Failed", "Cancelled")
    # On the way into a failed state, releasing until the release is confirmed: the
    # session has failed on entering the first of them, and ends in a failed state.
    failing_states: tuple[str, ...] = ("Failing", "FailingRetried")
    queued_states: tuple[str, ...] = ("Queued",)
    # The actions counted as a queued answer in a result's queued_outcomes.
    queued_actions: tuple[str, ...] = ("SandboxQueued",)
    # False: the spec's own modules do the agent's work (an LLM caller answering each
    # turn), and the runner only submits and watches.
    caller_turns: bool = True

    @classmethod
    def for_spec(cls, spec: Spec) -> SessionScript:
        """The script of a packaged spec, by its entity type; the TemperAgent's otherwise."""
        return _SCRIPTS.get(spec.name) or cls()

    def check(self, spec: Spec) -> None:
        for name in (self.start_action, self.turn_action, self.finish_action):
            if spec.action(name) is None:
                raise ValueError(f"{spec.source}: the session script needs action {name!r}")
        if self.working_state not in spec.states:
            raise ValueError(f"{spec.source}: no state {self.working_state!r}")

    @property
    def final_states(self) -> tuple[str, ...]:
        return (*self.completed_states, *self.failed_states)

    @property
    def failure_states(self) -> tuple[str, ...]:
        """Every state of a session that has failed: failing or failed."""
        return (*self.failing_states, *self.failed_states)


@dataclass(frozen=True)
class FailureStart:
    """The transition that failed a session (into its first failing or failed state)."""

    action: str
    source: str | None
    before: str


# The packaged specs other than the TemperAgent's: both start with a bare Submit.
_SUBMITTED = SessionScript(start_action="Submit", start_params=())
_SCRIPTS = {
    "CurationJob": replace(
        _SUBMITTED, working_state="Running", turn_action="RecordProgress", finish_action="Complete"
    ),
    "LlmGatedAgent": replace(
        _SUBMITTED,
        working_state="CallingLlm",
        turn_action="LlmResponded",
        finish_action="LlmFinished",
        queued_states=("WaitingForSlot", "WaitingForLlm"),
        queued_actions=("SessionSlotQueued", "LlmPermitQueued"),
        caller_turns=False,
    ),
}


@dataclass(frozen=True)
class RunSettings:
    """Times in the loop's seconds (real or virtual)."""

    turns: int = 10
    turn_s: float = 0.5
    batch_size: int | None = None

    def __post_init__(self) -> None:
        if self.turns < 0 or self.turn_s < 0:
            raise ValueError("turns and turn_s must be >= 0")
        if self.batch_size is not None and self.batch_size < 1:
            raise ValueError("batch_size must be at least 1")


@dataclass
class RunResult:
    results: list[SessionResult]
    makespan_s: float
    interrupted: bool = False
    # Why the run stopped early, when the host could not keep up.
    overloaded: str | None = None
    host: dict[str, Any] = field(default_factory=dict)

    @property
    def completed(self) -> int:
        return sum(1 for r in self.results if r.completed)

    @property
    def failed(self) -> int:
        return sum(1 for r in self.results if r.failed)


def timer_scale(script: SessionScript, sim_per_real: float) -> Callable[[StateTimeout], float]:
    """Timers of the agent's working state run on the session's (scaled) clock; the others
    pace or guard calls to E2B, which runs in real time, and keep the spec's seconds."""

    def seconds(timeout: StateTimeout) -> float:
        if timeout.state == script.working_state:
            return timeout.after_seconds / sim_per_real
        return float(timeout.after_seconds)

    return seconds


class SessionRunner:
    """Plays the caller for every job; the executor plays Temper."""

    def __init__(
        self,
        executor: Executor,
        script: SessionScript,
        settings: RunSettings,
        call_later: Callable[[float, Callable[[], None]], object],
    ) -> None:
        script.check(executor.spec)
        self.executor = executor
        self.script = script
        self.settings = settings
        self._call_later = call_later
        self._order: list[str] = []
        self._next = 0
        self._submitted: dict[str, float] = {}
        self._ready: dict[str, float] = {}
        self._finished: dict[str, float] = {}
        self._turns: dict[str, int] = {}
        self._queued: dict[str, int] = {}
        self._failures: dict[str, FailureStart] = {}
        self.last_finish = 0.0
        # Jobs not yet ended, so `done` costs nothing per event.
        self._pending: set[str] = set()
        executor.on_transition(self._transition)
        executor.on_settled(self._maybe_ended)

    # -- the run ---------------------------------------------------------------------

    def start(self, jobs: Sequence[Job]) -> None:
        if len({job.id for job in jobs}) != len(jobs):
            raise ValueError("job ids must be unique")
        for job in jobs:
            self.executor.create(job)
        self._order = [job.id for job in jobs]
        self._pending = set(self._order)
        self._submit_batch()

    def done(self) -> bool:
        return self._next >= len(self._order) and not self._pending

    def _maybe_ended(self, entity: Entity) -> None:
        if entity.job.id in self._pending and self._ended(entity):
            self._pending.discard(entity.job.id)

    def results(self, *, interrupted: bool = False) -> list[SessionResult]:
        return [self._result(self.executor.entities[job_id], interrupted) for job_id in self._order]

    # -- the caller's side -----------------------------------------------------------

    def _submit_batch(self) -> None:
        size = self.settings.batch_size or len(self._order)
        batch = self._order[self._next : self._next + size]
        self._next += len(batch)
        for job_id in batch:
            entity = self.executor.entities[job_id]
            self._submitted[job_id] = self.executor.loop.now()
            self.executor.emit(entity, "submitted")
            self.executor.dispatch(entity, self.script.start_action, dict(self.script.start_params))

    def _ended(self, entity: Entity) -> bool:
        return entity.status in self.script.final_states and entity.in_flight == 0

    def _transition(self, entity: Entity, action: str, before: str, after: str) -> None:
        job_id = entity.job.id
        now = self.executor.loop.now()
        if action in self.script.queued_actions:
            self._queued[job_id] = self._queued.get(job_id, 0) + 1
        if after == self.script.working_state and before != after and not self.script.caller_turns:
            self._ready.setdefault(job_id, now)
        elif after == self.script.working_state and before != after:
            self._ready.setdefault(job_id, now)
            self._turns[job_id] = 0
            self._schedule_turn(entity)
        failure = self.script.failure_states
        if after in failure and before not in failure:
            self._failures[job_id] = FailureStart(action, entity.last_source, before)
        if after in self.script.final_states and before not in self.script.final_states:
            self._finished[job_id] = now
            self.last_finish = max(self.last_finish, now)
            self._maybe_next_batch()

    def _maybe_next_batch(self) -> None:
        if self._next < len(self._order) and all(
            self.executor.entities[j].status in self.script.final_states
            for j in self._order[: self._next]
        ):
            self._submit_batch()

    def _schedule_turn(self, entity: Entity) -> None:
        self._call_later(self.settings.turn_s, lambda: self._turn(entity))

    def _turn(self, entity: Entity) -> None:
        if entity.status != self.script.working_state:
            return  # it failed (liveness) or ended meanwhile
        job_id = entity.job.id
        if self._turns[job_id] >= self.settings.turns:
            self.executor.dispatch(entity, self.script.finish_action)
            return
        self._turns[job_id] += 1
        self.executor.emit(entity, "turn", turn=self._turns[job_id], of=self.settings.turns)
        self.executor.dispatch(entity, self.script.turn_action)
        self._schedule_turn(entity)

    # -- results ---------------------------------------------------------------------

    def failure_start(self, entity: Entity) -> FailureStart:
        """What failed the session (its last transition, for a spec without failing
        states or a session that did not fail)."""
        recorded = self._failures.get(entity.job.id)
        if recorded is not None:
            return recorded
        before = entity.history[-2][1] if len(entity.history) >= 2 else ""
        return FailureStart(entity.last_action or "?", entity.last_source, before)

    def _result(self, entity: Entity, interrupted: bool) -> SessionResult:
        job_id = entity.job.id
        script = self.script
        if entity.status in script.completed_states:
            outcome = COMPLETED
        elif entity.status in script.failed_states:
            outcome = FAILED
        else:
            outcome = INTERRUPTED if interrupted else UNFINISHED
        submitted = self._submitted.get(job_id)
        ready = self._ready.get(job_id)
        finished = self._finished.get(job_id)
        waited = None
        if submitted is not None:
            end = ready if ready is not None else finished
            if end is not None:
                waited = round((end - submitted) * 1000)
        reason = None
        start = self.failure_start(entity)
        if outcome == FAILED:
            reason = _failure_reason(entity, start.action)
        elif outcome != COMPLETED:
            reason = f"{outcome} in {entity.status}"
        killed_by_timer = outcome == FAILED and start.source == "timer"
        sandbox = entity.fields.get("sandbox_id") if ready is not None else None
        return SessionResult(
            job=entity.job,
            state=entity.status,
            outcome=outcome,
            reason=reason,
            sandbox_id=str(sandbox) if sandbox else None,
            turns=self._turns.get(job_id, 0),
            waited_ms=waited,
            invocations=entity.invocations,
            queued_outcomes=self._queued.get(job_id, 0),
            submitted_at_s=submitted,
            ready_at_s=ready,
            finished_at_s=finished,
            killed_by_timer=killed_by_timer,
            killed_while_queued=killed_by_timer and start.before in script.queued_states,
            history=list(entity.history),
        )


def _failure_reason(entity: Entity, action: str) -> str:
    fields: Mapping[str, Any] = entity.fields
    detail = fields.get("code") or fields.get("error_message") or ""
    if fields.get("code") and fields.get("message"):
        detail = f"{fields['code']}: {fields['message']}"
    return f"{action}: {detail}" if detail else action
