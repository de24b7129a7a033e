"""The stored gate documents: one per gate (`GateState`, `ResourceState`) plus one key per
waiter (`place.Place`) and per queued ticket, under the gate's key prefix.

A document holds everything the gate's limits depend on, so one compare-and-swap decides a
grant. The fair queue is per-tenant ticket counters (bounded by waiting tenants, not
waiters); waiter and ticket keys have a TTL, so a waiter that stops polling vanishes.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol, Self, TypeVar
from urllib.parse import quote

from provisioner.config import SandboxSettings
from provisioner.gates.bucket import Charge

# Host keys are at most 512 bytes; longer names are replaced by their digest.
_MAX_NAME = 160
# What `quote(..., safe="")` leaves alone, plus "/": such a name skips `quote` (costly fuel).
_PLAIN_NAME = re.compile(r"[A-Za-z0-9_.~/-]{1,160}")


def key_part(raw: str) -> str:
    quoted = raw.replace("/", "%2F") if _PLAIN_NAME.fullmatch(raw) else quote(raw, safe="")
    if len(quoted) <= _MAX_NAME:
        return quoted
    return "~" + hashlib.sha256(raw.encode("utf-8", "surrogatepass")).hexdigest()


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
    @property
    def tenant(self) -> str: ...

    @property
    def entity(self) -> str | None: ...


OwnedT = TypeVar("OwnedT", bound=Owned)


def owned_by(items: Iterable[OwnedT], tenant: str, entity: str | None) -> OwnedT | None:
    return next((item for item in items if (item.tenant, item.entity) == (tenant, entity)), None)


def not_owned_by(items: Iterable[OwnedT], tenant: str, entity: str | None) -> list[OwnedT]:
    return [item for item in items if (item.tenant, item.entity) != (tenant, entity)]


@dataclass(slots=True)
class TenantQueue:
    """Tickets head..tail-1 of one tenant, minus those taken out before the head reached
    them (granted out of turn, or their waiter stopped polling)."""

    tenant: str
    head: int
    tail: int
    removed: list[int] = field(default_factory=list)

    def length(self) -> int:
        return self.tail - self.head - len(self.removed)

    def holds(self, ticket: int) -> bool:
        return self.head <= ticket < self.tail and ticket not in self.removed

    def tickets(self) -> Iterator[int]:
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
    """A waiter whose create failed retryably: it waits ahead of fresh tickets (its attempt
    lives in its `place.Place`)."""

    tenant: str
    entity: str


@dataclass(slots=True)
class Reservation:
    """A permit promised to one turn (`gates.queue`), claimable from `at_ms`, passed on
    after `by_ms`: a fresh ticket's turn (`ticket`) or a retry's (`entity`)."""

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


# A stored field: its key, the attribute, and how its value is encoded and decoded (None:
# as it is). A dataclass is stored as the list of its fields in order (`_row`).
Codec = tuple[Callable[[Any], Any] | None, Callable[[Any], Any] | None]
Fields = tuple[tuple[str, str, Codec], ...]


def _row(item: Any) -> list[Any]:
    return [getattr(item, name) for name in item.__match_args__]


def _rows_of(make: Callable[..., Any]) -> Codec:
    """Rows read back by `make` (a dataclass, or what reads an older row)."""
    return None, lambda rows: [make(*row) for row in rows]


def _encode_reservations(reservations: list[Reservation]) -> list[list[Any]]:
    return [
        [r.tenant, -1 if r.ticket is None else r.ticket, r.entity or "", r.rid, r.at_ms, r.by_ms]
        for r in reservations
    ]


def _reservation(tenant: str, ticket: int, entity: str, rid: str, at: int, by: int) -> Reservation:
    return Reservation(tenant, None if ticket < 0 else ticket, entity or None, rid, at, by)


_INT: Codec = (None, int)
_RAW: Codec = (None, None)
# Documents written before these were stored lack them: the field's default.
_OPTIONAL = frozenset({"u", "rq", "rv", "g"})
# The fair queue's fields; older documents carry a third retry field (the attempt).
_QUEUE: Fields = (
    ("q", "ring", _rows_of(TenantQueue)),
    ("rq", "retries", _rows_of(lambda tenant, entity, *_: RetryEntry(tenant, entity))),
    ("ep", "ticket_high_water", _INT),
    ("rv", "reservations", (_encode_reservations, _rows_of(_reservation)[1])),
)


@dataclass(slots=True)
class GateDocument:
    """What every gate's document holds: the fair queue (`gates.queue`), the shared
    cooldown, the average hold time and the grant count."""

    FIELDS: ClassVar[Fields] = ()
    cooldown_until_ms: int = 0
    backoff_failures: int = 0
    ring: list[TenantQueue] = field(default_factory=list)
    retries: list[RetryEntry] = field(default_factory=list)
    # The highest ticket ever issued plus one: ticket keys never repeat.
    ticket_high_water: int = 0
    reservations: list[Reservation] = field(default_factory=list)
    # How long a permit is held, a moving average (None: not observed yet).
    hold_ms: int | None = None
    grants: int = 0

    def fields(self) -> dict[str, Any]:
        return {
            key: getattr(self, name) if encode is None else encode(getattr(self, name))
            for key, name, (encode, _) in self.FIELDS
        }

    def to_bytes(self) -> bytes:
        return json.dumps(self.fields(), separators=(",", ":"), default=_row).encode()

    @classmethod
    def from_doc(cls, doc: dict[str, Any]) -> Self:
        return cls(
            **{
                name: doc[key] if decode is None else decode(doc[key])
                for key, name, (_, decode) in cls.FIELDS
                if key in doc or key not in _OPTIONAL
            }
        )

    @classmethod
    def from_bytes(cls, raw: bytes) -> Self:
        return cls.from_doc(json.loads(raw.decode()))  # str: json skips sniffing the encoding

    def holds_ticket(self, tenant: str, ticket: int) -> bool:
        queue = self.queue_of(tenant)
        return queue is not None and queue.holds(ticket)

    def queue_of(self, tenant: str) -> TenantQueue | None:
        return next((queue for queue in self.ring if queue.tenant == tenant), None)

    def waiting(self) -> int:
        return len(self.retries) + sum(q.length() for q in self.ring)

    def observe_hold(self, started_ms: int, now_ms: int) -> None:
        self.hold_ms = averaged(self.hold_ms, started_ms, now_ms)

    def add_retry(self, tenant: str, entity: str) -> None:
        if owned_by(self.retries, tenant, entity) is None:
            self.retries.append(RetryEntry(tenant, entity))

    def drop_retry(self, tenant: str, entity: str) -> None:
        self.retries = not_owned_by(self.retries, tenant, entity)
        self.reservations = [r for r in self.reservations if not r.holds(tenant, None, entity)]


def averaged(average: int | None, started_ms: int, now_ms: int) -> int:
    """A moving average of how long something took, from `started_ms` to now."""
    observed = max(0, now_ms - started_ms)
    return observed if average is None else (average * 3 + observed) // 4


# Bounds a create whose caller named no timeout, and those of documents before version 2.
DEFAULT_SANDBOX_TIMEOUT_MS = SandboxSettings.sandbox_timeout_s * 1000


@dataclass(slots=True)
class Lease:
    """A permit held by one entity from `started_ms` until it expires."""

    lease_id: str
    tenant: str
    entity: str
    expires_ms: int
    started_ms: int


@dataclass(slots=True)
class CreateLease(Lease):
    # Until when a sandbox it makes can run unrecorded: the lease's expiry plus the
    # sandbox's E2B timeout, after which E2B kills it.
    sandbox_until_ms: int

    def unsettled(self) -> UnsettledCreate:
        """What it leaves when its outcome becomes unknown."""
        return UnsettledCreate(
            self.lease_id, self.tenant, self.entity, self.started_ms, self.sandbox_until_ms
        )


@dataclass(slots=True)
class UnsettledCreate:
    """A create whose outcome is unknown (its lease expired, or it was answered with a
    timeout or 5xx): E2B may have made its sandbox, so it counts against capacity until
    the entity's next create adopts it, a late answer settles it, the entity's release
    kills it, or E2B's timeout would have (`until_ms`)."""

    lease_id: str
    tenant: str
    entity: str
    started_ms: int
    until_ms: int


