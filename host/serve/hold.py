"""Held answers: a queued invocation stays open and the component is asked again at the
waiter's turn, so the grant reaches Temper in the same call (`pace.next_step` decides).

The window of one request is the serve flag `--hold-ms`, or the integration config's
`hold_ms` (the spec author sets it below the spec's poll interval: a hold past the poll
would let the session's timer start a second invocation meanwhile), capped below the
trigger's `timeout_secs` (Temper abandons the call there). `hold_ms` is the service's
key: it is taken out of the config before the component sees it.

Waiting is asyncio (a held request costs no worker); each ask again goes through the
service's worker pool like a first call. At most `max_held` requests are held at once;
past that, and once draining starts, a request is answered with its latest outcome at
once. An event in this process that can free a permit wakes the held requests nearest
the head of the queue to ask again early (other processes' events reach them at their
`retry_at_ms`).
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass

from host.runtime.temper_limits import TemperLimits
from host.serve.pace import Answer, AnswerAndWake, AskAgainAt, Step, next_step
from provisioner.model import (
    SANDBOX_FAILED,
    SANDBOX_QUEUED,
    SANDBOX_READY,
    SANDBOX_RELEASED,
    Outcome,
)

HOLD_CONFIG_KEY = "hold_ms"
# Integration-config keys the service consumes: never handed to the component.
PACE_CONFIG_KEYS = frozenset({HOLD_CONFIG_KEY})
# Kept between the end of the window and Temper's deadline for the last component call
# and the answer's way back through the shim.
DEADLINE_MARGIN_MS = 10_000
# Two asks of one held request are at least this far apart, so a component that keeps
# answering "your turn is now" is not called in a loop.
MIN_ASK_INTERVAL_MS = 25
# A held request whose ask again found every worker busy tries again this much later.
SATURATED_RETRY_MS = 50
# "May not be held": no turn is at or before it, so `next_step` answers (and may wake).
NO_HOLD = -1
# Outcomes after which a permit may be free: a settled create, a release, a failure; and a
# release's answer a spec renamed (`released_action`, e.g. Failing -> Failed).
FREEING_ACTIONS = frozenset({SANDBOX_READY, SANDBOX_RELEASED, SANDBOX_FAILED})
RELEASED_ACTION_KEY = "released_action"


class InvalidHoldConfig(ValueError):
    """`hold_ms` is not a whole number of milliseconds."""


def hold_window_ms(config: Mapping[str, str], default_ms: int) -> int:
    """The hold window for an invocation with this integration config: `hold_ms` (else
    the service's default), at most the trigger's `timeout_secs` less a margin; 0 is off."""
    text = config.get(HOLD_CONFIG_KEY)
    if text is None:
        wanted = default_ms
    else:
        digits = text.strip()
        if not digits.isascii() or not digits.isdigit():
            raise InvalidHoldConfig(f"hold_ms must be a whole number of milliseconds: {text!r}")
        wanted = int(digits)
    deadline_ms = int(TemperLimits.from_integration_config(config).max_duration_s * 1000)
    return max(0, min(wanted, deadline_ms - DEADLINE_MARGIN_MS))


def queue_position(outcome: Outcome) -> int:
    position = outcome.params.get("position")
    if isinstance(position, int) and not isinstance(position, bool) and position > 0:
        return position
    return 2**31


class HeldRequest:
    """One held request: its place in line (to wake the nearest first) and its wake-up."""

    def __init__(self, position: int, entity: tuple[str, str] | None = None) -> None:
        self.position = position
        # (tenant, entity id): a permit promised to it wakes it (`Holds.wake_entity`).
        self.entity = entity
        self.woken = asyncio.Event()
        self.loop = asyncio.get_running_loop()

    def wake(self) -> None:
        """Safe from any thread or a signal handler: the set runs on the request's loop."""
        if not self.loop.is_closed():
            self.loop.call_soon_threadsafe(self.woken.set)

    async def sleep_until(self, deadline_s: float) -> None:
        """Until `deadline_s` (loop time), or earlier when woken."""
        delay = deadline_s - self.loop.time()
        if delay > 0:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.woken.wait(), delay)
        self.woken.clear()


