"""The limits a gate is built from, each a few functions over its part of the document."""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

from provisioner.config import TENANT, AdmissionConfig, ResourceGate
from provisioner.gates.bucket import EPSILON, Bucket
from provisioner.gates.document import (
    INPUT,
    OUTPUT,
    REQUESTS,
    Costs,
    GateDocument,
    GateState,
    ResourceLease,
    ResourceState,
    SandboxLease,
    bucket_id,
    margin_key,
)

# The shared cooldown after a 429/529/5xx.


def backoff_ms(failures: int, config: AdmissionConfig, uniform: float) -> int:
    """Exponential backoff with full jitter: uniform in [0, min(cap, base * 2**failures)]."""
    ceiling = min(config.backoff_cap_ms, config.backoff_base_ms * (2 ** min(failures, 40)))
    return int(uniform * ceiling)


def record_failure(
    state: GateDocument,
    config: AdmissionConfig,
    now_ms: int,
    retry_after_ms: int | None,
    uniform: float,
) -> None:
    """Extend the cooldown (never shorten it)."""
    pause = backoff_ms(state.backoff_failures, config, uniform)
    if retry_after_ms is not None and retry_after_ms >= 0:
        pause = retry_after_ms
    state.backoff_failures += 1
    state.cooldown_until_ms = max(state.cooldown_until_ms, now_ms + pause)


def cooling_ms(state: GateDocument, now_ms: int) -> int:
    return max(0, state.cooldown_until_ms - now_ms)


# The retry budget: retries are paid from tokens earned by first attempts and by time, so
# a storm of failures cannot multiply the load.


def refill_retries(state: GateState, config: AdmissionConfig, now_ms: int) -> None:
    if state.retry_tokens is None:
        state.retry_tokens = config.retry_budget
        state.retry_refilled_ms = now_ms
    elapsed = max(0, now_ms - state.retry_refilled_ms)
    state.retry_tokens = min(
        config.retry_budget, state.retry_tokens + elapsed * config.retry_refill_per_s / 1000.0
    )
    state.retry_refilled_ms = max(state.retry_refilled_ms, now_ms)


def retry_tokens(state: GateState, config: AdmissionConfig) -> float:
    return config.retry_budget if state.retry_tokens is None else state.retry_tokens


def retry_token_wait_ms(state: GateState, config: AdmissionConfig, needed: int) -> int:
    """How long until `needed` whole tokens are banked (poll_max when nothing refills)."""
    missing = needed - retry_tokens(state, config)
    if missing <= 0:
        return 0
    if config.retry_refill_per_s <= 0:
        return config.poll_max_ms
    return int(missing * 1000.0 / config.retry_refill_per_s) + 1


# The sandbox gate's create slots, create rate (a GCRA bucket of one token per create) and
# capacity (creates in flight and unsettled ones count: each may become a sandbox).


def slots_in_use(state: GateState) -> int:
    return len(state.create_leases)


def create_bucket(config: AdmissionConfig) -> Bucket:
    return Bucket(config.rate_interval_ms, config.create_burst)


def rate_available(state: GateState, config: AdmissionConfig, now_ms: int) -> int:
    return max(0, math.floor(create_bucket(config).level(state.rate_tat_ms, now_ms) + EPSILON))


def rate_wait_ms(state: GateState, config: AdmissionConfig, now_ms: int, nth: int) -> int:
    return create_bucket(config).wait_ms(state.rate_tat_ms, now_ms, nth)


def capacity_limit(state: GateState, config: AdmissionConfig) -> int:
    if state.capacity is None:
        return config.max_sandboxes
    return max(1, min(state.capacity, config.max_sandboxes))


def capacity_in_use(state: GateState) -> int:
    return len(state.sandbox_leases) + len(state.create_leases) + len(state.possible_sandboxes())


def capacity_free(state: GateState, config: AdmissionConfig) -> int:
    return max(0, capacity_limit(state, config) - capacity_in_use(state))


def latency_ms(state: GateState, config: AdmissionConfig) -> int:
    return state.latency_ms if state.latency_ms is not None else config.create_latency_ms


