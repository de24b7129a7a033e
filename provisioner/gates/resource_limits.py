"""A resource gate's limits as the decisions use them: concurrency counts and token buckets.

Each rate `config.Limit` of a `config.ResourceGate` becomes one `RateLimit`: the cost kind it meters
(a request, input tokens, output tokens), whether each tenant has its own bucket, and the
bucket (`gates.bucket.Bucket`, per minute, a minute's worth of burst unless set).
"""

from __future__ import annotations

from dataclasses import dataclass

from provisioner.config import TENANT, ResourceGate
from provisioner.gates.bucket import Bucket
from provisioner.gates.document import INPUT, OUTPUT, REQUESTS, Costs, bucket_id, margin_key

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
