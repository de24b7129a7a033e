"""The limits a gate is built from, each a few functions over its part of the document:
the shared cooldown after a 429/529/5xx, the retry budget (retries paid from tokens earned
by first attempts and by time, so a storm of failures cannot multiply the load), the
sandbox gate's create slots, create rate (GCRA, `bucket.Bucket`) and adaptive capacity,
and a resource gate's concurrency counts and token buckets (`RateLimit`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

from provisioner.config import TENANT, AdmissionConfig, ResourceGate
from provisioner.gates.bucket import Bucket
from provisioner.gates.document import (
    INPUT,
    OUTPUT,
    REQUESTS,
    Costs,
    GateState,
    bucket_id,
    margin_key,
)

# The shared cooldown.


class Cooldown(Protocol):
    """Where a shared cooldown is kept: the sandbox gate document and each resource gate's."""

    cooldown_until_ms: int
    backoff_failures: int


def backoff_ms(failures: int, config: AdmissionConfig, uniform: float) -> int:
    """Exponential backoff with full jitter: uniform in [0, min(cap, base * 2**failures)]."""
    ceiling = min(config.backoff_cap_ms, config.backoff_base_ms * (2 ** min(failures, 40)))
    return int(uniform * ceiling)


def record_failure(
    state: Cooldown,
    config: AdmissionConfig,
    now_ms: int,
    retry_after_ms: int | None,
    uniform: float,
) -> int:
    """Extend the cooldown (never shorten it); returns its new end."""
    if retry_after_ms is not None and retry_after_ms >= 0:
        pause = retry_after_ms
    else:
        pause = backoff_ms(state.backoff_failures, config, uniform)
    state.backoff_failures += 1
    state.cooldown_until_ms = max(state.cooldown_until_ms, now_ms + pause)
    return state.cooldown_until_ms


def record_success(state: Cooldown) -> None:
    state.backoff_failures = 0


def cooling_ms(state: Cooldown, now_ms: int) -> int:
    return max(0, state.cooldown_until_ms - now_ms)


# The retry budget.


class BudgetHolder(Protocol):
    """Where a retry budget is kept: the sandbox gate document."""

    retry_tokens: float | None
    retry_refilled_ms: int


def refill_retries(state: BudgetHolder, config: AdmissionConfig, now_ms: int) -> float:
    if state.retry_tokens is None:
        state.retry_tokens = config.retry_budget
        state.retry_refilled_ms = now_ms
    elapsed = max(0, now_ms - state.retry_refilled_ms)
    state.retry_tokens = min(
        config.retry_budget, state.retry_tokens + elapsed * config.retry_refill_per_s / 1000.0
    )
    state.retry_refilled_ms = max(state.retry_refilled_ms, now_ms)
    return state.retry_tokens


def retry_tokens(state: BudgetHolder, config: AdmissionConfig) -> float:
    return config.retry_budget if state.retry_tokens is None else state.retry_tokens


def earn_retry(state: BudgetHolder, config: AdmissionConfig) -> None:
    state.retry_tokens = min(config.retry_budget, retry_tokens(state, config) + config.retry_ratio)


def spend_retry(state: BudgetHolder, config: AdmissionConfig) -> None:
    state.retry_tokens = retry_tokens(state, config) - 1.0


def retry_token_wait_ms(state: BudgetHolder, config: AdmissionConfig, needed: int) -> int:
    """How long until `needed` whole tokens are banked (large when nothing refills)."""
    missing = needed - retry_tokens(state, config)
    if missing <= 0:
        return 0
    if config.retry_refill_per_s <= 0:
        return config.poll_max_ms
    return int(missing * 1000.0 / config.retry_refill_per_s) + 1


# The sandbox gate: create slots, create rate, sandbox capacity.


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


# A resource gate: concurrency and token buckets. Each rate `config.Limit` of a
# `config.ResourceGate` becomes one `RateLimit`: the cost kind it meters, whether each
# tenant has its own bucket, and the bucket (per minute; a minute's burst unless set).


_RATE_REASONS = {REQUESTS: "rate", INPUT: "input_tokens", OUTPUT: "output_tokens"}
_COST_KINDS = {"rpm": REQUESTS, "itpm": INPUT, "otpm": OUTPUT}


@dataclass(frozen=True, slots=True)
class RateLimit:
    kind: str
    per_tenant: bool
    bucket: Bucket

    @property
    def reason(self) -> str:
        """The queue reason when this bucket holds a waiter back: `rate`, `input_tokens`,
        `output_tokens`, each with `tenant_` in front for a tenant's own bucket."""
        return ("tenant_" if self.per_tenant else "") + _RATE_REASONS[self.kind]

    def bucket_id(self, tenant: str) -> str:
        return bucket_id(self.kind, tenant if self.per_tenant else None)


def rate_limits(gate: ResourceGate) -> tuple[RateLimit, ...]:
    return tuple(
        RateLimit(_COST_KINDS[kind], scope == TENANT, Bucket.per_minute(limit.amount, limit.burst))
        for kind, scope, limit in gate.rates()
    )


def request_costs(estimates: dict[str, int], worst_cases: dict[str, int]) -> Costs:
    """What one request is estimated to cost, by token kind (plus one request), and how
    far each estimate may fall short of the actual: its worst case less the estimate (a
    kind without a worst case: the estimate is its worst case). The callers check that a
    worst case is not below its estimate."""
    costs = {REQUESTS: 1.0, INPUT: 0.0, OUTPUT: 0.0}
    costs.update({kind: float(tokens) for kind, tokens in estimates.items()})
    for kind, worst in worst_cases.items():
        if worst > costs[kind]:
            costs[margin_key(kind)] = float(worst) - costs[kind]
    return costs


def too_large(gate: ResourceGate, costs: Costs) -> str | None:
    """Why a request this large can never fit (its estimate exceeds a bucket's burst)."""
    for (kind, scope, _), rate in zip(gate.rates(), rate_limits(gate), strict=True):
        need = costs.get(rate.kind, 0.0)
        if need > rate.bucket.burst:
            key = gate.key(kind, scope)
            return (
                f"an estimated {need:g} {rate.kind} exceeds the burst of {key} "
                f"({rate.bucket.burst:g}): it could never be granted"
            )
    return None