@dataclass(slots=True)
class SandboxLease(Lease):
    sandbox_id: str


@dataclass(slots=True)
class GateState(GateDocument):
    FIELDS: ClassVar[Fields] = (
        ("c", "create_leases", _rows_of(CreateLease)),
        ("s", "sandbox_leases", _rows_of(SandboxLease)),
        ("u", "unsettled", _rows_of(UnsettledCreate)),
        ("r", "rate_tat_ms", (lambda tat: round(tat, 3), float)),
        ("cd", "cooldown_until_ms", _INT),
        ("bf", "backoff_failures", _INT),
        ("cap", "capacity", _RAW),
        ("ok", "success_streak", _INT),
        ("rb", "retry_tokens", (lambda tokens: None if tokens is None else round(tokens, 4), None)),
        ("rbt", "retry_refilled_ms", _INT),
        *_QUEUE,
        ("lat", "latency_ms", _RAW),
        ("hold", "hold_ms", _RAW),
        ("n", "grants", _INT),
    )
    create_leases: list[CreateLease] = field(default_factory=list)
    sandbox_leases: list[SandboxLease] = field(default_factory=list)
    unsettled: list[UnsettledCreate] = field(default_factory=list)
    # GCRA theoretical arrival time of the next create.
    rate_tat_ms: float = 0.0
    # Effective capacity after a concurrent-cap 429 (None: the configured maximum).
    capacity: int | None = None
    success_streak: int = 0
    retry_tokens: float | None = None
    retry_refilled_ms: int = 0
    latency_ms: int | None = None

    def fields(self) -> dict[str, Any]:
        return {"v": 2, **GateDocument.fields(self)}

    @classmethod
    def from_doc(cls, doc: dict[str, Any]) -> Self:
        if doc.get("v", 1) < 2:
            # No sandbox bound yet (the default), and older ones carry the attempt sixth.
            bound = DEFAULT_SANDBOX_TIMEOUT_MS
            doc["c"] = [[*item[:5], item[3] + bound] for item in doc["c"]]
        return super(GateState, cls).from_doc(doc)

    def possible_sandboxes(self) -> list[UnsettledCreate]:
        """The unsettled creates that count against capacity: one per entity (one
        idempotency key makes at most one sandbox), none for an entity whose create is in
        flight again (that create counts for it)."""
        creating = {(c.tenant, c.entity) for c in self.create_leases}
        first: dict[tuple[str, str], UnsettledCreate] = {}
        for unsettled in self.unsettled:
            first.setdefault((unsettled.tenant, unsettled.entity), unsettled)
        return [unsettled for owner, unsettled in first.items() if owner not in creating]

    def reclaims(self, tenant: str, entity: str) -> bool:
        """A create for this entity takes no new capacity: it counts for (and adopts) the
        possible sandbox of the entity's unsettled create."""
        return any((u.tenant, u.entity) == (tenant, entity) for u in self.possible_sandboxes())

    def tenant_in_use(self, tenant: str) -> int:
        return self.usage_by_tenant().get(tenant, 0)

    def usage_by_tenant(self) -> dict[str, int]:
        """Creates in flight, running and possible sandboxes, per tenant."""
        held: list[Owned] = [*self.create_leases, *self.sandbox_leases, *self.possible_sandboxes()]
        return dict(Counter(lease.tenant for lease in held))


