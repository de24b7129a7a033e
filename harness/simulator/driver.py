"""The real-time driver: the executor on the wall clock, invocations on a thread pool.

One scheduler thread (the caller's) owns every entity and a timer heap; invocations run on a
bounded thread pool and post their outcomes back, so entity state is only ever touched by
the scheduler thread and needs no lock. The rules are the executor's (`executor.py`).

It also watches whether the host keeps up with what the sessions ask: every
invocation is stamped when it is due and when a worker starts it, every timer when it should
fire and when it does. When either lags by more than a quarter of the shortest liveness
guard it could trip, the run stops with `RunResult.overloaded` naming the figures, rather
than letting the guard kill sessions that Temper, keeping up, would not kill.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Protocol, TypeVar

from harness.simulator.executor import (
    ConfigHook,
    EventSink,
    Executor,
    ExternalAccess,
    Secrets,
    TimerScale,
    no_such_module,
)
from harness.simulator.model import Job
from harness.simulator.runner import RunResult, RunSettings, SessionRunner, SessionScript
from harness.simulator.spec import Spec
from harness.simulator.temper_api import TemperApiServer
from harness.simulator.timers import Timer, TimerHeap
from provisioner.failures import FailureCode
from provisioner.model import Failure, Invocation, Outcome, failed

T = TypeVar("T")


class Invoker(Protocol):
    """Runs one integration invocation; called from many threads at once."""

    def invoke(self, invocation: Invocation) -> Outcome: ...


@dataclass(frozen=True)
class KeepUpLimits:
    """Lags (real seconds) past which the run stops: a quarter of the liveness guards an
    invocation's or a timer's lateness could trip."""

    invocation_lag_s: float
    timer_lag_s: float
    invocation_guard: str = ""
    timer_guard: str = ""


@dataclass
class HostLoad:
    """What the host was asked and what it served, for the report and the overload message."""

    due: int = 0
    served: int = 0
    max_invocation_lag_s: float = 0.0
    max_timer_lag_s: float = 0.0
    # (due_at, started_at) of recent invocations, to state a rate when stopping.
    recent: deque[tuple[float, float]] = field(default_factory=lambda: deque(maxlen=2000))

    def figures(self, elapsed_s: float) -> dict[str, float | int]:
        return {
            "invocations_due": self.due,
            "invocations_served": self.served,
            "served_per_s": round(self.served / elapsed_s, 1) if elapsed_s > 0 else 0.0,
            "max_invocation_lag_s": round(self.max_invocation_lag_s, 3),
            "max_timer_lag_s": round(self.max_timer_lag_s, 3),
        }


class RealTimeLoop:
    """A `Loop` on the wall clock (seconds since `start`), invocations on a thread pool."""

    def __init__(
        self,
        modules: Mapping[str, Invoker],
        *,
        workers: int = 16,
        clock: Callable[[], float] = time.monotonic,
        limits: KeepUpLimits | None = None,
    ) -> None:
        if workers < 1:
            raise ValueError("workers must be at least 1")
        self._modules = dict(modules)
        self._clock = clock
        self._started = clock()
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="session-invoke")
        self._cond = threading.Condition()
        self._inbox: deque[tuple[Callable[[Outcome], None], Outcome]] = deque()
        # Calls from other threads (the Temper API endpoint), run on the loop's thread.
        self._calls: deque[Callable[[], None]] = deque()
        self._timers = TimerHeap()
        self._open = 0
        self._stopping = False
        self.limits = limits
        self.load = HostLoad()
        self.overloaded: str | None = None

    def now(self) -> float:
        return self._clock() - self._started

    def restart_clock(self) -> None:
        """Time 0 is now: a run's times count from its jobs' submission, not from when
        the loop (and any server started after it) was set up. Before any timer."""
        if self._timers.next_due() is not None or self._open:
            raise RuntimeError("the clock restarts only before anything is scheduled")
        self._started = self._clock()

    def call_at(self, when: float, callback: Callable[[], None]) -> Timer:
        return self._timers.arm(when, callback)

    def call_later(self, delay: float, callback: Callable[[], None]) -> Timer:
        return self.call_at(self.now() + max(0.0, delay), callback)

    def invoke(self, module: str, invocation: Invocation, done: Callable[[Outcome], None]) -> None:
        invoker = self._modules.get(module)
        self._open += 1
        self.load.due += 1
        due = self.now()
        if invoker is None:
            outcome = no_such_module(module)
            with self._cond:
                self._inbox.append((done, outcome))
            return
        try:
            self._pool.submit(self._work, invoker, invocation, done, due)
        except RuntimeError:  # the pool is shutting down: the run is being interrupted
            self._open -= 1

    def _work(
        self,
        invoker: Invoker,
        invocation: Invocation,
        done: Callable[[Outcome], None],
        due: float,
    ) -> None:
        started = self.now()
        lag = started - due
        with self._cond:
            self.load.served += 1
            self.load.recent.append((due, started))
            self.load.max_invocation_lag_s = max(self.load.max_invocation_lag_s, lag)
            limits = self.limits
            if limits is not None and lag > limits.invocation_lag_s and self.overloaded is None:
                self.overloaded = self._overload_message(
                    f"an invocation waited {lag:.1f}s for a worker",
                    limits.invocation_lag_s,
                    limits.invocation_guard,
                )
                self._stopping = True
                self._cond.notify_all()
        try:
            outcome = invoker.invoke(invocation)
        except Exception as error:  # an invoker bug must not wedge the session
            message = f"{type(error).__name__}: {error}"[:300]
            outcome = failed(Failure(FailureCode.HOST_ERROR, message, retryable=True))
        with self._cond:
            self._inbox.append((done, outcome))
            self._cond.notify_all()

    def _overload_message(self, what: str, limit: float, guard: str) -> str:
        now = self.now()
        window = [(d, s) for d, s in self.load.recent if now - d <= 10.0]
        span = max(1e-9, min(10.0, now))
        due = sum(1 for d, _ in window)
        return (
            f"the host cannot keep up with the sessions: {what}, past the {limit:.2f}s "
            f"limit (a quarter of {guard}); in the last {span:.0f}s {due} invocations were "
            f"due ({due / span:.0f}/s) and {self.load.served} served in all "
            f"({self.load.served / max(now, 1e-9):.0f}/s). Run fewer --jobs, or a lower "
            "--time-scale: the real runtime, keeping up, would not fail these sessions"
        )

    def submit(self, call: Callable[[], T]) -> Future[T]:
        """Runs `call` on the loop's thread (from any thread); a cancelled future's call
        does not run. Calls wait while the loop is not running."""
        future: Future[T] = Future()

        def run() -> None:
            if not future.set_running_or_notify_cancel():
                return
            try:
                future.set_result(call())
            except Exception as error:  # handed to the caller, not raised on the loop
                future.set_exception(error)
            except BaseException as error:
                # Ctrl-C lands on whatever the loop's thread runs, this call included: it
                # must stop the loop, not end up in a future only the caller reads.
                future.set_exception(error)
                raise

        with self._cond:
            self._calls.append(run)
            self._cond.notify_all()
        return future

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()

    def run(self, until: Callable[[], bool]) -> str:
        """Runs callbacks until `until()` holds ("done"), nothing is left to happen
        ("idle"), `stop()` ("stopped") or the host falls behind ("overloaded")."""
        while True:
            with self._cond:
                if self._stopping:
                    return "overloaded" if self.overloaded else "stopped"
                if not self._inbox and not self._calls:
                    if until():
                        return "done"
                    due = self._timers.next_due()
                    if due is None and self._open == 0:
                        return "idle"
                    timeout = None if due is None else max(0.0, due - self.now())
                    if timeout is None or timeout > 0:
                        self._cond.wait(timeout)
                answers = list(self._inbox)
                self._inbox.clear()
                calls = list(self._calls)
                self._calls.clear()
            for done, outcome in answers:
                self._open -= 1
                done(outcome)
            for call in calls:
                call()
            self._fire_due()

    def _fire_due(self) -> None:
        now = self.now()
        while (timer := self._timers.pop_due(now)) is not None:
            lag = now - timer.when
            self.load.max_timer_lag_s = max(self.load.max_timer_lag_s, lag)
            limits = self.limits
            if limits is not None and lag > limits.timer_lag_s:
                # Under the lock: workers append to `load.recent`, which the message reads.
                with self._cond:
                    if self.overloaded is None:
                        self.overloaded = self._overload_message(
                            f"a timer fired {lag:.1f}s late", limits.timer_lag_s, limits.timer_guard
                        )
                        self._stopping = True
                        return
            timer.callback()

    def close(self, *, wait: bool) -> None:
        self._pool.shutdown(wait=wait, cancel_futures=True)


@dataclass(frozen=True)
class DriverSettings:
    """Real seconds, except the spec's own timers: those of the working state are divided by
    `sim_per_real`, the others keep the spec's seconds (see `runner.timer_scale`)."""

    turns: int = 10
    turn_s: float = 0.5
    sim_per_real: float = 1.0
    batch_size: int | None = None
    workers: int = 16
    run_id: str = "sim"
    secrets: tuple[tuple[str, str], ...] = ()
    keep_up: bool = True
    # Serve Temper's external dispatch on 127.0.0.1 (`temper_api.py`) for the run, so a
    # real `serve` can push wake-ups; `api_credentials` pairs each bearer token with its
    # tenant.
    temper_api: bool = False
    api_credentials: tuple[tuple[str, str], ...] = ()

    def __post_init__(self) -> None:
        if self.turns < 0 or self.turn_s < 0 or self.workers < 1 or self.sim_per_real <= 0:
            raise ValueError("turns, turn_s >= 0; workers >= 1; sim_per_real > 0")


