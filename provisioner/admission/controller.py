"""The admission controller: one fresh instance per invocation, all state in storage.

Every decision reads the account gate document, decides, and writes it back with one
compare-and-swap; a conflict means another invocation decided first, so the decision is
recomputed from a fresh read (a bounded number of times). Limits are checked inside that
one document, so no interleaving of invocations can exceed one. Anything unexpected fails
closed: the waiter is told to come back (reason `storage`) and nothing is granted.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from provisioner.admission import budget
from provisioner.admission.backoff import cooling_ms, record_failure, record_success
from provisioner.admission.gates import (
    capacity_free,
    capacity_in_use,
    capacity_limit,
    note_created,
    rate_available,
    rate_in_use,
    rate_wait_ms,
    shrink_capacity,
    slots_free,
    slots_in_use,
    take_rate,
    tenant_has_room,
)
from provisioner.admission.leases import (
    drop_create_lease,
    drop_leases_of,
    hold_sandbox,
    new_lease_id,
    prune_expired,
    take_create_lease,
)
from provisioner.admission.queue import (
    can_remove,
    eligible_retries,
    enqueue,
    fair_order,
    fresh_position,
    remove_ticket,
)
from provisioner.admission.results import (
    REASON_BACKOFF,
    REASON_CAPACITY,
    REASON_CREATE_SLOTS,
    REASON_RATE,
    REASON_STORAGE,
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
from provisioner.admission.state import (
    CREATING,
    GATE_KEY,
    HOLDING,
    QUEUED,
    RETRYING,
    GateState,
    RetryEntry,
    WaiterRecord,
    ticket_key,
    waiter_key,
)
from provisioner.admission.status import capacity_wait_ms, slot_wait_ms, snapshot
from provisioner.config import AdmissionConfig
from provisioner.failures import FailureCode
from provisioner.model import Failure
from provisioner.ports import LogLevel, Ports, Scope, StorageConflict, StorageError

_A = Scope.ACCOUNT
_T = TypeVar("_T")


class _Again(Exception):
    """Another invocation changed something this decision read: decide again."""


@dataclass(slots=True)
class _Loaded:
    now_ms: int
    state: GateState
    gate_version: int | None
    record: WaiterRecord | None
    record_version: int | None


@dataclass(slots=True)
class _Place:
    """Where a waiter stands: a fresh ticket, or an entry among the retries."""

    retry: RetryEntry | None
    ticket: int
    since_ms: int
    attempt: int


class AdmissionController:
    def __init__(self, ports: Ports, config: AdmissionConfig) -> None:
        self._ports = ports
        self._config = config

    # ------------------------------------------------------------------ public API

    def admit(self, waiter: Waiter) -> Grant | Queued | Rejected:
        """Grant one create now, or say where the waiter stands.

        Idempotent per waiter: asking again keeps the waiter's place. A waiter whose own
        create is still in flight (its grant's lease is live) gets Queued with reason
        `create_slots` and position 0 rather than a second grant, so no entity ever has
        two creates in flight. Storage trouble answers Queued with reason `storage`."""
        return self._guard(waiter, "admit", lambda: self._retrying(lambda: self._admit(waiter)))

    def settle(
        self, waiter: Waiter, grant: Grant, result: CreateResult
    ) -> Grant | Queued | Rejected | None:
        """Record what the granted create came back with; frees its create slot.

        Created -> None (the waiter now holds a capacity lease for the sandbox's timeout).
        RateLimited / Unavailable -> Queued("backoff") at the front, or Rejected
        (FailureCode.RETRY_BUDGET_EXHAUSTED) after `max_create_attempts`. CapacityExhausted ->
        Queued("capacity"). CreateFailed -> Rejected(its failure). Queued("storage") means
        the result could not be recorded: settle again with the same arguments."""
        return self._guard(
            waiter,
            "settle",
            lambda: self._retrying(lambda: self._settle(waiter, grant, result)),
            {"e2b_answer": type(result).__name__, "attempt": grant.attempt},
        )

    def release(self, waiter: Waiter) -> bool:
        """Free everything the waiter holds or waits for; True when something was held."""
        try:
            held = self._retrying(lambda: self._release(waiter))
        except Exception as error:  # fail closed: held leases expire on their own
            self._log(LogLevel.WARN, f"admission release failed: {error!r}")
            held = False
        self._emit(waiter, "release", held)
        return held

    def status(self, tenant: str) -> dict[str, Any]:
        """A JSON-serialisable snapshot of every gate for the tenant and the account."""
        try:
            now = self._ports.clock.now_ms()
            entry = self._ports.storage.get(_A, GATE_KEY)
            state = GateState() if entry is None else GateState.from_bytes(entry.value)
            prune_expired(state, now)
            budget.refill(state, self._config, now)
            return snapshot(state, self._config, now, tenant)
        except Exception as error:
            return {"error": REASON_STORAGE, "message": str(error)}

    # ------------------------------------------------------------------ plumbing

    def _guard(
        self,
        waiter: Waiter,
        what: str,
        decide: Callable[[], _T],
        extra: dict[str, Any] | None = None,
    ) -> _T | Queued:
        result: _T | Queued
        try:
            result = decide()
        except StorageError as error:
            result = self._storage_queued(waiter, f"{what}: {error!r}")
        except Exception as error:  # a bug must not grant: fail closed
            self._log(LogLevel.ERROR, f"admission {what} failed: {error!r}")
            result = self._storage_queued(waiter, f"{what}: {error!r}")
        self._emit(waiter, what, result, extra)
        return result

    def _retrying(self, decide: Callable[[], _T]) -> _T:
        last: Exception | None = None
        for _ in range(self._config.cas_retries):
            try:
                return decide()
            except (StorageConflict, _Again) as conflict:
                last = conflict
        raise StorageConflict(f"still contended after {self._config.cas_retries} tries: {last}")

    def _storage_queued(self, waiter: Waiter, detail: str) -> Queued:
        self._log(LogLevel.WARN, f"admission for {waiter.entity} fails closed: {detail}")
        wait = self._config.poll_min_ms + int(self._ports.uniform() * 1000)
        return Queued(0, 0, 0, 0, REASON_STORAGE, wait, wait, 0)

    def _log(self, level: LogLevel, message: str) -> None:
        with contextlib.suppress(Exception):
            self._ports.telemetry.log(level, message)

    def _emit(
        self, waiter: Waiter, what: str, result: object, extra: dict[str, Any] | None = None
    ) -> None:
        event: dict[str, Any] = {"tenant": waiter.tenant, "entity": waiter.entity, "step": what}
        event.update(extra or {})
        if isinstance(result, Grant):
            event.update(
                event="admission_granted",
                lease_id=result.lease_id,
                attempt=result.attempt,
                queued_ms=result.queued_ms,
            )
        elif isinstance(result, Queued):
            event.update(event="admission_queued", **result.params())
        elif isinstance(result, Rejected):
            event.update(
                event="admission_rejected",
                code=result.failure.code,
                message=result.failure.message,
            )
        elif isinstance(result, bool):
            event.update(event="admission_released", held=result)
        else:
            event.update(event="admission_settled")
        with contextlib.suppress(Exception):
            self._ports.telemetry.progress(event)

    def _load(self, waiter: Waiter) -> _Loaded:
        storage = self._ports.storage
        record_entry = storage.get(_A, waiter_key(waiter.tenant, waiter.entity))
        gate_entry = storage.get(_A, GATE_KEY)
        now = self._ports.clock.now_ms()
        state = GateState() if gate_entry is None else GateState.from_bytes(gate_entry.value)
        prune_expired(state, now)
        budget.refill(state, self._config, now)
        return _Loaded(
            now_ms=now,
            state=state,
            gate_version=None if gate_entry is None else gate_entry.version,
            record=None if record_entry is None else WaiterRecord.from_bytes(record_entry.value),
            record_version=None if record_entry is None else record_entry.version,
        )

    def _save_gate(self, loaded: _Loaded) -> None:
        loaded.gate_version = self._ports.storage.compare_and_swap(
            _A, GATE_KEY, loaded.gate_version, loaded.state.to_bytes(), None
        )

    def _save_record(
        self, waiter: Waiter, loaded: _Loaded, record: WaiterRecord, ttl_ms: int
    ) -> None:
        self._ports.storage.compare_and_swap(
            _A,
            waiter_key(waiter.tenant, waiter.entity),
            loaded.record_version,
            record.to_bytes(),
            ttl_ms,
        )

    def _forget_record(self, waiter: Waiter) -> None:
        self._ports.storage.delete(_A, waiter_key(waiter.tenant, waiter.entity), None)

    def _eligible(self, state: GateState) -> Callable[[str], bool]:
        limit = self._config.max_sandboxes_per_tenant
        if limit is None:
            return lambda tenant: True
        usage = state.usage_by_tenant()
        return lambda tenant: usage.get(tenant, 0) < limit

    # ------------------------------------------------------------------ admit

    def _place(self, waiter: Waiter, loaded: _Loaded) -> _Place | Queued | Rejected:
        """Find (or make, in memory) the waiter's place in the queue."""
        state, record, now = loaded.state, loaded.record, loaded.now_ms
        if record is not None and record.state == QUEUED:
            queue = state.queue_of(waiter.tenant)
            if queue is not None and queue.holds(record.ticket):
                return _Place(None, record.ticket, record.since_ms, record.attempt)
        if record is not None and record.state == RETRYING:
            entry = state.retry_of(waiter.tenant, waiter.entity)
            if entry is not None:
                return _Place(entry, -1, record.since_ms, entry.attempt)
        if record is not None and record.state == CREATING:
            lease = state.create_lease(record.lease_id)
            if lease is not None:
                wait = max(
                    self._config.poll_min_ms, min(lease.expires_ms - now, self._config.poll_max_ms)
                )
                return Queued(
                    0,
                    state.waiting(),
                    slots_in_use(state),
                    self._config.create_slots,
                    REASON_CREATE_SLOTS,
                    wait,
                    wait,
                    now - record.since_ms,
                )
            # The create's holder died mid-call: its outcome is unknown, so it is a retry.
            attempt = record.attempt + 1
            if attempt > self._config.max_create_attempts:
                return self._exhausted(attempt - 1)
            entry = RetryEntry(waiter.tenant, waiter.entity, attempt, record.since_ms)
            state.retries.append(entry)
            return _Place(entry, -1, record.since_ms, attempt)
        if record is not None and record.state == RETRYING:
            # Dropped from the retries while it stopped polling: back where retries wait.
            entry = RetryEntry(waiter.tenant, waiter.entity, record.attempt, record.since_ms)
            state.retries.append(entry)
            return _Place(entry, -1, record.since_ms, record.attempt)
        if record is not None and record.state == QUEUED:
            # Its ticket was skipped as dead (it polled too late): queue again, same since.
            return _Place(None, enqueue(state, waiter.tenant), record.since_ms, record.attempt)
        # New, or holding a sandbox the caller has no record of (a crash after the
        # create): a create with the same idempotency key finds the same sandbox.
        return _Place(None, enqueue(state, waiter.tenant), now, 1)

    def _admit(self, waiter: Waiter) -> Grant | Queued | Rejected:
        loaded = self._load(waiter)
        placed = self._place(waiter, loaded)
        if not isinstance(placed, _Place):
            if isinstance(placed, Rejected):
                self._save_gate(loaded)
                self._forget_record(waiter)
            return placed
        place = placed
        state, now, config = loaded.state, loaded.now_ms, self._config
        if now - place.since_ms >= config.queue_timeout_ms:
            self._unplace(state, waiter, place)
            self._save_gate(loaded)
            self._forget_record(waiter)
            self._drop_ticket_key(waiter, place)
            return Rejected(
                Failure(
                    FailureCode.QUEUE_TIMEOUT,
                    f"waited {now - place.since_ms} ms for a sandbox, longer than the queue "
                    f"timeout of {config.queue_timeout_ms} ms",
                    retryable=True,
                )
            )
        mine = self._key_of(waiter, place)
        skipped = False
        # Each pass drops at least one dead waiter from the front, so it ends.
        for _ in range(config.create_slots + len(state.retries) + 2):
            front = self._front(state, now)
            if mine in front and self._removable(state, waiter, place):
                return self._grant(waiter, loaded, place)
            if not front or not self._skip_dead(state, front, mine):
                break
            skipped = True
        queued = self._queued(state, now, waiter, place)
        ttl = queued.retry_after_ms + config.waiter_ttl_ms
        fresh = loaded.record is None or not self._record_matches(loaded.record, place)
        if fresh or skipped:
            self._save_gate(loaded)
        state_name = RETRYING if place.retry is not None else QUEUED
        record = WaiterRecord(
            state_name, place.since_ms, place.attempt, place.ticket, "", now + ttl
        )
        try:
            self._save_record(waiter, loaded, record, ttl + config.queue_timeout_ms)
        except StorageConflict:
            # Another invocation of this waiter moved first; a ticket made here has no
            # liveness key, so it is skipped as dead.
            raise _Again("waiter record moved") from None
        if place.retry is None:
            self._touch_ticket(waiter, place.ticket, ttl)
        return queued

    @staticmethod
    def _record_matches(record: WaiterRecord, place: _Place) -> bool:
        if place.retry is not None:
            return record.state == RETRYING
        return record.state == QUEUED and record.ticket == place.ticket

    @staticmethod
    def _key_of(waiter: Waiter, place: _Place) -> tuple[str, str, int]:
        if place.retry is not None:
            return ("r", f"{waiter.tenant}\x00{waiter.entity}", 0)
        return ("t", waiter.tenant, place.ticket)

    def _front(self, state: GateState, now: int) -> list[tuple[str, str, int]]:
        """The waiters the free permits belong to, in fair order."""
        config = self._config
        if cooling_ms(state, now) > 0:
            return []
        free = min(
            slots_free(state, config),
            capacity_free(state, config),
            rate_available(state, config, now),
        )
        if free <= 0:
            return []
        eligible = self._eligible(state)
        front: list[tuple[str, str, int]] = []
        for entry in eligible_retries(state, eligible, budget.tokens(state, config)):
            if len(front) >= free:
                return front
            front.append(("r", f"{entry.tenant}\x00{entry.entity}", 0))
        # A grant can fill a tenant's room, so count grants per tenant along the way.
        usage = state.usage_by_tenant()
        limit = config.max_sandboxes_per_tenant
        for tenant, ticket in fair_order(state, eligible):
            if len(front) >= free:
                break
            if limit is not None and usage.get(tenant, 0) >= limit:
                continue
            usage[tenant] = usage.get(tenant, 0) + 1
            front.append(("t", tenant, ticket))
        return front

    def _removable(self, state: GateState, waiter: Waiter, place: _Place) -> bool:
        if place.retry is not None:
            return True
        queue = state.queue_of(waiter.tenant)
        return queue is not None and can_remove(queue, place.ticket)

    def _grant(self, waiter: Waiter, loaded: _Loaded, place: _Place) -> Grant:
        state, now, config = loaded.state, loaded.now_ms, self._config
        lease_id = new_lease_id(self._ports, "c")
        lease = take_create_lease(
            state,
            lease_id,
            waiter.tenant,
            waiter.entity,
            now,
            config.create_lease_ms,
            place.attempt,
        )
        take_rate(state, config, now)
        if place.attempt > 1:
            budget.spend(state, config)
        else:
            budget.earn(state, config)
        self._unplace(state, waiter, place, served=True)
        state.grants += 1
        self._save_gate(loaded)
        record = WaiterRecord(CREATING, place.since_ms, place.attempt, -1, lease_id)
        try:
            self._save_record(waiter, loaded, record, config.create_lease_ms + config.waiter_ttl_ms)
        except StorageConflict:
            self._undo_grant(lease_id)
            raise _Again("waiter record moved during the grant") from None
        self._drop_ticket_key(waiter, place)
        return Grant(lease_id, place.attempt, now - place.since_ms, lease.expires_ms)

    def _undo_grant(self, lease_id: str) -> None:
        """Give a just-taken slot back (its rate token stays spent: that errs safe)."""
        for _ in range(self._config.cas_retries):
            entry = self._ports.storage.get(_A, GATE_KEY)
            if entry is None:
                return
            state = GateState.from_bytes(entry.value)
            if drop_create_lease(state, lease_id) is None:
                return
            try:
                self._ports.storage.compare_and_swap(
                    _A, GATE_KEY, entry.version, state.to_bytes(), None
                )
                return
            except StorageConflict:
                continue
        # Could not give it back: the lease expires on its own.

    def _unplace(
        self, state: GateState, waiter: Waiter, place: _Place, served: bool = False
    ) -> None:
        if place.retry is not None:
            state.retries = [
                e for e in state.retries if (e.tenant, e.entity) != (waiter.tenant, waiter.entity)
            ]
        else:
            remove_ticket(state, waiter.tenant, place.ticket, served=served)

    def _skip_dead(
        self, state: GateState, front: list[tuple[str, str, int]], mine: tuple[str, str, int]
    ) -> bool:
        """Drop waiters ahead that stopped polling (their keys expired); True if any."""
        storage = self._ports.storage
        skipped = False
        for kind, name, ticket in front:
            if (kind, name, ticket) == mine:
                continue
            if kind == "r":
                tenant, entity = name.split("\x00", 1)
                entry = storage.get(_A, waiter_key(tenant, entity))
                record = None if entry is None else WaiterRecord.from_bytes(entry.value)
                alive = (
                    record is not None
                    and record.state == RETRYING
                    and record.alive_until_ms > self._ports.clock.now_ms()
                )
                if not alive:
                    state.retries = [
                        e for e in state.retries if (e.tenant, e.entity) != (tenant, entity)
                    ]
                    skipped = True
            elif storage.get(_A, ticket_key(name, ticket)) is None:
                queue = state.queue_of(name)
                if queue is not None and can_remove(queue, ticket):
                    remove_ticket(state, name, ticket, served=False)
                    skipped = True
        return skipped

    def _touch_ticket(self, waiter: Waiter, ticket: int, ttl_ms: int) -> None:
        key = ticket_key(waiter.tenant, ticket)
        storage = self._ports.storage
        entry = storage.get(_A, key)
        storage.compare_and_swap(
            _A, key, None if entry is None else entry.version, waiter.entity.encode(), ttl_ms
        )

    def _drop_ticket_key(self, waiter: Waiter, place: _Place) -> None:
        if place.retry is None:
            self._forget_ticket(waiter, place.ticket)

    def _exhausted(self, attempts: int) -> Rejected:
        return Rejected(
            Failure(
                FailureCode.RETRY_BUDGET_EXHAUSTED,
                f"E2B refused {attempts} create attempts; giving up on this waiter",
                retryable=True,
            )
        )

    # ------------------------------------------------------------------ queue status

    def _position(self, state: GateState, waiter: Waiter, place: _Place) -> int:
        eligible = self._eligible(state)
        tokens = budget.tokens(state, self._config)
        ready = eligible_retries(state, eligible, tokens)
        if place.retry is not None:
            for index, entry in enumerate(state.retries):
                if (entry.tenant, entry.entity) == (waiter.tenant, waiter.entity):
                    return index + 1
            return len(state.retries)
        return len(ready) + fresh_position(state, waiter.tenant, place.ticket, eligible)

    def _queued(self, state: GateState, now: int, waiter: Waiter, place: _Place) -> Queued:
        config = self._config
        position = max(1, self._position(state, waiter, place))
        cooling = cooling_ms(state, now)
        waits = {
            REASON_CAPACITY: capacity_wait_ms(state, config, now, position),
            REASON_CREATE_SLOTS: slot_wait_ms(state, config, now, position),
            REASON_RATE: rate_wait_ms(state, config, now, position),
        }
        frees = {
            REASON_CAPACITY: capacity_free(state, config),
            REASON_CREATE_SLOTS: slots_free(state, config),
            REASON_RATE: rate_available(state, config, now),
        }
        usage = {
            REASON_CAPACITY: (capacity_in_use(state), capacity_limit(state, config)),
            REASON_CREATE_SLOTS: (slots_in_use(state), config.create_slots),
            REASON_RATE: (rate_in_use(state, config, now), config.create_burst),
        }
        eta = cooling + max(waits.values())
        blocked = [name for name in waits if frees[name] < position]
        if cooling > 0:
            reason = REASON_BACKOFF
            in_use, limit = usage[REASON_CREATE_SLOTS]
        elif not tenant_has_room(state, config, waiter.tenant):
            reason = REASON_CAPACITY
            in_use = state.tenant_in_use(waiter.tenant)
            limit = config.max_sandboxes_per_tenant or config.max_sandboxes
        elif place.retry is not None and budget.tokens(state, config) < 1.0:
            reason = REASON_BACKOFF
            in_use, limit = usage[REASON_CREATE_SLOTS]
            eta = max(eta, budget.wait_for_token_ms(state, config, 1))
        elif blocked:
            reason = max(blocked, key=lambda name: waits[name])
            in_use, limit = usage[reason]
        else:
            # The permits ahead belong to waiters that have not polled yet.
            reason = REASON_CREATE_SLOTS
            in_use, limit = usage[reason]
        # Only the rate gate's estimate is exact, so a waiter held by it comes back right
        # when its turn is due (else a fast rate would be throttled to one grant per
        # poll_min). Slot and capacity estimates are guesses from observed times, and an
        # unused rate token means the permit waits on someone else's turn: poll_min keeps
        # those from spinning.
        exact = reason == REASON_RATE and eta > 0 and frees[REASON_RATE] == 0
        floor = 1 if exact else config.poll_min_ms
        wait = eta
        if not exact and state.latency_ms is None:
            # The estimate rests on the assumed create latency: come back by the time the
            # first create should have answered, when a measured latency is known.
            wait = min(wait, config.create_latency_ms // 2)
        retry_after = max(floor, min(wait, config.poll_max_ms))
        if cooling > 0:
            # Spread the herd that comes back when the cooldown ends.
            retry_after = max(cooling, retry_after) + int(
                self._ports.uniform() * config.poll_min_ms
            )
        return Queued(
            position=position,
            queue_length=state.waiting(),
            in_use=in_use,
            limit=limit,
            reason=reason,
            retry_after_ms=retry_after,
            eta_ms=eta,
            waited_ms=now - place.since_ms,
        )

    # ------------------------------------------------------------------ settle

    def _settle(
        self, waiter: Waiter, grant: Grant, result: CreateResult
    ) -> Queued | Rejected | None:
        loaded = self._load(waiter)
        state, now, config = loaded.state, loaded.now_ms, self._config
        record = loaded.record
        since = record.since_ms if record is not None else now - grant.queued_ms
        lease = drop_create_lease(state, grant.lease_id)
        if lease is not None:
            observed = max(0, now - lease.started_ms)
            state.latency_ms = (
                observed if state.latency_ms is None else (state.latency_ms * 3 + observed) // 4
            )
        if isinstance(result, Created):
            if any(s.lease_id == grant.lease_id for s in state.sandbox_leases):
                return None  # settled already
            # Held even when the create lease had expired: the sandbox exists, so it counts.
            # (A create lease outlives any invocation, so only a dead holder loses one.)
            hold_sandbox(
                state,
                grant.lease_id,
                waiter.tenant,
                waiter.entity,
                result.sandbox_id,
                now,
                max(1, result.sandbox_timeout_ms),
            )
            # A late answer for a waiter that had been queued again must not leave it queued.
            ticket = self._leave_queue(state, waiter, record)
            record_success(state)
            note_created(state, config)
            self._save_gate(loaded)
            self._forget_ticket(waiter, ticket)
            self._write_record(
                waiter,
                loaded,
                WaiterRecord(HOLDING, since, grant.attempt, -1, grant.lease_id),
                max(1, result.sandbox_timeout_ms) + config.waiter_ttl_ms,
            )
            return None
        if isinstance(result, CreateFailed):
            ticket = self._leave_queue(state, waiter, record)
            self._save_gate(loaded)
            self._forget_record(waiter)
            self._forget_ticket(waiter, ticket)
            return Rejected(result.failure)
        if lease is None and record is not None and record.state != CREATING:
            # Settled already (or the waiter moved on): report where it stands now.
            return self._retrying_admit_view(waiter, loaded, since)
        if isinstance(result, CapacityExhausted):
            shrink_capacity(state, config)
            if capacity_in_use(state) == 0:
                record_failure(state, config, now, None, self._ports.uniform())
        elif isinstance(result, RateLimited | Unavailable):
            retry_after = result.retry_after_ms if isinstance(result, RateLimited) else None
            record_failure(state, config, now, retry_after, self._ports.uniform())
        attempt = grant.attempt + 1
        if attempt > config.max_create_attempts:
            ticket = self._leave_queue(state, waiter, record)
            self._save_gate(loaded)
            self._forget_record(waiter)
            self._forget_ticket(waiter, ticket)
            return self._exhausted(grant.attempt)
        entry = state.retry_of(waiter.tenant, waiter.entity)
        if entry is None:
            entry = RetryEntry(waiter.tenant, waiter.entity, attempt, since)
            state.retries.append(entry)
        place = _Place(entry, -1, since, attempt)
        queued = self._queued(state, now, waiter, place)
        if isinstance(result, CapacityExhausted) and queued.reason != REASON_BACKOFF:
            queued = _with_reason(
                queued, REASON_CAPACITY, capacity_in_use(state), capacity_limit(state, config)
            )
        self._save_gate(loaded)
        ttl = queued.retry_after_ms + config.waiter_ttl_ms
        self._write_record(
            waiter,
            loaded,
            WaiterRecord(RETRYING, since, attempt, -1, "", now + ttl),
            ttl + config.queue_timeout_ms,
        )
        return queued

    def _retrying_admit_view(self, waiter: Waiter, loaded: _Loaded, since: int) -> Queued | None:
        entry = loaded.state.retry_of(waiter.tenant, waiter.entity)
        if entry is None:
            return None
        return self._queued(
            loaded.state, loaded.now_ms, waiter, _Place(entry, -1, since, entry.attempt)
        )

    def _write_record(
        self, waiter: Waiter, loaded: _Loaded, record: WaiterRecord, ttl: int
    ) -> None:
        """The gate is already decided; the record only guides the waiter's next call, so
        a concurrent writer is overwritten rather than undoing the decision."""
        key = waiter_key(waiter.tenant, waiter.entity)
        storage = self._ports.storage
        version = loaded.record_version
        for _ in range(self._config.cas_retries):
            try:
                storage.compare_and_swap(_A, key, version, record.to_bytes(), ttl)
                return
            except StorageConflict:
                entry = storage.get(_A, key)
                version = None if entry is None else entry.version

    def _leave_queue(self, state: GateState, waiter: Waiter, record: WaiterRecord | None) -> int:
        """Take the waiter out of the retries and its tenant's queue (in memory); returns
        the ticket whose liveness key should go, or -1."""
        state.retries = [
            e for e in state.retries if (e.tenant, e.entity) != (waiter.tenant, waiter.entity)
        ]
        if record is None or record.state != QUEUED:
            return -1
        queue = state.queue_of(waiter.tenant)
        if queue is not None and can_remove(queue, record.ticket):
            remove_ticket(state, waiter.tenant, record.ticket, served=False)
        return record.ticket

    def _forget_ticket(self, waiter: Waiter, ticket: int) -> None:
        if ticket >= 0:
            # On failure it expires on its own; it is out of the queue either way.
            with contextlib.suppress(StorageError):
                self._ports.storage.delete(_A, ticket_key(waiter.tenant, ticket), None)

    # ------------------------------------------------------------------ release

    def _release(self, waiter: Waiter) -> bool:
        loaded = self._load(waiter)
        state, now, record = loaded.state, loaded.now_ms, loaded.record
        for lease in state.sandbox_leases:
            if (lease.tenant, lease.entity) == (waiter.tenant, waiter.entity):
                observed = max(0, now - lease.started_ms)
                state.hold_ms = (
                    observed if state.hold_ms is None else (state.hold_ms * 3 + observed) // 4
                )
        held = drop_leases_of(state, waiter.tenant, waiter.entity) > 0
        before = state.waiting()
        ticket = self._leave_queue(state, waiter, record)
        waited = before != state.waiting() or ticket >= 0
        if held or before != state.waiting():
            self._save_gate(loaded)
        self._forget_record(waiter)
        self._forget_ticket(waiter, ticket)
        return held or waited


def _with_reason(queued: Queued, reason: str, in_use: int, limit: int) -> Queued:
    return Queued(
        queued.position,
        queued.queue_length,
        in_use,
        limit,
        reason,
        queued.retry_after_ms,
        queued.eta_ms,
        queued.waited_ms,
    )