class Holds:
    """The requests held in this process: the bound, the early wake-ups and the drain."""

    def __init__(self, max_held: int) -> None:
        self.max_held = max(0, max_held)
        self.draining = False
        self._held: set[HeldRequest] = set()
        # Reentrant: drain() may run in a signal handler on a thread inside enter().
        self._lock = threading.RLock()

    @property
    def count(self) -> int:
        with self._lock:
            return len(self._held)

    def enter(self, position: int, entity: tuple[str, str] | None = None) -> HeldRequest | None:
        """A place for one more held request, or None (full, or draining)."""
        with self._lock:
            if self.draining or len(self._held) >= self.max_held:
                return None
            held = HeldRequest(position, entity)
            self._held.add(held)
            return held

    def leave(self, held: HeldRequest) -> None:
        with self._lock:
            self._held.discard(held)

    def wake_nearest(self, count: int) -> None:
        """Wake the `count` held requests nearest the head of the queue."""
        with self._lock:
            nearest = sorted(self._held, key=lambda h: h.position)[: max(0, count)]
        for held in nearest:
            held.wake()

    def wake_entity(self, entity: tuple[str, str]) -> bool:
        """Wake the held requests of `entity` (tenant, entity id); False when none is held
        here."""
        with self._lock:
            found = [held for held in self._held if held.entity == entity]
        for held in found:
            held.wake()
        return bool(found)

    def drain(self) -> None:
        """Answer every held request at once (from a signal handler, too)."""
        self.draining = True
        with self._lock:
            held = list(self._held)
        for request in held:
            request.wake()


@dataclass(frozen=True, slots=True)
class HeldAnswer:
    """What to answer: the outcome, the step that ends it (Answer or AnswerAndWake), the
    component calls it took and the time it was held."""

    outcome: Outcome
    step: Answer | AnswerAndWake
    calls: int
    held_s: float

    @property
    def granted_after_hold(self) -> bool:
        granted = self.outcome.success and self.outcome.action not in (
            SANDBOX_QUEUED,
            SANDBOX_FAILED,
        )
        return self.calls > 1 and granted


def final_step(outcome: Outcome, now_ms: int, push: bool) -> Answer | AnswerAndWake:
    step: Step = next_step(outcome, now_ms, NO_HOLD, push)
    return step if isinstance(step, Answer | AnswerAndWake) else Answer()


def hold_until_ms(arrived_ms: int, window_ms: int) -> int:
    """The latest turn a request that arrived at `arrived_ms` may be held for."""
    return arrived_ms + window_ms if window_ms > 0 else NO_HOLD


async def answer_held(
    first: Outcome,
    ask_again: Callable[[], Awaitable[Outcome | None]],
    *,
    holds: Holds,
    hold_until: int,
    push: bool,
    now_ms: Callable[[], int],
    client_gone: Callable[[], Awaitable[bool]] | None = None,
    entity: tuple[str, str] | None = None,
) -> HeldAnswer:
    """Hold the request while `pace.next_step` says to ask again by `hold_until` (counted
    from the request's arrival: Temper's deadline is); `ask_again` calls the component
    (None: no worker was free). A client that went away is asked for nothing more."""
    loop = asyncio.get_running_loop()
    started = time.monotonic()
    outcome, calls = first, 1
    step = next_step(outcome, now_ms(), hold_until, push)
    held = holds.enter(queue_position(outcome), entity) if isinstance(step, AskAgainAt) else None
    if held is None:
        return HeldAnswer(outcome, final_step(outcome, now_ms(), push), calls, 0.0)
    try:
        last_ask_s = loop.time()
        while isinstance(step, AskAgainAt) and not holds.draining:
            # The component's clock (the storage's) gives the turn; the loop's clock waits.
            at_s = loop.time() + (step.at_ms - now_ms()) / 1000
            await held.sleep_until(max(at_s, last_ask_s + MIN_ASK_INTERVAL_MS / 1000))
            if holds.draining or (client_gone is not None and await client_gone()):
                break
            fresh = await ask_again()
            last_ask_s = loop.time()
            now = now_ms()
            if fresh is None:
                retry = now + SATURATED_RETRY_MS
                step = AskAgainAt(retry) if retry <= hold_until else Answer()
                continue
            outcome, calls = fresh, calls + 1
            held.position = queue_position(outcome)
            step = next_step(outcome, now, hold_until, push) if now < hold_until else Answer()
    finally:
        holds.leave(held)
    return HeldAnswer(
        outcome, final_step(outcome, now_ms(), push), calls, time.monotonic() - started
    )


def frees_a_permit(outcome: Outcome, config: Mapping[str, str]) -> bool:
    """`config`: the invocation's integration config, which may rename the release's answer."""
    renamed = config.get(RELEASED_ACTION_KEY, "").strip()
    return outcome.action in FREEING_ACTIONS or (bool(renamed) and outcome.action == renamed)


__all__ = [
    "DEADLINE_MARGIN_MS",
    "HOLD_CONFIG_KEY",
    "PACE_CONFIG_KEYS",
    "HeldAnswer",
    "Holds",
    "InvalidHoldConfig",
    "answer_held",
    "final_step",
    "frees_a_permit",
    "hold_until_ms",
    "hold_window_ms",
]
