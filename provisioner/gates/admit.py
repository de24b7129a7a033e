"""Admit and acquire: a waiter asks for a permit; grant it now, or say where it stands.

One decision for both gates (`ledger.Asking`): load the gate and the waiter's place,
`locate` the waiter (its stored place checked against the gate), refuse it once it has
waited too long, else `judge` by the walk (`blocking`) whether its turn has come. A grant
takes its permit in the same compare-and-swap that takes the waiter out of the queue.

The sandbox gate (`Admission`): dead waiters ahead are dropped first; a grant takes a
create lease and a rate token. A resource gate (`Acquisition`): a grant takes a lease and
charges every bucket its estimate; an entity holds at most one lease per resource, so
asking again while holding it renews the lease and answers the same grant.
"""

from __future__ import annotations

import contextlib

from provisioner.config import AdmissionConfig
from provisioner.failures import FailureCode
from provisioner.gates.blocking import (
    Turn,
    Verdict,
    assess,
    resource_verdict,
    resource_waiting,
    waiting,
)
from provisioner.gates.bucket import Charge
from provisioner.gates.cas import Again, new_lease_id, until_settled
from provisioner.gates.document import (
    GATE_KEY,
    INPUT,
    OUTPUT,
    Costs,
    GateState,
    ResourceLease,
    ResourceState,
    encode_ticket,
    margin_of,
    ticket_key,
    waiter_key,
)
from provisioner.gates.ledger import (
    ACCOUNT,
    Asking,
    ResourceLedger,
    ResourceLoaded,
    SandboxLedger,
    SandboxLoaded,
    set_bucket,
)
from provisioner.gates.place import Place, Stage
from provisioner.gates.policies import (
    cooling_ms,
    earn_retry,
    rate_limits,
    slots_in_use,
    spend_retry,
    take_rate,
)
from provisioner.gates.queue import (
    can_remove,
    drop_ticket,
    enqueue,
    remove_ticket,
    reservation_of,
    reserve,
)
from provisioner.gates.results import (
    REASON_BACKOFF,
    REASON_CREATE_SLOTS,
    Grant,
    Queued,
    Rejected,
    ResourceGrant,
    Waiter,
)
from provisioner.gates.sandbox import drop_create_lease, take_create_lease
from provisioner.model import Failure
from provisioner.ports import Ports, StorageConflict


def exhausted(attempts: int) -> Rejected:
    return Rejected(
        Failure(
            FailureCode.RETRY_BUDGET_EXHAUSTED,
            f"E2B refused {attempts} create attempts; giving up on this waiter",
            retryable=True,
        )
    )


def leave_queue(state: GateState, waiter: Waiter, place: Place | None) -> int | None:
    """Take the waiter out of the retries and its tenant's queue (in memory); returns the
    ticket whose liveness key should go, if any."""
    state.drop_retry(waiter.tenant, waiter.entity)
    ticket = None if place is None else place.queued_ticket
    if ticket is not None:
        drop_ticket(state, waiter.tenant, ticket)
    return ticket


