"""Settle: the call a permit was granted for is over. Record its actual cost, what the
provider answered, and free the permit.

Each bucket the grant charged is corrected with the actual cost (`bucket.settle_charge`:
what the estimate missed goes into debt at once; what it overcharged comes back only as
far as the bucket would really have held it). A settle that arrives after its lease
expired no longer knows what the grant charged, so it charges the actual input and
output tokens in full: it errs towards waiting, never towards a 429. A 429 or 529 sets
the gate's shared cooldown for every invocation of the account (`gates.policies`, the
same as E2B's 429s).
"""

from __future__ import annotations

from provisioner.gates.bucket import settle_charge
from provisioner.gates.cas import until_settled
from provisioner.gates.document import REQUESTS, Costs, observe_hold
from provisioner.gates.ledger import ResourceLedger, set_bucket
from provisioner.gates.policies import cooling_ms, rate_limits, record_failure, record_success
from provisioner.gates.provider import ProviderAnswer
from provisioner.gates.results import Settled, Waiter


class Settlement(ResourceLedger):
    def decide(
        self, waiter: Waiter, lease_id: str | None, actual: Costs, answer: ProviderAnswer
    ) -> Settled:
        return until_settled(
            lambda: self._decide(waiter, lease_id, actual, answer), self.config.cas_retries
        )

    def _decide(
        self, waiter: Waiter, lease_id: str | None, actual: Costs, answer: ProviderAnswer
    ) -> Settled:
        loaded = self.load(waiter)
        state, now = loaded.state, loaded.now_ms
        lease = (
            state.lease(lease_id)
            if lease_id is not None
            else state.lease_of(waiter.tenant, waiter.entity)
        )
        if lease is not None and (lease.tenant, lease.entity) != (waiter.tenant, waiter.entity):
            lease = None  # another entity's lease: not this waiter's to settle
        charged: dict[str, float] = {}
        if lease is not None:
            state.leases.remove(lease)
            observe_hold(state, lease.started_ms, now)
            rates = {rate.bucket_id(waiter.tenant): rate for rate in rate_limits(self.gate)}
            for charge in lease.charges:
                rate = rates.get(charge.bucket)
                if rate is None:
                    continue  # the limit was removed from the config since the grant
                known = actual.get(rate.kind)
                if known is None:
                    continue  # not told: what the grant charged stands
                tat = state.buckets.get(charge.bucket, 0.0)
                settled = settle_charge(rate.bucket, tat, now, charge, known)
                set_bucket(state, charge.bucket, settled, now)
                if not rate.per_tenant:
                    charged[rate.kind] = (settled - tat) / rate.bucket.interval_ms
        else:
            for rate in rate_limits(self.gate):
                known = actual.get(rate.kind)
                if rate.kind == REQUESTS or not known:
                    continue
                name = rate.bucket_id(waiter.tenant)
                tat = state.buckets.get(name, 0.0)
                set_bucket(state, name, rate.bucket.charge(tat, now, known), now)
                if not rate.per_tenant:
                    charged[rate.kind] = known
        if answer.backs_off:
            record_failure(state, self.config, now, answer.pause_ms, self.ports.uniform())
        elif answer.kind == "success":
            record_success(state)
        self.save_gate(loaded)
        return Settled(
            lease_id=lease.lease_id if lease is not None else lease_id,
            held=lease is not None,
            answer=answer.kind,
            charged={kind: round(tokens, 3) for kind, tokens in charged.items()},
            cooling_ms=cooling_ms(state, now),
        )
