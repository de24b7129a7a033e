"""The three gates a create must pass: create slots, create rate, sandbox capacity."""

from __future__ import annotations

import math

from provisioner.config import AdmissionConfig
from provisioner.gates.bucket import Bucket
from provisioner.gates.document import GateState


def slots_in_use(state: GateState) -> int:
    return len(state.create_leases)


def slots_free(state: GateState, config: AdmissionConfig) -> int:
    return max(0, config.create_slots - slots_in_use(state))


# Rate: the account's create rate is a GCRA bucket (`bucket.Bucket`) of one token per
# create; `rate_tat_ms` is its clock.


def create_bucket(config: AdmissionConfig) -> Bucket:
    return Bucket(config.rate_interval_ms, config.create_burst)


def rate_available(state: GateState, config: AdmissionConfig, now_ms: int) -> int:
    return max(0, math.floor(create_bucket(config).level(state.rate_tat_ms, now_ms) + 1e-9))


def rate_wait_ms(state: GateState, config: AdmissionConfig, now_ms: int, nth: int) -> int:
    """How long until the nth create from now is allowed by the rate."""
    return create_bucket(config).wait_ms(state.rate_tat_ms, now_ms, nth)


def take_rate(state: GateState, config: AdmissionConfig, now_ms: int) -> None:
    state.rate_tat_ms = create_bucket(config).charge(state.rate_tat_ms, now_ms, 1)


def rate_in_use(state: GateState, config: AdmissionConfig, now_ms: int) -> int:
    return config.create_burst - rate_available(state, config, now_ms)


# Capacity: creates in flight count too, since each may become a running sandbox, and so
# do the unsettled creates, whose sandbox may be running unrecorded (`possible_sandboxes`).


def capacity_limit(state: GateState, config: AdmissionConfig) -> int:
    if state.capacity is None:
        return config.max_sandboxes
    return max(1, min(state.capacity, config.max_sandboxes))


def capacity_in_use(state: GateState) -> int:
    return len(state.sandbox_leases) + len(state.create_leases) + len(state.possible_sandboxes())


def capacity_free(state: GateState, config: AdmissionConfig) -> int:
    return max(0, capacity_limit(state, config) - capacity_in_use(state))


def tenant_has_room(state: GateState, config: AdmissionConfig, tenant: str) -> bool:
    limit = config.max_sandboxes_per_tenant
    return limit is None or state.tenant_in_use(tenant) < limit


def shrink_capacity(state: GateState, config: AdmissionConfig) -> int:
    """Multiplicative decrease to what was observed: the account is full at our current
    count, so someone else holds the rest. Never below one. Call it after the failed
    create's own lease was dropped."""
    observed = capacity_in_use(state)
    state.capacity = max(1, min(capacity_limit(state, config), observed))
    state.success_streak = 0
    return state.capacity


def note_created(state: GateState, config: AdmissionConfig) -> None:
    """Additive increase: one more after a run of successes, never above the configured."""
    if state.capacity is None:
        return
    state.success_streak += 1
    if state.success_streak >= config.capacity_grow_after:
        state.success_streak = 0
        state.capacity += 1
        if state.capacity >= config.max_sandboxes:
            state.capacity = None


# Waiting estimates.


def latency_ms(state: GateState, config: AdmissionConfig) -> int:
    return state.latency_ms if state.latency_ms is not None else config.create_latency_ms


def slot_wait_ms(state: GateState, config: AdmissionConfig, now_ms: int, position: int) -> int:
    """When a slot should be free for the waiter at `position`: slots free up in waves, each
    slot serving one waiter per observed create latency (O(slots), whatever the position)."""
    latency = latency_ms(state, config)
    ends = sorted(max(0, c.started_ms + latency - now_ms) for c in state.create_leases)
    ends = [0] * max(0, config.create_slots - len(ends)) + ends
    wave, slot = divmod(position - 1, len(ends))
    return ends[slot] + wave * latency


def capacity_wait_ms(state: GateState, config: AdmissionConfig, now_ms: int, position: int) -> int:
    """When capacity should be free for the waiter at `position`: from observed hold times
    when known, else from the sandbox leases' own expiries."""
    limit = capacity_limit(state, config)
    free = capacity_free(state, config)
    if position <= free:
        return 0
    hold = state.hold_ms
    ends = sorted(
        max(0, (s.expires_ms if hold is None else min(s.expires_ms, s.started_ms + hold)) - now_ms)
        for s in state.sandbox_leases
    )
    if not ends:
        return latency_ms(state, config)
    wave, slot = divmod(position - free - 1, max(1, min(limit, len(ends))))
    cycle = hold if hold is not None else ends[-1]
    return ends[min(slot, len(ends) - 1)] + wave * max(cycle, latency_ms(state, config))
