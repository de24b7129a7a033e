"""The stored gate documents: one small document per gate (the sandbox gate's
`GateState`, a resource gate's `ResourceState`) plus one key per waiter (`place.Place`)
and per queued ticket, all in the account scope and under the gate's key prefix.

A document holds everything the gate's limits depend on, so one compare-and-swap decides a
grant atomically. The fair queue is kept as per-tenant ticket counters (bounded by the
number of waiting tenants, never by the number of waiters); the waiter and ticket keys
have a TTL, so a waiter that stops polling vanishes by itself. A ticket's key holds its
waiter's entity (and, at a resource gate, its estimated cost, so the turns at the front
can be costed without a per-waiter entry in the document).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar
from urllib.parse import quote

from provisioner.config import SandboxSettings
from provisioner.gates.bucket import Charge

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


# The sandbox gate's keys are under `adm/`, a resource gate's under `res/<name>/`.
SANDBOX_PREFIX = "adm/"


def resource_prefix(resource: str) -> str:
    return f"res/{resource}/"


def gate_key(prefix: str = SANDBOX_PREFIX) -> str:
    return f"{prefix}gate"


def waiter_key(tenant: str, entity: str, prefix: str = SANDBOX_PREFIX) -> str:
    return f"{prefix}w/{key_part(tenant)}/{key_part(entity)}"


def ticket_key(tenant: str, ticket: int, prefix: str = SANDBOX_PREFIX) -> str:
    return f"{prefix}t/{key_part(tenant)}/{ticket}"


GATE_KEY = gate_key()


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


class HoldTimer(Protocol):
    # How long a permit is held, a moving average (None: not observed yet).
    hold_ms: int | None


def observe_hold(state: HoldTimer, started_ms: int, now_ms: int) -> None:
    observed = max(0, now_ms - started_ms)
    state.hold_ms = observed if state.hold_ms is None else (state.hold_ms * 3 + observed) // 4


class FairQueueState:
    """What a gate document holds for the fair queue (`gates.queue`): the tenants'
    ticket ranges in ring order and the retries ahead of them. The sandbox gate and every
    resource gate (`ResourceState`) keep their waiters this way."""

    __slots__ = ()
    ring: list[TenantQueue]
    retries: list[RetryEntry]
    ticket_high_water: int
    reservations: list[Reservation]

    def holds_ticket(self, tenant: str, ticket: int) -> bool:
        queue = self.queue_of(tenant)
        return queue is not None and queue.holds(ticket)

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


# The sandbox gate.

# The default sandbox timeout (`sandbox_timeout_s`): bounds a create whose caller named no
# timeout, and the creates of documents written before create leases recorded their bound.
DEFAULT_SANDBOX_TIMEOUT_MS = SandboxSettings.sandbox_timeout_s * 1000


@dataclass(slots=True)
class CreateLease:
    lease_id: str
    tenant: str
    entity: str
    expires_ms: int
    started_ms: int
    # Until when a sandbox this create makes can run unrecorded: the lease's expiry (the
    # create has answered by then, or its holder is dead) plus the sandbox's E2B timeout,
    # after which E2B kills it.
    sandbox_until_ms: int


@dataclass(slots=True)
class UnsettledCreate:
    """A create whose outcome is unknown: its lease expired unsettled (the holder died
    mid-call) or it was answered with a timeout or 5xx. E2B may have made its sandbox,
    which nothing records, so it counts against capacity until the entity's next create
    adopts it by its idempotency key, a late answer of this create says what it made,
    the entity's release kills it, or E2B's timeout would have (`until_ms`)."""

    lease_id: str
    tenant: str
    entity: str
    started_ms: int
    until_ms: int


@dataclass(slots=True)
class SandboxLease:
    lease_id: str
    tenant: str
    entity: str
    expires_ms: int
    started_ms: int
    sandbox_id: str


@dataclass(slots=True)
class GateState(FairQueueState):
    create_leases: list[CreateLease] = field(default_factory=list)
    sandbox_leases: list[SandboxLease] = field(default_factory=list)
    unsettled: list[UnsettledCreate] = field(default_factory=list)
    # GCRA theoretical arrival time of the next create.
    rate_tat_ms: float = 0.0
    cooldown_until_ms: int = 0
    backoff_failures: int = 0
    # Effective capacity after a concurrent-cap 429 (None: the configured maximum).
    capacity: int | None = None
    success_streak: int = 0
    retry_tokens: float | None = None
    retry_refilled_ms: int = 0
    ring: list[TenantQueue] = field(default_factory=list)
    retries: list[RetryEntry] = field(default_factory=list)
    # The highest ticket number ever issued plus one: a tenant that starts waiting again
    # gets tickets from here, so ticket keys never repeat.
    ticket_high_water: int = 0
    reservations: list[Reservation] = field(default_factory=list)
    latency_ms: int | None = None
    hold_ms: int | None = None
    grants: int = 0

    def retry_of(self, tenant: str, entity: str) -> RetryEntry | None:
        return owned_by(self.retries, tenant, entity)

    def add_retry(self, tenant: str, entity: str) -> None:
        """The entity waits among the retries (once: a second call changes nothing)."""
        if self.retry_of(tenant, entity) is None:
            self.retries.append(RetryEntry(tenant, entity))

    def drop_retry(self, tenant: str, entity: str) -> None:
        self.retries = not_owned_by(self.retries, tenant, entity)
        self.reservations = [r for r in self.reservations if not r.holds(tenant, None, entity)]

    def create_lease(self, lease_id: str) -> CreateLease | None:
        for lease in self.create_leases:
            if lease.lease_id == lease_id:
                return lease
        return None

    def possible_sandboxes(self) -> list[UnsettledCreate]:
        """The unsettled creates that count against capacity: one per entity (every create
        of one provisioning cycle carries the same idempotency key, so they make at most
        one sandbox), and none for an entity whose create is in flight again (that create
        counts for the same sandbox)."""
        counted: list[UnsettledCreate] = []
        seen = {(c.tenant, c.entity) for c in self.create_leases}
        for unsettled in self.unsettled:
            if (unsettled.tenant, unsettled.entity) not in seen:
                seen.add((unsettled.tenant, unsettled.entity))
                counted.append(unsettled)
        return counted

    def reclaims(self, tenant: str, entity: str) -> bool:
        """A create for this entity now takes no new capacity: it counts for the possible
        sandbox of the entity's unsettled create (and adopts it, if it exists)."""
        return any((u.tenant, u.entity) == (tenant, entity) for u in self.possible_sandboxes())

    def tenant_in_use(self, tenant: str) -> int:
        return self.usage_by_tenant().get(tenant, 0)

    def usage_by_tenant(self) -> dict[str, int]:
        """Creates in flight, running and possible sandboxes, per tenant."""
        usage: dict[str, int] = {}
        for tenant in (
            [c.tenant for c in self.create_leases]
            + [s.tenant for s in self.sandbox_leases]
            + [u.tenant for u in self.possible_sandboxes()]
        ):
            usage[tenant] = usage.get(tenant, 0) + 1
        return usage

    def to_bytes(self) -> bytes:
        doc: dict[str, Any] = {
            "v": 2,
            "c": [
                [c.lease_id, c.tenant, c.entity, c.expires_ms, c.started_ms, c.sandbox_until_ms]
                for c in self.create_leases
            ],
            "s": [
                [s.lease_id, s.tenant, s.entity, s.expires_ms, s.started_ms, s.sandbox_id]
                for s in self.sandbox_leases
            ],
            "u": [
                [u.lease_id, u.tenant, u.entity, u.started_ms, u.until_ms] for u in self.unsettled
            ],
            "r": round(self.rate_tat_ms, 3),
            "cd": self.cooldown_until_ms,
            "bf": self.backoff_failures,
            "cap": self.capacity,
            "ok": self.success_streak,
            "rb": None if self.retry_tokens is None else round(self.retry_tokens, 4),
            "rbt": self.retry_refilled_ms,
            **self.queue_fields(),
            "lat": self.latency_ms,
            "hold": self.hold_ms,
            "n": self.grants,
        }
        return json.dumps(doc, separators=(",", ":")).encode()

    @classmethod
    def from_bytes(cls, raw: bytes) -> GateState:
        doc = json.loads(raw.decode())  # str: json skips sniffing the encoding
        # Documents before version 2 carry no sandbox bound in a create lease (it gets the
        # default sandbox timeout); older ones carry the attempt as a sixth lease field
        # and a third retry field: read past it.
        if doc.get("v", 1) >= 2:
            creates = [CreateLease(*item) for item in doc["c"]]
        else:
            bound = DEFAULT_SANDBOX_TIMEOUT_MS
            creates = [
                CreateLease(item[0], item[1], item[2], item[3], item[4], item[3] + bound)
                for item in doc["c"]
            ]
        return cls(
            create_leases=creates,
            sandbox_leases=[SandboxLease(*item) for item in doc["s"]],
            unsettled=[UnsettledCreate(*item) for item in doc.get("u", [])],
            rate_tat_ms=float(doc["r"]),
            cooldown_until_ms=int(doc["cd"]),
            backoff_failures=int(doc["bf"]),
            capacity=doc["cap"],
            success_streak=int(doc["ok"]),
            retry_tokens=doc["rb"],
            retry_refilled_ms=int(doc["rbt"]),
            **cls.read_queue_fields(doc),
            latency_ms=doc["lat"],
            hold_ms=doc["hold"],
            grants=int(doc["n"]),
        )


