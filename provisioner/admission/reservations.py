"""Reservations: capacity promised to a waiter that is not the one asking.

Temper invokes a queued waiter only when its own timer fires (or when the host wakes it),
so a permit that frees up between two of its calls would sit unused, or go to whoever
happens to ask first. A reservation pins such a permit to the turn next in fair order and
says when it becomes claimable (`at_ms`: now for a free slot, the due time of a rate token
that is not yet due). The gate's schedule puts reserved turns first, so nobody else can
take their permits; the holder learns `at_ms` as its `retry_at_ms`, and a host that holds
its request or wakes it comes back right then. A holder that has not claimed by `by_ms`
is passed over: its turn leaves the queue (it queues again, keeping when it first asked,
if it comes back), and the permit goes to the next turn in fair order. So a permit is
never lost to a waiter that went away.

The sandbox gate and every resource gate keep their reservations this way, in the fair
queue's part of their document (`state.FairQueueState`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from provisioner.admission.queue import QueueHolder, can_remove, remove_ticket
from provisioner.admission.state import Reservation


def reservation_of(
    state: QueueHolder, tenant: str, ticket: int | None, entity: str | None
) -> Reservation | None:
    return next((r for r in state.reservations if r.holds(tenant, ticket, entity)), None)


def reserve(
    state: QueueHolder,
    tenant: str,
    ticket: int | None,
    entity: str | None,
    at_ms: int,
    now_ms: int,
    claim_ms: int,
    new_id: str,
) -> tuple[Reservation, bool]:
    """The turn's reservation, made claimable from `at_ms` (a held one keeps its id and
    its deadline moves with `at_ms`: a rate token that became due later). Returns it and
    whether the document changed."""
    held = reservation_of(state, tenant, ticket, entity)
    if held is None:
        made = Reservation(tenant, ticket, entity, new_id, at_ms, max(at_ms, now_ms) + claim_ms)
        state.reservations.append(made)
        return made, True
    if held.at_ms == at_ms or (held.at_ms <= now_ms and at_ms <= now_ms):
        return held, False
    held.at_ms = at_ms
    held.by_ms = max(held.by_ms, at_ms + claim_ms)
    return held, True


class Reserving(QueueHolder, Protocol):
    """A gate document with reservations and a shared cooldown."""

    cooldown_until_ms: int


def pass_over_unclaimed(
    state: Reserving,
    now_ms: int,
    claim_ms: int,
    drop_retry: Callable[[str, str], None] | None = None,
) -> list[Reservation]:
    """Reservations whose claim deadline has passed (never within `claim_ms` of a cooldown's
    end: none can be claimed during one): each holder's turn leaves the queue, a fresh
    ticket removed and a retry dropped through `drop_retry(tenant, entity)`, which takes
    its reservation with it. The next schedule gives the permit to the next turn. Returns
    the reservations passed over."""
    if now_ms <= state.cooldown_until_ms + claim_ms:
        return []
    passed = [r for r in state.reservations if r.by_ms < now_ms]
    for reservation in passed:
        if reservation.ticket is not None:
            queue = state.queue_of(reservation.tenant)
            if queue is not None and can_remove(queue, reservation.ticket):
                remove_ticket(state, reservation.tenant, reservation.ticket, granted=False)
        elif drop_retry is not None and reservation.entity is not None:
            drop_retry(reservation.tenant, reservation.entity)
    # A ticket that cannot leave out of order yet keeps its turn, but not the permit.
    state.reservations = [r for r in state.reservations if r.by_ms >= now_ms]
    return passed
