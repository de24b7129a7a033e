"""The public, read-only view of a resource gate's state (re-exported by
`provisioner.gates.sandbox_view`, beside the sandbox gates' view).

`inspect_resource` reads the gate's document and its waiters' ticket keys through the
guest's `Storage` protocol (account scope) and returns frozen dataclasses: the leases with
what each charged, every bucket's level and debt, the shared cooldown, and every waiter in
fair order with its estimated cost. Reading never writes; each waiter costs one read.
"""

from __future__ import annotations

from dataclasses import dataclass

from provisioner.config import ACCOUNT, TENANT, ResourceGate
from provisioner.gates.cooldown import cooling_ms
from provisioner.gates.resource_ledger import prune
from provisioner.gates.resource_limits import rate_limits
from provisioner.gates.resource_state import (
    Costs,
    ResourceState,
    decode_ticket,
    gate_key,
    ticket_key,
)
from provisioner.ports import Scope, Storage


@dataclass(frozen=True, slots=True)
class ResourceLeaseView:
    """A permit held: `charged` is what its grant charged each bucket (by bucket name)."""

    lease_id: str
    tenant: str
    entity: str
    started_ms: int
    expires_ms: int
    charged: tuple[tuple[str, float], ...]


@dataclass(frozen=True, slots=True)
class BucketView:
    """One token bucket: `reason` names it as a queue reason (`input_tokens`,
    `tenant_rate`, ...), `tenant` is set for a tenant's own bucket. `level` is negative
    while in debt."""

    reason: str
    tenant: str | None
    per_minute: float
    burst: float
    level: float

    @property
    def debt(self) -> float:
        return max(0.0, -self.level)


@dataclass(frozen=True, slots=True)
class ResourceWaiterView:
    """A queued waiter; `entity` and `costs` are None once its ticket's key has expired
    (it stopped asking and will be skipped)."""

    tenant: str
    ticket: int
    entity: str | None
    costs: Costs | None


@dataclass(frozen=True, slots=True)
class ResourceGateView:
    name: str
    now_ms: int
    version: int | None
    concurrency: int | None
    tenant_concurrency: int | None
    leases: tuple[ResourceLeaseView, ...]
    buckets: tuple[BucketView, ...]
    cooldown_until_ms: int
    cooling_ms: int
    backoff_failures: int
    waiters: tuple[ResourceWaiterView, ...]
    hold_ms: int | None
    grants: int

    @property
    def in_use(self) -> int:
        return len(self.leases)

    def held_by(self, tenant: str) -> int:
        return sum(1 for lease in self.leases if lease.tenant == tenant)

    def bucket(self, reason: str, tenant: str | None = None) -> BucketView | None:
        for view in self.buckets:
            if view.reason == reason and view.tenant == tenant:
                return view
        return None


def inspect_resource(
    storage: Storage, now_ms: int, gate: ResourceGate, *, prune_expired: bool = True
) -> ResourceGateView:
    """Read one resource gate. `prune_expired` drops expired leases as the next decision
    will; tenant buckets are listed for the tenants that hold a lease, wait, or whose
    bucket is not full."""
    entry = storage.get(Scope.ACCOUNT, gate_key(gate.name))
    state = ResourceState() if entry is None else ResourceState.from_bytes(entry.value)
    if prune_expired:
        prune(state, gate, now_ms)
    tenants = sorted(
        {lease.tenant for lease in state.leases}
        | {q.tenant for q in state.ring}
        | {name.partition("\t")[2] for name in state.buckets if "\t" in name}
    )
    buckets: list[BucketView] = []
    for rate in rate_limits(gate):
        for tenant in tenants if rate.per_tenant else [None]:
            name = rate.bucket_id(tenant or "")
            level = rate.bucket.level(state.buckets.get(name, 0.0), now_ms)
            buckets.append(
                BucketView(
                    rate.reason, tenant, rate.bucket.per_minute_rate, rate.bucket.burst, level
                )
            )
    waiters: list[ResourceWaiterView] = []
    for queue in state.ring:
        removed = set(queue.removed)
        for ticket in range(queue.head, queue.tail):
            if ticket in removed:
                continue
            found = storage.get(Scope.ACCOUNT, ticket_key(gate.name, queue.tenant, ticket))
            entity, costs = (None, None) if found is None else decode_ticket(found.value)
            waiters.append(ResourceWaiterView(queue.tenant, ticket, entity, costs))
    return ResourceGateView(
        name=gate.name,
        now_ms=now_ms,
        version=None if entry is None else entry.version,
        concurrency=gate.permits(ACCOUNT),
        tenant_concurrency=gate.permits(TENANT),
        leases=tuple(
            ResourceLeaseView(
                lease.lease_id,
                lease.tenant,
                lease.entity,
                lease.started_ms,
                lease.expires_ms,
                tuple((c.bucket, c.tokens) for c in lease.charges),
            )
            for lease in state.leases
        ),
        buckets=tuple(buckets),
        cooldown_until_ms=state.cooldown_until_ms,
        cooling_ms=cooling_ms(state, now_ms),
        backoff_failures=state.backoff_failures,
        waiters=tuple(waiters),
        hold_ms=state.hold_ms,
        grants=state.grants,
    )


def inspect_resources(
    storage: Storage, now_ms: int, gates: dict[str, ResourceGate]
) -> dict[str, ResourceGateView]:
    """Every declared gate (`config.read_config(...).resources`), by name."""
    return {name: inspect_resource(storage, now_ms, gate) for name, gate in gates.items()}
