"""What every gate document shares: storage-key quoting, items owned by one entity, and
the fair queue's stored part (tenant ticket ranges, retries, reservations)."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar
from urllib.parse import quote

# Host keys are at most 512 bytes; longer names are replaced by their digest.
_MAX_NAME = 160

# Characters `quote(..., safe="")` leaves alone, plus "/" (which it turns into %2F): a name
# made only of them is quoted without calling `quote`, the costlier path in guest fuel.
_PLAIN_NAME = re.compile(r"[A-Za-z0-9_.~/-]{1,160}")


def key_part(raw: str) -> str:
    """`raw` as one segment of a storage key (quoted; a digest when too long)."""
    quoted = raw.replace("/", "%2F") if _PLAIN_NAME.fullmatch(raw) else quote(raw, safe="")
    if len(quoted) <= _MAX_NAME:
        return quoted
    return "~" + hashlib.sha256(raw.encode("utf-8", "surrogatepass")).hexdigest()


class Owned(Protocol):
    """Anything kept for one entity of one tenant: a lease, a retry, a waiter's view."""

    @property
    def tenant(self) -> str: ...

    @property
    def entity(self) -> str | None: ...


OwnedT = TypeVar("OwnedT", bound=Owned)


def owned_by(items: Iterable[OwnedT], tenant: str, entity: str | None) -> OwnedT | None:
    """The first of `items` kept for the entity (None: none is)."""
    for item in items:
        if item.tenant == tenant and item.entity == entity:
            return item
    return None


def not_owned_by(items: Iterable[OwnedT], tenant: str, entity: str | None) -> list[OwnedT]:
    """`items` in order, without those kept for the entity."""
    return [item for item in items if item.tenant != tenant or item.entity != entity]


@dataclass(slots=True)
class TenantQueue:
    """Tickets head..tail-1 of one tenant, minus `removed`: tickets taken out before the
    head reached them (granted out of turn, or dropped because their waiter stopped
    polling)."""

    tenant: str
    head: int
    tail: int
    removed: list[int] = field(default_factory=list)

    def length(self) -> int:
        return self.tail - self.head - len(self.removed)

    def holds(self, ticket: int) -> bool:
        return self.head <= ticket < self.tail and ticket not in self.removed

    def tickets(self) -> Iterator[int]:
        """The tickets held, head first."""
        removed = set(self.removed)
        return (ticket for ticket in range(self.head, self.tail) if ticket not in removed)

    def index_of(self, ticket: int) -> int:
        return ticket - self.head - sum(1 for s in self.removed if s < ticket)

    def remove(self, ticket: int) -> None:
        if ticket == self.head:
            self.head += 1
        elif self.holds(ticket):
            self.removed.append(ticket)
        self.removed.sort()
        while self.removed and self.removed[0] <= self.head:
            if self.removed[0] == self.head:
                self.head += 1
            self.removed.pop(0)


@dataclass(slots=True)
class RetryEntry:
    """A waiter whose create failed retryably: it keeps its place ahead of fresh tickets.
    (Its attempt count and first-asked time live in its own record, `place.Place`.)"""

    tenant: str
    entity: str


@dataclass(slots=True)
class Reservation:
    """A permit promised to one turn (`gates.queue`): claimable from `at_ms`,
    passed on after `by_ms`. `ticket` names a fresh ticket's turn, `entity` a retry's
    (the sandbox gate knows its retries by entity)."""

    tenant: str
    ticket: int | None
    entity: str | None
    rid: str
    at_ms: int
    by_ms: int

    def holds(self, tenant: str, ticket: int | None, entity: str | None) -> bool:
        if self.tenant != tenant:
            return False
        return self.ticket == ticket if ticket is not None else self.entity == entity

    def encode(self) -> list[Any]:
        ticket = -1 if self.ticket is None else self.ticket
        return [self.tenant, ticket, self.entity or "", self.rid, self.at_ms, self.by_ms]

    @classmethod
    def decode(cls, item: list[Any]) -> Reservation:
        tenant, ticket, entity, rid, at, by = item
        return cls(
            str(tenant),
            None if int(ticket) < 0 else int(ticket),
            str(entity) or None,
            str(rid),
            int(at),
            int(by),
        )


class FairQueueState:
    """What a gate document holds for the fair queue (`gates.queue`): the tenants'
    ticket ranges in ring order and the retries ahead of them. The sandbox gate and every
    resource gate (`gates.resource_state`) keep their waiters this way."""

    __slots__ = ()
    ring: list[TenantQueue]
    retries: list[RetryEntry]
    ticket_high_water: int
    reservations: list[Reservation]

    def queue_fields(self) -> dict[str, Any]:
        """The fair queue's part of the stored document."""
        return {
            "q": [[q.tenant, q.head, q.tail, q.removed] for q in self.ring],
            "rq": [[e.tenant, e.entity] for e in self.retries],
            "ep": self.ticket_high_water,
            "rv": [r.encode() for r in self.reservations],
        }

    @staticmethod
    def read_queue_fields(doc: dict[str, Any]) -> dict[str, Any]:
        """`queue_fields` read back, as constructor arguments (a document without retries,
        a resource gate's before they were stored, has none)."""
        return {
            "ring": [TenantQueue(t, h, tl, list(s)) for t, h, tl, s in doc["q"]],
            # Documents written before the attempt moved to the waiter's record carry it
            # as a third retry field: read past it.
            "retries": [RetryEntry(item[0], item[1]) for item in doc.get("rq", [])],
            "ticket_high_water": int(doc["ep"]),
            # Documents written before reservations have none.
            "reservations": [Reservation.decode(item) for item in doc.get("rv", [])],
        }

    def queue_of(self, tenant: str) -> TenantQueue | None:
        return next((queue for queue in self.ring if queue.tenant == tenant), None)

    def waiting(self) -> int:
        return len(self.retries) + sum(q.length() for q in self.ring)
