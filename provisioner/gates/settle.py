"""Settle: the call a permit was granted for is over; record what came back, free the
permit.

After a timeout or 5xx (Unavailable) E2B may have made the sandbox, so the create stays
counted as unsettled until a retry adopts it. At a resource gate a settle that comes after
its lease expired no longer knows what the grant charged, so it charges the actual in full:
it errs towards waiting, never towards a 429.
"""

from __future__ import annotations

from dataclasses import replace

from provisioner.gates.admit import exhausted, leave_queue
from provisioner.gates.blocking import waiting
from provisioner.gates.bucket import settle_charge
from provisioner.gates.cas import until_settled
from provisioner.gates.document import REQUESTS, Costs, averaged, observe_hold
from provisioner.gates.ledger import ResourceLedger, SandboxLedger, SandboxLoaded, set_bucket
from provisioner.gates.place import Place, Stage
from provisioner.gates.policies import (
    capacity_in_use,
    capacity_limit,
    cooling_ms,
    rate_limits,
    record_failure,
)
from provisioner.gates.results import (
    REASON_BACKOFF,
    REASON_CAPACITY,
    CapacityExhausted,
    Created,
    CreateFailed,
    CreateResult,
    Grant,
    ProviderAnswer,
    Queued,
    RateLimited,
    Rejected,
    Settled,
    Unavailable,
    Waiter,
)
from provisioner.gates.sandbox import hold_sandbox, pop_lease, unsettled_from


class SandboxSettlement(SandboxLedger):
    def decide(
        self, waiter: Waiter, grant: Grant, result: CreateResult
    ) -> Queued | Rejected | None:
        return until_settled(lambda: self._decide(waiter, grant, result), self.config.cas_retries)

    def _decide(
        self, waiter: Waiter, grant: Grant, result: CreateResult
    ) -> Queued | Rejected | None:
        loaded = self.load(waiter)
        state, now, config = loaded.state, loaded.now_ms, self.config
        stored = loaded.place
        since = stored.since_ms if stored is not None else now - grant.queued_ms
        lease = pop_lease(state.create_leases, grant.lease_id)
        # Answered after its lease expired: the unsettled create it left is settled now.
        late = None if lease is not None else pop_lease(state.unsettled, grant.lease_id)
        unsettled = late if lease is None else unsettled_from(lease)
        if isinstance(result, Unavailable) and unsettled is not None:
            state.unsettled.append(unsettled)
        if lease is not None:
            state.latency_ms = averaged(state.latency_ms, lease.started_ms, now)
        if isinstance(result, Created):
            self._created(waiter, grant, result, loaded, since)
            return None
        if isinstance(result, CreateFailed):
            self.forget(waiter, self._leave(waiter, loaded))
            return Rejected(result.failure)
        if lease is None and stored is not None and stored.stage is not Stage.CREATING:
            # Settled already (or the waiter moved on): report where it stands now.
            if late is not None and not isinstance(result, Unavailable):
                self.save_gate(loaded)
            if state.retry_of(waiter.tenant, waiter.entity) is None:
                return None
            view = Place(Stage.RETRYING, since, stored.attempt)
            return waiting(state, config, now, waiter, view, self.ports.uniform)
        if isinstance(result, CapacityExhausted):
            # Multiplicative decrease to our count (someone else holds the rest), never below
            # one; the failed create's own lease was dropped above.
            used = capacity_in_use(state)
            state.capacity = max(1, min(capacity_limit(state, config), used))
            state.success_streak = 0
            if used == 0:
                record_failure(state, config, now, None, self.ports.uniform())
        elif isinstance(result, RateLimited | Unavailable):
            retry_after = result.retry_after_ms if isinstance(result, RateLimited) else None
            record_failure(state, config, now, retry_after, self.ports.uniform())
        attempt = grant.attempt + 1
        if attempt > config.max_create_attempts:
            self.forget(waiter, self._leave(waiter, loaded))
            return exhausted(grant.attempt)
        state.add_retry(waiter.tenant, waiter.entity)
        place = Place(Stage.RETRYING, since, attempt)
        queued = waiting(state, config, now, waiter, place, self.ports.uniform)
        if isinstance(result, CapacityExhausted) and queued.reason != REASON_BACKOFF:
            used, limit = capacity_in_use(state), capacity_limit(state, config)
            queued = replace(
                queued, reason=REASON_CAPACITY, in_use=used, limit=limit, retry_at_ms=0
            )
        self.save_gate(loaded)
        ttl = queued.expected_back_ms(now) + config.waiter_ttl_ms
        renewed = Place(Stage.RETRYING, since, attempt, alive_until_ms=now + ttl)
        self.write_place(waiter, loaded, renewed, ttl + config.queue_timeout_ms)
        return queued

    def _created(
        self, waiter: Waiter, grant: Grant, result: Created, loaded: SandboxLoaded, since: int
    ) -> None:
        state, now, config = loaded.state, loaded.now_ms, self.config
        if any(s.lease_id == grant.lease_id for s in state.sandbox_leases):
            return  # settled already
        # Held even when the create lease had expired: the sandbox exists, so it counts.
        timeout_ms = max(1, result.sandbox_timeout_ms)
        tenant, entity, lease_id = waiter.tenant, waiter.entity, grant.lease_id
        hold_sandbox(state, lease_id, tenant, entity, result.sandbox_id, now, timeout_ms)
        state.backoff_failures = 0
        if state.capacity is not None:
            # Additive increase: one more after a run of successes, up to the configured.
            state.success_streak += 1
            if state.success_streak >= config.capacity_grow_after:
                state.success_streak = 0
                state.capacity += 1
                if state.capacity >= config.max_sandboxes:
                    state.capacity = None
        # A late answer for a waiter that had been queued again must not leave it queued.
        self.forget_ticket(waiter, self._leave(waiter, loaded))
        holding = Place(Stage.HOLDING, since, grant.attempt, lease_id=grant.lease_id)
        self.write_place(waiter, loaded, holding, timeout_ms + config.waiter_ttl_ms)

    def _leave(self, waiter: Waiter, loaded: SandboxLoaded) -> int | None:
        """Out of the queue, the create slot it held promised on; returns its ticket."""
        ticket = leave_queue(loaded.state, waiter, loaded.place)
        self.promise(loaded)
        self.save_gate(loaded)
        return ticket


class ResourceSettlement(ResourceLedger):
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
        mine = (waiter.tenant, waiter.entity)
        lease = state.lease_of(*mine) if lease_id is None else state.lease(lease_id)
        if lease is not None and (lease.tenant, lease.entity) != mine:
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
            state.backoff_failures = 0
        self.save_gate(loaded)
        return Settled(
            lease_id=lease.lease_id if lease is not None else lease_id,
            held=lease is not None,
            answer=answer.kind,
            charged={kind: round(tokens, 3) for kind, tokens in charged.items()},
            cooling_ms=cooling_ms(state, now),
        )
