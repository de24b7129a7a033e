"""Admit and acquire, the two gates' halves of one decision (`ledger.Asking`): a grant
takes its permit in the same compare-and-swap that takes the waiter out of the queue."""

from __future__ import annotations

import contextlib
from dataclasses import replace

from provisioner.config import AdmissionConfig
from provisioner.failures import FailureCode
from provisioner.gates.blocking import (
    Assessment,
    Scheduled,
    Turn,
    assess,
    removable,
    resource_assess,
    waiting,
)
from provisioner.gates.bucket import Charge
from provisioner.gates.cas import Again, new_lease_id, until_settled
from provisioner.gates.document import (
    GATE_KEY,
    INPUT,
    OUTPUT,
    Costs,
    CreateLease,
    GateDocument,
    GateState,
    Reservation,
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
from provisioner.gates.policies import create_bucket, rate_limits, retry_tokens, slots_in_use
from provisioner.gates.queue import (
    drop_ticket,
    enqueue,
    remove_ticket,
    reservation_of,
    reserve,
)
from provisioner.gates.results import (
    REASON_CREATE_SLOTS,
    Grant,
    Queued,
    Rejected,
    ResourceGrant,
    Waiter,
)
from provisioner.gates.sandbox import pop_lease
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
    """Out of the retries and its tenant's queue; returns the ticket whose key should go."""
    state.drop_retry(waiter.tenant, waiter.entity)
    ticket = None if place is None else place.queued_ticket
    if ticket is not None:
        drop_ticket(state, waiter.tenant, ticket)
    return ticket


def queued_place(state: GateDocument, tenant: str, stored: Place | None, now_ms: int) -> Place:
    """The stored place while its ticket is live; else a new ticket (its old one was skipped
    as dead), keeping when the waiter first asked so that dying cannot dodge the timeout."""
    ticket = None if stored is None else stored.queued_ticket
    if stored is not None and ticket is not None and state.holds_ticket(tenant, ticket):
        return stored
    since, attempt = (now_ms, 1) if stored is None else (stored.since_ms, stored.attempt)
    return Place(Stage.QUEUED, since, attempt, ticket=enqueue(state, tenant))


class Admission(SandboxLedger, Asking[GateState, Grant]):
    def __init__(self, ports: Ports, config: AdmissionConfig, sandbox_timeout_ms: int) -> None:
        super().__init__(ports, config)
        self.sandbox_timeout_ms = sandbox_timeout_ms

    def decide(self, waiter: Waiter) -> Grant | Queued | Rejected:
        return until_settled(lambda: self.ask(waiter), self.config.cas_retries)

    def locate(self, waiter: Waiter, loaded: SandboxLoaded) -> Place | Queued | Rejected:
        """A waiter whose own create is in flight gets Queued (position 0), not a place: no
        entity has two creates at once."""
        state, stored, now, config = loaded.state, loaded.place, loaded.now_ms, self.config
        if stored is None or stored.stage is Stage.HOLDING:
            if state.reclaims(waiter.tenant, waiter.entity):
                # Its record expired while its unsettled create counts: a retry reclaims it.
                state.add_retry(waiter.tenant, waiter.entity)
                attempt = 1 if stored is None else stored.attempt
                return Place(Stage.RETRYING, now, attempt + 1)
            # A sandbox the caller has no record of (a crash after the create): the same
            # idempotency key finds it again.
            return queued_place(state, waiter.tenant, None, now)
        if stored.stage is Stage.QUEUED:
            return queued_place(state, waiter.tenant, stored, now)
        if stored.stage is Stage.RETRYING:
            # Dropped from the retries while it stopped polling: back where retries wait.
            state.add_retry(waiter.tenant, waiter.entity)
            return stored
        lease = next((c for c in state.create_leases if c.lease_id == stored.lease_id), None)
        if lease is not None:
            wait = max(config.poll_min_ms, min(lease.expires_ms - now, config.poll_max_ms))
            in_use, slots, waited = slots_in_use(state), config.create_slots, now - stored.since_ms
            queue = state.waiting()
            return Queued(0, queue, in_use, slots, REASON_CREATE_SLOTS, wait, wait, waited)
        # The create's holder died mid-call: a retry (its possible sandbox still counted).
        attempt = stored.attempt + 1
        if attempt > config.max_create_attempts:
            return exhausted(attempt - 1)
        state.add_retry(waiter.tenant, waiter.entity)
        return Place(Stage.RETRYING, stored.since_ms, attempt)

    def timed_out(self, loaded: SandboxLoaded, place: Place) -> str | None:
        waited, timeout = loaded.now_ms - place.since_ms, self.queue_timeout_ms
        if waited < timeout:
            return None
        return f"waited {waited} ms for a sandbox, longer than the queue timeout of {timeout} ms"

    def assess(self, waiter: Waiter, loaded: SandboxLoaded, place: Place) -> Assessment:
        state, now, config, uniform = loaded.state, loaded.now_ms, self.config, self.ports.uniform
        mine = Turn.of(waiter, place)
        dropped = False
        # Each pass drops at least one dead waiter from the front, so it ends.
        for _ in range(config.create_slots + len(state.retries) + 2):
            seen = assess(state, config, now, waiter, place, uniform)
            if seen.goes and removable(state, waiter.tenant, place):
                return seen
            front = [item.turn for item in seen.scheduled if item.due_ms <= 0]
            if not front or not self._skip_dead(state, front, mine):
                break
            dropped = True
        else:
            seen = assess(state, config, now, waiter, place, uniform)
        # When its turn has come but its ticket cannot leave out of order yet, it waits.
        queued = seen.queued or waiting(state, config, now, waiter, place, uniform)
        return replace(seen, queued=queued, dropped=dropped)

    def reserve(
        self, loaded: SandboxLoaded, scheduled: list[Scheduled], mine: Turn
    ) -> tuple[bool, Reservation | None]:
        reserved = self.promise(loaded, scheduled, caller=mine)
        own = reservation_of(loaded.state, mine.tenant, mine.ticket, mine.entity)
        if own is not None and not any(item.turn == mine for item in scheduled):
            # No permit is there for it now (a cap-429 took it): withdraw the promise, or
            # the holder, still asking, would be passed over at its deadline as gone.
            loaded.state.reservations.remove(own)
            return True, None
        return reserved, own

    def unplace(
        self, state: GateState, waiter: Waiter, place: Place, *, granted: bool = False
    ) -> None:
        if place.stage is Stage.RETRYING:
            state.drop_retry(waiter.tenant, waiter.entity)
        elif place.ticket is not None:
            remove_ticket(state, waiter.tenant, place.ticket, granted=granted)

    def grant(self, waiter: Waiter, loaded: SandboxLoaded, place: Place) -> Grant:
        state, now, config = loaded.state, loaded.now_ms, self.config
        lease_id = new_lease_id(self.ports, "c")
        expires = now + config.create_lease_ms
        until = expires + self.sandbox_timeout_ms
        lease = CreateLease(lease_id, waiter.tenant, waiter.entity, expires, now, until)
        state.create_leases.append(lease)
        state.rate_tat_ms = create_bucket(config).charge(state.rate_tat_ms, now, 1)
        tokens = retry_tokens(state, config)
        if place.attempt > 1:
            state.retry_tokens = tokens - 1.0
        else:
            state.retry_tokens = min(config.retry_budget, tokens + config.retry_ratio)
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
            if pop_lease(state.create_leases, lease_id) is None:
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
                entry = storage.get(ACCOUNT, waiter_key(turn.tenant, turn.entity, self.prefix))
                place = None if entry is None else Place.from_bytes(entry.value)
                if not (
                    place is not None
                    and place.stage is Stage.RETRYING
                    and place.alive(self.ports.clock.now_ms())
                ):
                    state.drop_retry(turn.tenant, turn.entity)
                    skipped = True
            else:
                assert turn.ticket is not None
                if storage.get(ACCOUNT, ticket_key(turn.tenant, turn.ticket, self.prefix)) is None:
                    skipped = drop_ticket(state, turn.tenant, turn.ticket) or skipped
        return skipped


class Acquisition(ResourceLedger, Asking[ResourceState, ResourceGrant]):
    costs: Costs  # the request's estimates, set by `decide`

    def decide(self, waiter: Waiter, costs: Costs) -> ResourceGrant | Queued | Rejected:
        self.costs = costs
        self.ticket_value = encode_ticket(waiter.entity, costs)
        return until_settled(lambda: self.ask(waiter), self.config.cas_retries)

    def locate(self, waiter: Waiter, loaded: ResourceLoaded) -> Place | ResourceGrant:
        """Asking again while holding the lease renews it and answers the same grant."""
        state, now = loaded.state, loaded.now_ms
        held = state.lease_of(waiter.tenant, waiter.entity)
        if held is not None:
            held.expires_ms = now + self.gate.lease_ms
            self.save_gate(loaded)
            return ResourceGrant(held.lease_id, held.expires_ms, 0, renewed=True)
        return queued_place(state, waiter.tenant, loaded.place, now)

    def unplace(self, state: ResourceState, waiter: Waiter, place: Place) -> None:
        assert place.ticket is not None
        remove_ticket(state, waiter.tenant, place.ticket, granted=False)

    def assess(self, waiter: Waiter, loaded: ResourceLoaded, place: Place) -> Assessment:
        state, gate, now, uniform = loaded.state, self.gate, loaded.now_ms, self.ports.uniform
        costs, read = self.costs, self.read_ticket
        return resource_assess(
            state, gate, self.config, now, waiter.tenant, place, costs, read, uniform
        )

    def reserve(
        self, loaded: ResourceLoaded, scheduled: list[Scheduled], mine: Turn
    ) -> tuple[bool, Reservation | None]:
        state, now, claim_ms = loaded.state, loaded.now_ms, self.config.reservation_claim_ms
        reserved = False
        for item in scheduled:
            turn, rid = item.turn, new_lease_id(self.ports, "v")
            made = reserve(state, turn.tenant, turn.ticket, None, now, now, claim_ms, rid)[1]
            reserved = reserved or made
        return reserved, reservation_of(state, mine.tenant, mine.ticket, None)

    def timed_out(self, loaded: ResourceLoaded, place: Place) -> str | None:
        """Longer than the queue timeout, or than the stall timeout with no grant made by
        the gate meanwhile (a stuck gate; a queue that moves keeps its waiters)."""
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

    def grant(self, waiter: Waiter, loaded: ResourceLoaded, place: Place) -> ResourceGrant:
        state, now, costs = loaded.state, loaded.now_ms, self.costs
        assert place.ticket is not None
        charges: list[Charge] = []
        for rate in rate_limits(self.gate):
            name = rate.bucket_id(waiter.tenant)
            cost = costs.get(rate.kind, 0.0)
            tat = rate.bucket.charge(state.buckets.get(name, 0.0), now, cost)
            set_bucket(state, name, tat, now)
            charges.append(Charge(name, cost, tat - now))
        margins = {kind: margin for kind in (INPUT, OUTPUT) if (margin := margin_of(costs, kind))}
        lease_id, until = new_lease_id(self.ports, "r"), now + self.gate.lease_ms
        lease = ResourceLease(lease_id, waiter.tenant, waiter.entity, until, now, charges, margins)
        state.leases.append(lease)
        remove_ticket(state, waiter.tenant, place.ticket, granted=True)
        state.grants += 1
        state.granted_ms = now
        self.save_gate(loaded)
        # The gate document is the truth about who holds what: the place is not needed.
        self.forget(waiter, place.ticket)
        return ResourceGrant(lease.lease_id, lease.expires_ms, now - place.since_ms)
