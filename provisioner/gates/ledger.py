"""What one gate decision reads and writes: the gate's document and the waiter's place,
in the account scope. The document is written with compare-and-swap against the version
read, so a decision that lost a race raises `StorageConflict` and runs again from a fresh
read (`cas.until_settled`)."""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from dataclasses import dataclass, replace
from typing import Generic, Protocol, TypeVar

from provisioner.config import AdmissionConfig, ResourceGate
from provisioner.failures import FailureCode
from provisioner.gates.blocking import Scheduled, Turn
from provisioner.gates.bucket import note_change
from provisioner.gates.cas import Again, until_settled
from provisioner.gates.document import (
    GATE_KEY,
    SANDBOX_PREFIX,
    Costs,
    GateState,
    Reservation,
    ResourceLease,
    ResourceState,
    decode_ticket,
    gate_key,
    resource_prefix,
    ticket_key,
    waiter_key,
)
from provisioner.gates.place import Place
from provisioner.gates.policies import rate_limits, refill_retries
from provisioner.gates.queue import pass_over_unclaimed
from provisioner.gates.results import Queued, Rejected, Waiter
from provisioner.gates.sandbox import WakeUp, promise, prune_expired
from provisioner.model import Failure
from provisioner.ports import Ports, Scope, StorageConflict, StorageError

ACCOUNT = Scope.ACCOUNT


class Stored(Protocol):
    def to_bytes(self) -> bytes: ...


Document = TypeVar("Document", bound=Stored)


@dataclass(slots=True)
class LoadedDocument(Generic[Document]):
    now_ms: int
    state: Document
    gate_version: int | None
    place: Place | None
    place_version: int | None
    # The load itself changed the document (a reservation passed over): save it.
    moved: bool = False


class Waiting(Protocol):
    @property
    def tenant(self) -> str: ...

    @property
    def entity(self) -> str: ...


