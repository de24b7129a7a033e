"""The public, read-only view of an account's admission state.

`inspect_gates` reads the gate document and the waiters' own keys through the guest's
`StorageReader` port (account scope) and returns frozen dataclasses: the create slots with
their leases, the rate, the capacity with its effective limit and sandbox leases, the
backoff, the retry budget, and every waiter in fair order with the reason it waits and its
ETA, computed by the same function a waiter's own `admit` answer comes from
(`blocking.waiting`). Hosts, operators and benchmarks read the state through this module
only; the stored encoding (`state`, `place`) stays private to the guest.

The resource gates (`resource.<name>.<limit>`) have their own view, re-exported here:
`inspect_resource` / `inspect_resources` (`provisioner.gates.resource_view`).

Reading never writes. Each waiter costs two reads (its ticket's key and its own record),
so inspection is O(waiters), unlike a decision; it is meant for operators and tests.
"""

from __future__ import annotations

from dataclasses import dataclass

from provisioner.config import AdmissionConfig
from provisioner.gates import budget
from provisioner.gates.cooldown import cooling_ms
from provisioner.gates.document import owned_by
from provisioner.gates.place import Place, Stage
from provisioner.gates.resource_view import (
    BucketView,
    ResourceGateView,
    ResourceLeaseView,
    ResourceWaiterView,
    inspect_resource,
    inspect_resources,
)
from provisioner.gates.results import Waiter
from provisioner.gates.sandbox_blocking import assess, waiting
from provisioner.gates.sandbox_leases import prune_expired
from provisioner.gates.sandbox_limits import (
    capacity_in_use,
    capacity_limit,
    rate_available,
    rate_wait_ms,
    slots_in_use,
)
from provisioner.gates.sandbox_state import GATE_KEY as _GATE_KEY
from provisioner.gates.sandbox_state import GateState, ticket_key, waiter_key
from provisioner.ports import Scope, StorageReader

# The reason shown for a waiter that will be granted at its next poll (inspection only: the
# component itself grants such a waiter instead of answering a reason).
REASON_DUE = "due"

__all__ = [
    "GATE_KEY",
    "Backoff",
    "BucketView",
    "Capacity",
    "CreateLeaseView",
    "CreateSlots",
    "GateView",
    "Rate",
    "ResourceGateView",
    "ResourceLeaseView",
    "ResourceWaiterView",
    "RetryBudget",
    "SandboxLeaseView",
    "UnsettledCreateView",
    "WaiterView",
    "inspect_gates",
    "inspect_resource",
    "inspect_resources",
]

# The key (account scope) of the account's gate document: every decision writes it with
# compare-and-swap, so a host may watch its version. Its content is private.
GATE_KEY = _GATE_KEY

_ACCOUNT = Scope.ACCOUNT


@dataclass(frozen=True, slots=True)
class CreateLeaseView:
    """A create slot in use: the create `entity` of `tenant` is in flight."""

    lease_id: str
    tenant: str
    entity: str
    started_ms: int
    expires_ms: int


@dataclass(frozen=True, slots=True)
class SandboxLeaseView:
    """A capacity permit: `entity` of `tenant` holds sandbox `sandbox_id`."""

    lease_id: str
    tenant: str
    entity: str
    sandbox_id: str
    started_ms: int
    expires_ms: int


@dataclass(frozen=True, slots=True)
class UnsettledCreateView:
    """A create of `entity` whose outcome is unknown (its holder died mid-call, or it timed
    out): its sandbox may run unrecorded, so it counts against capacity until the entity
    adopts or releases it, or until `until_ms`, when E2B's timeout would have killed it."""

    lease_id: str
    tenant: str
    entity: str
    started_ms: int
    until_ms: int


@dataclass(frozen=True, slots=True)
class CreateSlots:
    in_use: int
    limit: int
    leases: tuple[CreateLeaseView, ...]


@dataclass(frozen=True, slots=True)
class Rate:
    """GCRA at `per_s` with `burst`: `available` creates may start now; the next token
    after those is due in `next_in_ms`."""

    per_s: float
    burst: int
    available: int
    next_in_ms: int


@dataclass(frozen=True, slots=True)
class Capacity:
    """Running sandboxes, creates in flight and unsettled creates (`in_use`) against
    `effective_limit`: the configured `limit` until E2B's concurrent-sandbox 429 shrank
    it."""

    in_use: int
    limit: int
    effective_limit: int
    running: int
    leases: tuple[SandboxLeaseView, ...]
    unsettled: tuple[UnsettledCreateView, ...] = ()