class Admission(SandboxLedger, Asking[GateState, Grant]):
    def __init__(self, ports: Ports, config: AdmissionConfig, sandbox_timeout_ms: int) -> None:
        """`sandbox_timeout_ms`: the E2B timeout of the sandbox a granted create makes (how
        long it could run unrecorded if the create is never settled)."""
        super().__init__(ports, config)
        self.sandbox_timeout_ms = sandbox_timeout_ms

    def decide(self, waiter: Waiter) -> Grant | Queued | Rejected:
        return until_settled(lambda: self.ask(waiter), self.config.cas_retries)

    def locate(self, waiter: Waiter, loaded: SandboxLoaded) -> Place | Queued | Rejected:
        """Where the waiter stands, its stored place checked against the gate (changing the
        gate in memory when the place has to move). A waiter whose own create is in flight
        gets Queued (position 0) rather than a place: no entity has two creates at once."""
        state, stored, now, config = loaded.state, loaded.place, loaded.now_ms, self.config
        if stored is None or stored.stage is Stage.HOLDING:
            if state.reclaims(waiter.tenant, waiter.entity):
                # Its record expired while its unsettled create still counts: a retry
                # whose create reclaims that possible sandbox.
                state.add_retry(waiter.tenant, waiter.entity)
                attempt = 1 if stored is None else stored.attempt
                return Place(Stage.RETRYING, now, attempt + 1)
            # New, or holding a sandbox the caller has no record of (a crash after the
            # create): a create with the same idempotency key finds the same sandbox.
            return Place(Stage.QUEUED, now, 1, ticket=enqueue(state, waiter.tenant))
        if stored.stage is Stage.QUEUED:
            queue = state.queue_of(waiter.tenant)
            if stored.ticket is not None and queue is not None and queue.holds(stored.ticket):
                return stored
            # Its ticket was skipped as dead (it polled too late): queue again, same since.
            ticket = enqueue(state, waiter.tenant)
            return Place(Stage.QUEUED, stored.since_ms, stored.attempt, ticket=ticket)
        if stored.stage is Stage.RETRYING:
            # Dropped from the retries while it stopped polling: back where retries wait.
            state.add_retry(waiter.tenant, waiter.entity)
            return stored
        # CREATING
        lease = state.create_lease(stored.lease_id or "")
        if lease is not None:
            wait = max(config.poll_min_ms, min(lease.expires_ms - now, config.poll_max_ms))
            return Queued(
                0,
                state.waiting(),
                slots_in_use(state),
                config.create_slots,
                REASON_CREATE_SLOTS,
                wait,
                wait,
                now - stored.since_ms,
            )
        # The create's holder died mid-call: its outcome is unknown, so it is a retry (an
        # unsettled create, its possible sandbox still counted: `sandbox.prune_expired`).
        attempt = stored.attempt + 1
        if attempt > config.max_create_attempts:
            return exhausted(attempt - 1)
        state.add_retry(waiter.tenant, waiter.entity)
        return Place(Stage.RETRYING, stored.since_ms, attempt)

    def timed_out(self, loaded: SandboxLoaded, place: Place) -> str | None:
        waited, timeout = loaded.now_ms - place.since_ms, self.config.queue_timeout_ms
        if waited < timeout:
            return None
        return f"waited {waited} ms for a sandbox, longer than the queue timeout of {timeout} ms"

    def judge(self, waiter: Waiter, loaded: SandboxLoaded, place: Place) -> Grant | Queued:
        state, now, config = loaded.state, loaded.now_ms, self.config
        mine = Turn.of(waiter, place)
        skipped = False
        # Each pass drops at least one dead waiter from the front, so it ends.
        for _ in range(config.create_slots + len(state.retries) + 2):
            verdict = assess(state, config, now, waiter, place, self.ports.uniform)
            if verdict.goes and self._removable(state, waiter, place):
                return self._grant(waiter, loaded, place)
            if not verdict.front or not self._skip_dead(state, verdict.front, mine):
                break
            skipped = True
        else:
            verdict = assess(state, config, now, waiter, place, self.ports.uniform)
        queued = verdict.queued
        if queued is None:  # it goes, but its ticket cannot leave out of order yet
            queued = waiting(state, config, now, waiter, place, self.ports.uniform)
        reserved = self.promise(loaded, verdict.scheduled, caller=mine)
        own = reservation_of(state, waiter.tenant, mine.ticket, mine.entity)
        if own is not None and not any(s.turn == mine for s in verdict.scheduled):
            # No permit is there for it now (a cap-429 took it): withdraw the promise, or
            # the holder, still asking, would be passed over at its deadline as gone.
            state.reservations.remove(own)
            own, reserved = None, True
        stored = loaded.place
        unchanged = (
            stored is not None
            and stored.stage is place.stage
            and (place.stage is Stage.RETRYING or stored.ticket == place.ticket)
        )
        changed = not unchanged or skipped or reserved
        timeout = config.queue_timeout_ms
        return self.wait_on(
            waiter, loaded, place, queued, changed=changed, own=own, timeout_ms=timeout
        )

    def _removable(self, state: GateState, waiter: Waiter, place: Place) -> bool:
        if place.stage is Stage.RETRYING or place.ticket is None:
            return True
        queue = state.queue_of(waiter.tenant)
        return queue is not None and can_remove(queue, place.ticket)

    def unplace(
        self, state: GateState, waiter: Waiter, place: Place, *, granted: bool = False
    ) -> None:
        if place.stage is Stage.RETRYING:
            state.drop_retry(waiter.tenant, waiter.entity)
        elif place.ticket is not None:
            remove_ticket(state, waiter.tenant, place.ticket, granted=granted)

    def _grant(self, waiter: Waiter, loaded: SandboxLoaded, place: Place) -> Grant:
        state, now, config = loaded.state, loaded.now_ms, self.config
        lease_id = new_lease_id(self.ports, "c")
        lease = take_create_lease(
            state,
            lease_id,
            waiter.tenant,
            waiter.entity,
            now,
            config.create_lease_ms,
            self.sandbox_timeout_ms,
        )
        take_rate(state, config, now)
        if place.attempt > 1:
            spend_retry(state, config)
        else:
            earn_retry(state, config)
        self.unplace(state, waiter, place, granted=True)
        state.grants += 1
        # What the grant left free (more slots, the next rate token) goes to the next turns.
        self.promise(loaded)
        self.save_gate(loaded)
        creating = Place(Stage.CREATING, place.since_ms, place.attempt, lease_id=lease_id)
        try:
            self.save_place(waiter, loaded, creating, config.create_lease_ms + config.waiter_ttl_ms)
        except StorageConflict:
            self._undo_grant(lease_id)
            raise Again("waiter record moved during the grant") from None
        self.forget_ticket(waiter, place.ticket)
        return Grant(lease_id, place.attempt, now - place.since_ms, lease.expires_ms)

    def _undo_grant(self, lease_id: str) -> None:
        """Give a just-taken slot back (its rate token stays spent: that errs safe)."""
        storage = self.ports.storage

        def step() -> None:
            entry = storage.get(ACCOUNT, GATE_KEY)
            if entry is None:
                return
            state = GateState.from_bytes(entry.value)
            if drop_create_lease(state, lease_id) is None:
                return
            storage.compare_and_swap(ACCOUNT, GATE_KEY, entry.version, state.to_bytes(), None)

        # When it cannot be given back, the lease expires on its own.
        with contextlib.suppress(StorageConflict):
            until_settled(step, self.config.cas_retries)

    def _skip_dead(self, state: GateState, turns: list[Turn], mine: Turn) -> bool:
        """Drop waiters ahead that stopped polling (their keys expired); True if any."""
        storage = self.ports.storage
        skipped = False
        for turn in turns:
            if turn == mine:
                continue
            if turn.is_retry:
                assert turn.entity is not None
                entry = storage.get(ACCOUNT, waiter_key(turn.tenant, turn.entity))
                place = None if entry is None else Place.from_bytes(entry.value)
                alive = (
                    place is not None
                    and place.stage is Stage.RETRYING
                    and place.alive(self.ports.clock.now_ms())
                )
                if not alive:
                    state.drop_retry(turn.tenant, turn.entity)
                    skipped = True
            else:
                assert turn.ticket is not None
                if storage.get(ACCOUNT, ticket_key(turn.tenant, turn.ticket)) is None:
                    skipped = drop_ticket(state, turn.tenant, turn.ticket) or skipped
        return skipped


