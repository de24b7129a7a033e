"""Runs CurationJob sessions the way the Temper runtime would, many at once.

One scheduler thread (the caller's) owns every session and a timer heap; invocations run on
a bounded thread pool and post their outcomes back, so session state is only ever touched
by the scheduler and needs no lock. Each session:

    Submit -> Provisioning --SandboxQueued--> Queued --retry_after_ms--> Provisioning ...
           --SandboxReady--> Running (a turn every turn_s, each RecordProgress)
           --last turn--> Releasing --SandboxReleased--> Completed

A liveness timer, reset by RecordProgress and by SandboxQueued (the spec's `reset_on`),
fails a session that shows no sign of life; a failed session is released too, so nothing
it may hold is left behind. An outcome the spec has no transition for changes nothing:
the session waits silently, which is what the old provisioner's failures did.

When a permit frees (a create returned, a sandbox was released) the queued sessions
nearest the head are woken at once rather than left to sleep out their retry_after_ms;
the component still decides who is granted.
"""

from __future__ import annotations

import heapq
import itertools
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Protocol

from host.sessions.invocations import PROVISION, RELEASE, job_invocation
from host.sessions.model import (
    INTERRUPTED,
    LIVENESS_TIMEOUT,
    Job,
    Phase,
    SessionEvent,
    SessionResult,
)
from provisioner.failures import FailureCode
from provisioner.model import (
    SANDBOX_FAILED,
    SANDBOX_QUEUED,
    SANDBOX_READY,
    SANDBOX_RELEASED,
    Failure,
    Invocation,
    Outcome,
    failed,
)


class Invoker(Protocol):
    """Runs one integration invocation; called from many threads at once."""

    def invoke(self, invocation: Invocation) -> Outcome: ...


@dataclass(frozen=True)
class DriverSettings:
    """Times are real seconds (scale simulated ones with TimeScale first)."""

    turns: int = 10
    turn_s: float = 0.5
    liveness_s: float = 3.0
    # Submit this many jobs at a time, the next batch when the last of the previous ends.
    batch_size: int | None = None
    failure_retries: int = 2
    failure_retry_delay_s: float = 0.5
    release_attempts: int = 3
    workers: int = 16
    # Queued sessions woken per freed permit (0: only retry_after_ms wakes them).
    wake_per_permit: int = 1
    config: tuple[tuple[str, str], ...] = ()
    run_id: str = "sim"

    def __post_init__(self) -> None:
        if self.turns < 0 or self.turn_s < 0 or self.liveness_s <= 0 or self.workers < 1:
            raise ValueError("turns, turn_s >= 0; liveness_s > 0; workers >= 1")
        if self.batch_size is not None and self.batch_size < 1:
            raise ValueError("batch_size must be at least 1")


@dataclass
class RunResult:
    results: list[SessionResult]
    makespan_s: float
    interrupted: bool = False

    @property
    def completed(self) -> int:
        return sum(1 for r in self.results if r.state is Phase.COMPLETED)

    @property
    def failed(self) -> int:
        return sum(1 for r in self.results if r.state is Phase.FAILED)


class _Timer(Enum):
    SUBMIT = "submit"
    POLL = "poll"
    TURN = "turn"
    RELEASE = "release"
    LIVENESS = "liveness"


@dataclass
class _Session:
    result: SessionResult
    phase: Phase = Phase.PENDING
    # Bumped to cancel the pending POLL/TURN/RELEASE timer (a wake, a failure).
    token: int = 0
    calls: int = 0
    provision_call: int | None = None
    release_call: int | None = None
    liveness_deadline: float = 0.0
    liveness_armed: bool = False
    queued_since: float = 0.0
    # Sandboxes handed out (run-wide) when the last position was reported: positions only
    # move forward, by about one per grant, so this dates the position.
    grants_at_position: int = 0
    # How many wake-ups led to the provision in flight (0: its own timer).
    wake_depth: int = 0
    release_attempts: int = 0
    # True while a release runs (or will) only to clean up after a failure.
    cleaning: bool = False
    ever_invoked: bool = False

    @property
    def job(self) -> Job:
        return self.result.job