@dataclass(frozen=True, slots=True)
class Backoff:
    """The shared cooldown: nobody calls E2B before `until_ms` (0: never set)."""

    until_ms: int
    cooling_ms: int
    failures: int


@dataclass(frozen=True, slots=True)
class RetryBudget:
    tokens: float
    limit: float


@dataclass(frozen=True, slots=True)
class WaiterView:
    """One waiter. `stage` is `Stage.RETRYING` (its create failed retryably; it waits ahead
    of every fresh ticket) or `Stage.QUEUED` (a fresh ticket). `entity` is None when the
    ticket's liveness key has expired (its waiter stopped polling and will be skipped);
    `alive` says whether it is still expected back (False also for a leftover ticket: one
    whose entity's record no longer holds it). `position` is 1-based in fair order
    (what its own poll would be told), `reason` the gate that holds it back, `eta_ms` the
    estimate of when it may go; `waited_ms` and `attempt` come from its record (None when
    the record is gone)."""

    tenant: str
    entity: str | None
    stage: Stage
    ticket: int | None
    position: int
    reason: str
    eta_ms: int
    waited_ms: int | None
    attempt: int | None
    alive: bool


@dataclass(frozen=True, slots=True)
class ReservationView:
    """A permit promised to one waiting turn: `ticket` for a fresh ticket, `entity` for a
    retry; claimable from `at_ms`, passed on after `by_ms`."""

    tenant: str
    ticket: int | None
    entity: str | None
    at_ms: int
    by_ms: int


@dataclass(frozen=True, slots=True)
class GateView:
    """Everything admission control holds for one account, as of `now_ms`.
    `version` is the gate document's storage version (None: never written)."""

    now_ms: int
    version: int | None
    create_slots: CreateSlots
    rate: Rate
    capacity: Capacity
    backoff: Backoff
    retry_budget: RetryBudget
    waiters: tuple[WaiterView, ...]
    waiting_tenants: tuple[str, ...]
    create_latency_ms: int | None
    hold_ms: int | None
    grants: int
    reservations: tuple[ReservationView, ...] = ()

    @property
    def permits_held(self) -> int:
        """Create slots plus capacity permits held (unsettled creates included)."""
        capacity = self.capacity
        return len(self.create_slots.leases) + len(capacity.leases) + len(capacity.unsettled)

    def waiter(self, tenant: str, entity: str) -> WaiterView | None:
        return owned_by(self.waiters, tenant, entity)

    @property
    def live_waiters(self) -> tuple[WaiterView, ...]:
        """The waiters still expected back; the others hold no sandbox, slot or place
        for anyone, and decisions drop them as they meet them."""
        return tuple(w for w in self.waiters if w.alive)

    @property
    def orphaned_reservations(self) -> tuple[ReservationView, ...]:
        """Reservations whose turn is not waiting: none should exist (a turn that leaves
        the queue, however it leaves, takes its reservation with it)."""
        turns = {
            (w.tenant, w.ticket, None if w.ticket is not None else w.entity) for w in self.waiters
        }
        return tuple(r for r in self.reservations if (r.tenant, r.ticket, r.entity) not in turns)

    @property
    def dead_tickets(self) -> tuple[WaiterView, ...]:
        """Tickets nobody will come back for (a host killed between saving the gate and
        writing its place): they hold nothing, and the next decision that meets one in
        front drops it."""
        return tuple(w for w in self.waiters if not w.alive)


