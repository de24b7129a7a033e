"""Release: free the permit an entity holds at a resource gate (a session's slot at its
end, a call abandoned before it was made) and its place in the queue. What the grant
charged the token buckets stays charged, and its margins (how far its actual may exceed
the estimate) are charged too: the call may have happened, and may have cost its worst
case (`ledger.charge_margins`, as for a lease that expires)."""

from __future__ import annotations

from provisioner.gates.cas import until_settled
from provisioner.gates.document import observe_hold
from provisioner.gates.ledger import ResourceLedger, charge_margins
from provisioner.gates.place import Stage
from provisioner.gates.queue import drop_ticket
from provisioner.gates.results import Released, Waiter


class Release(ResourceLedger):
    def decide(self, waiter: Waiter) -> Released:
        return until_settled(lambda: self._decide(waiter), self.config.cas_retries)

    def _decide(self, waiter: Waiter) -> Released:
        loaded = self.load(waiter)
        state, now, place = loaded.state, loaded.now_ms, loaded.place
        lease = state.lease_of(waiter.tenant, waiter.entity)
        if lease is not None:
            state.leases.remove(lease)
            observe_hold(state, lease.started_ms, now)
            charge_margins(state, self.gate, lease, now)
        ticket = None
        if place is not None and place.stage is Stage.QUEUED and place.ticket is not None:
            ticket = place.ticket
        queue = state.queue_of(waiter.tenant)
        waited = False
        if ticket is not None and queue is not None and queue.holds(ticket):
            waited = True
            drop_ticket(state, waiter.tenant, ticket)
        if lease is not None or waited:
            self.save_gate(loaded)
        self.forget_place(waiter)
        self.forget_ticket(waiter, ticket)
        return Released(lease.lease_id if lease is not None else None, lease is not None, waited)