def keep_up_limits(
    spec: Spec, script: SessionScript, scale: TimerScale, *, waiter_ttl_s: float = 60.0
) -> KeepUpLimits:
    """A quarter of the shortest guard each kind of lateness could trip. A late invocation
    keeps its entity waiting where the provisioning guard runs, and the component drops a
    waiter that has not polled for `waiter_ttl_s`; a late timer can trip any guard."""
    guards = [
        (scale(t), f"{t.state}'s {t.on_timeout} timer ({scale(t):.1f}s)")
        for t in spec.timeouts
        if (a := spec.action(t.on_timeout)) is not None
        and t.state not in script.failure_states
        and a.target(t.state) in script.failure_states
    ]
    provisioning = [g for g in guards if not g[1].startswith(script.working_state)]
    invocation = min(
        [*provisioning, (waiter_ttl_s, f"the component's waiter_ttl_s ({waiter_ttl_s:.0f}s)")]
    )
    timer = min(guards) if guards else invocation
    return KeepUpLimits(invocation[0] / 4, timer[0] / 4, invocation[1], timer[1])


class SessionDriver:
    """Runs jobs through `spec` in real time: `modules` maps a trigger's `module` to what
    runs it (this component, or the old provisioner)."""

    def __init__(
        self,
        spec: Spec,
        modules: Mapping[str, Invoker],
        settings: DriverSettings | None = None,
        *,
        script: SessionScript | None = None,
        configure: ConfigHook | None = None,
        on_event: EventSink | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        from harness.simulator.runner import timer_scale

        self.spec = spec
        self.settings = settings or DriverSettings()
        self.script = script or SessionScript.for_spec(spec)
        scale = timer_scale(self.script, self.settings.sim_per_real)
        limits = keep_up_limits(spec, self.script, scale) if self.settings.keep_up else None
        self.loop = RealTimeLoop(modules, workers=self.settings.workers, clock=clock, limits=limits)
        self.executor = Executor(
            spec,
            self.loop,
            run_id=self.settings.run_id,
            secrets=Secrets(dict(self.settings.secrets)),
            configure=configure,
            timer_seconds=scale,
            on_event=on_event,
            access=ExternalAccess(f"{spec.name}s", dict(self.settings.api_credentials)),
        )
        self.api: TemperApiServer | None = None
        if self.settings.temper_api:
            self.api = TemperApiServer(self.executor, self.loop).start()
        self.runner = SessionRunner(
            self.executor,
            self.script,
            RunSettings(self.settings.turns, self.settings.turn_s, self.settings.batch_size),
            self.loop.call_later,
        )
        self._ran = False

    def run(self, jobs: Sequence[Job]) -> RunResult:
        """Runs every job until it ends; returns early when stopped or overloaded. Raises
        whatever interrupts it (KeyboardInterrupt) after cancelling queued calls."""
        if self._ran:
            raise RuntimeError("a SessionDriver runs once; make a new one")
        self._ran = True
        try:
            self.loop.restart_clock()
            self.runner.start(jobs)
            ended = self.loop.run(self.runner.done)
        finally:
            self.loop.close(wait=False)
        interrupted = ended in ("stopped", "overloaded")
        elapsed = self.loop.now()
        return RunResult(
            results=self.runner.results(interrupted=interrupted),
            makespan_s=self.runner.last_finish,
            interrupted=ended == "stopped",
            overloaded=self.loop.overloaded,
            host={
                **self.loop.load.figures(elapsed),
                "peak_admission_permits": self.executor.admission.peak_held,
            },
        )

    def stop(self) -> None:
        """Asks a running `run` to return soon (from any thread)."""
        self.loop.stop()

    @property
    def api_url(self) -> str:
        """Where Temper's external dispatch is served (`temper_api=True` only)."""
        if self.api is None:
            raise RuntimeError("this driver serves no Temper API (DriverSettings.temper_api)")
        return self.api.url

    def close(self) -> None:
        """Waits for invocations still running (call after the E2B they wait on is gone)."""
        if self.api is not None:
            self.api.stop()
        self.loop.close(wait=True)