def inspect_gates(
    storage: StorageReader,
    now_ms: int,
    config: AdmissionConfig | None = None,
    *,
    prune: bool = True,
) -> GateView:
    """Read the account's admission state. `prune` drops the leases that have expired by
    `now_ms` (what the next decision will see); without it the leases are as stored.
    `config` must be the integration's (limits and ETAs depend on it); the defaults when
    None."""
    config = config or AdmissionConfig()
    entry = storage.get(_ACCOUNT, GATE_KEY)
    state = GateState() if entry is None else GateState.from_bytes(entry.value)
    if prune:
        prune_expired(state, now_ms)
    budget.refill(state, config, now_ms)
    return GateView(
        now_ms=now_ms,
        version=None if entry is None else entry.version,
        create_slots=CreateSlots(
            slots_in_use(state),
            config.create_slots,
            tuple(
                CreateLeaseView(c.lease_id, c.tenant, c.entity, c.started_ms, c.expires_ms)
                for c in state.create_leases
            ),
        ),
        rate=Rate(
            config.create_rate_per_s,
            config.create_burst,
            rate_available(state, config, now_ms),
            rate_wait_ms(state, config, now_ms, 1),
        ),
        capacity=Capacity(
            capacity_in_use(state),
            config.max_sandboxes,
            capacity_limit(state, config),
            len(state.sandbox_leases),
            tuple(
                SandboxLeaseView(
                    s.lease_id, s.tenant, s.entity, s.sandbox_id, s.started_ms, s.expires_ms
                )
                for s in state.sandbox_leases
            ),
            tuple(
                UnsettledCreateView(u.lease_id, u.tenant, u.entity, u.started_ms, u.until_ms)
                for u in state.unsettled
            ),
        ),
        backoff=Backoff(state.cooldown_until_ms, cooling_ms(state, now_ms), state.backoff_failures),
        retry_budget=RetryBudget(budget.tokens(state, config), config.retry_budget),
        waiters=_waiters(storage, state, config, now_ms),
        waiting_tenants=tuple(queue.tenant for queue in state.ring),
        create_latency_ms=state.latency_ms,
        hold_ms=state.hold_ms,
        grants=state.grants,
        reservations=tuple(
            ReservationView(r.tenant, r.ticket, r.entity, r.at_ms, r.by_ms)
            for r in state.reservations
        ),
    )


def _record(storage: StorageReader, tenant: str, entity: str) -> Place | None:
    entry = storage.get(_ACCOUNT, waiter_key(tenant, entity))
    return None if entry is None else Place.from_bytes(entry.value)


def _waiters(
    storage: StorageReader, state: GateState, config: AdmissionConfig, now_ms: int
) -> tuple[WaiterView, ...]:
    views: list[WaiterView] = []
    for retry in state.retries:
        record = _record(storage, retry.tenant, retry.entity)
        alive = record is not None and record.stage is Stage.RETRYING and record.alive(now_ms)
        place = Place(
            Stage.RETRYING,
            now_ms if record is None else record.since_ms,
            1 if record is None else record.attempt,
        )
        views.append(_view(state, config, now_ms, retry.tenant, retry.entity, place, record, alive))
    for queue in state.ring:
        removed = set(queue.removed)
        for ticket in range(queue.head, queue.tail):
            if ticket in removed:
                continue
            found = storage.get(_ACCOUNT, ticket_key(queue.tenant, ticket))
            entity = None if found is None else found.value.decode("utf-8", "surrogatepass")
            record = None if entity is None else _record(storage, queue.tenant, entity)
            if record is not None and (record.stage is not Stage.QUEUED or record.ticket != ticket):
                record = None  # the entity has moved on; this ticket is a leftover
            place = Place(
                Stage.QUEUED,
                now_ms if record is None else record.since_ms,
                1 if record is None else record.attempt,
                ticket=ticket,
            )
            # Expected back only while its entity's record still holds this ticket: a
            # caller killed between queueing and recording its place leaves a ticket whose
            # entity comes back with a fresh one (and the next decision that meets a dead
            # ticket in front drops it).
            views.append(
                _view(
                    state, config, now_ms, queue.tenant, entity, place, record, record is not None
                )
            )
    views.sort(key=lambda view: (view.stage is not Stage.RETRYING, view.position))
    return tuple(views)


def _view(
    state: GateState,
    config: AdmissionConfig,
    now_ms: int,
    tenant: str,
    entity: str | None,
    place: Place,
    record: Place | None,
    alive: bool,
) -> WaiterView:
    # No jitter: an inspection draws no randomness (the jitter only moves retry_after_ms).
    waiter = Waiter(tenant, entity or "")
    # A waiter whose turn has come (a permit freed since its last answer) is granted at its
    # next poll: no gate holds it, so it is `due`, never a gate it does not wait for.
    due = assess(state, config, now_ms, waiter, place, lambda: 0.0).goes
    queued = waiting(state, config, now_ms, waiter, place, lambda: 0.0)
    return WaiterView(
        tenant=tenant,
        entity=entity,
        stage=place.stage,
        ticket=place.ticket,
        position=queued.position,
        reason=REASON_DUE if due else queued.reason,
        eta_ms=0 if due else queued.eta_ms,
        waited_ms=None if record is None else queued.waited_ms,
        attempt=None if record is None else record.attempt,
        alive=alive,
    )
