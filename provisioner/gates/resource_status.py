"""The status snapshot of every resource gate, for the `status` operation (JSON-ready)."""

from __future__ import annotations

from typing import Any

from provisioner.config import ACCOUNT, TENANT, ResourceGate
from provisioner.gates.cooldown import cooling_ms
from provisioner.gates.resource_ledger import read_state
from provisioner.gates.resource_limits import rate_limits
from provisioner.gates.resource_state import ResourceState
from provisioner.ports import Ports


def gate_snapshot(
    state: ResourceState, gate: ResourceGate, now_ms: int, tenant: str
) -> dict[str, Any]:
    own = state.queue_of(tenant)
    rates: dict[str, Any] = {}
    for rate in rate_limits(gate):
        name = rate.bucket_id(tenant)
        level = rate.bucket.level(state.buckets.get(name, 0.0), now_ms)
        rates[rate.reason] = {
            "per_minute": rate.bucket.per_minute_rate,
            "burst": rate.bucket.burst,
            "available": round(max(0.0, level), 3),
            "debt": round(max(0.0, -level), 3),
        }
    return {
        "concurrency": {"in_use": len(state.leases), "limit": gate.permits(ACCOUNT)},
        "tenant_concurrency": {"in_use": state.held_by(tenant), "limit": gate.permits(TENANT)},
        "rates": rates,
        "backoff": {
            "cooling_ms": cooling_ms(state, now_ms),
            "failures": state.backoff_failures,
        },
        "queue_length": state.waiting(),
        "waiting_tenants": len(state.ring),
        "tenant_queued": 0 if own is None else own.length(),
        "hold_ms": state.hold_ms,
        "grants": state.grants,
    }


def snapshot(ports: Ports, gates: dict[str, ResourceGate], tenant: str) -> dict[str, Any]:
    """Every declared gate, by name; a gate whose state cannot be read says so."""
    now = ports.clock.now_ms()
    found: dict[str, Any] = {}
    for name, gate in gates.items():
        try:
            state, _ = read_state(ports, gate, now)
        except Exception as error:
            found[name] = {"error": "storage", "message": str(error)}
            continue
        found[name] = gate_snapshot(state, gate, now, tenant)
    return found
