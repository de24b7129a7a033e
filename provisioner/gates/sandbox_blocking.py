"""What blocks a waiter, and when it may go: the one function both answers come from.

`assess` computes the free permits once (`Permits`), gives them to the turns at the front
of the fair order (`front`: retries the budget pays for first, then fresh tickets
round-robin across tenants with room), and says whether the waiter's own turn is among
them. When it is not, the same permits say why it waits (the gate that holds it back) and
when it should ask again. A grant and a "queued" answer can therefore never disagree.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from itertools import chain

from provisioner.config import AdmissionConfig
from provisioner.gates.document import GateState, RetryEntry
from provisioner.gates.place import Place, Stage
from provisioner.gates.policies import (
    capacity_free,
    capacity_in_use,
    capacity_limit,
    capacity_wait_ms,
    cooling_ms,
    rate_available,
    rate_in_use,
    rate_wait_ms,
    retry_token_wait_ms,
    retry_tokens,
    slot_wait_ms,
    slots_free,
    slots_in_use,
    tenant_has_room,
)
from provisioner.gates.queue import (
    Eligible,
    ask_again_ms,
    eligible_retries,
    fair_order,
    fresh_position,
    live_reservations,
    retry_at_wait_ms,
)
from provisioner.gates.results import (
    REASON_BACKOFF,
    REASON_CAPACITY,
    REASON_CREATE_SLOTS,
    REASON_RATE,
    Queued,
    Waiter,
)


@dataclass(frozen=True, slots=True)
class Turn:
    """One turn in the fair order: a retry (its entity known to the gate) or a fresh ticket
    (the gate knows its number, the ticket's own key names the entity)."""

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


@dataclass(frozen=True, slots=True)
class Permits:
    """What each gate has free right now, computed once per assessment."""

    cooling_ms: int
    slots: int
    capacity: int
    rate: int

    @classmethod
    def of(cls, state: GateState, config: AdmissionConfig, now_ms: int) -> Permits:
        return cls(
            cooling_ms(state, now_ms),
            slots_free(state, config),
            capacity_free(state, config),
            rate_available(state, config, now_ms),
        )


def eligibility(state: GateState, config: AdmissionConfig) -> Eligible:
    """Whether a tenant has room under `max_sandboxes_per_tenant`."""
    limit = config.max_sandboxes_per_tenant
    if limit is None:
        return lambda tenant: True
    usage = state.usage_by_tenant()
    return lambda tenant: usage.get(tenant, 0) < limit


def ready_retries(
    state: GateState, config: AdmissionConfig, eligible: Eligible
) -> list[RetryEntry]:
    """Retries the budget pays for whose tenant has room, or that reclaim their own
    possible sandbox (their create takes no new room)."""
    return eligible_retries(
        state,
        lambda entry: eligible(entry.tenant) or state.reclaims(entry.tenant, entry.entity),
        retry_tokens(state, config),
    )


@dataclass(frozen=True, slots=True)
class Scheduled:
    """A turn the free permits belong to, and how long until its rate token is due
    (`due_ms`, 0: it may go now)."""

    turn: Turn
    due_ms: int


def schedule(
    state: GateState, config: AdmissionConfig, now_ms: int, permits: Permits, eligible: Eligible
) -> list[Scheduled]:
    """The turns the free slots and capacity belong to, in order: reserved turns first
    (their permits are promised), then retries the budget pays for, then fresh tickets
    round-robin across tenants with room. The k-th may go when the rate's k-th token is
    due. A retry that reclaims its own possible sandbox needs a slot but no free capacity.
    None during a cooldown: nothing starts, so nothing is promised."""
    if permits.cooling_ms > 0 or permits.slots <= 0:
        return []
    room = permits.capacity
    usage = state.usage_by_tenant()
    limit = config.max_sandboxes_per_tenant
    chosen: list[Turn] = []
    reserved = [Turn(r.tenant, r.entity, r.ticket) for r in live_reservations(state)]
    # Lazily: the walk stops at the first turns the permits run out on, whatever the
    # number of waiters behind them.
    candidates = chain(
        reserved,
        (Turn(e.tenant, e.entity) for e in ready_retries(state, config, eligible)),
        (Turn(t, ticket=n) for t, n in fair_order(state, eligible)),
    )
    for turn in candidates:
        if len(chosen) >= permits.slots:
            break
        if turn in chosen:
            continue
        if turn.is_retry and state.reclaims(turn.tenant, turn.entity or ""):
            chosen.append(turn)
            continue
        if room <= 0:
            if turn.is_retry:
                continue
            break
        # A grant can fill a tenant's room, so count grants per tenant along the way.
        if limit is not None and usage.get(turn.tenant, 0) >= limit:
            continue
        usage[turn.tenant] = usage.get(turn.tenant, 0) + 1
        room -= 1
        chosen.append(turn)
    return [
        Scheduled(turn, rate_wait_ms(state, config, now_ms, index + 1))
        for index, turn in enumerate(chosen)
    ]


def position(state: GateState, config: AdmissionConfig, turn: Turn, eligible: Eligible) -> int:
    """1-based place in the fair order (0: not found)."""
    if turn.is_retry:
        for index, entry in enumerate(state.retries):
            if (entry.tenant, entry.entity) == (turn.tenant, turn.entity):
                return index + 1
        return len(state.retries)
    ready = ready_retries(state, config, eligible)
    assert turn.ticket is not None
    return len(ready) + fresh_position(state, turn.tenant, turn.ticket, eligible)


@dataclass(frozen=True, slots=True)
class Assessment:
    """`front`: the turns that may go now. `goes`: the waiter's own turn is among them.
    `scheduled`: every turn the free permits belong to (to reserve). `queued`: when the
    waiter does not go, why it waits and when to ask again."""

    front: list[Turn]
    goes: bool
    queued: Queued | None
    scheduled: list[Scheduled]


def assess(
    state: GateState,
    config: AdmissionConfig,
    now_ms: int,
    waiter: Waiter,
    place: Place,
    uniform: Callable[[], float],
) -> Assessment:
    permits = Permits.of(state, config, now_ms)
    eligible = eligibility(state, config)
    planned = schedule(state, config, now_ms, permits, eligible)
    turns = [s.turn for s in planned if s.due_ms <= 0]
    mine = Turn.of(waiter, place)
    if mine in turns:
        return Assessment(turns, True, None, planned)
    queued = waiting(state, config, now_ms, waiter, place, uniform, permits, eligible)
    own = next((s for s in planned if s.turn == mine), None)
    if own is not None:
        # Its permit is promised; only its rate token is not due yet, to the millisecond.
        queued = replace(
            queued,
            reason=REASON_RATE,
            retry_after_ms=max(1, min(own.due_ms, config.poll_max_ms)),
            eta_ms=own.due_ms,
            retry_at_ms=now_ms + own.due_ms,
        )
    return Assessment(turns, False, queued, planned)


def waiting(
    state: GateState,
    config: AdmissionConfig,
    now_ms: int,
    waiter: Waiter,
    place: Place,
    uniform: Callable[[], float],
    permits: Permits | None = None,
    eligible: Eligible | None = None,
) -> Queued:
    """Why the waiter at `place` waits, and when it should ask again. Jitter is drawn from
    `uniform` only during a cooldown."""
    now = now_ms
    permits = permits or Permits.of(state, config, now)
    eligible = eligible or eligibility(state, config)
    turn = Turn.of(waiter, place)
    at = max(1, position(state, config, turn, eligible))
    cooling = permits.cooling_ms
    # A retry reclaiming its own possible sandbox waits for no capacity.
    reclaims = turn.is_retry and state.reclaims(waiter.tenant, waiter.entity)
    waits = {
        REASON_CAPACITY: 0 if reclaims else capacity_wait_ms(state, config, now, at),
        REASON_CREATE_SLOTS: slot_wait_ms(state, config, now, at),
        REASON_RATE: rate_wait_ms(state, config, now, at),
    }
    frees = {
        REASON_CAPACITY: at if reclaims else permits.capacity,
        REASON_CREATE_SLOTS: permits.slots,
        REASON_RATE: permits.rate,
    }
    usage = {
        REASON_CAPACITY: (capacity_in_use(state), capacity_limit(state, config)),
        REASON_CREATE_SLOTS: (slots_in_use(state), config.create_slots),
        REASON_RATE: (rate_in_use(state, config, now), config.create_burst),
    }
    eta = cooling + max(waits.values())
    blocked = [name for name in waits if frees[name] < at]
    if cooling > 0:
        reason = REASON_BACKOFF
        in_use, limit = usage[REASON_CREATE_SLOTS]
    elif not reclaims and not tenant_has_room(state, config, waiter.tenant):
        reason = REASON_CAPACITY
        in_use = state.tenant_in_use(waiter.tenant)
        limit = config.max_sandboxes_per_tenant or config.max_sandboxes
    elif turn.is_retry and retry_tokens(state, config) < 1.0:
        reason = REASON_BACKOFF
        in_use, limit = usage[REASON_CREATE_SLOTS]
        eta = max(eta, retry_token_wait_ms(state, config, 1))
    elif blocked:
        reason = max(blocked, key=lambda name: waits[name])
        in_use, limit = usage[reason]
    else:
        # The permits ahead belong to waiters that have not polled yet.
        reason = REASON_CREATE_SLOTS
        in_use, limit = usage[reason]
    # Only the rate gate's estimate is exact, so a waiter held by it comes back right
    # when its turn is due (else a fast rate would be throttled to one grant per
    # poll_min). Slot and capacity estimates are guesses from observed times, and an
    # unused rate token means the permit waits on someone else's turn: poll_min keeps
    # those from spinning.
    exact = reason == REASON_RATE and eta > 0 and frees[REASON_RATE] == 0
    wait = eta
    if not exact and state.latency_ms is None:
        # The estimate rests on the assumed create latency: come back by the time the
        # first create should have answered, when a measured latency is known.
        wait = min(wait, config.create_latency_ms // 2)
    retry_after = ask_again_ms(config, wait, exact, cooling, uniform)
    waited = now - place.since_ms
    retry_at = now + retry_at_wait_ms(config, eta, exact, retry_after, cooling)
    return Queued(at, state.waiting(), in_use, limit, reason, retry_after, eta, waited, retry_at)
