"""Leases: every permit has an id and an expiry, and a dead holder's permit comes back."""

from __future__ import annotations

from provisioner.gates.document import (
    CreateLease,
    GateState,
    SandboxLease,
    UnsettledCreate,
    not_owned_by,
    owned_by,
)


def prune_expired(state: GateState, now_ms: int) -> bool:
    """Drop leases whose expiry has passed; True when anything changed. An expired create
    lease gives its slot back but stays as an unsettled create: its holder died before
    hearing E2B's answer, so the sandbox may exist."""
    creates = [c for c in state.create_leases if c.expires_ms > now_ms]
    for lease in state.create_leases:
        if lease.expires_ms <= now_ms:
            state.unsettled.append(unsettled_from(lease))
    unsettled = [u for u in state.unsettled if u.until_ms > now_ms]
    sandboxes = [s for s in state.sandbox_leases if s.expires_ms > now_ms]
    changed = (
        len(creates) != len(state.create_leases)
        or len(sandboxes) != len(state.sandbox_leases)
        or len(unsettled) != len(state.unsettled)
    )
    state.create_leases = creates
    state.sandbox_leases = sandboxes
    state.unsettled = unsettled
    return changed


def unsettled_from(lease: CreateLease) -> UnsettledCreate:
    return UnsettledCreate(
        lease.lease_id, lease.tenant, lease.entity, lease.started_ms, lease.sandbox_until_ms
    )


def take_create_lease(
    state: GateState,
    lease_id: str,
    tenant: str,
    entity: str,
    now_ms: int,
    ttl_ms: int,
    sandbox_timeout_ms: int,
) -> CreateLease:
    expires = now_ms + ttl_ms
    lease = CreateLease(lease_id, tenant, entity, expires, now_ms, expires + sandbox_timeout_ms)
    state.create_leases.append(lease)
    return lease


def drop_create_lease(state: GateState, lease_id: str) -> CreateLease | None:
    for index, lease in enumerate(state.create_leases):
        if lease.lease_id == lease_id:
            return state.create_leases.pop(index)
    return None


def drop_unsettled(state: GateState, lease_id: str) -> UnsettledCreate | None:
    """Settle one unsettled create: its own answer came, late."""
    for index, unsettled in enumerate(state.unsettled):
        if unsettled.lease_id == lease_id:
            return state.unsettled.pop(index)
    return None


def drop_leases_of(state: GateState, tenant: str, entity: str) -> int:
    """Drop every lease the entity holds, and its unsettled creates; returns how many
    counted against a limit."""
    counted = state.tenant_in_use(tenant)
    state.create_leases = not_owned_by(state.create_leases, tenant, entity)
    state.sandbox_leases = not_owned_by(state.sandbox_leases, tenant, entity)
    state.unsettled = not_owned_by(state.unsettled, tenant, entity)
    return counted - state.tenant_in_use(tenant)


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
    """Hold one capacity lease per entity: a re-create replaces the entity's old lease, and
    its unsettled creates (the same idempotency key: this is the sandbox they may have
    made)."""
    state.sandbox_leases = not_owned_by(state.sandbox_leases, tenant, entity)
    state.unsettled = not_owned_by(state.unsettled, tenant, entity)
    state.sandbox_leases.append(
        SandboxLease(lease_id, tenant, entity, now_ms + ttl_ms, now_ms, sandbox_id)
    )