# A resource gate.

# The cost kinds a request has: one request, its input tokens, its output tokens.
REQUESTS = "requests"
INPUT = "input"
OUTPUT = "output"
KINDS = (REQUESTS, INPUT, OUTPUT)

# What one request is estimated to cost, by kind, and under `margin_key(kind)` how far its
# actual may exceed that estimate (its declared worst case less the estimate; 0 when none
# is declared: the estimate is then its upper bound).
Costs = dict[str, float]


def margin_key(kind: str) -> str:
    return f"{kind}+"


def margin_of(costs: Costs, kind: str) -> float:
    return costs.get(margin_key(kind), 0.0)


def bucket_id(kind: str, tenant: str | None) -> str:
    """A bucket's name in the document: the cost kind, and for a tenant's own bucket the
    tenant after a tab (no tenant id holds a control character)."""
    return kind if tenant is None else f"{kind}\t{tenant}"


def encode_ticket(entity: str, costs: Costs) -> bytes:
    return json.dumps([entity, costs], separators=(",", ":")).encode()


def decode_ticket(raw: bytes) -> tuple[str, Costs]:
    entity, costs = json.loads(raw.decode("utf-8", "surrogatepass"))
    return str(entity), {str(k): float(v) for k, v in dict(costs).items()}


@dataclass(slots=True)
class ResourceLease:
    lease_id: str
    tenant: str
    entity: str
    expires_ms: int
    started_ms: int
    charges: list[Charge] = field(default_factory=list)
    # How far the call's actual cost may exceed what `charges` charged, by kind: the
    # estimation error still outstanding until it settles (`blocking.ResourceHeadroom.reserve`).
    margins: Costs = field(default_factory=dict)

    def margin(self, kind: str) -> float:
        return self.margins.get(kind, 0.0)


