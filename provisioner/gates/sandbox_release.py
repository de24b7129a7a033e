"""Release: free everything a waiter holds or waits for (its sandbox lease, a create lease,
its queue place), and learn from how long the sandbox was held (capacity ETAs)."""

from __future__ import annotations

from provisioner.gates.admit import leave_queue
from provisioner.gates.cas import until_settled
from provisioner.gates.document import observe_hold
from provisioner.gates.ledger import SandboxLedger
from provisioner.gates.promises import promise
from provisioner.gates.results import Waiter
from provisioner.gates.sandbox_leases import drop_leases_of, sandbox_lease_of


class Release(SandboxLedger):
    def decide(self, waiter: Waiter) -> bool:
        """True when the waiter held a permit or had a place in the queue."""
        return until_settled(lambda: self._decide(waiter), self.config.cas_retries)

    def _decide(self, waiter: Waiter) -> bool:
        loaded = self.load(waiter)
        state, now = loaded.state, loaded.now_ms
        lease = sandbox_lease_of(state, waiter.tenant, waiter.entity)
        if lease is not None:
            observe_hold(state, lease.started_ms, now)
        held = drop_leases_of(state, waiter.tenant, waiter.entity) > 0
        before = state.waiting()
        ticket = leave_queue(state, waiter, loaded.place)
        waited = before != state.waiting() or ticket is not None
        # What it held is free again: promised to the next turns.
        promised, wake_ups = promise(self.ports, self.config, state, now)
        if held or before != state.waiting() or promised or loaded.moved:
            self.save_gate(loaded)
            self.wake_ups.extend(wake_ups)
        self.forget_place(waiter)
        self.forget_ticket(waiter, ticket)
        return held or waited
