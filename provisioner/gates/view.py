"""The one read-only view of the gates: the `status` snapshots (a few reads, no waiter
keys), the frozen views `inspect_gates` / `inspect_resource` (every waiter, in fair order,
with the reason it waits computed by the same function a decision uses), and
`operation = inspect`, which renders the sandbox gate's view as JSON for the host's
operator view and `/metrics` (so hosts never decode the stored documents; `serve` refuses
the operation from outside, since it names every tenant's waiters). Reading never writes.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Any

from provisioner.config import ACCOUNT, TENANT, AdmissionConfig, ResourceGate, read_config
from provisioner.gates.blocking import assess, waiting
from provisioner.gates.document import GATE_KEY as GATE_KEY
from provisioner.gates.document import (
    Costs,
    GateState,
    ResourceState,
    decode_ticket,
    gate_key,
    owned_by,
    resource_prefix,
    ticket_key,
    waiter_key,
)
from provisioner.gates.ledger import prune, read_state
from provisioner.gates.place import Place, Stage
from provisioner.gates.policies import (
    capacity_in_use,
    capacity_limit,
    cooling_ms,
    latency_ms,
    rate_available,
    rate_limits,
    rate_wait_ms,
    refill_retries,
    retry_tokens,
    slots_in_use,
)
from provisioner.gates.results import Waiter
from provisioner.gates.sandbox import prune_expired
from provisioner.invocation import Request
from provisioner.model import GATES_INSPECTED, Outcome
from provisioner.ports import Ports, Scope, Storage, StorageReader

ACCOUNT_SCOPE = Scope.ACCOUNT
# GATE_KEY (above) is public: every decision writes that document with compare-and-swap,
# so a host may watch its version. Its content is private.


def sandbox_snapshot(
    state: GateState, config: AdmissionConfig, now_ms: int, tenant: str
) -> dict[str, Any]:
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
                "tokens": round(retry_tokens(state, config), 3),
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


def resource_snapshot(ports: Ports, gates: dict[str, ResourceGate], tenant: str) -> dict[str, Any]:
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


# The reason shown for a waiter that will be granted at its next poll (inspection only: the
# component itself grants such a waiter instead of answering a reason).
REASON_DUE = "due"


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
    entry = storage.get(ACCOUNT_SCOPE, GATE_KEY)
    state = GateState() if entry is None else GateState.from_bytes(entry.value)
    if prune:
        prune_expired(state, now_ms)
    refill_retries(state, config, now_ms)
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
        retry_budget=RetryBudget(retry_tokens(state, config), config.retry_budget),
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
    entry = storage.get(ACCOUNT_SCOPE, waiter_key(tenant, entity))
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
        for ticket in queue.tickets():
            found = storage.get(ACCOUNT_SCOPE, ticket_key(queue.tenant, ticket))
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


@dataclass(frozen=True, slots=True)
class ResourceLeaseView:
    """A permit held: `charged` is what its grant charged each bucket (by bucket name)."""

    lease_id: str
    tenant: str
    entity: str
    started_ms: int
    expires_ms: int
    charged: tuple[tuple[str, float], ...]


@dataclass(frozen=True, slots=True)
class BucketView:
    """One token bucket: `reason` names it as a queue reason (`input_tokens`,
    `tenant_rate`, ...), `tenant` is set for a tenant's own bucket. `level` is negative
    while in debt."""

    reason: str
    tenant: str | None
    per_minute: float
    burst: float
    level: float

    @property
    def debt(self) -> float:
        return max(0.0, -self.level)


@dataclass(frozen=True, slots=True)
class ResourceWaiterView:
    """A queued waiter; `entity` and `costs` are None once its ticket's key has expired
    (it stopped asking and will be skipped)."""

    tenant: str
    ticket: int
    entity: str | None
    costs: Costs | None


@dataclass(frozen=True, slots=True)
class ResourceGateView:
    name: str
    now_ms: int
    version: int | None
    concurrency: int | None
    tenant_concurrency: int | None
    leases: tuple[ResourceLeaseView, ...]
    buckets: tuple[BucketView, ...]
    cooldown_until_ms: int
    cooling_ms: int
    backoff_failures: int
    waiters: tuple[ResourceWaiterView, ...]
    hold_ms: int | None
    grants: int

    @property
    def in_use(self) -> int:
        return len(self.leases)

    def held_by(self, tenant: str) -> int:
        return sum(1 for lease in self.leases if lease.tenant == tenant)

    def bucket(self, reason: str, tenant: str | None = None) -> BucketView | None:
        for view in self.buckets:
            if view.reason == reason and view.tenant == tenant:
                return view
        return None


def inspect_resource(
    storage: Storage, now_ms: int, gate: ResourceGate, *, prune_expired: bool = True
) -> ResourceGateView:
    """Read one resource gate. `prune_expired` drops expired leases as the next decision
    will; tenant buckets are listed for the tenants that hold a lease, wait, or whose
    bucket is not full."""
    entry = storage.get(ACCOUNT_SCOPE, gate_key(resource_prefix(gate.name)))
    state = ResourceState() if entry is None else ResourceState.from_bytes(entry.value)
    if prune_expired:
        prune(state, gate, now_ms)
    tenants = sorted(
        {lease.tenant for lease in state.leases}
        | {q.tenant for q in state.ring}
        | {name.partition("\t")[2] for name in state.buckets if "\t" in name}
    )
    buckets: list[BucketView] = []
    for rate in rate_limits(gate):
        for tenant in tenants if rate.per_tenant else [None]:
            name = rate.bucket_id(tenant or "")
            level = rate.bucket.level(state.buckets.get(name, 0.0), now_ms)
            buckets.append(
                BucketView(
                    rate.reason, tenant, rate.bucket.per_minute_rate, rate.bucket.burst, level
                )
            )
    waiters: list[ResourceWaiterView] = []
    for queue in state.ring:
        for ticket in queue.tickets():
            found = storage.get(
                ACCOUNT_SCOPE, ticket_key(queue.tenant, ticket, resource_prefix(gate.name))
            )
            entity, costs = (None, None) if found is None else decode_ticket(found.value)
            waiters.append(ResourceWaiterView(queue.tenant, ticket, entity, costs))
    return ResourceGateView(
        name=gate.name,
        now_ms=now_ms,
        version=None if entry is None else entry.version,
        concurrency=gate.permits(ACCOUNT),
        tenant_concurrency=gate.permits(TENANT),
        leases=tuple(
            ResourceLeaseView(
                lease.lease_id,
                lease.tenant,
                lease.entity,
                lease.started_ms,
                lease.expires_ms,
                tuple((c.bucket, c.tokens) for c in lease.charges),
            )
            for lease in state.leases
        ),
        buckets=tuple(buckets),
        cooldown_until_ms=state.cooldown_until_ms,
        cooling_ms=cooling_ms(state, now_ms),
        backoff_failures=state.backoff_failures,
        waiters=tuple(waiters),
        hold_ms=state.hold_ms,
        grants=state.grants,
    )


def inspect_resources(
    storage: Storage, now_ms: int, gates: dict[str, ResourceGate]
) -> dict[str, ResourceGateView]:
    """Every declared gate (`config.read_config(...).resources`), by name."""
    return {name: inspect_resource(storage, now_ms, gate) for name, gate in gates.items()}


def _plain(value: Any) -> Any:
    if isinstance(value, Enum):  # by name: an enum's value may be its stored encoding
        return value.name.lower()
    if isinstance(value, tuple | list):
        return [_plain(item) for item in value]
    if hasattr(value, "__dataclass_fields__"):
        return {name: _plain(getattr(value, name)) for name in value.__dataclass_fields__}
    return value


def view_to_json(view: GateView) -> dict[str, Any]:
    """The whole view, field for field, and the permits it holds."""
    doc: dict[str, Any] = _plain(view)
    doc["permits_held"] = view.permits_held
    return doc


def inspect(request: Request, ports: Ports) -> Outcome:
    config = read_config(request.config).admission
    view = inspect_gates(ports.storage, ports.clock.now_ms(), config)
    return Outcome(GATES_INSPECTED, view_to_json(view))
