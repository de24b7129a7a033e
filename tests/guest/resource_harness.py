"""Runs the guest's resource operations natively on shared memory storage, a virtual
clock and seeded randomness (test support for the resource-gate tests; no tests here)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from provisioner.app import run
from provisioner.config import ResourceGate
from provisioner.gates.document import (
    Costs,
    ResourceState,
    decode_ticket,
    resource_prefix,
    ticket_key,
)
from provisioner.gates.ledger import read_state
from provisioner.gates.policies import cooling_ms, rate_limits
from provisioner.gates.view import Backoff
from provisioner.model import Invocation, Outcome
from provisioner.ports import Ports, Scope
from tests.builders import invocation
from tests.guest.harness import VirtualAccount


def gate_invocation(
    config: dict[str, str],
    tenant: str,
    entity: str,
    params: dict[str, Any] | None = None,
    *,
    state: dict[str, Any] | None = None,
    entity_type: str = "Agent",
    action: str = "Gate",
) -> Invocation:
    """One resource operation (its `operation` and gate keys in `config`) of an entity in
    `state`, fired by `action`."""
    return invocation(
        config,
        tenant=tenant,
        entity_type=entity_type,
        entity_id=entity,
        trigger_action=action,
        trigger_params=params,
        entity_state=state,
    )


class ResourceHarness(VirtualAccount):
    def __init__(self, config: dict[str, str], *, seed: int = 0) -> None:
        super().__init__(seed=seed)
        self.config = config

    def call(
        self,
        operation: str,
        tenant: str,
        entity: str,
        params: dict[str, Any] | None = None,
        **config: str,
    ) -> Outcome:
        merged = {**self.config, "operation": operation, **config}
        return run(gate_invocation(merged, tenant, entity, params), self.ports(tenant))

    def acquire(self, tenant: str, entity: str, **params: Any) -> Outcome:
        return self.call("acquire", tenant, entity, params)

    def settle(self, tenant: str, entity: str, **params: Any) -> Outcome:
        return self.call("settle", tenant, entity, params)

    def release(self, tenant: str, entity: str) -> Outcome:
        return self.call("release", tenant, entity)

    def status(self, tenant: str = "tenant-a") -> dict[str, Any]:
        params: dict[str, Any] = self.call("status", tenant, "status-probe").params
        return params

    def advance(self, ms: int) -> None:
        self.clock.advance(ms)


# What a test sees of a resource gate: the guest answers no `inspect` for these gates, so
# this reads the stored documents the way the next decision will (`ledger.read_state`).


@dataclass(frozen=True, slots=True)
class BucketView:
    """`tenant` is set for a tenant's own bucket; `level` is negative while in debt."""

    reason: str
    tenant: str | None
    level: float

    @property
    def debt(self) -> float:
        return max(0.0, -self.level)


@dataclass(frozen=True, slots=True)
class ResourceWaiterView:
    """`entity` and `costs` are None once the ticket's key expired."""

    tenant: str
    ticket: int
    entity: str | None
    costs: Costs | None


@dataclass(frozen=True, slots=True)
class ResourceGateView:
    """A resource gate's document as of `now_ms`, pruned as the next decision will, with
    its buckets; `version` is None when never written."""

    name: str
    now_ms: int
    version: int | None
    state: ResourceState
    buckets: tuple[BucketView, ...]
    backoff: Backoff
    waiters: tuple[ResourceWaiterView, ...]

    def bucket(self, reason: str, tenant: str | None = None) -> BucketView | None:
        return next((b for b in self.buckets if (b.reason, b.tenant) == (reason, tenant)), None)


def inspect_resources(ports: Ports, gates: dict[str, ResourceGate]) -> dict[str, ResourceGateView]:
    """Each gate with every waiter; tenants' buckets are listed for those that hold a
    lease, wait, or whose bucket is not full."""
    now = ports.clock.now_ms()
    views: dict[str, ResourceGateView] = {}
    for name, gate in gates.items():
        state, version = read_state(ports, gate, now)
        tenants = sorted(
            {lease.tenant for lease in state.leases}
            | {queue.tenant for queue in state.ring}
            | {bucket.partition("\t")[2] for bucket in state.buckets if "\t" in bucket}
        )
        waiters: list[ResourceWaiterView] = []
        for queue in state.ring:
            for ticket in queue.tickets():
                key = ticket_key(queue.tenant, ticket, resource_prefix(gate.name))
                found = ports.storage.get(Scope.ACCOUNT, key)
                entity, costs = (None, None) if found is None else decode_ticket(found.value)
                waiters.append(ResourceWaiterView(queue.tenant, ticket, entity, costs))
        buckets = tuple(
            BucketView(rate.reason, tenant, rate.level(state, tenant or "", now))
            for rate in rate_limits(gate)
            for tenant in (tenants if rate.per_tenant else [None])
        )
        backoff = Backoff(state.cooldown_until_ms, cooling_ms(state, now), state.backoff_failures)
        views[name] = ResourceGateView(name, now, version, state, buckets, backoff, tuple(waiters))
    return views
