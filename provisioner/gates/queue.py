"""The fair queue: FIFO within a tenant, round-robin across tenants.

Each waiting tenant has an entry in the ring with ticket counters; the ring is ordered by
service: a tenant served moves to the back, a tenant that starts waiting joins at the
back, so a tenant's first waiter is at most one round (one grant per other waiting
tenant) behind. Waiters whose create failed retryably wait in `retries`, ahead of every
fresh ticket, since they were already at the head. Positions come from the counters, so
computing one costs O(tenants), whatever the number of waiters.

Reservations: Temper invokes a queued waiter only when its own timer fires (or when the
host wakes it), so a permit freed between two of its calls would sit unused or go to
whoever asks first. A reservation pins it to the turn next in fair order, claimable from
`at_ms`; the schedule puts reserved turns first. A holder that has not claimed by `by_ms`
is passed over (its turn leaves the queue), so a permit is never lost to a waiter that
went away.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Protocol

from provisioner.config import AdmissionConfig
from provisioner.gates.document import Reservation, RetryEntry, TenantQueue

# Out-of-order removals remembered per tenant; beyond this, only the head can leave.
MAX_REMOVED_OUT_OF_ORDER = 64

Eligible = Callable[[str], bool]


class QueueHolder(Protocol):
    """What the fair queue lives in: every gate document."""

    ring: list[TenantQueue]
    retries: list[RetryEntry]
    ticket_high_water: int
    reservations: list[Reservation]

    def queue_of(self, tenant: str) -> TenantQueue | None: ...

    def holds_ticket(self, tenant: str, ticket: int) -> bool: ...


def enqueue(state: QueueHolder, tenant: str) -> int:
    queue = state.queue_of(tenant)
    if queue is None:
        # A fresh entry starts past every ticket ever issued, so ticket keys never repeat.
        queue = TenantQueue(tenant, state.ticket_high_water, state.ticket_high_water)
        state.ring.append(queue)
    ticket = queue.tail
    queue.tail += 1
    state.ticket_high_water = max(state.ticket_high_water, queue.tail)
    return ticket


def can_remove(queue: TenantQueue, ticket: int) -> bool:
    return ticket == queue.head or len(queue.removed) < MAX_REMOVED_OUT_OF_ORDER


def remove_ticket(state: QueueHolder, tenant: str, ticket: int, *, granted: bool) -> None:
    """Take a ticket out; a tenant whose ticket was granted moves to the back of the ring
    (a ticket dropped because its waiter stopped polling leaves the ring order alone)."""
    queue = state.queue_of(tenant)
    if queue is None or not queue.holds(ticket):
        return
    # A turn that leaves the queue, however it leaves, gives up its reservation.
    state.reservations = [r for r in state.reservations if not r.holds(tenant, ticket, None)]
    queue.remove(ticket)
    if queue.length() <= 0:
        state.ring.remove(queue)
    elif granted:
        state.ring.remove(queue)
        state.ring.append(queue)


def drop_ticket(state: QueueHolder, tenant: str, ticket: int) -> bool:
    """Take a ticket out, not granted; False when it cannot leave out of order yet (it
    keeps its turn)."""
    queue = state.queue_of(tenant)
    if queue is None or not can_remove(queue, ticket):
        return False
    remove_ticket(state, tenant, ticket, granted=False)
    return True


def ticket_at(queue: TenantQueue, index: int) -> int:
    """The ticket `index` places behind the head (costs index + out-of-order removals)."""
    removed = set(queue.removed)
    ticket = queue.head
    remaining = index
    while True:
        if ticket not in removed:
            if remaining == 0:
                return ticket
            remaining -= 1
        ticket += 1


def eligible_retries(
    state: QueueHolder, eligible: Callable[[RetryEntry], bool], retry_tokens: float
) -> list[RetryEntry]:
    """Retries that may be granted now: `eligible` (its tenant has room) and the budget
    pays for them."""
    affordable = int(retry_tokens + 1e-9)
    chosen: list[RetryEntry] = []
    for entry in state.retries:
        if len(chosen) >= affordable:
            break
        if eligible(entry):
            chosen.append(entry)
    return chosen


def fair_order(state: QueueHolder, eligible: Eligible) -> Iterator[tuple[str, int]]:
    """Fresh tickets in service order: round r serves each tenant's r-th ticket."""
    queues = [q for q in state.ring if eligible(q.tenant)]
    rounds = max((q.length() for q in queues), default=0)
    for index in range(rounds):
        for queue in queues:
            if queue.length() > index:
                yield queue.tenant, ticket_at(queue, index)


def fresh_position(state: QueueHolder, tenant: str, ticket: int, eligible: Eligible) -> int:
    """1-based place of a fresh ticket among fresh tickets, counting eligible tenants only
    (plus its own)."""
    own = state.queue_of(tenant)
    if own is None or not own.holds(ticket):
        return 0
    index = own.index_of(ticket)
    position = index + 1
    before = True
    for queue in state.ring:
        if queue is own:
            before = False
            continue
        if not eligible(queue.tenant):
            continue
        position += min(queue.length(), index + 1 if before else index)
    return position


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
            drop_ticket(state, reservation.tenant, reservation.ticket)
        elif drop_retry is not None and reservation.entity is not None:
            drop_retry(reservation.tenant, reservation.entity)
    # A ticket that cannot leave out of order yet keeps its turn, but not the permit.
    state.reservations = [r for r in state.reservations if r.by_ms >= now_ms]
    return passed


def live_reservations(state: QueueHolder) -> list[Reservation]:
    """The reservations whose turn still waits, in the order they were made."""
    retrying = {(e.tenant, e.entity) for e in state.retries}
    return [
        r
        for r in state.reservations
        if (r.tenant, r.entity) in retrying
        or (r.ticket is not None and state.holds_ticket(r.tenant, r.ticket))
    ]


# When a waiter should ask again: the same for every gate.


def retry_at_wait_ms(
    config: AdmissionConfig, eta_ms: int, exact: bool, retry_after_ms: int, cooling_ms: int
) -> int:
    """How long from now `retry_at_ms` lies: the estimate itself, unclamped by poll_max (a
    host that wakes the waiter wakes it then) and not shortened while the create latency is
    unknown (only turns near the front may be held, so held requests stay within rate x
    window + slots), but no sooner than poll_min when it is a guess (an overdue estimate
    must not have a host ask again in a loop), and after a cooldown its jittered end."""
    wait = eta_ms if exact else max(eta_ms, config.poll_min_ms)
    return max(wait, retry_after_ms) if cooling_ms > 0 else max(1, wait)


def ask_again_ms(
    config: AdmissionConfig, wait_ms: int, exact: bool, cooling: int, uniform: Callable[[], float]
) -> int:
    """When a waiter should ask again (`retry_after_ms`), for a wait of `wait_ms`: at once
    when the wait is `exact` (a rate's, due to the millisecond), else no sooner than
    poll_min; never later than poll_max; and during a cooldown of `cooling` ms, after it,
    spread over poll_min. Shared by the sandbox gates and the resource gates."""
    floor = 1 if exact else config.poll_min_ms
    retry_after = max(floor, min(wait_ms, config.poll_max_ms))
    if cooling > 0:
        # Spread the herd that comes back when the cooldown ends.
        retry_after = max(cooling, retry_after) + int(uniform() * config.poll_min_ms)
    return retry_after