def slot_wait_ms(state: GateState, config: AdmissionConfig, now_ms: int, position: int) -> int:
    """When a slot should be free for the waiter at `position`: in waves, each slot serving
    one waiter per create latency."""
    latency = latency_ms(state, config)
    ends = sorted(max(0, c.started_ms + latency - now_ms) for c in state.create_leases)
    # A free slot serves its first waiter now.
    return lease_wait_ms([0] * max(0, config.create_slots - len(ends)) + ends, position, latency)


def capacity_wait_ms(state: GateState, config: AdmissionConfig, now_ms: int, position: int) -> int:
    """When capacity should be free for the waiter at `position`: from the observed hold
    time, else from the sandbox leases' expiries."""
    free = capacity_free(state, config)
    if position <= free:
        return 0
    ends = lease_ends(state.sandbox_leases, now_ms, state.hold_ms)
    if not ends:
        return latency_ms(state, config)
    cycle = max(state.hold_ms if state.hold_ms is not None else ends[-1], latency_ms(state, config))
    # Sandboxes held beyond a lowered limit free no permit when they end.
    limit = capacity_limit(state, config)
    beyond = max(0, capacity_in_use(state) - limit)
    return lease_wait_ms(ends[beyond:][: max(1, limit)], position - free, cycle)


def lease_ends(
    leases: Iterable[SandboxLease | ResourceLease], now_ms: int, hold_ms: int | None
) -> list[int]:
    """In how long each lease should end, soonest first: when it expires, or once held
    `hold_ms` if that is sooner."""
    ends = (
        x.expires_ms if hold_ms is None else min(x.expires_ms, x.started_ms + hold_ms)
        for x in leases
    )
    return sorted(max(0, end - now_ms) for end in ends)


def lease_wait_ms(ends: list[int], waves: int, cycle_ms: int) -> int:
    """When the `waves`-th permit from now should free up: permits freeing at `ends`
    (soonest first), each serving again every `cycle_ms`."""
    if waves <= 0:
        return 0
    if not ends:
        return cycle_ms
    wave, slot = divmod(waves - 1, len(ends))
    return ends[slot] + wave * cycle_ms


# A resource gate's token buckets: each rate of a `config.ResourceGate` is one `RateLimit`.


_RATE_REASONS = {REQUESTS: "rate", INPUT: "input_tokens", OUTPUT: "output_tokens"}
_COST_KINDS = {"rpm": REQUESTS, "itpm": INPUT, "otpm": OUTPUT}


@dataclass(frozen=True, slots=True)
class RateLimit:
    kind: str
    per_tenant: bool
    bucket: Bucket

    @property
    def reason(self) -> str:
        """The queue reason when this bucket holds a waiter back."""
        return ("tenant_" if self.per_tenant else "") + _RATE_REASONS[self.kind]

    def bucket_id(self, tenant: str) -> str:
        return bucket_id(self.kind, tenant if self.per_tenant else None)

    def level(self, state: ResourceState, tenant: str, now_ms: int) -> float:
        return self.bucket.level(state.buckets.get(self.bucket_id(tenant), 0.0), now_ms)


def rate_limits(gate: ResourceGate) -> tuple[RateLimit, ...]:
    return tuple(
        RateLimit(_COST_KINDS[kind], scope == TENANT, Bucket.per_minute(limit.amount, limit.burst))
        for kind, scope, limit in gate.rates()
    )


def request_costs(estimates: dict[str, int], worst_cases: dict[str, int]) -> Costs:
    """One request's estimated `Costs`, with the margin of each kind that declares a worst
    case (the callers check it is not below its estimate)."""
    costs = {REQUESTS: 1.0, INPUT: 0.0, OUTPUT: 0.0}
    costs.update({kind: float(tokens) for kind, tokens in estimates.items()})
    for kind, worst in worst_cases.items():
        if worst > costs[kind]:
            costs[margin_key(kind)] = float(worst) - costs[kind]
    return costs


def too_large(gate: ResourceGate, costs: Costs) -> str | None:
    """Why a request this large can never fit."""
    for (kind, scope, _), rate in zip(gate.rates(), rate_limits(gate), strict=True):
        need = costs.get(rate.kind, 0.0)
        if need > rate.bucket.burst:
            key = gate.key(kind, scope)
            return (
                f"an estimated {need:g} {rate.kind} exceeds the burst of {key} "
                f"({rate.bucket.burst:g}): it could never be granted"
            )
    return None
