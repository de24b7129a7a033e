"""The read-only view of the gates: one built from each gate's state, which `status`
renders without waiters (a few reads) and `operation = inspect` renders whole, every
waiter in fair order with what its own poll would be told, so hosts never decode the
stored documents. `serve` refuses `inspect` from outside: it names every tenant's waiters.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Any

from provisioner.config import ACCOUNT, TENANT, AdmissionConfig, ResourceGate, read_config
from provisioner.gates import policies
from provisioner.gates.blocking import Asking, assess, waiting
from provisioner.gates.document import GATE_KEY as GATE_KEY
from provisioner.gates.document import (
    CreateLease,
    GateState,
    Reservation,
    ResourceState,
    SandboxLease,
    UnsettledCreate,
    owned_by,
    ticket_key,
    waiter_key,
)
from provisioner.gates.ledger import read_state
from provisioner.gates.place import Place, Stage
from provisioner.gates.results import REASON_STORAGE, Waiter
from provisioner.gates.sandbox import prune_expired
from provisioner.invocation import Request
from provisioner.model import GATES_INSPECTED, Outcome
from provisioner.ports import Ports, Scope, StorageReader

# GATE_KEY is public: every decision writes it with compare-and-swap, so a host may watch
# its version. Its content is private.

# The reason shown for a waiter a permit was freed for since its last answer: it is granted
# at its next poll, so no gate holds it.
REASON_DUE = "due"


@dataclass(frozen=True, slots=True)
class CreateSlots:
    in_use: int
    limit: int
    leases: tuple[CreateLease, ...]


@dataclass(frozen=True, slots=True)
class Rate:
    per_s: float
    burst: int
    available: int
    next_in_ms: int


@dataclass(frozen=True, slots=True)
class Capacity:
    """`effective_limit` is `limit` until E2B's concurrent-sandbox 429 shrank it."""

    in_use: int
    limit: int
    effective_limit: int
    running: int
    leases: tuple[SandboxLease, ...]
    unsettled: tuple[UnsettledCreate, ...] = ()


@dataclass(frozen=True, slots=True)
class Backoff:
    until_ms: int
    cooling_ms: int
    failures: int


@dataclass(frozen=True, slots=True)
class RetryBudget:
    tokens: float
    limit: float


@dataclass(frozen=True, slots=True)
class WaiterView:
    """`entity` is None once the ticket's key expired; `alive` is False too for a leftover
    ticket (its entity's record no longer holds it). `waited_ms` and `attempt` are None
    when the record is gone."""

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
class GateView:
    """The sandbox gate as of `now_ms`; `version` is None when never written."""

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
    reservations: tuple[Reservation, ...] = ()

    @property
    def permits_held(self) -> int:
        capacity = self.capacity
        return len(self.create_slots.leases) + len(capacity.leases) + len(capacity.unsettled)

    def waiter(self, tenant: str, entity: str) -> WaiterView | None:
        return owned_by(self.waiters, tenant, entity)

    @property
    def live_waiters(self) -> tuple[WaiterView, ...]:
        return tuple(w for w in self.waiters if w.alive)

    @property
    def orphaned_reservations(self) -> tuple[Reservation, ...]:
        """Reservations whose turn is not waiting: a turn takes its reservation with it
        however it leaves, so none should exist."""
        turns = {
            (w.tenant, w.ticket, None if w.ticket is not None else w.entity) for w in self.waiters
        }
        return tuple(r for r in self.reservations if (r.tenant, r.ticket, r.entity) not in turns)

    @property
    def dead_tickets(self) -> tuple[WaiterView, ...]:
        """Turns nobody comes back for: they hold nothing, and decisions drop them."""
        return tuple(w for w in self.waiters if not w.alive)


def _cooldown(state: GateState | ResourceState, now_ms: int) -> dict[str, int]:
    """The cooldown as `status` shows it."""
    return {"cooling_ms": policies.cooling_ms(state, now_ms), "failures": state.backoff_failures}