class GateLedger(ABC, Generic[Document]):
    """The base of every decision of one gate, whose keys are under `prefix`. A gate says
    how its document is read and brought up to now (`catch_up`: True when that changed
    the document)."""

    def __init__(self, ports: Ports, config: AdmissionConfig, prefix: str) -> None:
        self.ports = ports
        self.config = config
        self.prefix = prefix

    def gate_key(self) -> str:
        return gate_key(self.prefix)

    def waiter_key(self, tenant: str, entity: str) -> str:
        return waiter_key(tenant, entity, self.prefix)

    def ticket_key(self, tenant: str, ticket: int) -> str:
        return ticket_key(tenant, ticket, self.prefix)

    @abstractmethod
    def read(self, raw: bytes | None) -> Document: ...

    @abstractmethod
    def catch_up(self, state: Document, now_ms: int) -> bool: ...

    def load(self, waiter: Waiting) -> LoadedDocument[Document]:
        storage = self.ports.storage
        place_entry = storage.get(ACCOUNT, self.waiter_key(waiter.tenant, waiter.entity))
        gate_entry = storage.get(ACCOUNT, self.gate_key())
        now = self.ports.clock.now_ms()
        state = self.read(None if gate_entry is None else gate_entry.value)
        moved = self.catch_up(state, now)
        return LoadedDocument(
            now_ms=now,
            state=state,
            gate_version=None if gate_entry is None else gate_entry.version,
            place=None if place_entry is None else Place.from_bytes(place_entry.value),
            place_version=None if place_entry is None else place_entry.version,
            moved=moved,
        )

    def save_gate(self, loaded: LoadedDocument[Document]) -> None:
        loaded.gate_version = self.ports.storage.compare_and_swap(
            ACCOUNT, self.gate_key(), loaded.gate_version, loaded.state.to_bytes(), None
        )

    def save_place(
        self, waiter: Waiting, loaded: LoadedDocument[Document], place: Place, ttl_ms: int
    ) -> None:
        """Write the place only if nobody moved it since the load (StorageConflict if so)."""
        self.ports.storage.compare_and_swap(
            ACCOUNT,
            self.waiter_key(waiter.tenant, waiter.entity),
            loaded.place_version,
            place.to_bytes(),
            ttl_ms,
        )

    def write_place(
        self, waiter: Waiting, loaded: LoadedDocument[Document], place: Place, ttl_ms: int
    ) -> None:
        """The gate is already decided; the place only guides the waiter's next call, so a
        concurrent writer is overwritten rather than undoing the decision (best effort)."""
        key = self.waiter_key(waiter.tenant, waiter.entity)
        storage = self.ports.storage
        version = [loaded.place_version]

        def step() -> None:
            try:
                storage.compare_and_swap(ACCOUNT, key, version[0], place.to_bytes(), ttl_ms)
            except StorageConflict:
                entry = storage.get(ACCOUNT, key)
                version[0] = None if entry is None else entry.version
                raise

        with contextlib.suppress(StorageConflict):
            until_settled(step, self.config.cas_retries)

    def keep_waiting(
        self,
        waiter: Waiting,
        loaded: LoadedDocument[Document],
        place: Place,
        ttl_ms: int,
        timeout_ms: int,
        ticket_value: bytes | None = None,
    ) -> None:
        """Record that the waiter waits on: its place, alive for `ttl_ms` and kept
        `timeout_ms` longer (so a waiter that dies and returns keeps when it first asked),
        and its ticket's liveness key."""
        renewed = replace(place, lease_id=None, alive_until_ms=loaded.now_ms + ttl_ms)
        try:
            self.save_place(waiter, loaded, renewed, ttl_ms + timeout_ms)
        except StorageConflict:
            # Another invocation of this waiter moved first; a ticket made here has no
            # liveness key, so it is skipped as dead.
            raise Again("waiter record moved") from None
        if place.ticket is not None:
            self.touch_ticket(waiter, place.ticket, ttl_ms, ticket_value)

    def time_out(
        self, waiter: Waiting, loaded: LoadedDocument[Document], ticket: int | None, why: str
    ) -> Rejected:
        """The waiter waited too long: save the gate it was taken out of, forget its place
        and ticket, and refuse it (retryable: asking again queues it afresh)."""
        self.save_gate(loaded)
        self.forget(waiter, ticket)
        return Rejected(Failure(FailureCode.QUEUE_TIMEOUT, why, retryable=True))

    def wait_on(
        self,
        waiter: Waiting,
        loaded: LoadedDocument[Document],
        place: Place,
        queued: Queued,
        *,
        changed: bool,
        own: Reservation | None,
        timeout_ms: int,
        ticket_value: bytes | None = None,
    ) -> Queued:
        """Answer Queued: naming the permit promised to the waiter (`own`), saving the gate
        when the decision changed it, and keeping the waiter's place until it is back."""
        if own is not None:
            queued = replace(queued, reservation=own.rid, claim_by_ms=own.by_ms)
        if changed or loaded.moved:
            self.save_gate(loaded)
        ttl = queued.expected_back_ms(loaded.now_ms) + self.config.waiter_ttl_ms
        self.keep_waiting(waiter, loaded, place, ttl, timeout_ms, ticket_value)
        return queued

    def forget(self, waiter: Waiting, ticket: int | None) -> None:
        """The waiter no longer waits: its place and its ticket's liveness key go."""
        self.forget_place(waiter)
        self.forget_ticket(waiter, ticket)

    def forget_place(self, waiter: Waiting) -> None:
        self.ports.storage.delete(ACCOUNT, self.waiter_key(waiter.tenant, waiter.entity), None)

    def touch_ticket(
        self, waiter: Waiting, ticket: int, ttl_ms: int, value: bytes | None = None
    ) -> None:
        """The ticket's liveness key: while it exists, the ticket's waiter counts as alive.
        It holds `value` (the waiter's entity unless given)."""
        key = self.ticket_key(waiter.tenant, ticket)
        storage = self.ports.storage
        entry = storage.get(ACCOUNT, key)
        held = waiter.entity.encode() if value is None else value
        storage.compare_and_swap(
            ACCOUNT, key, None if entry is None else entry.version, held, ttl_ms
        )

    def forget_ticket(self, waiter: Waiting, ticket: int | None) -> None:
        if ticket is not None:
            # On failure it expires on its own; it is out of the queue either way.
            with contextlib.suppress(StorageError):
                key = self.ticket_key(waiter.tenant, ticket)
                self.ports.storage.delete(ACCOUNT, key, None)


Answer = TypeVar("Answer")


class Asking(GateLedger[Document], Generic[Document, Answer]):
    """A waiter asks for a permit (`admit`, `acquire`): load, `locate` the waiter (its
    stored place checked against the gate), refuse it once it has waited too long, else
    `judge` whether its turn has come."""

    def ask(self, waiter: Waiter) -> Answer | Queued | Rejected:
        loaded = self.load(waiter)
        located = self.locate(waiter, loaded)
        if not isinstance(located, Place):
            if isinstance(located, Rejected):
                self.save_gate(loaded)
                self.forget_place(waiter)
            return located
        why = self.timed_out(loaded, located)
        if why is not None:
            self.unplace(loaded.state, waiter, located)
            return self.time_out(waiter, loaded, located.ticket, why)
        return self.judge(waiter, loaded, located)

    @abstractmethod
    def locate(
        self, waiter: Waiter, loaded: LoadedDocument[Document]
    ) -> Place | Answer | Queued | Rejected: ...

    @abstractmethod
    def timed_out(self, loaded: LoadedDocument[Document], place: Place) -> str | None:
        """Why the wait is over, if it is."""

    @abstractmethod
    def unplace(self, state: Document, waiter: Waiter, place: Place) -> None:
        """Take the waiter out of the queue (in memory)."""

    @abstractmethod
    def judge(
        self, waiter: Waiter, loaded: LoadedDocument[Document], place: Place
    ) -> Answer | Queued | Rejected: ...


# The sandbox gate.


SandboxLoaded = LoadedDocument[GateState]


