"""What blocks a waiter at a resource gate, and when it may go.

One `Headroom` of what every limit has free now is handed to the turns at the front of the
fair order, each taking its own estimated cost; the waiter goes when its own turn fits. A
turn that does not fit a limit shared by the account stops the walk (a large request is
never overtaken by cheaper ones behind it); one held back by its own tenant's limits only
skips that tenant's turns. A turn fits a bucket when the level covers its estimate plus
the reserve (`Headroom.reserve`), so the estimation errors reaching the provider
unaccounted stay within one request's: docs/gates.md gives the argument."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from itertools import chain

from provisioner.config import ACCOUNT, TENANT, AdmissionConfig, ResourceGate
from provisioner.gates.document import Costs, ResourceState, margin_of
from provisioner.gates.policies import RateLimit, rate_limits
from provisioner.gates.queue import (
    Eligible,
    ask_again_ms,
    fair_order,
    fresh_position,
    live_reservations,
    retry_at_wait_ms,
)
from provisioner.gates.results import (
    REASON_BACKOFF,
    REASON_CONCURRENCY,
    REASON_TENANT_CONCURRENCY,
    Queued,
)

# Turns looked at per decision (each costs one read of its ticket key).
LOOKAHEAD = 32
_EPSILON = 1e-9

# Reads a queued turn's estimated cost from its ticket key; None when the ticket is dead.
ReadCost = Callable[[str, int], Costs | None]


class Headroom:
    """What every limit of the gate has free right now."""

    def __init__(self, state: ResourceState, gate: ResourceGate, now_ms: int) -> None:
        self.state = state
        self.gate = gate
        self.now_ms = now_ms
        self.rates = rate_limits(gate)
        permits = gate.permits(ACCOUNT)
        self.free = None if permits is None else permits - len(state.leases)
        self.held: Counter[str] = Counter(lease.tenant for lease in state.leases)
        self._levels: dict[str, float] = {}
        # Per bucket: the sum and the largest of the in-flight calls' margins.
        self._exposure: dict[str, tuple[float, float]] = {}

    def level(self, rate: RateLimit, tenant: str) -> float:
        name = rate.bucket_id(tenant)
        if name not in self._levels:
            tat = self.state.buckets.get(name, 0.0)
            self._levels[name] = rate.bucket.level(tat, self.now_ms)
        return self._levels[name]

    def exposure(self, rate: RateLimit, tenant: str) -> tuple[float, float]:
        name = rate.bucket_id(tenant)
        if name not in self._exposure:
            margins = [
                lease.margin(rate.kind)
                for lease in self.state.leases
                if any(charge.bucket == name for charge in lease.charges)
            ]
            self._exposure[name] = (sum(margins), max(margins, default=0.0))
        return self._exposure[name]

    def reserve(self, rate: RateLimit, tenant: str, costs: Costs) -> float:
        """What the bucket must hold beyond a turn's estimate: every outstanding margin
        with the turn's own, except the largest one."""
        total, largest = self.exposure(rate, tenant)
        margin = margin_of(costs, rate.kind)
        return total + margin - max(largest, margin)

    def tenant_has_room(self, tenant: str) -> bool:
        cap = self.gate.permits(TENANT)
        return cap is None or self.held[tenant] < cap

    def blocker(self, tenant: str, costs: Costs) -> tuple[str, bool] | None:
        """The limit a request of `tenant` costing `costs` does not fit now, and whether it
        is shared by the whole account; None when it fits every limit."""
        if self.free is not None and self.free <= 0:
            return REASON_CONCURRENCY, True
        if not self.tenant_has_room(tenant):
            return REASON_TENANT_CONCURRENCY, False
        for rate in self.rates:
            need = costs.get(rate.kind, 0.0) + self.reserve(rate, tenant, costs)
            if self.level(rate, tenant) + _EPSILON < need:
                return rate.reason, not rate.per_tenant
        return None

    def take(self, tenant: str, costs: Costs) -> None:
        if self.free is not None:
            self.free -= 1
        self.held[tenant] += 1
        for rate in self.rates:
            name = rate.bucket_id(tenant)
            self._levels[name] = self.level(rate, tenant) - costs.get(rate.kind, 0.0)
            total, largest = self.exposure(rate, tenant)
            margin = margin_of(costs, rate.kind)
            self._exposure[name] = (total + margin, max(largest, margin))


@dataclass(frozen=True, slots=True)
class Verdict:
    """`goes`: the waiter's own turn fits now. Otherwise `reason` names the limit that holds
    it back, and `ahead` the turns (tenant, costs) the free permits went to first. `dead`:
    tickets found dead on the way (to drop from the queue)."""

    goes: bool
    reason: str | None
    ahead: tuple[tuple[str, Costs], ...]
    dead: tuple[tuple[str, int], ...]
    # The turns (tenant, ticket) the free permits went to, in the order of `ahead`.
    ahead_turns: tuple[tuple[str, int], ...] = ()


def eligibility(headroom: Headroom) -> Eligible:
    return headroom.tenant_has_room