def gate_view(
    state: GateState,
    config: AdmissionConfig,
    now_ms: int,
    version: int | None,
    waiters: tuple[WaiterView, ...] = (),
) -> GateView:
    return GateView(
        now_ms=now_ms,
        version=version,
        create_slots=CreateSlots(
            policies.slots_in_use(state),
            config.create_slots,
            tuple(state.create_leases),
        ),
        rate=Rate(
            config.create_rate_per_s,
            config.create_burst,
            policies.rate_available(state, config, now_ms),
            policies.rate_wait_ms(state, config, now_ms, 1),
        ),
        capacity=Capacity(
            policies.capacity_in_use(state),
            config.max_sandboxes,
            policies.capacity_limit(state, config),
            len(state.sandbox_leases),
            tuple(state.sandbox_leases),
            tuple(state.unsettled),
        ),
        backoff=Backoff(
            state.cooldown_until_ms, policies.cooling_ms(state, now_ms), state.backoff_failures
        ),
        retry_budget=RetryBudget(policies.retry_tokens(state, config), config.retry_budget),
        waiters=waiters,
        waiting_tenants=tuple(queue.tenant for queue in state.ring),
        create_latency_ms=state.latency_ms,
        hold_ms=state.hold_ms,
        grants=state.grants,
        reservations=tuple(state.reservations),
    )


def sandbox_snapshot(
    state: GateState, config: AdmissionConfig, now_ms: int, tenant: str
) -> dict[str, Any]:
    """`status`: the view without waiters, and the tenant's share of it."""
    view = gate_view(state, config, now_ms, None)
    slots, capacity, budget = view.create_slots, view.capacity, view.retry_budget
    own = state.queue_of(tenant)
    return {
        "now_ms": now_ms,
        "account": {
            "create_slots": {"in_use": slots.in_use, "limit": slots.limit},
            "rate": plain(view.rate),
            "capacity": {
                "in_use": capacity.in_use,
                "limit": capacity.effective_limit,
                "configured": capacity.limit,
                "running": capacity.running,
                "unsettled": len(capacity.unsettled),
            },
            "backoff": _cooldown(state, now_ms),
            "retry_budget": {"tokens": round(budget.tokens, 3), "max": budget.limit},
            "queue_length": state.waiting(),
            "waiting_tenants": len(view.waiting_tenants),
            "retrying": len(state.retries),
            "create_latency_ms": policies.latency_ms(state, config),
            "hold_ms": view.hold_ms,
            "grants": view.grants,
        },
        "tenant": {
            "tenant": tenant,
            "in_use": state.tenant_in_use(tenant),
            "limit": config.max_sandboxes_per_tenant,
            "running": sum(1 for s in capacity.leases if s.tenant == tenant),
            "creating": sum(1 for c in slots.leases if c.tenant == tenant),
            "queued": 0 if own is None else own.length(),
            "retrying": sum(1 for e in state.retries if e.tenant == tenant),
            "ring_place": 0 if own is None else state.ring.index(own) + 1,
        },
    }


def inspect_gates(
    storage: StorageReader,
    now_ms: int,
    config: AdmissionConfig | None = None,
    *,
    prune: bool = True,
) -> GateView:
    """`prune` drops the leases expired by `now_ms`, as the next decision will. `config`
    must be the integration's: limits and ETAs depend on it."""
    config = config or AdmissionConfig()
    entry = storage.get(Scope.ACCOUNT, GATE_KEY)
    state = GateState() if entry is None else GateState.from_bytes(entry.value)
    if prune:
        prune_expired(state, now_ms)
    policies.refill_retries(state, config, now_ms)
    version = None if entry is None else entry.version
    return gate_view(state, config, now_ms, version, _waiters(storage, state, config, now_ms))


def _record(storage: StorageReader, tenant: str, entity: str) -> Place | None:
    entry = storage.get(Scope.ACCOUNT, waiter_key(tenant, entity))
    return None if entry is None else Place.from_bytes(entry.value)


