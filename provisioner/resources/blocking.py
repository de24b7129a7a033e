"""What blocks a waiter at a resource gate, and when it may go.

The same shape as the sandbox gates' `admission.blocking`: one `Budget` of what every limit
has free now is handed to the turns at the front of the fair order (round-robin across
tenants, FIFO within one), each turn taking its own estimated cost; the waiter goes when
its own turn fits. Costs differ per request, so a turn that does not fit a limit shared
by the account stops the walk there: the head of the queue is never overtaken by a
cheaper request behind it (no starvation of large requests). A turn held back by its own
tenant's limits only skips that tenant's turns.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

from provisioner.admission.queue import Eligible, fair_order, fresh_position
from provisioner.admission.results import Queued
from provisioner.config import AdmissionConfig, ResourceGate
from provisioner.resources.limits import (
    REASON_BACKOFF,
    REASON_CONCURRENCY,
    REASON_TENANT_CONCURRENCY,
    RateLimit,
    rate_limits,
)
from provisioner.resources.state import Costs, ResourceState

# Turns looked at per decision (each costs one read of its ticket key).
LOOKAHEAD = 32
_EPSILON = 1e-9

# Reads a queued turn's estimated cost from its ticket key; None when the ticket is dead.
ReadCost = Callable[[str, int], Costs | None]


class Budget:
    """What every limit of the gate has free right now."""

    def __init__(self, state: ResourceState, gate: ResourceGate, now_ms: int) -> None:
        self.state = state
        self.gate = gate
        self.now_ms = now_ms
        self.rates = rate_limits(gate)
        self.free = None if gate.concurrency is None else gate.concurrency - len(state.leases)
        self.held: Counter[str] = Counter(lease.tenant for lease in state.leases)
        self._levels: dict[str, float] = {}

    def level(self, rate: RateLimit, tenant: str) -> float:
        name = rate.bucket_id(tenant)
        if name not in self._levels:
            tat = self.state.buckets.get(name, 0.0)
            self._levels[name] = rate.bucket.level(tat, self.now_ms)
        return self._levels[name]

    def tenant_has_room(self, tenant: str) -> bool:
        cap = self.gate.tenant_concurrency
        return cap is None or self.held[tenant] < cap

    def blocker(self, tenant: str, costs: Costs) -> tuple[str, bool] | None:
        """The limit a request of `tenant` costing `costs` does not fit now, and whether it
        is shared by the whole account; None when it fits every limit."""
        if self.free is not None and self.free <= 0:
            return REASON_CONCURRENCY, True
        if not self.tenant_has_room(tenant):
            return REASON_TENANT_CONCURRENCY, False
        for rate in self.rates:
            if self.level(rate, tenant) + _EPSILON < costs.get(rate.kind, 0.0):
                return rate.reason, not rate.per_tenant
        return None

    def take(self, tenant: str, costs: Costs) -> None:
        if self.free is not None:
            self.free -= 1
        self.held[tenant] += 1
        for rate in self.rates:
            name = rate.bucket_id(tenant)
            self._levels[name] = self.level(rate, tenant) - costs.get(rate.kind, 0.0)


@dataclass(frozen=True, slots=True)
class Verdict:
    """`goes`: the waiter's own turn fits now. Otherwise `reason` names the limit that holds
    it back, and `ahead` the turns (tenant, costs) the free permits went to first. `dead`:
    tickets found dead on the way (to drop from the queue)."""

    goes: bool
    reason: str | None
    ahead: tuple[tuple[str, Costs], ...]
    dead: tuple[tuple[str, int], ...]


def eligibility(budget: Budget) -> Eligible:
    return budget.tenant_has_room


def walk(
    state: ResourceState,
    gate: ResourceGate,
    now_ms: int,
    tenant: str,
    ticket: int,
    costs: Costs,
    read_cost: ReadCost,
) -> Verdict:
    budget = Budget(state, gate, now_ms)
    turns = []
    for turn in fair_order(state, eligibility(budget)):
        turns.append(turn)
        if turn == (tenant, ticket) or len(turns) >= LOOKAHEAD:
            break
    ahead: list[tuple[str, Costs]] = []
    dead: list[tuple[str, int]] = []
    skipped_tenants: set[str] = set()
    for turn_tenant, turn_ticket in turns:
        own = (turn_tenant, turn_ticket) == (tenant, ticket)
        if turn_tenant in skipped_tenants and not own:
            continue
        turn_costs = costs if own else read_cost(turn_tenant, turn_ticket)
        if turn_costs is None:
            dead.append((turn_tenant, turn_ticket))
            continue
        blocked = budget.blocker(turn_tenant, turn_costs)
        if own:
            reason = None if blocked is None else blocked[0]
            return Verdict(blocked is None, reason, tuple(ahead), tuple(dead))
        if blocked is None:
            budget.take(turn_tenant, turn_costs)
            ahead.append((turn_tenant, turn_costs))
        elif blocked[1]:
            return Verdict(False, blocked[0], tuple(ahead), tuple(dead))
        else:
            skipped_tenants.add(turn_tenant)
    # Not reached: its tenant has no room, or the permits free went to turns ahead that
    # have not asked yet (or the turn lies beyond the lookahead).
    blocked = budget.blocker(tenant, costs)
    reason = blocked[0] if blocked is not None else _first_limit(gate, budget)
    return Verdict(False, reason, tuple(ahead), tuple(dead))


def _first_limit(gate: ResourceGate, budget: Budget) -> str:
    if gate.concurrency is not None:
        return REASON_CONCURRENCY
    if gate.tenant_concurrency is not None:
        return REASON_TENANT_CONCURRENCY
    return budget.rates[0].reason


def position(
    state: ResourceState, gate: ResourceGate, now_ms: int, tenant: str, ticket: int
) -> int:
    """1-based place in the fair order, among tenants with room (plus its own)."""
    return fresh_position(state, tenant, ticket, eligibility(Budget(state, gate, now_ms)))


def _lease_wait_ms(ends: list[int], waves: int, cycle_ms: int) -> int:
    """When the `waves`-th permit from now should free up, leases ending at `ends`."""
    if waves <= 0:
        return 0
    if not ends:
        return cycle_ms
    wave, slot = divmod(waves - 1, len(ends))
    return ends[slot] + wave * cycle_ms


def waiting(
    state: ResourceState,
    gate: ResourceGate,
    admission: AdmissionConfig,
    now_ms: int,
    tenant: str,
    ticket: int,
    since_ms: int,
    costs: Costs,
    verdict: Verdict,
    cooling_ms: int,
    uniform: Callable[[], float],
) -> Queued:
    """Why the waiter waits, how long it should (`eta_ms`) and when to ask again."""
    budget = Budget(state, gate, now_ms)
    at = max(1, position(state, gate, now_ms, tenant, ticket))
    cycle = state.hold_ms if state.hold_ms is not None else gate.lease_ms
    ends = sorted(
        max(0, min(lease.expires_ms, lease.started_ms + cycle) - now_ms) for lease in state.leases
    )
    waits: dict[str, int] = {}
    usage: dict[str, tuple[int, int]] = {}
    if gate.concurrency is not None:
        free = gate.concurrency - len(state.leases)
        waits[REASON_CONCURRENCY] = _lease_wait_ms(ends, at - max(0, free), cycle)
        usage[REASON_CONCURRENCY] = (len(state.leases), gate.concurrency)
    if gate.tenant_concurrency is not None:
        own_ends = sorted(
            max(0, min(lease.expires_ms, lease.started_ms + cycle) - now_ms)
            for lease in state.leases
            if lease.tenant == tenant
        )
        over = budget.held[tenant] - gate.tenant_concurrency + 1
        waits[REASON_TENANT_CONCURRENCY] = _lease_wait_ms(own_ends, over, cycle)
        usage[REASON_TENANT_CONCURRENCY] = (budget.held[tenant], gate.tenant_concurrency)
    for rate in budget.rates:
        need = costs.get(rate.kind, 0.0) + sum(
            turn_costs.get(rate.kind, 0.0)
            for turn_tenant, turn_costs in verdict.ahead
            if not rate.per_tenant or turn_tenant == tenant
        )
        tat = state.buckets.get(rate.bucket_id(tenant), 0.0)
        waits[rate.reason] = rate.bucket.wait_ms(tat, now_ms, need)
        used = rate.bucket.burst - budget.level(rate, tenant)
        usage[rate.reason] = (max(0, math.ceil(used - _EPSILON)), math.floor(rate.bucket.burst))
    reason = REASON_BACKOFF if cooling_ms > 0 else (verdict.reason or _first_limit(gate, budget))
    eta = cooling_ms + max(waits.values(), default=0)
    in_use, limit = usage.get(reason, usage.get(_first_limit(gate, budget), (0, 0)))
    # A bucket's wait is exact: a waiter it holds back comes back right when its tokens are
    # due. Lease ends are estimates: poll_min keeps those from spinning.
    exact = reason in {rate.reason for rate in budget.rates} and eta > 0
    floor = 1 if exact else admission.poll_min_ms
    retry_after = max(floor, min(eta, admission.poll_max_ms))
    if cooling_ms > 0:
        # Spread the herd that comes back when the cooldown ends.
        retry_after = max(cooling_ms, retry_after) + int(uniform() * admission.poll_min_ms)
    return Queued(
        position=at,
        queue_length=state.waiting(),
        in_use=in_use,
        limit=limit,
        reason=reason,
        retry_after_ms=retry_after,
        eta_ms=eta,
        waited_ms=now_ms - since_ms,
    )
