"""The fair queue: FIFO within a tenant, round-robin across tenants.

Each waiting tenant has an entry in the ring with ticket counters; the ring is ordered by
service: a tenant served moves to the back, a tenant that starts waiting joins at the
back, so a tenant's first waiter is at most one round (one grant per other waiting
tenant) behind. Waiters whose create failed retryably wait in `retries`, ahead of every
fresh ticket, since they were already at the head. Positions come from the counters, so
computing one costs O(tenants), whatever the number of waiters.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Protocol

from provisioner.admission.state import Reservation, RetryEntry, TenantQueue

# Out-of-order removals remembered per tenant; beyond this, only the head can leave.
MAX_REMOVED_OUT_OF_ORDER = 64

Eligible = Callable[[str], bool]


class QueueHolder(Protocol):
    """What the fair queue lives in: the sandbox gate document (`state.GateState`) and each
    resource gate's document (`provisioner.resources.state.ResourceState`)."""

    ring: list[TenantQueue]
    retries: list[RetryEntry]
    ticket_high_water: int
    reservations: list[Reservation]

    def queue_of(self, tenant: str) -> TenantQueue | None: ...


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