class Acquisition(ResourceLedger, Asking[ResourceState, ResourceGrant]):
    costs: Costs  # the request's estimates, set by `decide`

    def decide(self, waiter: Waiter, costs: Costs) -> ResourceGrant | Queued | Rejected:
        self.costs = costs
        return until_settled(lambda: self.ask(waiter), self.config.cas_retries)

    def locate(self, waiter: Waiter, loaded: ResourceLoaded) -> Place | ResourceGrant:
        """The waiter's place; asking again while holding the lease renews it instead."""
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
            return stored
        # New, or its ticket was skipped as dead: queue again, keeping when it first asked
        # so that dying and returning cannot dodge the queue timeout.
        since = stored.since_ms if stored is not None else now
        return Place(Stage.QUEUED, since, 1, ticket=enqueue(state, waiter.tenant))

    def unplace(self, state: ResourceState, waiter: Waiter, place: Place) -> None:
        assert place.ticket is not None
        remove_ticket(state, waiter.tenant, place.ticket, granted=False)

    def judge(self, waiter: Waiter, loaded: ResourceLoaded, place: Place) -> ResourceGrant | Queued:
        state, now, costs = loaded.state, loaded.now_ms, self.costs
        fresh = place is not loaded.place
        assert place.ticket is not None
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

    def timed_out(self, loaded: ResourceLoaded, place: Place) -> str | None:
        """Longer than the queue timeout, or longer than the stall timeout with no grant
        made by the gate meanwhile (a stuck gate; a queue that moves keeps its waiters)."""
        now_ms, since_ms, granted_ms = loaded.now_ms, place.since_ms, loaded.state.granted_ms
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