def _waiters(
    storage: StorageReader, state: GateState, config: AdmissionConfig, now_ms: int
) -> tuple[WaiterView, ...]:
    # (tenant, entity, ticket (None: a retry), its record, expected back)
    turns: list[tuple[str, str | None, int | None, Place | None, bool]] = []
    for retry in state.retries:
        record = _record(storage, retry.tenant, retry.entity)
        alive = record is not None and record.stage is Stage.RETRYING and record.alive(now_ms)
        turns.append((retry.tenant, retry.entity, None, record, alive))
    for queue in state.ring:
        for number in queue.tickets():
            found = storage.get(Scope.ACCOUNT, ticket_key(queue.tenant, number))
            entity = None if found is None else found.value.decode("utf-8", "surrogatepass")
            record = None if entity is None else _record(storage, queue.tenant, entity)
            if record is not None and (record.stage is not Stage.QUEUED or record.ticket != number):
                record = None  # a leftover: its entity queued again or moved on
            turns.append((queue.tenant, entity, number, record, record is not None))
    views: list[WaiterView] = []
    for tenant, entity, ticket, record, alive in turns:
        stage = Stage.RETRYING if ticket is None else Stage.QUEUED
        since, attempt = (now_ms, 1) if record is None else (record.since_ms, record.attempt)
        place = Place(stage, since, attempt, ticket=ticket)
        waiter = Waiter(tenant, entity or "")
        # No jitter: reading draws no randomness.
        asking = Asking(state, config, now_ms, waiter, place, lambda: 0.0)
        due = assess(asking).goes
        queued = waiting(asking)
        reason, eta = (REASON_DUE, 0) if due else (queued.reason, queued.eta_ms)
        waited, tries = (None, None) if record is None else (queued.waited_ms, record.attempt)
        views.append(
            WaiterView(
                tenant, entity, stage, ticket, queued.position, reason, eta, waited, tries, alive
            )
        )
    views.sort(key=lambda view: (view.stage is not Stage.RETRYING, view.position))
    return tuple(views)


def resource_snapshot(ports: Ports, gates: dict[str, ResourceGate], tenant: str) -> dict[str, Any]:
    """`status`: each gate without waiters, for the tenant; or why it is unreadable."""
    now = ports.clock.now_ms()
    found: dict[str, Any] = {}
    for name, gate in gates.items():
        try:
            state, _ = read_state(ports, gate, now)
        except Exception as error:
            found[name] = {"error": REASON_STORAGE, "message": str(error)}
            continue
        own = state.queue_of(tenant)
        found[name] = {
            "concurrency": {"in_use": len(state.leases), "limit": gate.permits(ACCOUNT)},
            "tenant_concurrency": {"in_use": state.held_by(tenant), "limit": gate.permits(TENANT)},
            "rates": {
                rate.reason: {
                    "per_minute": rate.bucket.per_minute_rate,
                    "burst": rate.bucket.burst,
                    "available": round(max(0.0, level), 3),
                    "debt": round(max(0.0, -level), 3),
                }
                for rate in policies.rate_limits(gate)
                for level in [rate.level(state, tenant, now)]
            },
            "backoff": _cooldown(state, now),
            "queue_length": state.waiting(),
            "waiting_tenants": len(state.ring),
            "tenant_queued": 0 if own is None else own.length(),
            "hold_ms": state.hold_ms,
            "grants": state.grants,
        }
    return found


# The fields of a stored record that `inspect` shows, in order (default: all of them).
_SHOWN: dict[type, tuple[str, ...]] = {
    CreateLease: ("lease_id", "tenant", "entity", "started_ms", "expires_ms"),
    SandboxLease: ("lease_id", "tenant", "entity", "sandbox_id", "started_ms", "expires_ms"),
    Reservation: ("tenant", "ticket", "entity", "at_ms", "by_ms"),
}


def plain(value: Any) -> Any:
    """`value` as the JSON of `inspect` shows it."""
    if isinstance(value, Enum):  # by name: an enum's value may be its stored encoding
        return value.name.lower()
    if isinstance(value, tuple | list):
        return [plain(item) for item in value]
    if hasattr(value, "__dataclass_fields__"):
        names = _SHOWN.get(type(value), tuple(value.__dataclass_fields__))
        return {name: plain(getattr(value, name)) for name in names}
    return value


def inspect(request: Request, ports: Ports) -> Outcome:
    config = read_config(request.config).admission
    view = inspect_gates(ports.storage, ports.clock.now_ms(), config)
    return Outcome(GATES_INSPECTED, {**plain(view), "permits_held": view.permits_held})
