"""`sandbox-provisioner serve` in front of the provisioner, in virtual time: held answers
and push wake-ups, decided by the one rule the real `serve` follows (`host/serve/pace.py`).

Every invocation of the module reaches it through this model (the rule holds only queued
answers; a release passes straight through). When the answer is
`AskAgainAt`, the request is held (still in flight for the executor: Temper's timers keep
running, so the entity's own timer may start a second invocation meanwhile, as in Temper)
and the provisioner is asked again at that virtual time. `AnswerAndWake` answers now and,
at `at_ms`, dispatches the spec's wake action on the entity through the executor's
external-dispatch path (Temper's `POST /tdata/{EntitySet}('{id}')/Temper.{Action}`), so
Temper's rules apply to it: a wake the entity's state does not allow is refused (409) and
changes nothing. Every provisioner call counts, a held request's re-asks included.

`fault` plays a push that does not work, to show the poll timer still completes every
job: "403" sends another tenant's credential (the executor refuses it), "409" names an
action the spec lacks (refused as not enabled), "503" is Temper refusing at admission and
"down" is Temper's API unreachable (no dispatch happens in either).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

from harness.simulator.executor import Executor
from harness.simulator.fake_e2b import START_MS
from harness.simulator.simulated_ports import VirtualClock
from host.serve.pace import (
    AnswerAndWake,
    AskAgainAt,
    PaceSettings,
    Promised,
    next_step,
    promised,
    without_promises,
)
from provisioner.model import SANDBOX_QUEUED, Invocation, Outcome

WAKE_ACTION = "WakeProvision"
FAULTS = ("409", "403", "503", "down")


class VirtualInvoker(Protocol):
    def start(self, invocation: Invocation, done: Callable[[Outcome], None]) -> None: ...


class Cancellable(Protocol):
    def cancel(self) -> None: ...


class VirtualTimers(Protocol):
    clock: VirtualClock

    def call_at(self, when: float, callback: Callable[[], None]) -> Cancellable: ...


def _seconds(at_ms: int) -> float:
    return (at_ms - START_MS) / 1000


@dataclass
class ServeFigures:
    """What the model saw: provisioner calls, requests held at once, wake-ups by answer."""

    calls: int = 0
    holding: int = 0
    max_holding: int = 0
    reasks: int = 0
    wakes: Counter[str] = field(default_factory=Counter)


class VirtualServe:
    """Plays `serve` for module `sandbox_provisioner`: forwards to `inner`, holds and
    wakes as `host/serve/pace.py` decides. `bind` gives it the executor to wake through."""

    def __init__(
        self,
        loop: VirtualTimers,
        inner: VirtualInvoker,
        pace: PaceSettings,
        *,
        wake_action: str = WAKE_ACTION,
        fault: str | None = None,
    ) -> None:
        if fault is not None and fault not in FAULTS:
            raise ValueError(f"fault must be one of {', '.join(FAULTS)}, found {fault!r}")
        self.loop = loop
        self.inner = inner
        self.pace = pace
        self.wake_action = wake_action
        self.fault = fault
        self.figures = ServeFigures()
        self._executor: Executor | None = None
        self._credentials: Mapping[str, str] = {}
        # Entity id -> the (at_ms, reservation) of its pending wake-up: one per entity,
        # the latest answer's.
        self._wakes: dict[str, tuple[int, str]] = {}
        # Entity id -> its held request's next ask: (when, the timer, the ask), so a
        # permit promised to it sooner asks sooner.
        self._held: dict[str, tuple[int, Cancellable, Callable[[], None]]] = {}

    def bind(self, executor: Executor, credentials: Mapping[str, str]) -> None:
        """`credentials`: tenant -> the bearer token serve holds for it."""
        self._executor = executor
        self._credentials = dict(credentials)

    # -- requests ------------------------------------------------------------------------

    def start(self, invocation: Invocation, done: Callable[[Outcome], None]) -> None:
        # Every answer goes through the rule: it holds only what it calls queued.
        hold_until = self.loop.clock.now_ms() + max(0, self.pace.hold_ms)
        self._ask(invocation, done, hold_until, held=False)

    def _call(self, invocation: Invocation, done: Callable[[Outcome], None]) -> None:
        self.figures.calls += 1
        self.inner.start(invocation, done)

    def _ask(
        self,
        invocation: Invocation,
        done: Callable[[Outcome], None],
        hold_until: int,
        *,
        held: bool,
    ) -> None:
        self._call(
            invocation, lambda outcome: self._answered(invocation, done, hold_until, held, outcome)
        )

    def _answered(
        self,
        invocation: Invocation,
        done: Callable[[Outcome], None],
        hold_until: int,
        held: bool,
        outcome: Outcome,
    ) -> None:
        figures = self.figures
        now = self.loop.clock.now_ms()
        self._held.pop(invocation.entity_id, None)
        for promise in promised(outcome):
            self._promised(promise)
        outcome = without_promises(outcome)
        # Past max_held a new request is answered at once (it may not be held).
        may_hold = held or figures.holding < self.pace.max_held
        step = next_step(outcome, now, hold_until if may_hold else now, self.pace.push)
        if isinstance(step, AskAgainAt):
            if not held:
                figures.holding += 1
                figures.max_holding = max(figures.max_holding, figures.holding)
            figures.reasks += 1

            def ask() -> None:
                self._ask(invocation, done, hold_until, held=True)

            timer = self.loop.call_at(_seconds(step.at_ms), ask)
            self._held[invocation.entity_id] = (step.at_ms, timer, ask)
            return
        if held:
            figures.holding -= 1
        if isinstance(step, AnswerAndWake) and outcome.action == SANDBOX_QUEUED:
            # The spec's wake action re-runs the provision trigger; a queued answer of
            # another kind (a resource gate's) has no wake action here and is just answered.
            self._schedule_wake(
                invocation.tenant, invocation.entity_id, step.at_ms, step.reservation
            )
        done(outcome)

    def _promised(self, promise: Promised) -> None:
        """A permit promised to another waiter: its held request asks when it is claimable;
        with push, a waiter not held is woken then."""
        held = self._held.get(promise.entity_id)
        if held is not None:
            at_ms, timer, ask = held
            if promise.at_ms < at_ms:
                timer.cancel()
                when = max(promise.at_ms, self.loop.clock.now_ms())
                self._held[promise.entity_id] = (when, self.loop.call_at(_seconds(when), ask), ask)
            return
        if self.pace.push:
            self._schedule_wake(
                promise.tenant, promise.entity_id, promise.at_ms, promise.reservation
            )

    # -- wake-ups ------------------------------------------------------------------------

    def _schedule_wake(self, tenant: str, entity_id: str, at_ms: int, reservation: str) -> None:
        key = (at_ms, reservation)
        if self._wakes.get(entity_id) == key:
            return  # this wake-up is already on its way
        self._wakes[entity_id] = key
        self.loop.call_at(_seconds(at_ms), lambda: self._wake(tenant, entity_id, key))

    def _wake(self, tenant: str, entity_id: str, key: tuple[int, str]) -> None:
        if self._wakes.get(entity_id) != key:
            return  # a later answer replaced this wake-up
        del self._wakes[entity_id]
        executor = self._executor
        if executor is None:
            raise RuntimeError("VirtualServe.bind was not called: nowhere to send wake-ups")
        if self.fault in ("503", "down"):
            self.figures.wakes[self.fault] += 1
            return
        credential = self._credentials.get(tenant)
        if self.fault == "403":
            credential = next(
                (c for t, c in self._credentials.items() if t != tenant), "no-such-credential"
            )
        action = self.wake_action if self.fault != "409" else f"{self.wake_action}Missing"
        answer = executor.dispatch_external(
            tenant, executor.access.entity_set, entity_id, action, {}, credential
        )
        self.figures.wakes[str(answer.status)] += 1
