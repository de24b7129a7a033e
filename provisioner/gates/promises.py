"""Promising free permits: the reservations a sandbox-gate decision makes, and whom to wake.

Any decision that leaves a permit free for turns other than the caller's (a grant that
left slots, a settled create, a release, a queued answer) promises it here, to the turns
the schedule gives it to (`blocking.schedule`): those that may go now, and the one the next
rate token falls to. Tokens further off are not promised yet, so a tenant that starts
waiting meanwhile still gets its round-robin turn among them.

A new promise to a waiter that is not the caller comes back as a `WakeUp`: that waiter
learns of it only when it is invoked next, so the host that runs this decision may wake it
(`serve`'s push wake-ups) instead of letting the permit wait for its timer.
"""

from __future__ import annotations

from dataclasses import dataclass

from provisioner.config import AdmissionConfig
from provisioner.gates.blocking import Permits, Scheduled, Turn, eligibility, schedule
from provisioner.gates.cas import new_lease_id
from provisioner.gates.document import GateState, ticket_key
from provisioner.gates.queue import reservation_of, reserve
from provisioner.ports import Ports, Scope


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
