"""The fair queue: FIFO within a tenant, round-robin across tenants (the ring is ordered
by service: a tenant served moves to the back), retries ahead of every fresh ticket.
Positions come from the ticket counters: O(tenants), whatever the number of waiters.

Reservations: a queued waiter is invoked only when its timer fires (or the host wakes
it), so a permit freed meanwhile is pinned to the turn next in fair order, claimable from
`at_ms`; a holder that has not claimed it by `by_ms` is passed over.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from itertools import islice

from provisioner.gates.document import GateDocument, Reservation, TenantQueue

# Out-of-order removals remembered per tenant; beyond this, only the head can leave.
MAX_REMOVED_OUT_OF_ORDER = 64

Eligible = Callable[[str], bool]


def enqueue(state: GateDocument, tenant: str) -> int:
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


def remove_ticket(state: GateDocument, tenant: str, ticket: int, *, granted: bool) -> None:
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


def drop_ticket(state: GateDocument, tenant: str, ticket: int) -> bool:
    """Take a ticket out, not granted; False when it cannot leave out of order yet (it
    keeps its turn)."""
    queue = state.queue_of(tenant)
    if queue is None or not can_remove(queue, ticket):
        return False
    remove_ticket(state, tenant, ticket, granted=False)
    return True


def fair_order(state: GateDocument, eligible: Eligible) -> Iterator[tuple[str, int]]:
    """Fresh tickets in service order: round r serves each tenant's r-th ticket."""
    queues = [q for q in state.ring if eligible(q.tenant)]
    rounds = max((q.length() for q in queues), default=0)
    for index in range(rounds):
        for queue in queues:
            if queue.length() > index:
                yield queue.tenant, next(islice(queue.tickets(), index, None))


def fresh_position(state: GateDocument, tenant: str, ticket: int, eligible: Eligible) -> int:
    """1-based place of a fresh ticket among those of eligible tenants (and its own)."""
    own = state.queue_of(tenant)
    if own is None or not own.holds(ticket):
        return 0
    index, ahead = own.index_of(ticket), state.ring.index(own)
    # A tenant ahead of this one in the ring is served once more in this ticket's round.
    return (index + 1) + sum(
        min(queue.length(), index + 1 if n < ahead else index)
        for n, queue in enumerate(state.ring)
        if queue is not own and eligible(queue.tenant)
    )


def reservation_of(
    state: GateDocument, tenant: str, ticket: int | None, entity: str | None
) -> Reservation | None:
    return next((r for r in state.reservations if r.holds(tenant, ticket, entity)), None)


def reserve(
    state: GateDocument,
    tenant: str,
    ticket: int | None,
    entity: str | None,
    at_ms: int,
    now_ms: int,
    claim_ms: int,
    new_id: str,
) -> tuple[Reservation, bool]:
    """The turn's reservation, claimable from `at_ms` (a held one keeps its id, its
    deadline moves with `at_ms`), and whether the document changed."""
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


def pass_over_unclaimed(
    state: GateDocument,
    now_ms: int,
    claim_ms: int,
    drop_retry: Callable[[str, str], None] | None = None,
) -> list[Reservation]:
    """Pass over the reservations whose claim deadline has passed (none within `claim_ms`
    of a cooldown's end: none can be claimed during one): each holder's turn leaves the
    queue, a retry through `drop_retry`. Returns them."""
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


def live_reservations(state: GateDocument) -> list[Reservation]:
    """The reservations whose turn still waits, oldest first."""
    retrying = {(e.tenant, e.entity) for e in state.retries}
    return [
        r
        for r in state.reservations
        if (r.tenant, r.entity) in retrying
        or (r.ticket is not None and state.holds_ticket(r.tenant, r.ticket))
    ]
