"""What blocks a waiter, and when it may go: one walk for both gate kinds.

What every limit has free now is handed to the turns at the front of the fair order; the
waiter goes when its own turn is among those that fit, so a grant and a "queued" answer
never disagree. A limit the account shares stops the walk (the head is never overtaken);
a tenant's own limit skips that tenant's turns. Why the token bounds hold: docs/gates.md.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from enum import Enum
from itertools import chain, islice
from typing import Protocol

from provisioner.config import ACCOUNT, TENANT, AdmissionConfig, ResourceGate
from provisioner.gates.bucket import EPSILON
from provisioner.gates.document import (
    Costs,
    GateDocument,
    GateState,
    ResourceState,
    RetryEntry,
    margin_of,
    owned_by,
)
from provisioner.gates.place import Place, Stage
from provisioner.gates.policies import (
    RateLimit,
    capacity_free,
    capacity_in_use,
    capacity_limit,
    capacity_wait_ms,
    cooling_ms,
    lease_ends,
    lease_wait_ms,
    rate_available,
    rate_limits,
    rate_wait_ms,
    retry_token_wait_ms,
    retry_tokens,
    slot_wait_ms,
    slots_in_use,
)
from provisioner.gates.queue import (
    Eligible,
    can_remove,
    drop_ticket,
    fair_order,
    fresh_position,
    live_reservations,
)
from provisioner.gates.results import (
    REASON_BACKOFF,
    REASON_CAPACITY,
    REASON_CONCURRENCY,
    REASON_CREATE_SLOTS,
    REASON_RATE,
    REASON_TENANT_CONCURRENCY,
    Queued,
    Waiter,
)


@dataclass(frozen=True, slots=True)
class Turn:
    """A retry (the gate knows its entity) or a fresh ticket (its key names the entity)."""

    tenant: str
    entity: str | None = None
    ticket: int | None = None

    @property
    def is_retry(self) -> bool:
        return self.ticket is None

    @classmethod
    def of(cls, waiter: Waiter, place: Place) -> Turn:
        if place.stage is Stage.RETRYING:
            return cls(waiter.tenant, waiter.entity)
        return cls(waiter.tenant, ticket=place.ticket)


class Hold(Enum):
    """How far a limit a turn does not fit holds the walk back."""

    ALL = "all"  # a limit the account shares: nothing behind the turn may overtake it
    TENANT = "tenant"  # the tenant's own limit: its later turns are passed over too
    TURN = "turn"  # only this turn


Blocked = tuple[str, Hold]


class Headroom(Protocol):
    def blocker(self, turn: Turn) -> Blocked | None: ...

    def take(self, turn: Turn) -> None: ...


@dataclass(frozen=True, slots=True)
class Walk:
    """`reached`: the walk came to `until`, and `blocked` holds that turn back (None: it
    fits); else `blocked` stopped the walk (None: the turns ran out)."""

    chosen: list[Turn]
    blocked: Blocked | None
    reached: bool


def walk(turns: Iterable[Turn], headroom: Headroom, until: Turn | None = None) -> Walk:
    chosen: list[Turn] = []
    held_tenants: set[str] = set()
    for turn in turns:
        if turn in chosen or (turn.tenant in held_tenants and turn != until):
            continue
        blocked = headroom.blocker(turn)
        if turn == until:
            return Walk(chosen, blocked, True)
        if blocked is None:
            headroom.take(turn)
            chosen.append(turn)
        elif blocked[1] is Hold.ALL:
            return Walk(chosen, blocked, False)
        elif blocked[1] is Hold.TENANT:
            held_tenants.add(turn.tenant)
    return Walk(chosen, None, False)


@dataclass(frozen=True, slots=True)
class Estimate:
    """One limit as a waiter sees it: when it should let the waiter go (`wait_ms`), its
    (in use, limit), and whether that wait is exact (a bucket's own refill, not a guess)."""

    reason: str
    wait_ms: int
    usage: tuple[int, int]
    exact: bool = False


def queued_answer(
    config: AdmissionConfig,
    state: GateDocument,
    now_ms: int,
    place: Place,
    at: int,
    limits: list[Estimate],
    held: Estimate,
    uniform: Callable[[], float],
    wait_cap_ms: int | None = None,
) -> Queued:
    """The answer to the waiter at `at` that `held` holds back (docs/gates.md, walk26). An
    exact wait polls from 1 ms; a guess no sooner than poll_min, so an overdue one never loops."""
    cooling = cooling_ms(state, now_ms)
    eta = cooling + max(limit.wait_ms for limit in [*limits, held])
    if cooling > 0:
        held = Estimate(REASON_BACKOFF, 0, limits[0].usage)
    exact = held.exact and eta > 0
    wait = eta if exact or wait_cap_ms is None else min(eta, wait_cap_ms)
    floor = 1 if exact else config.poll_min_ms
    retry_after = max(floor, min(wait, config.poll_max_ms))
    retry_at = eta if exact else max(eta, config.poll_min_ms)
    if cooling > 0:
        retry_after = max(cooling, retry_after) + int(uniform() * config.poll_min_ms)
        retry_at = max(retry_at, retry_after)
    in_use, limit = held.usage
    waited = now_ms - place.since_ms
    retry_at = now_ms + max(1, retry_at)
    return Queued(
        at, state.waiting(), in_use, limit, held.reason, retry_after, eta, waited, retry_at
    )


# The sandbox gate


@dataclass(frozen=True, slots=True)
class Permits:
    cooling_ms: int
    slots: int
    capacity: int
    rate: int

    @classmethod
    def of(cls, state: GateState, config: AdmissionConfig, now_ms: int) -> Permits:
        return cls(
            cooling_ms(state, now_ms),
            max(0, config.create_slots - slots_in_use(state)),
            capacity_free(state, config),
            rate_available(state, config, now_ms),
        )


class SandboxHeadroom:
    """A retry that reclaims its own possible sandbox needs a slot but no capacity; a
    retry held back by capacity is passed over rather than stopping the walk."""

    def __init__(self, state: GateState, config: AdmissionConfig, permits: Permits) -> None:
        self.state = state
        self.slots = permits.slots
        self.room = permits.capacity
        self.usage = state.usage_by_tenant()
        self.limit = config.max_sandboxes_per_tenant

    def _reclaims(self, turn: Turn) -> bool:
        return turn.is_retry and self.state.reclaims(turn.tenant, turn.entity or "")

    def blocker(self, turn: Turn) -> Blocked | None:
        if self.slots <= 0:
            return REASON_CREATE_SLOTS, Hold.ALL
        if self._reclaims(turn):
            return None
        if self.room <= 0:
            return REASON_CAPACITY, Hold.TURN if turn.is_retry else Hold.ALL
        if self.limit is not None and self.usage.get(turn.tenant, 0) >= self.limit:
            return REASON_CAPACITY, Hold.TURN
        return None

    def take(self, turn: Turn) -> None:
        self.slots -= 1
        if not self._reclaims(turn):
            # A grant can fill a tenant's room, so count grants per tenant along the way.
            self.usage[turn.tenant] = self.usage.get(turn.tenant, 0) + 1
            self.room -= 1


def eligibility(state: GateState, config: AdmissionConfig) -> Eligible:
    limit = config.max_sandboxes_per_tenant
    if limit is None:
        return lambda tenant: True
    usage = state.usage_by_tenant()
    return lambda tenant: usage.get(tenant, 0) < limit


def ready_retries(
    state: GateState, config: AdmissionConfig, eligible: Eligible
) -> list[RetryEntry]:
    """The first retries whose tenant has room, or that take no new room, as many as the
    budget pays for."""
    ready = (e for e in state.retries if eligible(e.tenant) or state.reclaims(e.tenant, e.entity))
    return list(islice(ready, max(0, int(retry_tokens(state, config) + EPSILON))))


@dataclass(frozen=True, slots=True)
class Scheduled:
    """A turn the free permits belong to; `due_ms` until its rate token is due."""

    turn: Turn
    due_ms: int


def schedule(
    state: GateState, config: AdmissionConfig, now_ms: int, permits: Permits, eligible: Eligible
) -> list[Scheduled]:
    """The k-th turn may go when the rate's k-th token is due (the create rate delays
    rather than blocks). None during a cooldown: nothing starts, so nothing is promised."""
    if permits.cooling_ms > 0 or permits.slots <= 0:
        return []
    # Lazily: the walk stops where the permits run out, whatever the waiters behind.
    turns = chain(
        [Turn(r.tenant, r.entity, r.ticket) for r in live_reservations(state)],
        (Turn(e.tenant, e.entity) for e in ready_retries(state, config, eligible)),
        (Turn(t, ticket=n) for t, n in fair_order(state, eligible)),
    )
    chosen = walk(turns, SandboxHeadroom(state, config, permits)).chosen
    return [
        Scheduled(turn, rate_wait_ms(state, config, now_ms, index + 1))
        for index, turn in enumerate(chosen)
    ]


@dataclass(frozen=True, slots=True)
class Assessment:
    """What a walk found at either gate. `queued`: why the waiter waits (None: its turn has
    come). `scheduled`: the turns to promise the free permits to (those due now may go).
    `dropped`: dead turns left the queue on the way."""

    queued: Queued | None
    scheduled: list[Scheduled]
    dropped: bool = False

    @property
    def goes(self) -> bool:
        return self.queued is None


def removable(state: GateDocument, tenant: str, place: Place) -> bool:
    if place.stage is Stage.RETRYING or place.ticket is None:
        return True
    queue = state.queue_of(tenant)
    return queue is not None and can_remove(queue, place.ticket)


@dataclass(frozen=True, slots=True)
class Asking:
    """A waiter asking the sandbox gate now, from `place`: what both `assess` and `waiting`
    look at. `uniform` jitters the answer's poll time."""

    state: GateState
    config: AdmissionConfig
    now_ms: int
    waiter: Waiter
    place: Place
    uniform: Callable[[], float]


def assess(asking: Asking) -> Assessment:
    state, config, now_ms = asking.state, asking.config, asking.now_ms
    permits = Permits.of(state, config, now_ms)
    eligible = eligibility(state, config)
    planned = schedule(state, config, now_ms, permits, eligible)
    mine = Turn.of(asking.waiter, asking.place)
    own = next((s for s in planned if s.turn == mine), None)
    if own is not None and own.due_ms <= 0:
        return Assessment(None, planned)
    queued = waiting(asking, permits, eligible)
    if own is not None:
        # Its permit is promised; only its rate token is not due yet, to the millisecond.
        queued = replace(
            queued,
            reason=REASON_RATE,
            retry_after_ms=max(1, min(own.due_ms, config.poll_max_ms)),
            eta_ms=own.due_ms,
            retry_at_ms=now_ms + own.due_ms,
        )
    return Assessment(queued, planned)


def waiting(
    asking: Asking, permits: Permits | None = None, eligible: Eligible | None = None
) -> Queued:
    state, config, now_ms = asking.state, asking.config, asking.now_ms
    waiter, place = asking.waiter, asking.place
    permits = permits or Permits.of(state, config, now_ms)
    eligible = eligible or eligibility(state, config)
    turn = Turn.of(waiter, place)
    # Its 1-based place in the fair order.
    if turn.ticket is None:
        entry = owned_by(state.retries, waiter.tenant, waiter.entity)
        at = max(1, len(state.retries) if entry is None else state.retries.index(entry) + 1)
    else:
        ready = ready_retries(state, config, eligible)
        at = max(1, len(ready) + fresh_position(state, turn.tenant, turn.ticket, eligible))
    # A retry reclaiming its own possible sandbox waits for no capacity.
    reclaims = turn.is_retry and state.reclaims(waiter.tenant, waiter.entity)
    slots = Estimate(
        REASON_CREATE_SLOTS,
        slot_wait_ms(state, config, now_ms, at),
        (slots_in_use(state), config.create_slots),
    )
    capacity = Estimate(
        REASON_CAPACITY,
        0 if reclaims else capacity_wait_ms(state, config, now_ms, at),
        (capacity_in_use(state), capacity_limit(state, config)),
    )
    # Only the rate's estimate is exact (else a fast rate would be throttled to one grant
    # per poll_min); an unused rate token waits on someone else's turn.
    rate = Estimate(
        REASON_RATE,
        rate_wait_ms(state, config, now_ms, at),
        (config.create_burst - permits.rate, config.create_burst),
        exact=permits.rate == 0,
    )
    rooms = [
        (capacity, at if reclaims else permits.capacity),
        (slots, permits.slots),
        (rate, permits.rate),
    ]
    blocked = [limit for limit, room in rooms if room < at]
    # Nothing blocked: the permits ahead belong to waiters that have not polled yet.
    held = max(blocked, key=lambda limit: limit.wait_ms, default=slots)
    if not reclaims and not eligible(waiter.tenant):
        limit = config.max_sandboxes_per_tenant or config.max_sandboxes
        held = Estimate(REASON_CAPACITY, 0, (state.tenant_in_use(waiter.tenant), limit))
    elif turn.is_retry and retry_tokens(state, config) < 1.0 and permits.cooling_ms <= 0:
        held = Estimate(REASON_BACKOFF, retry_token_wait_ms(state, config, 1), slots.usage)
    # Slot and capacity estimates rest on the assumed create latency until one is measured.
    cap = config.create_latency_ms // 2 if state.latency_ms is None else None
    limits = [slots, capacity, rate]  # the first one's usage is shown during a cooldown
    return queued_answer(config, state, now_ms, place, at, limits, held, asking.uniform, cap)


# The resource gates

# Turns looked at per decision (each costs one read of its ticket key).
LOOKAHEAD = 32
_DEAD = "dead"

# Reads a queued turn's estimated cost from its ticket key; None when the ticket is dead.
ReadCost = Callable[[str, int], Costs | None]


class ResourceHeadroom:
    """Each turn takes its estimated cost; a dead ticket (no cost to read) goes to `dead`."""

    def __init__(
        self,
        state: ResourceState,
        gate: ResourceGate,
        now_ms: int,
        read_cost: ReadCost | None = None,
        known: dict[Turn, Costs] | None = None,
    ) -> None:
        self.state = state
        self.gate = gate
        self.now_ms = now_ms
        self.rates = rate_limits(gate)
        permits = gate.permits(ACCOUNT)
        self.free = None if permits is None else permits - len(state.leases)
        self.held: Counter[str] = Counter(lease.tenant for lease in state.leases)
        self.read_cost = read_cost
        self.costs: dict[Turn, Costs] = dict(known or {})
        self.dead: list[Turn] = []
        self._levels: dict[str, float] = {}
        # Per bucket: the sum and the largest of the in-flight calls' margins.
        self._exposure: dict[str, tuple[float, float]] = {}

    def level(self, rate: RateLimit, tenant: str) -> float:
        name = rate.bucket_id(tenant)
        if name not in self._levels:
            self._levels[name] = rate.level(self.state, tenant, self.now_ms)
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
        """Beyond a turn's estimate: every margin in flight and its own but the largest."""
        total, largest = self.exposure(rate, tenant)
        margin = margin_of(costs, rate.kind)
        return total + margin - max(largest, margin)

    def tenant_has_room(self, tenant: str) -> bool:
        cap = self.gate.permits(TENANT)
        return cap is None or self.held[tenant] < cap

    def blocker(self, turn: Turn) -> Blocked | None:
        costs = self.costs.get(turn)
        if costs is None and self.read_cost is not None and turn.ticket is not None:
            costs = self.read_cost(turn.tenant, turn.ticket)
            if costs is not None:
                self.costs[turn] = costs
        if costs is None:
            self.dead.append(turn)
            return _DEAD, Hold.TURN
        if self.free is not None and self.free <= 0:
            return REASON_CONCURRENCY, Hold.ALL
        if not self.tenant_has_room(turn.tenant):
            return REASON_TENANT_CONCURRENCY, Hold.TENANT
        for rate in self.rates:
            need = costs.get(rate.kind, 0.0) + self.reserve(rate, turn.tenant, costs)
            if self.level(rate, turn.tenant) + EPSILON < need:
                return rate.reason, Hold.TENANT if rate.per_tenant else Hold.ALL
        return None

    def take(self, turn: Turn) -> None:
        costs = self.costs[turn]
        if self.free is not None:
            self.free -= 1
        self.held[turn.tenant] += 1
        for rate in self.rates:
            name = rate.bucket_id(turn.tenant)
            self._levels[name] = self.level(rate, turn.tenant) - costs.get(rate.kind, 0.0)
            total, largest = self.exposure(rate, turn.tenant)
            margin = margin_of(costs, rate.kind)
            self._exposure[name] = (total + margin, max(largest, margin))

    def estimates(
        self, tenant: str, at: int, costs: Costs, ahead: list[tuple[str, Costs]]
    ) -> list[Estimate]:
        """Each limit, in the gate's order, as the tenant's turn at `at` sees it once the
        turns `ahead` (tenant, costs) have gone (this headroom is before any walk)."""
        state, gate, now_ms = self.state, self.gate, self.now_ms
        cycle = state.hold_ms if state.hold_ms is not None else gate.lease_ms
        limits: list[Estimate] = []
        # The account's turns ahead are the `at - 1` before this one; the tenant's own limit
        # is asked only by its first turn. Leases held beyond a lowered limit end first.
        for reason, scope, leases, turn in (
            (REASON_CONCURRENCY, ACCOUNT, state.leases, at),
            (REASON_TENANT_CONCURRENCY, TENANT, [x for x in state.leases if x.tenant == tenant], 1),
        ):
            permits = gate.permits(scope)
            if permits is not None:
                ends = lease_ends(leases, now_ms, cycle)
                wait = lease_wait_ms(ends, len(leases) - permits + turn, cycle)
                limits.append(Estimate(reason, wait, (len(leases), permits)))
        for rate in self.rates:
            need = costs.get(rate.kind, 0.0) + sum(
                cost.get(rate.kind, 0.0)
                for of, cost in ahead
                if not rate.per_tenant or of == tenant
            )
            # The reserve comes back when calls in flight settle, not by refill: an estimate,
            # as lease ends are.
            reserve = self.reserve(rate, tenant, costs)
            tat = state.buckets.get(rate.bucket_id(tenant), 0.0)
            wait = rate.bucket.wait_ms(tat, now_ms, need + reserve)
            used = max(0, math.ceil(rate.bucket.burst - self.level(rate, tenant) - EPSILON))
            usage = (used, math.floor(rate.bucket.burst))
            limits.append(Estimate(rate.reason, wait, usage, exact=reserve <= 0))
        return limits


def resource_assess(
    state: ResourceState,
    gate: ResourceGate,
    config: AdmissionConfig,
    now_ms: int,
    tenant: str,
    place: Place,
    costs: Costs,
    read_cost: ReadCost,
    uniform: Callable[[], float],
) -> Assessment:
    """Whether the waiter's turn fits now; the dead tickets found on the way leave the queue."""
    assert place.ticket is not None
    mine = Turn(tenant, ticket=place.ticket)
    walked = ResourceHeadroom(state, gate, now_ms, read_cost, {mine: costs})
    went = Walk([], (REASON_BACKOFF, Hold.ALL), False)
    if cooling_ms(state, now_ms) <= 0:
        # Up to the waiter's own turn; reserved turns first (their permits are promised).
        reserved = (Turn(r.tenant, ticket=r.ticket) for r in live_reservations(state))
        fresh = (Turn(t, ticket=n) for t, n in fair_order(state, walked.tenant_has_room))
        turns: list[Turn] = []
        for turn in chain(reserved, fresh):
            if turn.ticket is None or turn in turns:
                continue
            turns.append(turn)
            if turn == mine or len(turns) >= LOOKAHEAD:
                break
        went = walk(turns, walked, until=mine)
    blocked = went.blocked
    if not went.reached and blocked is None:
        # No room for its tenant, or the permits went to turns ahead (or beyond LOOKAHEAD).
        blocked = walked.blocker(mine)
    for turn in walked.dead:
        assert turn.ticket is not None
        drop_ticket(state, turn.tenant, turn.ticket)
    scheduled = [Scheduled(turn, 0) for turn in went.chosen]
    dropped = bool(walked.dead)
    if went.reached and blocked is None and removable(state, tenant, place):
        return Assessment(None, scheduled, dropped)
    headroom = ResourceHeadroom(state, gate, now_ms)  # as it was before the walk
    at = max(1, fresh_position(state, tenant, place.ticket, headroom.tenant_has_room))
    ahead = [(turn.tenant, walked.costs[turn]) for turn in went.chosen]
    limits = headroom.estimates(tenant, at, costs, ahead)
    # Nothing blocked: the permits went to turns ahead.
    held = next((limit for limit in limits if blocked and limit.reason == blocked[0]), limits[0])
    queued = queued_answer(config, state, now_ms, place, at, limits, held, uniform)
    return Assessment(queued, scheduled, dropped)