def walk(
    state: ResourceState,
    gate: ResourceGate,
    now_ms: int,
    tenant: str,
    ticket: int,
    costs: Costs,
    read_cost: ReadCost,
) -> Verdict:
    headroom = Headroom(state, gate, now_ms)
    # Reserved turns first: their permits are promised (`gates.queue`).
    reserved = [(r.tenant, r.ticket) for r in live_reservations(state) if r.ticket is not None]
    turns: list[tuple[str, int]] = []
    for turn in chain(reserved, fair_order(state, eligibility(headroom))):
        if turn in turns:
            continue
        turns.append(turn)
        if turn == (tenant, ticket) or len(turns) >= LOOKAHEAD:
            break
    ahead: list[tuple[str, Costs]] = []
    ahead_turns: list[tuple[str, int]] = []
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
        blocked = headroom.blocker(turn_tenant, turn_costs)
        if own:
            reason = None if blocked is None else blocked[0]
            return Verdict(blocked is None, reason, tuple(ahead), tuple(dead), tuple(ahead_turns))
        if blocked is None:
            headroom.take(turn_tenant, turn_costs)
            ahead.append((turn_tenant, turn_costs))
            ahead_turns.append((turn_tenant, turn_ticket))
        elif blocked[1]:
            return Verdict(False, blocked[0], tuple(ahead), tuple(dead), tuple(ahead_turns))
        else:
            skipped_tenants.add(turn_tenant)
    # Not reached: its tenant has no room, or the permits free went to turns ahead that
    # have not asked yet (or the turn lies beyond the lookahead).
    blocked = headroom.blocker(tenant, costs)
    reason = blocked[0] if blocked is not None else _first_limit(gate, headroom)
    return Verdict(False, reason, tuple(ahead), tuple(dead), tuple(ahead_turns))


def _first_limit(gate: ResourceGate, headroom: Headroom) -> str:
    if gate.permits(ACCOUNT) is not None:
        return REASON_CONCURRENCY
    if gate.permits(TENANT) is not None:
        return REASON_TENANT_CONCURRENCY
    return headroom.rates[0].reason


def position(
    state: ResourceState, gate: ResourceGate, now_ms: int, tenant: str, ticket: int
) -> int:
    """1-based place in the fair order, among tenants with room (plus its own)."""
    return fresh_position(state, tenant, ticket, eligibility(Headroom(state, gate, now_ms)))


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
    headroom = Headroom(state, gate, now_ms)
    at = max(1, position(state, gate, now_ms, tenant, ticket))
    cycle = state.hold_ms if state.hold_ms is not None else gate.lease_ms
    ends = sorted(
        max(0, min(lease.expires_ms, lease.started_ms + cycle) - now_ms) for lease in state.leases
    )
    waits: dict[str, int] = {}
    usage: dict[str, tuple[int, int]] = {}
    reserved: set[str] = set()
    permits, tenant_permits = gate.permits(ACCOUNT), gate.permits(TENANT)
    if permits is not None:
        free = permits - len(state.leases)
        waits[REASON_CONCURRENCY] = _lease_wait_ms(ends, at - max(0, free), cycle)
        usage[REASON_CONCURRENCY] = (len(state.leases), permits)
    if tenant_permits is not None:
        own_ends = sorted(
            max(0, min(lease.expires_ms, lease.started_ms + cycle) - now_ms)
            for lease in state.leases
            if lease.tenant == tenant
        )
        over = headroom.held[tenant] - tenant_permits + 1
        waits[REASON_TENANT_CONCURRENCY] = _lease_wait_ms(own_ends, over, cycle)
        usage[REASON_TENANT_CONCURRENCY] = (headroom.held[tenant], tenant_permits)
    for rate in headroom.rates:
        need = costs.get(rate.kind, 0.0) + sum(
            turn_costs.get(rate.kind, 0.0)
            for turn_tenant, turn_costs in verdict.ahead
            if not rate.per_tenant or turn_tenant == tenant
        )
        # The reserve comes back when calls in flight settle, not by refill: an estimate.
        reserve = headroom.reserve(rate, tenant, costs)
        if reserve > 0:
            reserved.add(rate.reason)
        need += reserve
        tat = state.buckets.get(rate.bucket_id(tenant), 0.0)
        waits[rate.reason] = rate.bucket.wait_ms(tat, now_ms, need)
        used = rate.bucket.burst - headroom.level(rate, tenant)
        usage[rate.reason] = (max(0, math.ceil(used - _EPSILON)), math.floor(rate.bucket.burst))
    reason = REASON_BACKOFF if cooling_ms > 0 else (verdict.reason or _first_limit(gate, headroom))
    eta = cooling_ms + max(waits.values(), default=0)
    in_use, limit = usage.get(reason, usage.get(_first_limit(gate, headroom), (0, 0)))
    # A bucket's wait is exact: a waiter it holds back comes back right when its tokens are
    # due. Lease ends, and so a reserve, are estimates: poll_min keeps those from spinning.
    exact = reason in {rate.reason for rate in headroom.rates} - reserved and eta > 0
    retry_after = ask_again_ms(admission, eta, exact, cooling_ms, uniform)
    waited = now_ms - since_ms
    retry_at = now_ms + retry_at_wait_ms(admission, eta, exact, retry_after, cooling_ms)
    return Queued(at, state.waiting(), in_use, limit, reason, retry_after, eta, waited, retry_at)