# The cost kinds a request has: one request, its input tokens, its output tokens.
REQUESTS = "requests"
INPUT = "input"
OUTPUT = "output"

# One request's estimated cost by kind, and under `margin_key(kind)` how far its actual
# may exceed it (its declared worst case less the estimate; 0 when none is declared).
Costs = dict[str, float]


def margin_key(kind: str) -> str:
    return f"{kind}+"


def margin_of(costs: Costs, kind: str) -> float:
    return costs.get(margin_key(kind), 0.0)


def bucket_id(kind: str, tenant: str | None) -> str:
    # No tenant id holds a control character.
    return kind if tenant is None else f"{kind}\t{tenant}"


def encode_ticket(entity: str, costs: Costs) -> bytes:
    return json.dumps([entity, costs], separators=(",", ":")).encode()


def decode_ticket(raw: bytes) -> tuple[str, Costs]:
    entity, costs = json.loads(raw.decode("utf-8", "surrogatepass"))
    return str(entity), {str(k): float(v) for k, v in dict(costs).items()}


@dataclass(slots=True)
class ResourceLease(Lease):
    charges: list[Charge] = field(default_factory=list)
    # How far the actual cost may exceed `charges`, by kind, until it settles
    # (`blocking.ResourceHeadroom.reserve`).
    margins: Costs = field(default_factory=dict)

    def margin(self, kind: str) -> float:
        return self.margins.get(kind, 0.0)


def _lease(*row: Any) -> ResourceLease:
    # Margins are absent from documents written before they were stored.
    charges = [Charge(str(b), float(t), float(s)) for b, t, s in row[5]]
    margins = {str(k): float(v) for k, v in (row[6] if len(row) > 6 else {}).items()}
    lease_id, tenant, entity, expires, started = row[:5]
    return ResourceLease(lease_id, tenant, entity, expires, started, charges, margins)


@dataclass(slots=True)
class ResourceState(GateDocument):
    # Clocks are stored unrounded: a rounded clock could hand out a sliver of a token.
    FIELDS: ClassVar[Fields] = (
        ("l", "leases", _rows_of(_lease)),
        ("b", "buckets", (dict, lambda clocks: {str(k): float(v) for k, v in clocks.items()})),
        ("cd", "cooldown_until_ms", _INT),
        ("bf", "backoff_failures", _INT),
        *_QUEUE,
        ("hold", "hold_ms", _RAW),
        ("n", "grants", _INT),
        ("g", "granted_ms", _INT),
    )
    leases: list[ResourceLease] = field(default_factory=list)
    # GCRA clock (`tat_ms`) of each bucket in use, by `bucket_id`; one not named is full.
    buckets: dict[str, float] = field(default_factory=dict)
    # When the gate last granted a permit (0: never): a waiter's stall starts there.
    granted_ms: int = 0

    def lease_of(
        self, tenant: str, entity: str, lease_id: str | None = None
    ) -> ResourceLease | None:
        """The entity's lease (only if it is `lease_id`, when named: another entity's lease
        is not its to settle)."""
        mine = (lease for lease in self.leases if (lease.tenant, lease.entity) == (tenant, entity))
        return next((lease for lease in mine if lease_id in (None, lease.lease_id)), None)

    def held_by(self, tenant: str) -> int:
        return sum(1 for lease in self.leases if lease.tenant == tenant)

    def open_charges(self) -> list[Charge]:
        return [charge for lease in self.leases for charge in lease.charges]
