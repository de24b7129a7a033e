"""The sandbox gate: its leases (a dead holder's permit comes back), the promises of its
free permits (`promise`), and its decisions, `admit`, `settle` and `release`.

After a timeout or 5xx (Unavailable) E2B may have made the sandbox, so the create stays
counted as unsettled until a retry adopts it.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, replace
from typing import TypeVar

from provisioner.config import AdmissionConfig
from provisioner.failures import FailureCode
from provisioner.gates.blocking import (
    Asking,
    Assessment,
    Permits,
    Scheduled,
    Turn,
    assess,
    eligibility,
    removable,
    schedule,
    waiting,
)
from provisioner.gates.cas import Again, new_lease_id
from provisioner.gates.document import (
    DEFAULT_SANDBOX_TIMEOUT_MS,
    GATE_KEY,
    SANDBOX_PREFIX,
    CreateLease,
    GateState,
    Reservation,
    SandboxLease,
    UnsettledCreate,
    averaged,
    not_owned_by,
    owned_by,
    waiter_key,
)
from provisioner.gates.ledger import (
    ACCOUNT,
    GateLedger,
    LoadedDocument,
    queued_place,
    retried,
)
from provisioner.gates.place import Place, Stage
from provisioner.gates.policies import (
    capacity_in_use,
    capacity_limit,
    create_bucket,
    record_failure,
    refill_retries,
    retry_tokens,
    slots_in_use,
)
from provisioner.gates.queue import (
    drop_ticket,
    pass_over_unclaimed,
    reservation_of,
    reserve,
)
from provisioner.gates.results import (
    REASON_BACKOFF,
    REASON_CAPACITY,
    REASON_CREATE_SLOTS,
    CapacityExhausted,
    Created,
    CreateFailed,
    CreateResult,
    Grant,
    Queued,
    RateLimited,
    Rejected,
    Unavailable,
    Waiter,
)
from provisioner.model import Failure
from provisioner.ports import Ports, StorageConflict

LeaseT = TypeVar("LeaseT", CreateLease, UnsettledCreate)
SandboxLoaded = LoadedDocument[GateState]


def prune_expired(state: GateState, now_ms: int) -> None:
    """Drop expired leases. An expired create lease gives its slot back but stays as an
    unsettled create: its holder died before hearing E2B's answer, so the sandbox may exist."""
    state.unsettled += [c.unsettled() for c in state.create_leases if c.expires_ms <= now_ms]
    state.create_leases = [c for c in state.create_leases if c.expires_ms > now_ms]
    state.sandbox_leases = [s for s in state.sandbox_leases if s.expires_ms > now_ms]
    state.unsettled = [u for u in state.unsettled if u.until_ms > now_ms]


def pop_lease(leases: list[LeaseT], lease_id: str) -> LeaseT | None:
    for index, lease in enumerate(leases):
        if lease.lease_id == lease_id:
            return leases.pop(index)
    return None


def drop_sandbox(state: GateState, tenant: str, entity: str) -> None:
    """Drop the entity's capacity lease and unsettled creates."""
    state.sandbox_leases = not_owned_by(state.sandbox_leases, tenant, entity)
    state.unsettled = not_owned_by(state.unsettled, tenant, entity)


@dataclass(frozen=True, slots=True)
class WakeUp:
    """A permit is promised to `entity` (`reservation`): the host may wake it at `at_ms`
    instead of letting the permit wait for its timer."""

    tenant: str
    entity: str
    at_ms: int
    reservation: str


def exhausted(attempts: int) -> Rejected:
    message = f"E2B refused {attempts} create attempts; giving up on this waiter"
    return Rejected(Failure(FailureCode.RETRY_BUDGET_EXHAUSTED, message, retryable=True))


def leave_queue(state: GateState, waiter: Waiter, place: Place | None) -> int | None:
    """Out of the retries and its tenant's queue; returns the ticket whose key should go."""
    state.drop_retry(waiter.tenant, waiter.entity)
    ticket = None if place is None else place.queued_ticket
    if ticket is not None:
        drop_ticket(state, waiter.tenant, ticket)
    return ticket


