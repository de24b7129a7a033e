"""Runs the guest's resource operations natively on shared memory storage, a virtual
clock and seeded randomness (test support for the resource-gate tests; no tests here)."""

from __future__ import annotations

from typing import Any

from provisioner.app import run
from provisioner.model import Invocation, Outcome
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
