"""The stored representation: one small account gate document plus one key per waiter.

The gate document holds everything a limit depends on, so a single compare-and-swap
decides a grant atomically: the create and sandbox leases (at most `create_slots` and
`max_sandboxes` of them), the unsettled creates (whose sandbox may exist unrecorded), the
rate and backoff clocks, the retry budget, and the fair queue as per-tenant ticket
counters (bounded by the number of waiting tenants, never by the number of waiters).
Each waiter has its own record key (`place.Place`) and each queued ticket its own
liveness key, both with a TTL, so a waiter that stops polling vanishes by itself.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from provisioner.config import SandboxSettings
from provisioner.gates.document import (
    FairQueueState,
    Reservation,
    RetryEntry,
    TenantQueue,
    key_part,
    not_owned_by,
    owned_by,
)

GATE_KEY = "adm/gate"

# The default sandbox timeout (`sandbox_timeout_s`): bounds a create whose caller named no
# timeout, and the creates of documents written before create leases recorded their bound.
DEFAULT_SANDBOX_TIMEOUT_MS = SandboxSettings.sandbox_timeout_s * 1000


def waiter_key(tenant: str, entity: str) -> str:
    return f"adm/w/{key_part(tenant)}/{key_part(entity)}"


def ticket_key(tenant: str, ticket: int) -> str:
    return f"adm/t/{key_part(tenant)}/{ticket}"


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