@dataclass(slots=True)
class ResourceState(FairQueueState):
    leases: list[ResourceLease] = field(default_factory=list)
    # GCRA clock (`tat_ms`) of each bucket in use, by `bucket_id`; a bucket not named is
    # full.
    buckets: dict[str, float] = field(default_factory=dict)
    cooldown_until_ms: int = 0
    backoff_failures: int = 0
    ring: list[TenantQueue] = field(default_factory=list)
    # Resource waiters never retry out of turn; the fair queue's protocol has the list.
    retries: list[RetryEntry] = field(default_factory=list)
    ticket_high_water: int = 0
    reservations: list[Reservation] = field(default_factory=list)
    hold_ms: int | None = None
    grants: int = 0
    # When the gate last granted a permit (0: never): a waiter's stall starts there.
    granted_ms: int = 0

    def lease(self, lease_id: str) -> ResourceLease | None:
        return next((lease for lease in self.leases if lease.lease_id == lease_id), None)

    def lease_of(self, tenant: str, entity: str) -> ResourceLease | None:
        found = (lease for lease in self.leases if (lease.tenant, lease.entity) == (tenant, entity))
        return next(found, None)

    def held_by(self, tenant: str) -> int:
        return sum(1 for lease in self.leases if lease.tenant == tenant)

    def open_charges(self) -> list[Charge]:
        return [charge for lease in self.leases for charge in lease.charges]

    def to_bytes(self) -> bytes:
        # Clocks are stored unrounded (JSON floats round-trip exactly): a rounded clock
        # could hand out a sliver of a token on every write.
        doc: dict[str, Any] = {
            "l": [
                [
                    lease.lease_id,
                    lease.tenant,
                    lease.entity,
                    lease.expires_ms,
                    lease.started_ms,
                    [[c.bucket, c.tokens, c.slack_ms] for c in lease.charges],
                    lease.margins,
                ]
                for lease in self.leases
            ],
            "b": {name: tat for name, tat in self.buckets.items()},
            "cd": self.cooldown_until_ms,
            "bf": self.backoff_failures,
            **self.queue_fields(),
            "hold": self.hold_ms,
            "n": self.grants,
            "g": self.granted_ms,
        }
        return json.dumps(doc, separators=(",", ":")).encode()

    @classmethod
    def from_bytes(cls, raw: bytes) -> ResourceState:
        doc = json.loads(raw.decode())
        return cls(
            leases=[_lease(*fields) for fields in doc["l"]],
            buckets={str(k): float(v) for k, v in doc["b"].items()},
            cooldown_until_ms=int(doc["cd"]),
            backoff_failures=int(doc["bf"]),
            **cls.read_queue_fields(doc),
            hold_ms=doc["hold"],
            grants=int(doc["n"]),
            granted_ms=int(doc.get("g", 0)),
        )


def _lease(
    lease_id: str,
    tenant: str,
    entity: str,
    expires: int,
    started: int,
    charges: list[list[Any]],
    margins: dict[str, float] | None = None,
) -> ResourceLease:
    # `margins` is absent from a document written before margins were stored: none.
    return ResourceLease(
        str(lease_id),
        str(tenant),
        str(entity),
        int(expires),
        int(started),
        [Charge(str(b), float(t), float(s)) for b, t, s in charges],
        {str(k): float(v) for k, v in (margins or {}).items()},
    )