@dataclass(frozen=True)
class _Done:
    job_id: str
    call: int
    operation: str
    outcome: Outcome


@dataclass(frozen=True)
class _Alive:
    """A progress event from the component, about one session."""

    job_id: str


@dataclass(order=True)
class _Entry:
    due: float
    seq: int
    kind: _Timer = field(compare=False)
    job_id: str = field(compare=False)
    token: int = field(compare=False)


EventSink = Callable[[SessionEvent], None]


class SessionDriver:
    def __init__(
        self,
        invoker: Invoker,
        settings: DriverSettings | None = None,
        *,
        on_event: EventSink | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.invoker = invoker
        self.settings = settings or DriverSettings()
        self._on_event = on_event
        self._clock = clock
        self._pool = ThreadPoolExecutor(self.settings.workers, thread_name_prefix="session-invoke")
        self._cond = threading.Condition()
        self._inbox: deque[_Done | _Alive] = deque()
        self._stopping = False
        self._heap: list[_Entry] = []
        self._seq = itertools.count()
        self._sessions: dict[str, _Session] = {}
        self._order: list[str] = []
        self._next_batch = 0
        self._open_calls = 0
        self._grants = 0
        self._started = 0.0
        self._last_finish = 0.0

    # -- public ------------------------------------------------------------------------

    def run(self, jobs: Sequence[Job]) -> RunResult:
        """Runs every job to Completed or Failed; returns when all are done and released.
        Raises whatever interrupts it (KeyboardInterrupt) after cancelling queued calls."""
        if self._sessions:
            raise RuntimeError("a SessionDriver runs once; make a new one")
        if len({job.id for job in jobs}) != len(jobs):
            raise ValueError("job ids must be unique")
        self._sessions = {job.id: _Session(SessionResult(job)) for job in jobs}
        self._order = [job.id for job in jobs]
        self._started = self._clock()
        self._last_finish = self._started
        interrupted = False
        try:
            self._submit_next_batch()
            interrupted = self._loop()
        finally:
            self._pool.shutdown(wait=False, cancel_futures=True)
        if interrupted:
            self._fail_unfinished(INTERRUPTED)
        return RunResult(
            results=[self._sessions[job_id].result for job_id in self._order],
            makespan_s=self._last_finish - self._started,
            interrupted=interrupted,
        )

    def stop(self) -> None:
        """Asks a running `run` to return soon (from any thread)."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()

    def sign_of_life(self, job_id: str) -> None:
        """The component reported progress for `job_id` (from any thread): like
        RecordProgress, it resets the session's liveness timer."""
        with self._cond:
            self._inbox.append(_Alive(job_id))
            self._cond.notify_all()

    def close(self) -> None:
        """Waits for invocations still running (call after the E2B they wait on is gone)."""
        self._pool.shutdown(wait=True, cancel_futures=True)

    # -- the loop ----------------------------------------------------------------------

    def _now(self) -> float:
        return self._clock() - self._started

    def _loop(self) -> bool:
        while True:
            with self._cond:
                if self._stopping:
                    return True
                if not self._inbox:
                    if self._all_done():
                        return False
                    timeout = None
                    if self._heap:
                        timeout = max(0.0, self._heap[0].due - self._now())
                    if timeout is None or timeout > 0:
                        self._cond.wait(timeout)
                done = list(self._inbox)
                self._inbox.clear()
            for item in done:
                if isinstance(item, _Alive):
                    self._on_alive(item.job_id)
                else:
                    self._open_calls -= 1
                    self._on_done(item)
            self._fire_due()

    def _all_done(self) -> bool:
        return self._open_calls == 0 and all(
            s.phase.terminal and not s.cleaning for s in self._sessions.values()
        )

    def _has_pending_batches(self) -> bool:
        return self._next_batch < len(self._order)

    def _fire_due(self) -> None:
        now = self._now()
        while self._heap and self._heap[0].due <= now:
            entry = heapq.heappop(self._heap)
            session = self._sessions[entry.job_id]
            if entry.kind is _Timer.LIVENESS:
                self._check_liveness(session)
            elif entry.token == session.token:
                if entry.kind is _Timer.SUBMIT:
                    self._submit(session)
                elif entry.kind is _Timer.POLL:
                    self._provision(session)
                elif entry.kind is _Timer.TURN:
                    self._turn(session)
                elif entry.kind is _Timer.RELEASE:
                    self._release(session)

    def _schedule(self, session: _Session, kind: _Timer, delay_s: float) -> None:
        entry = _Entry(self._now() + max(0.0, delay_s), next(self._seq), kind, session.job.id,
                       session.token)
        heapq.heappush(self._heap, entry)

    def _emit(self, session: _Session, kind: str, **detail: Any) -> None:
        if self._on_event is not None:
            self._on_event(SessionEvent(self._now(), session.job, kind, session.phase, detail))

    # -- invoking ----------------------------------------------------------------------

    def _invoke(self, session: _Session, operation: str, trigger_action: str) -> int:
        session.calls += 1
        session.ever_invoked = True
        session.result.invocations += 1
        call = session.calls
        result = session.result
        invocation = job_invocation(
            session.job,
            operation=operation,
            trigger_action=trigger_action,
            trigger_params={"call": call},
            entity_state={
                "status": str(session.phase),
                "turns": result.turns,
                "sandbox_id": result.sandbox_id,
            },
            config=self.settings.config,
            run_id=self.settings.run_id,
        )
        self._open_calls += 1
        try:
            self._pool.submit(self._work, session.job.id, call, operation, invocation)
        except RuntimeError:  # the pool is shutting down: the run is being interrupted
            self._open_calls -= 1
        return call

    def _work(self, job_id: str, call: int, operation: str, invocation: Invocation) -> None:
        try:
            outcome = self.invoker.invoke(invocation)
        except Exception as error:  # an invoker bug must not wedge the session
            outcome = failed(
                Failure(
                    FailureCode.HOST_ERROR, f"{type(error).__name__}: {error}"[:300], retryable=True
                )
            )
        with self._cond:
            self._inbox.append(_Done(job_id, call, operation, outcome))
            self._cond.notify_all()

    def _on_alive(self, job_id: str) -> None:
        session = self._sessions.get(job_id)
        if session is not None and session.phase in (Phase.PROVISIONING, Phase.QUEUED):
            self._progress(session)

    def _on_done(self, done: _Done) -> None:
        session = self._sessions[done.job_id]
        if done.operation == RELEASE:
            if done.call == session.release_call:
                session.release_call = None
                self._on_released(session, done.outcome)
            return
        if done.call != session.provision_call:
            return
        session.provision_call = None
        if session.phase.terminal:
            self._on_late_provision(session, done.outcome)
            return
        self._on_provisioned(session, done.outcome)

    # -- transitions -------------------------------------------------------------------

    def _submit_next_batch(self) -> None:
        size = self.settings.batch_size or len(self._order)
        batch = self._order[self._next_batch : self._next_batch + size]
        self._next_batch += len(batch)
        for job_id in batch:
            self._schedule(self._sessions[job_id], _Timer.SUBMIT, 0.0)

    def _submit(self, session: _Session) -> None:
        session.phase = Phase.PROVISIONING
        session.result.state = Phase.PROVISIONING
        session.result.submitted_at_s = self._now()
        self._emit(session, "submitted")
        self._progress(session)
        self._provision(session, trigger_action="Submit")

    def _provision(
        self, session: _Session, trigger_action: str = "Provision", wake_depth: int = 0
    ) -> None:
        session.token += 1
        session.wake_depth = wake_depth
        session.phase = Phase.PROVISIONING
        session.provision_call = self._invoke(session, PROVISION, trigger_action)

    def _progress(self, session: _Session) -> None:
        """A sign of life: the liveness timer starts over."""
        session.liveness_deadline = self._now() + self.settings.liveness_s
        if not session.liveness_armed:
            session.liveness_armed = True
            self._schedule(session, _Timer.LIVENESS, self.settings.liveness_s)

    def _check_liveness(self, session: _Session) -> None:
        session.liveness_armed = False
        if session.phase not in (Phase.PROVISIONING, Phase.QUEUED, Phase.RUNNING):
            return
        left = session.liveness_deadline - self._now()
        if left > 0:
            session.liveness_armed = True
            self._schedule(session, _Timer.LIVENESS, left)
            return
        session.result.killed_while_queued = session.phase is Phase.QUEUED
        self._fail(session, LIVENESS_TIMEOUT)

    def _on_provisioned(self, session: _Session, outcome: Outcome) -> None:
        result = session.result
        if outcome.action == SANDBOX_READY:
            now = self._now()
            session.phase = Phase.RUNNING
            result.state = Phase.RUNNING
            result.sandbox_id = str(outcome.params.get("sandbox_id") or "") or None
            result.ready_at_s = now
            result.waited_ms = round((now - (result.submitted_at_s or 0.0)) * 1000)
            self._grants += 1
            self._progress(session)
            self._emit(session, "ready", sandbox_id=result.sandbox_id, waited_ms=result.waited_ms)
            self._wake_queued(self.settings.wake_per_permit)
            if self.settings.turns == 0:
                self._finish_session(session)
            else:
                self._schedule(session, _Timer.TURN, self.settings.turn_s)
        elif outcome.action == SANDBOX_QUEUED:
            session.phase = Phase.QUEUED
            result.state = Phase.QUEUED
            result.queued_outcomes += 1
            if result.last_queue is None:
                session.queued_since = self._now()
            previous = result.last_queue
            result.last_queue = dict(outcome.params)
            session.grants_at_position = self._grants
            self._progress(session)
            if previous is None or _queue_line(previous) != _queue_line(outcome.params):
                self._emit(session, "queued", **outcome.params)
            retry_ms = _int(outcome.params.get("retry_after_ms"), 1000)
            self._schedule(session, _Timer.POLL, retry_ms / 1000)
            if session.wake_depth and _permit_free(outcome.params):
                # Woken for a permit that someone nearer the head should take: pass it on.
                self._wake_queued(1, depth=session.wake_depth + 1, skip=session)
        elif outcome.action == SANDBOX_FAILED:
            failure = outcome.error or Failure("unknown", "SandboxFailed", retryable=False)
            self._wake_queued(self.settings.wake_per_permit)
            if failure.retryable and result.failure_retries < self.settings.failure_retries:
                result.failure_retries += 1
                session.phase = Phase.QUEUED
                self._emit(session, "retry", code=failure.code, message=failure.message)
                self._schedule(session, _Timer.POLL, self.settings.failure_retry_delay_s)
            else:
                self._fail(session, f"{failure.code}: {failure.message}")
        else:
            # No transition for it in the spec: nothing happens, and nobody is told.
            self._emit(session, "ignored", action=outcome.action,
                       error=None if outcome.error is None else outcome.error.message)

    def _on_late_provision(self, session: _Session, outcome: Outcome) -> None:
        """A provision that finished after its session failed: release what it made."""
        sandbox_id = outcome.params.get("sandbox_id") if outcome.action == SANDBOX_READY else None
        if sandbox_id:
            session.result.sandbox_id = str(sandbox_id)
            self._emit(session, "late_sandbox", sandbox_id=sandbox_id)
            self._start_cleanup(session)

    def _turn(self, session: _Session) -> None:
        result = session.result
        result.turns += 1
        self._progress(session)
        self._emit(session, "turn", turn=result.turns, of=self.settings.turns)
        if result.turns >= self.settings.turns:
            self._finish_session(session)
        else:
            self._schedule(session, _Timer.TURN, self.settings.turn_s)

    def _finish_session(self, session: _Session) -> None:
        session.token += 1
        session.phase = Phase.RELEASING
        session.result.state = Phase.RELEASING
        self._release(session)

    def _release(self, session: _Session) -> None:
        session.release_attempts += 1
        session.release_call = self._invoke(session, RELEASE, "Release")

    def _start_cleanup(self, session: _Session) -> None:
        if session.release_call is None:
            session.cleaning = True
            session.release_attempts = 0
            self._release(session)

    def _on_released(self, session: _Session, outcome: Outcome) -> None:
        if outcome.action != SANDBOX_RELEASED:
            failure = outcome.error or Failure("unknown", outcome.action, retryable=False)
            if failure.retryable and session.release_attempts < self.settings.release_attempts:
                self._schedule(session, _Timer.RELEASE, self.settings.failure_retry_delay_s)
                return
            session.result.release_error = f"{failure.code}: {failure.message}"
        self._wake_queued(self.settings.wake_per_permit)
        if session.cleaning:
            session.cleaning = False
            self._emit(session, "cleaned", error=session.result.release_error)
            return
        self._set_terminal(session, Phase.COMPLETED, None)
        self._emit(session, "completed", turns=session.result.turns,
                   release_error=session.result.release_error)

    def _fail(self, session: _Session, reason: str) -> None:
        self._set_terminal(session, Phase.FAILED, reason)
        result = session.result
        if result.waited_ms is None and result.submitted_at_s is not None:
            result.waited_ms = round((self._now() - result.submitted_at_s) * 1000)
        self._emit(session, "failed", reason=reason, queued=result.killed_while_queued)
        if session.ever_invoked:
            self._start_cleanup(session)

    def _set_terminal(self, session: _Session, phase: Phase, reason: str | None) -> None:
        session.token += 1
        session.phase = phase
        result = session.result
        result.state = phase
        result.reason = reason
        result.finished_at_s = self._now()
        self._last_finish = self._clock()
        if self._has_pending_batches() and all(
            self._sessions[job_id].phase.terminal for job_id in self._order[: self._next_batch]
        ):
            self._submit_next_batch()

    def _wake_queued(self, count: int, depth: int = 1, skip: _Session | None = None) -> None:
        """Invokes the `count` queued sessions likely nearest the head now."""
        if count <= 0 or depth > _MAX_WAKE_DEPTH:
            return
        waiting = [
            s
            for s in self._sessions.values()
            if s.phase is Phase.QUEUED and s.provision_call is None and s.result.last_queue
            and s is not skip
        ]
        waiting.sort(key=lambda s: (self._estimated_position(s), s.queued_since))
        for session in waiting[:count]:
            self._provision(session, wake_depth=depth)

    def _estimated_position(self, session: _Session) -> int:
        reported = _int((session.result.last_queue or {}).get("position"), 1 << 30)
        return max(1, reported - (self._grants - session.grants_at_position))

    def _fail_unfinished(self, reason: str) -> None:
        for session in self._sessions.values():
            if not session.phase.terminal:
                session.phase = Phase.FAILED
                session.result.state = Phase.FAILED
                session.result.reason = reason


# A freed permit is passed on at most this many times before timers take over again.
_MAX_WAKE_DEPTH = 4


def _permit_free(params: dict[str, Any]) -> bool:
    """Whether a SandboxQueued answer says the gate holding it has room."""
    in_use, limit = params.get("in_use"), params.get("limit")
    if params.get("reason") not in ("create_slots", "capacity"):
        return False
    return isinstance(in_use, int) and isinstance(limit, int) and in_use < limit


def _int(value: object, default: int) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else default


def _queue_line(params: dict[str, Any]) -> tuple[object, ...]:
    return (params.get("position"), params.get("queue_length"), params.get("reason"))
