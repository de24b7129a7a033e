"""Waiting estimates and the status snapshot of every gate."""

from __future__ import annotations

from typing import Any

from provisioner.config import AdmissionConfig
from provisioner.gates import budget
from provisioner.gates.cooldown import cooling_ms
from provisioner.gates.sandbox_limits import (
    capacity_free,
    capacity_in_use,
    capacity_limit,
    rate_available,
    rate_wait_ms,
    slots_in_use,
)
from provisioner.gates.sandbox_state import GateState


def latency_ms(state: GateState, config: AdmissionConfig) -> int:
    return state.latency_ms if state.latency_ms is not None else config.create_latency_ms


def slot_wait_ms(state: GateState, config: AdmissionConfig, now_ms: int, position: int) -> int:
    """When a slot should be free for the waiter at `position`: slots free up in waves, each
    slot serving one waiter per observed create latency (O(slots), whatever the position)."""
    latency = latency_ms(state, config)
    ends = sorted(max(0, c.started_ms + latency - now_ms) for c in state.create_leases)
    ends = [0] * max(0, config.create_slots - len(ends)) + ends
    wave, slot = divmod(position - 1, len(ends))
    return ends[slot] + wave * latency


def capacity_wait_ms(state: GateState, config: AdmissionConfig, now_ms: int, position: int) -> int:
    """When capacity should be free for the waiter at `position`: from observed hold times
    when known, else from the sandbox leases' own expiries."""
    limit = capacity_limit(state, config)
    free = capacity_free(state, config)
    if position <= free:
        return 0
    hold = state.hold_ms
    ends = sorted(
        max(0, (s.expires_ms if hold is None else min(s.expires_ms, s.started_ms + hold)) - now_ms)
        for s in state.sandbox_leases
    )
    if not ends:
        return latency_ms(state, config)
    wave, slot = divmod(position - free - 1, max(1, min(limit, len(ends))))
    cycle = hold if hold is not None else ends[-1]
    return ends[min(slot, len(ends) - 1)] + wave * max(cycle, latency_ms(state, config))


def snapshot(state: GateState, config: AdmissionConfig, now_ms: int, tenant: str) -> dict[str, Any]:
    own = state.queue_of(tenant)
    return {
        "now_ms": now_ms,
        "account": {
            "create_slots": {"in_use": slots_in_use(state), "limit": config.create_slots},
            "rate": {
                "per_s": config.create_rate_per_s,
                "burst": config.create_burst,
                "available": rate_available(state, config, now_ms),
                "next_in_ms": rate_wait_ms(state, config, now_ms, 1),
            },
            "capacity": {
                "in_use": capacity_in_use(state),
                "limit": capacity_limit(state, config),
                "configured": config.max_sandboxes,
                "running": len(state.sandbox_leases),
                "unsettled": len(state.unsettled),
            },
            "backoff": {
                "cooling_ms": cooling_ms(state, now_ms),
                "failures": state.backoff_failures,
            },
            "retry_budget": {
                "tokens": round(budget.tokens(state, config), 3),
                "max": config.retry_budget,
            },
            "queue_length": state.waiting(),
            "waiting_tenants": len(state.ring),
            "retrying": len(state.retries),
            "create_latency_ms": latency_ms(state, config),
            "hold_ms": state.hold_ms,
            "grants": state.grants,
        },
        "tenant": {
            "tenant": tenant,
            "in_use": state.tenant_in_use(tenant),
            "limit": config.max_sandboxes_per_tenant,
            "running": sum(1 for s in state.sandbox_leases if s.tenant == tenant),
            "creating": sum(1 for c in state.create_leases if c.tenant == tenant),
            "queued": 0 if own is None else own.length(),
            "retrying": sum(1 for e in state.retries if e.tenant == tenant),
            "ring_place": 0 if own is None else state.ring.index(own) + 1,
        },
    }