class SandboxLedger(GateLedger[GateState, Grant]):
    def __init__(self, ports: Ports, config: AdmissionConfig) -> None:
        super().__init__(ports, config, SANDBOX_PREFIX, GateState)
        # The waiters this decision promised a permit to (`promise`), told only once the
        # gate holding the promise is saved.
        self.wake_ups: list[WakeUp] = []
        self._promised: list[WakeUp] = []
        # How long a create never settled counts against capacity (`admit` sets it).
        self.sandbox_timeout_ms = DEFAULT_SANDBOX_TIMEOUT_MS

    def load(self, waiter: Waiter) -> SandboxLoaded:
        self._promised = []
        return super().load(waiter)

    def save_gate(self, loaded: SandboxLoaded) -> None:
        super().save_gate(loaded)
        self.wake_ups.extend(self._promised)
        self._promised = []

    def promise(
        self,
        loaded: SandboxLoaded,
        scheduled: list[Scheduled] | None = None,
        caller: Turn | None = None,
    ) -> bool:
        """Promise the free permits to the turns the schedule (`blocking.schedule`, of now
        unless given) lets go now and to the one the next rate token falls to: tokens
        further off stay unpromised, so a tenant that starts waiting still gets its
        round-robin turn. True when the document changed; the waiters other than `caller`
        newly promised a permit are told once it is saved."""
        state, now_ms, config = loaded.state, loaded.now_ms, self.config
        if scheduled is None:
            permits = Permits.of(state, config, now_ms)
            scheduled = schedule(state, config, now_ms, permits, eligibility(state, config))
        pending = [item for item in scheduled if item.due_ms > 0][:1]
        changed, claim = False, config.reservation_claim_ms
        self._promised = []
        for item in [item for item in scheduled if item.due_ms <= 0] + pending:
            turn, at, rid = item.turn, now_ms + item.due_ms, new_lease_id(self.ports, "v")
            held, moved = reserve(
                state, turn.tenant, turn.ticket, turn.entity, at, now_ms, claim, rid
            )
            changed = changed or moved
            if held.rid != rid or turn == caller:
                continue  # promised before, or to the caller: no one to wake
            # A ticket's entity is in its liveness key (gone: its waiter is skipped as dead).
            value = None if turn.ticket is None else self.ticket_entry(turn.tenant, turn.ticket)
            entity = turn.entity or (None if value is None else value.decode())
            if entity is not None:
                self._promised.append(WakeUp(turn.tenant, entity, held.at_ms, held.rid))
        return changed

    def catch_up(self, state: GateState, now_ms: int) -> bool:
        """Prune expired leases, refill the retry budget, pass over unclaimed reservations
        (True when any was)."""
        prune_expired(state, now_ms)
        refill_retries(state, self.config, now_ms)
        claim_ms = self.config.reservation_claim_ms
        return bool(pass_over_unclaimed(state, now_ms, claim_ms, state.drop_retry))

    def admit(self, waiter: Waiter, sandbox_timeout_ms: int) -> Grant | Queued | Rejected:
        self.sandbox_timeout_ms = sandbox_timeout_ms
        return self.ask(waiter)

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
        state, config = loaded.state, self.config
        asking = Asking(state, config, loaded.now_ms, waiter, place, self.ports.uniform)
        mine = Turn.of(waiter, place)
        dropped = False
        # Each pass drops at least one dead waiter from the front, so it ends.
        for _ in range(config.create_slots + len(state.retries) + 2):
            seen = assess(asking)
            if seen.goes and removable(state, waiter.tenant, place):
                return seen
            front = [item.turn for item in seen.scheduled if item.due_ms <= 0]
            if not front or not self._skip_dead(state, front, mine):
                break
            dropped = True
        else:
            seen = assess(asking)
        # When its turn has come but its ticket cannot leave out of order yet, it waits.
        queued = seen.queued or waiting(asking)
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
        # What the grant left free (more slots, the next rate token) goes to the next turns.
        self.promise(loaded)
        self.save_gate(loaded)
        creating = Place(Stage.CREATING, place.since_ms, place.attempt, lease_id=lease_id)
        try:
            self.save_place(waiter, loaded, creating, config.create_lease_ms + config.waiter_ttl_ms)
        except StorageConflict:
            # When the slot cannot be given back, the lease expires on its own.
            with contextlib.suppress(StorageConflict):
                self._undo_grant(lease_id)
            raise Again("waiter record moved during the grant") from None
        self.forget_ticket(waiter, place.ticket)
        return Grant(lease_id, place.attempt, now - place.since_ms, lease.expires_ms)

    @retried
    def _undo_grant(self, lease_id: str) -> None:
        """Give a just-taken slot back (its rate token stays spent: that errs safe)."""
        entry = self.ports.storage.get(ACCOUNT, GATE_KEY)
        if entry is None:
            return
        state = GateState.from_bytes(entry.value)
        if pop_lease(state.create_leases, lease_id) is not None:
            storage, version = self.ports.storage, entry.version
            storage.compare_and_swap(ACCOUNT, GATE_KEY, version, state.to_bytes(), None)

    def _skip_dead(self, state: GateState, turns: list[Turn], mine: Turn) -> bool:
        """Drop waiters ahead that stopped polling (their keys expired); True if any."""
        skipped = False
        for turn in turns:
            if turn == mine:
                continue
            if turn.entity is not None and turn.is_retry:
                entry = self.ports.storage.get(ACCOUNT, waiter_key(turn.tenant, turn.entity))
                place = None if entry is None else Place.from_bytes(entry.value)
                if (
                    place is None
                    or place.stage is not Stage.RETRYING
                    or not place.alive(self.ports.clock.now_ms())
                ):
                    state.drop_retry(turn.tenant, turn.entity)
                    skipped = True
            elif turn.ticket is not None and self.ticket_entry(turn.tenant, turn.ticket) is None:
                skipped = drop_ticket(state, turn.tenant, turn.ticket) or skipped
        return skipped

    @retried
    def settle(
        self, waiter: Waiter, grant: Grant, result: CreateResult
    ) -> Queued | Rejected | None:
        loaded = self.load(waiter)
        state, now, config = loaded.state, loaded.now_ms, self.config
        stored = loaded.place
        since = stored.since_ms if stored is not None else now - grant.queued_ms
        lease = pop_lease(state.create_leases, grant.lease_id)
        # Answered after its lease expired: the unsettled create it left is settled now.
        late = None if lease is not None else pop_lease(state.unsettled, grant.lease_id)
        unsettled = late if lease is None else lease.unsettled()
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
            if owned_by(state.retries, waiter.tenant, waiter.entity) is None:
                return None
            view = Place(Stage.RETRYING, since, stored.attempt)
            return waiting(Asking(state, config, now, waiter, view, self.ports.uniform))
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
        queued = waiting(Asking(state, config, now, waiter, place, self.ports.uniform))
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
        # Held even when the create lease had expired: the sandbox exists, so it counts. It
        # replaces the entity's old lease and unsettled creates (one idempotency key: this is
        # the sandbox they may have made).
        timeout_ms = max(1, result.sandbox_timeout_ms)
        tenant, entity, until = waiter.tenant, waiter.entity, now + timeout_ms
        drop_sandbox(state, tenant, entity)
        lease = SandboxLease(grant.lease_id, tenant, entity, until, now, result.sandbox_id)
        state.sandbox_leases.append(lease)
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

    @retried
    def release(self, waiter: Waiter) -> bool:
        """True when the waiter held a permit or had a place in the queue."""
        loaded = self.load(waiter)
        state, now = loaded.state, loaded.now_ms
        lease = owned_by(state.sandbox_leases, waiter.tenant, waiter.entity)
        if lease is not None:
            state.observe_hold(lease.started_ms, now)
        counted = state.tenant_in_use(waiter.tenant)
        state.create_leases = not_owned_by(state.create_leases, waiter.tenant, waiter.entity)
        drop_sandbox(state, waiter.tenant, waiter.entity)
        held = state.tenant_in_use(waiter.tenant) < counted
        before = state.waiting()
        ticket = leave_queue(state, waiter, loaded.place)
        left = before != state.waiting()
        promised = self.promise(loaded)
        if held or left or promised or loaded.moved:
            self.save_gate(loaded)
        self.forget(waiter, ticket)
        return held or left or ticket is not None