def load_gate(ports: Ports, config: AdmissionConfig, now_ms: int) -> tuple[GateState, int | None]:
    """The gate as the next decision sees it: expired leases pruned, budget refilled."""
    entry = ports.storage.get(ACCOUNT, GATE_KEY)
    state = GateState() if entry is None else GateState.from_bytes(entry.value)
    sandbox_catch_up(state, config, now_ms)
    return state, None if entry is None else entry.version


def sandbox_catch_up(state: GateState, config: AdmissionConfig, now_ms: int) -> bool:
    """The gate as of `now_ms`: expired leases pruned, the budget refilled, unclaimed
    reservations passed over. True when reservations moved (the caller should save)."""
    prune_expired(state, now_ms)
    refill_retries(state, config, now_ms)
    return bool(pass_over_unclaimed(state, now_ms, config.reservation_claim_ms, state.drop_retry))


class SandboxLedger(GateLedger[GateState]):
    def __init__(self, ports: Ports, config: AdmissionConfig) -> None:
        super().__init__(ports, config, SANDBOX_PREFIX)
        # The waiters this decision promised a permit to (`sandbox.promise`), told only
        # once the gate holding the promise is saved.
        self.wake_ups: list[WakeUp] = []
        self._promised: list[WakeUp] = []

    def load(self, waiter: Waiting) -> SandboxLoaded:
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
        """Promise the free permits to the next turns; True when the document changed."""
        changed, self._promised = promise(
            self.ports, self.config, loaded.state, loaded.now_ms, scheduled=scheduled, caller=caller
        )
        return changed

    def read(self, raw: bytes | None) -> GateState:
        return GateState() if raw is None else GateState.from_bytes(raw)

    def catch_up(self, state: GateState, now_ms: int) -> bool:
        return sandbox_catch_up(state, self.config, now_ms)


# A resource gate.


ResourceLoaded = LoadedDocument[ResourceState]


def prune(state: ResourceState, gate: ResourceGate, now_ms: int) -> bool:
    """Drop expired leases and buckets that are full and charged by no open lease; True
    when anything was dropped. What an expired lease charged stays charged, and its
    margins are charged too: its call may have cost its worst case, and nothing tells the
    gate otherwise in time (a settle that comes later charges the actual in full)."""
    expired = [lease for lease in state.leases if lease.expires_ms <= now_ms]
    changed = bool(expired)
    state.leases = [lease for lease in state.leases if lease.expires_ms > now_ms]
    for lease in expired:
        charge_margins(state, gate, lease, now_ms)
    charged = {charge.bucket for charge in state.open_charges()}
    for name, tat in list(state.buckets.items()):
        if tat <= now_ms and name not in charged:
            del state.buckets[name]
            changed = True
    return changed


def charge_margins(
    state: ResourceState, gate: ResourceGate, lease: ResourceLease, now_ms: int
) -> None:
    """Charge every bucket `lease` charged its worst-case error (the lease is out of
    `state.leases`)."""
    rates = {rate.bucket_id(lease.tenant): rate for rate in rate_limits(gate)}
    for charge in lease.charges:
        rate = rates.get(charge.bucket)
        margin = 0.0 if rate is None else lease.margin(rate.kind)
        if rate is not None and margin > 0:
            tat = state.buckets.get(charge.bucket, 0.0)
            set_bucket(state, charge.bucket, rate.bucket.charge(tat, now_ms, margin), now_ms)


def read_state(ports: Ports, gate: ResourceGate, now_ms: int) -> tuple[ResourceState, int | None]:
    entry = ports.storage.get(ACCOUNT, gate_key(resource_prefix(gate.name)))
    state = ResourceState() if entry is None else ResourceState.from_bytes(entry.value)
    prune(state, gate, now_ms)
    return state, None if entry is None else entry.version


def set_bucket(state: ResourceState, name: str, tat_ms: float, now_ms: int) -> None:
    """Change a bucket's clock, telling every open charge on it first (`bucket.note_change`)."""
    note_change(state.open_charges(), name, state.buckets.get(name, 0.0), now_ms)
    state.buckets[name] = tat_ms


class ResourceLedger(GateLedger[ResourceState]):
    def __init__(self, ports: Ports, config: AdmissionConfig, gate: ResourceGate) -> None:
        super().__init__(ports, config, resource_prefix(gate.name))
        self.gate = gate

    @property
    def queue_timeout_ms(self) -> int:
        timeout = self.gate.queue_timeout_ms
        return self.config.queue_timeout_ms if timeout is None else timeout

    def read(self, raw: bytes | None) -> ResourceState:
        return ResourceState() if raw is None else ResourceState.from_bytes(raw)

    def catch_up(self, state: ResourceState, now_ms: int) -> bool:
        prune(state, self.gate, now_ms)
        return bool(pass_over_unclaimed(state, now_ms, self.config.reservation_claim_ms))

    def read_ticket(self, tenant: str, ticket: int) -> Costs | None:
        entry = self.ports.storage.get(ACCOUNT, self.ticket_key(tenant, ticket))
        return None if entry is None else decode_ticket(entry.value)[1]
