"""When a queued answer goes back to Temper: at once, after asking the component again, or
at once with a wake-up sent later.

Temper learns of a grant only when the session's own timer fires (a `[[state_timeout]]`'s
`after_seconds` is a literal), so a queued session told "your turn is at t" cannot come
back at t by itself. The host can: it holds the request and asks the component again at t
(the answer then carries the grant), or, when t is further off than a request may be held,
answers now and dispatches the spec's wake action on the entity at t through Temper's API.

This module only decides; `serve` (real time) and the session simulator (virtual time)
carry the decision out, so both follow one rule.
"""

from __future__ import annotations

from dataclasses import dataclass

from provisioner.model import WAKE_UPS, Outcome

# The answers that mean "not yet": the sandbox gates' and a resource gate's.
QUEUED_ACTIONS = frozenset({"SandboxQueued", "ResourceQueued"})


@dataclass(frozen=True, slots=True)
class PaceSettings:
    """`hold_ms`: the longest one request is held (0: never). It must stay below the
    spec's poll interval, or the session's timer starts a second invocation during the
    hold, and below the trigger's `timeout_secs`. `max_held`: requests held at once; the
    rest are answered at once. `push`: send wake-ups for turns past the hold window."""

    hold_ms: int = 1_500
    max_held: int = 256
    push: bool = False


@dataclass(frozen=True, slots=True)
class Answer:
    """Answer with this outcome now."""


@dataclass(frozen=True, slots=True)
class AskAgainAt:
    """Keep holding the request; ask the component again at `at_ms`."""

    at_ms: int


@dataclass(frozen=True, slots=True)
class AnswerAndWake:
    """Answer now; wake the entity at `at_ms` (its `reservation` names the wake-up, so
    several hosts send it once)."""

    at_ms: int
    reservation: str


Step = Answer | AskAgainAt | AnswerAndWake


def retry_at_ms(outcome: Outcome, now_ms: int) -> int | None:
    """When asking again is useful, for a queued outcome (None for any other): the
    component's `retry_at_ms` (a reservation's claimable time, or its estimate), else
    `retry_after_ms` from now (a component built before `retry_at_ms`)."""
    if outcome.action not in QUEUED_ACTIONS:
        return None
    params = outcome.params
    at = params.get("retry_at_ms")
    if isinstance(at, int) and not isinstance(at, bool) and at > 0:
        return at
    after = params.get("retry_after_ms")
    if isinstance(after, int) and not isinstance(after, bool) and after >= 0:
        return now_ms + after
    return None


@dataclass(frozen=True, slots=True)
class Promised:
    """A waiter the component promised a permit to while deciding for another (its
    `wake_ups` param): woken at `at_ms`, it claims the permit then, not at its next poll."""

    tenant: str
    entity_type: str
    entity_id: str
    at_ms: int
    reservation: str


def promised(outcome: Outcome) -> list[Promised]:
    """The waiters `outcome` says were promised a permit (malformed entries are skipped)."""
    found: list[Promised] = []
    items = outcome.params.get(WAKE_UPS)
    for item in items if isinstance(items, list) else []:
        try:
            found.append(
                Promised(
                    str(item["tenant"]),
                    str(item["entity_type"]),
                    str(item["entity_id"]),
                    int(item["at_ms"]),
                    str(item["reservation"]),
                )
            )
        except (KeyError, TypeError, ValueError):
            continue
    return found


def without_promises(outcome: Outcome) -> Outcome:
    """`outcome` as the runtime may see it: the promises name other tenants' entities."""
    if WAKE_UPS not in outcome.params:
        return outcome
    params = {k: v for k, v in outcome.params.items() if k != WAKE_UPS}
    return Outcome(outcome.action, params, outcome.success, outcome.error)


def next_step(outcome: Outcome, now_ms: int, hold_until_ms: int, push: bool) -> Step:
    """What to do with `outcome`, answered at `now_ms` to a request that may be held until
    `hold_until_ms` (the request's start plus its hold window; at most `now_ms` when the
    request may not be held)."""
    at = retry_at_ms(outcome, now_ms)
    if at is None:
        return Answer()
    if at <= hold_until_ms:
        return AskAgainAt(max(at, now_ms))
    if push:
        reservation = outcome.params.get("reservation")
        return AnswerAndWake(at, reservation if isinstance(reservation, str) else "")
    return Answer()


__all__ = [
    "QUEUED_ACTIONS",
    "Answer",
    "AnswerAndWake",
    "AskAgainAt",
    "PaceSettings",
    "Promised",
    "Step",
    "next_step",
    "promised",
    "retry_at_ms",
    "without_promises",
]
