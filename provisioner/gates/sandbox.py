"""What only the sandbox gate keeps: its leases, and the promises of its free permits.

Leases: every permit has an id and an expiry, and a dead holder's permit comes back (a
create whose holder died stays counted as unsettled: `prune_expired`).

Promises (`promise`): any decision that leaves a permit free for turns other than the
caller's (a grant that left slots, a settled create, a release, a queued answer) promises
it to the turns the schedule gives it to (`blocking.schedule`): those that may go now, and
the one the next rate token falls to. Tokens further off are not promised yet, so a
tenant that starts waiting meanwhile still gets its round-robin turn among them.

A new promise to a waiter that is not the caller comes back as a `WakeUp`: that waiter
learns of it only when it is invoked next, so the host that runs this decision may wake it
(`serve`'s push wake-ups) instead of letting the permit wait for its timer.
"""

from __future__ import annotations

from dataclasses import dataclass

from provisioner.config import AdmissionConfig
from provisioner.gates.blocking import Permits, Scheduled, Turn, eligibility, schedule
from provisioner.gates.cas import new_lease_id
from provisioner.gates.document import (
    CreateLease,
    GateState,
    SandboxLease,
    UnsettledCreate,
    not_owned_by,
    owned_by,
    ticket_key,
)
from provisioner.gates.queue import reservation_of, reserve
from provisioner.ports import Ports, Scope


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


@dataclass(frozen=True, slots=True)
class WakeUp:
    """Wake `entity` of `tenant` at `at_ms`: a permit is promised to it (`reservation`)."""

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
    """Reserve the permits free for scheduled turns (the schedule of `state` now unless
    given); returns whether the document changed, and the waiters other than `caller`
    newly promised a permit."""
    if scheduled is None:
        permits = Permits.of(state, config, now_ms)
        scheduled = schedule(state, config, now_ms, permits, eligibility(state, config))
    pending = [item for item in scheduled if item.due_ms > 0][:1]
    changed = False
    wake_ups: list[WakeUp] = []
    for item in [item for item in scheduled if item.due_ms <= 0] + pending:
        turn = item.turn
        new = reservation_of(state, turn.tenant, turn.ticket, turn.entity) is None
        held, moved = reserve(
            state,
            turn.tenant,
            turn.ticket,
            turn.entity,
            now_ms + item.due_ms,
            now_ms,
            config.reservation_claim_ms,
            new_lease_id(ports, "v"),
        )
        changed = changed or moved
        if new and turn != caller:
            entity = turn.entity or _ticket_entity(ports, turn)
            if entity is not None:
                wake_ups.append(WakeUp(turn.tenant, entity, held.at_ms, held.rid))
    return changed, wake_ups


def _ticket_entity(ports: Ports, turn: Turn) -> str | None:
    """The entity a fresh ticket belongs to, from its liveness key (None: it has expired,
    and its waiter will be skipped as dead)."""
    assert turn.ticket is not None
    entry = ports.storage.get(Scope.ACCOUNT, ticket_key(turn.tenant, turn.ticket))
    return None if entry is None else entry.value.decode()
