"""The stored representation of one resource gate: one small document per named resource,
plus one key per waiter and per ticket, all in the account scope under `res/<name>/`.

The document holds everything the gate's limits depend on, so one compare-and-swap decides
a grant atomically: the leases (each with what it charged every token bucket), the
buckets' clocks (account-wide and per tenant), the shared cooldown, and the fair queue as
per-tenant ticket counters (`gates.queue`, the same queue the sandbox gates use). A
waiter's place is a `gates.place.Place` under its own key; each queued ticket has a
liveness key whose value is the waiter's entity and its estimated cost, so the waiters at
the front can be costed without a per-waiter entry in the document.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from provisioner.gates.bucket import Charge
from provisioner.gates.document import (
    FairQueueState,
    Reservation,
    RetryEntry,
    TenantQueue,
    key_part,
)

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


def gate_key(resource: str) -> str:
    return f"res/{resource}/gate"


def waiter_key(resource: str, tenant: str, entity: str) -> str:
    return f"res/{resource}/w/{key_part(tenant)}/{key_part(entity)}"


def ticket_key(resource: str, tenant: str, ticket: int) -> str:
    return f"res/{resource}/t/{key_part(tenant)}/{ticket}"


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
    # estimation error still outstanding until it settles (`blocking.Budget.reserve`).
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
