"""What only the sandbox gate keeps: its leases (a dead holder's permit comes back), and
the promises of its free permits (`promise`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TypeVar

from provisioner.config import AdmissionConfig
from provisioner.gates.blocking import Permits, Scheduled, Turn, eligibility, schedule
from provisioner.gates.cas import new_lease_id
from provisioner.gates.document import (
    CreateLease,
    GateState,
    SandboxLease,
    UnsettledCreate,
    not_owned_by,
    ticket_key,
)
from provisioner.gates.queue import reservation_of, reserve
from provisioner.ports import Ports, Scope

LeaseT = TypeVar("LeaseT", CreateLease, UnsettledCreate)


def prune_expired(state: GateState, now_ms: int) -> None:
    """Drop expired leases. An expired create lease gives its slot back but stays as an
    unsettled create: its holder died before hearing E2B's answer, so the sandbox may exist."""
    state.unsettled += [unsettled_from(c) for c in state.create_leases if c.expires_ms <= now_ms]
    state.create_leases = [c for c in state.create_leases if c.expires_ms > now_ms]
    state.sandbox_leases = [s for s in state.sandbox_leases if s.expires_ms > now_ms]
    state.unsettled = [u for u in state.unsettled if u.until_ms > now_ms]


def unsettled_from(lease: CreateLease) -> UnsettledCreate:
    return UnsettledCreate(
        lease.lease_id, lease.tenant, lease.entity, lease.started_ms, lease.sandbox_until_ms
    )


def pop_lease(leases: list[LeaseT], lease_id: str) -> LeaseT | None:
    for index, lease in enumerate(leases):
        if lease.lease_id == lease_id:
            return leases.pop(index)
    return None


def drop_leases_of(state: GateState, tenant: str, entity: str) -> int:
    """Drop the entity's leases and unsettled creates; returns how many counted."""
    counted = state.tenant_in_use(tenant)
    state.create_leases = not_owned_by(state.create_leases, tenant, entity)
    state.sandbox_leases = not_owned_by(state.sandbox_leases, tenant, entity)
    state.unsettled = not_owned_by(state.unsettled, tenant, entity)
    return counted - state.tenant_in_use(tenant)


def hold_sandbox(
    state: GateState,
    lease_id: str,
    tenant: str,
    entity: str,
    sandbox_id: str,
    now_ms: int,
    ttl_ms: int,
) -> None:
    """One capacity lease per entity: it replaces the entity's old lease and unsettled
    creates (the same idempotency key: this is the sandbox they may have made)."""
    state.sandbox_leases = not_owned_by(state.sandbox_leases, tenant, entity)
    state.unsettled = not_owned_by(state.unsettled, tenant, entity)
    state.sandbox_leases.append(
        SandboxLease(lease_id, tenant, entity, now_ms + ttl_ms, now_ms, sandbox_id)
    )


@dataclass(frozen=True, slots=True)
class WakeUp:
    """A permit is promised to `entity` (`reservation`): the host may wake it at `at_ms`
    instead of letting the permit wait for its timer."""

    tenant: str
    entity: str
    at_ms: int
    reservation: str


def promise(
    ports: Ports,
    config: AdmissionConfig,
    state: GateState,
    now_ms: int,
    *,
    scheduled: list[Scheduled] | None = None,
    caller: Turn | None = None,
) -> tuple[bool, list[WakeUp]]:
    """Promise the free permits to the turns the schedule (`blocking.schedule`, of now unless
    given) lets go now and to the one the next rate token falls to: tokens further off
    stay unpromised, so a tenant that starts waiting still gets its round-robin turn.
    Returns whether the document changed, and the waiters other than `caller` newly
    promised a permit."""
    if scheduled is None:
        permits = Permits.of(state, config, now_ms)
        scheduled = schedule(state, config, now_ms, permits, eligibility(state, config))
    pending = [item for item in scheduled if item.due_ms > 0][:1]
    changed = False
    wake_ups: list[WakeUp] = []
    for item in [item for item in scheduled if item.due_ms <= 0] + pending:
        turn = item.turn
        new = reservation_of(state, turn.tenant, turn.ticket, turn.entity) is None
        at, claim, rid = now_ms + item.due_ms, config.reservation_claim_ms, new_lease_id(ports, "v")
        held, moved = reserve(state, turn.tenant, turn.ticket, turn.entity, at, now_ms, claim, rid)
        changed = changed or moved
        if new and turn != caller:
            entity = turn.entity or _ticket_entity(ports, turn)
            if entity is not None:
                wake_ups.append(WakeUp(turn.tenant, entity, held.at_ms, held.rid))
    return changed, wake_ups


def _ticket_entity(ports: Ports, turn: Turn) -> str | None:
    """From the ticket's liveness key (None: expired, its waiter is skipped as dead)."""
    assert turn.ticket is not None
    entry = ports.storage.get(Scope.ACCOUNT, ticket_key(turn.tenant, turn.ticket))
    return None if entry is None else entry.value.decode()
