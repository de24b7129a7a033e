"""Leases: every permit has an id and an expiry, and a dead holder's permit comes back."""

from __future__ import annotations

from provisioner.admission.state import (
    CreateLease,
    GateState,
    SandboxLease,
    not_owned_by,
    owned_by,
)
from provisioner.ports import Ports


def new_lease_id(ports: Ports, prefix: str) -> str:
    return f"{prefix}{ports.random.next_u64():016x}"


def prune_expired(state: GateState, now_ms: int) -> bool:
    """Drop leases whose expiry has passed; True when anything was dropped."""
    creates = [c for c in state.create_leases if c.expires_ms > now_ms]
    sandboxes = [s for s in state.sandbox_leases if s.expires_ms > now_ms]
    changed = len(creates) != len(state.create_leases) or len(sandboxes) != len(
        state.sandbox_leases
    )
    state.create_leases = creates
    state.sandbox_leases = sandboxes
    return changed


def take_create_lease(
    state: GateState,
    lease_id: str,
    tenant: str,
    entity: str,
    now_ms: int,
    ttl_ms: int,
) -> CreateLease:
    lease = CreateLease(lease_id, tenant, entity, now_ms + ttl_ms, now_ms)
    state.create_leases.append(lease)
    return lease


def drop_create_lease(state: GateState, lease_id: str) -> CreateLease | None:
    for index, lease in enumerate(state.create_leases):
        if lease.lease_id == lease_id:
            return state.create_leases.pop(index)
    return None


def drop_leases_of(state: GateState, tenant: str, entity: str) -> int:
    """Drop every lease the entity holds; returns how many."""
    creates = not_owned_by(state.create_leases, tenant, entity)
    sandboxes = not_owned_by(state.sandbox_leases, tenant, entity)
    dropped = len(state.create_leases) - len(creates) + len(state.sandbox_leases) - len(sandboxes)
    state.create_leases = creates
    state.sandbox_leases = sandboxes
    return dropped


def sandbox_lease_of(state: GateState, tenant: str, entity: str) -> SandboxLease | None:
    """The entity's capacity lease (`hold_sandbox` keeps at most one per entity)."""
    return owned_by(state.sandbox_leases, tenant, entity)


def hold_sandbox(
    state: GateState,
    lease_id: str,
    tenant: str,
    entity: str,
    sandbox_id: str,
    now_ms: int,
    ttl_ms: int,
) -> None:
    """Hold one capacity lease per entity: a re-create replaces the entity's old lease."""
    state.sandbox_leases = not_owned_by(state.sandbox_leases, tenant, entity)
    state.sandbox_leases.append(
        SandboxLease(lease_id, tenant, entity, now_ms + ttl_ms, now_ms, sandbox_id)
    )
