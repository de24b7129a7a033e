"""Acquire: grant a permit of a resource gate now, or say where the waiter stands.

One decision, like the sandbox gates' `gates.admit`: load the gate and the waiter's
place, keep the waiter's ticket (a repeated acquire keeps its place), walk the front of
the fair order (`blocking.resource_verdict`), and either grant (take a lease and charge
every bucket its estimate, in the same compare-and-swap that takes the waiter out of the
queue) or answer Queued. An entity holds at most one lease per resource: asking again
while holding it renews the lease and answers the same grant.
"""

from __future__ import annotations

from provisioner.gates.blocking import Verdict, resource_verdict, resource_waiting
from provisioner.gates.bucket import Charge
from provisioner.gates.cas import new_lease_id, until_settled
from provisioner.gates.document import (
    INPUT,
    OUTPUT,
    Costs,
    ResourceLease,
    encode_ticket,
    margin_of,
)
from provisioner.gates.ledger import ResourceLedger, ResourceLoaded, set_bucket
from provisioner.gates.place import Place, Stage
from provisioner.gates.policies import cooling_ms, rate_limits
from provisioner.gates.queue import (
    can_remove,
    drop_ticket,
    enqueue,
    remove_ticket,
    reservation_of,
    reserve,
)
from provisioner.gates.results import REASON_BACKOFF, Queued, Rejected, ResourceGrant, Waiter


class Acquisition(ResourceLedger):
    def decide(self, waiter: Waiter, costs: Costs) -> ResourceGrant | Queued | Rejected:
        return until_settled(lambda: self._decide(waiter, costs), self.config.cas_retries)

    def _decide(self, waiter: Waiter, costs: Costs) -> ResourceGrant | Queued | Rejected:
        loaded = self.load(waiter)
        state, now = loaded.state, loaded.now_ms
        held = state.lease_of(waiter.tenant, waiter.entity)
        if held is not None:
            held.expires_ms = now + self.gate.lease_ms
            self.save_gate(loaded)
            return ResourceGrant(held.lease_id, held.expires_ms, 0, renewed=True)
        stored = loaded.place
        queue = state.queue_of(waiter.tenant)
        if (
            stored is not None
            and stored.stage is Stage.QUEUED
            and stored.ticket is not None
            and queue is not None
            and queue.holds(stored.ticket)
        ):
            place, fresh = stored, False
        else:
            # New, or its ticket was skipped as dead: queue again, keeping when it first
            # asked so that dying and returning cannot dodge the queue timeout.
            since = stored.since_ms if stored is not None else now
            place, fresh = Place(Stage.QUEUED, since, 1, ticket=enqueue(state, waiter.tenant)), True
        assert place.ticket is not None
        timed_out = self._timed_out_by(state.granted_ms, place.since_ms, now)
        if timed_out is not None:
            remove_ticket(state, waiter.tenant, place.ticket, granted=False)
            return self.time_out(waiter, loaded, place.ticket, timed_out)
        cooling = cooling_ms(state, now)
        if cooling > 0:
            verdict = Verdict(False, REASON_BACKOFF, (), ())
        else:
            verdict = resource_verdict(
                state, self.gate, now, waiter.tenant, place.ticket, costs, self.read_ticket
            )
        for tenant, ticket in verdict.dead:
            drop_ticket(state, tenant, ticket)
        own_queue = state.queue_of(waiter.tenant)
        if verdict.goes and own_queue is not None and can_remove(own_queue, place.ticket):
            return self._grant(waiter, loaded, place, costs)
        queued = resource_waiting(
            state,
            self.gate,
            self.config,
            now,
            waiter.tenant,
            place.ticket,
            place.since_ms,
            costs,
            verdict,
            cooling,
            self.ports.uniform,
        )
        reserved = False
        for tenant, ticket in verdict.ahead_turns:
            _, made = reserve(
                state,
                tenant,
                ticket,
                None,
                now,
                now,
                self.config.reservation_claim_ms,
                new_lease_id(self.ports, "v"),
            )
            reserved = reserved or made
        return self.wait_on(
            waiter,
            loaded,
            place,
            queued,
            changed=fresh or bool(verdict.dead) or reserved,
            own=reservation_of(state, waiter.tenant, place.ticket, None),
            timeout_ms=self.queue_timeout_ms,
            ticket_value=encode_ticket(waiter.entity, costs),
        )

    def _timed_out_by(self, granted_ms: int, since_ms: int, now_ms: int) -> str | None:
        """Why the wait is over, if it is: longer than the queue timeout, or longer than
        the stall timeout with no grant made by the gate meanwhile (a stuck gate; a queue
        that moves keeps its waiters)."""
        waited = now_ms - since_ms
        if waited >= self.queue_timeout_ms:
            return (
                f"waited {waited} ms for resource {self.gate.name!r}, longer than its queue "
                f"timeout of {self.queue_timeout_ms} ms"
            )
        stall = self.gate.stall_timeout_ms
        stalled = now_ms - max(since_ms, granted_ms)
        if stall is not None and stalled >= stall:
            return (
                f"resource {self.gate.name!r} granted no one for {stalled} ms of this wait, "
                f"longer than its stall timeout of {stall} ms"
            )
        return None

    def _grant(
        self, waiter: Waiter, loaded: ResourceLoaded, place: Place, costs: Costs
    ) -> ResourceGrant:
        state, now = loaded.state, loaded.now_ms
        assert place.ticket is not None
        charges: list[Charge] = []
        for rate in rate_limits(self.gate):
            name = rate.bucket_id(waiter.tenant)
            cost = costs.get(rate.kind, 0.0)
            tat = rate.bucket.charge(state.buckets.get(name, 0.0), now, cost)
            set_bucket(state, name, tat, now)
            charges.append(Charge(name, cost, tat - now))
        lease = ResourceLease(
            new_lease_id(self.ports, "r"),
            waiter.tenant,
            waiter.entity,
            now + self.gate.lease_ms,
            now,
            charges,
            {kind: margin_of(costs, kind) for kind in (INPUT, OUTPUT) if margin_of(costs, kind)},
        )
        state.leases.append(lease)
        remove_ticket(state, waiter.tenant, place.ticket, granted=True)
        state.grants += 1
        state.granted_ms = now
        self.save_gate(loaded)
        # The gate document is the truth about who holds what: the place is no longer needed.
        self.forget(waiter, place.ticket)
        return ResourceGrant(lease.lease_id, lease.expires_ms, now - place.since_ms)
