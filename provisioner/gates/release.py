"""Release: free everything a waiter holds or waits for at a gate, and learn the hold time.

At a resource gate the lease's margins are charged too (`ledger.charge_margins`): the call
may have happened, at its worst case.
"""

from __future__ import annotations

from provisioner.gates.admit import leave_queue
from provisioner.gates.cas import until_settled
from provisioner.gates.document import observe_hold, owned_by
from provisioner.gates.ledger import ResourceLedger, SandboxLedger, charge_margins
from provisioner.gates.queue import drop_ticket
from provisioner.gates.results import Released, Waiter
from provisioner.gates.sandbox import drop_leases_of


class SandboxRelease(SandboxLedger):
    def decide(self, waiter: Waiter) -> bool:
        """True when the waiter held a permit or had a place in the queue."""
        return until_settled(lambda: self._decide(waiter), self.config.cas_retries)

    def _decide(self, waiter: Waiter) -> bool:
        loaded = self.load(waiter)
        state, now = loaded.state, loaded.now_ms
        lease = owned_by(state.sandbox_leases, waiter.tenant, waiter.entity)
        if lease is not None:
            observe_hold(state, lease.started_ms, now)
        held = drop_leases_of(state, waiter.tenant, waiter.entity) > 0
        before = state.waiting()
        ticket = leave_queue(state, waiter, loaded.place)
        left = before != state.waiting()
        promised = self.promise(loaded)
        if held or left or promised or loaded.moved:
            self.save_gate(loaded)
        self.forget(waiter, ticket)
        return held or left or ticket is not None


class ResourceRelease(ResourceLedger):
    def decide(self, waiter: Waiter) -> Released:
        return until_settled(lambda: self._decide(waiter), self.config.cas_retries)

    def _decide(self, waiter: Waiter) -> Released:
        loaded = self.load(waiter)
        state, now = loaded.state, loaded.now_ms
        lease = state.lease_of(waiter.tenant, waiter.entity)
        if lease is not None:
            state.leases.remove(lease)
            observe_hold(state, lease.started_ms, now)
            charge_margins(state, self.gate, lease, now)
        ticket = None if loaded.place is None else loaded.place.queued_ticket
        waited = ticket is not None and state.holds_ticket(waiter.tenant, ticket)
        if ticket is not None and waited:
            drop_ticket(state, waiter.tenant, ticket)
        if lease is not None or waited:
            self.save_gate(loaded)
        self.forget(waiter, ticket)
        return Released(lease.lease_id if lease is not None else None, lease is not None, waited)
