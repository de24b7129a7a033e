"""What one gate decision reads and writes: the gate's document and the waiter's place, in
the account scope. The document is written with compare-and-swap against the version read:
a decision that lost a race raises `StorageConflict` and runs again (`retried`)."""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, Concatenate, Generic, ParamSpec, TypeVar

from provisioner.config import AdmissionConfig, ResourceGate
from provisioner.failures import FailureCode
from provisioner.gates.blocking import Assessment, Scheduled, Turn
from provisioner.gates.bucket import note_change
from provisioner.gates.cas import Again, until_settled
from provisioner.gates.document import (
    GateDocument,
    Reservation,
    ResourceLease,
    ResourceState,
    gate_key,
    resource_prefix,
    ticket_key,
    waiter_key,
)
from provisioner.gates.place import Place, Stage
from provisioner.gates.policies import rate_limits
from provisioner.gates.queue import enqueue, remove_ticket
from provisioner.gates.results import Queued, Rejected, Waiter
from provisioner.model import Failure
from provisioner.ports import Ports, Scope, StorageConflict, StorageError

ACCOUNT = Scope.ACCOUNT
Document = TypeVar("Document", bound=GateDocument)
Answer = TypeVar("Answer")
_T = TypeVar("_T")
_Args = ParamSpec("_Args")
_Ledger = TypeVar("_Ledger", bound="GateLedger[Any, Any]")


@dataclass(slots=True)
class LoadedDocument(Generic[Document]):
    now_ms: int
    state: Document
    gate_version: int | None
    place: Place | None
    place_version: int | None
    # The load itself changed the document (a reservation passed over): save it.
    moved: bool = False


def read_document(ports: Ports, key: str, document: type[Document]) -> tuple[Document, int | None]:
    entry = ports.storage.get(ACCOUNT, key)
    if entry is None:
        return document(), None
    return document.from_bytes(entry.value), entry.version


def queued_place(state: GateDocument, tenant: str, stored: Place | None, now_ms: int) -> Place:
    """The stored place while its ticket is live; else a new ticket (its old one was skipped
    as dead), keeping when the waiter first asked so that dying cannot dodge the timeout."""
    ticket = None if stored is None else stored.queued_ticket
    if stored is not None and ticket is not None and state.holds_ticket(tenant, ticket):
        return stored
    since, attempt = (now_ms, 1) if stored is None else (stored.since_ms, stored.attempt)
    return Place(Stage.QUEUED, since, attempt, ticket=enqueue(state, tenant))


def retried(
    decide: Callable[Concatenate[_Ledger, _Args], _T],
) -> Callable[Concatenate[_Ledger, _Args], _T]:
    """A decision method run in `cas.until_settled`, as many times as its config allows."""

    def run(ledger: _Ledger, /, *args: _Args.args, **kwargs: _Args.kwargs) -> _T:
        return until_settled(lambda: decide(ledger, *args, **kwargs), ledger.config.cas_retries)

    return run


class GateLedger(ABC, Generic[Document, Answer]):
    """Every decision of one gate, whose keys are under `prefix`. A waiter asks for a
    permit (`ask`): `locate` it (its stored place checked against the gate), refuse it
    once it has waited too long, else `assess` its turn: `grant` the permit, or `reserve`
    the free permits for the next turns and answer Queued."""

    # What the ticket's liveness key holds (None: the entity).
    ticket_value: bytes | None = None

    def __init__(
        self, ports: Ports, config: AdmissionConfig, prefix: str, document: type[Document]
    ) -> None:
        self.ports = ports
        self.config = config
        self.prefix = prefix
        self.document = document

    @property
    def queue_timeout_ms(self) -> int:
        return self.config.queue_timeout_ms

    def place_key(self, waiter: Waiter) -> str:
        return waiter_key(waiter.tenant, waiter.entity, self.prefix)

    def load(self, waiter: Waiter) -> LoadedDocument[Document]:
        stored = self.ports.storage.get(ACCOUNT, self.place_key(waiter))
        state, version = read_document(self.ports, gate_key(self.prefix), self.document)
        now = self.ports.clock.now_ms()
        moved = self.catch_up(state, now)
        place = None if stored is None else Place.from_bytes(stored.value)
        place_version = None if stored is None else stored.version
        return LoadedDocument(now, state, version, place, place_version, moved)

    def save_gate(self, loaded: LoadedDocument[Document]) -> None:
        loaded.gate_version = self.ports.storage.compare_and_swap(
            ACCOUNT, gate_key(self.prefix), loaded.gate_version, loaded.state.to_bytes(), None
        )

    def save_place(
        self, waiter: Waiter, loaded: LoadedDocument[Document], place: Place, ttl_ms: int
    ) -> None:
        """Write the place only if nobody moved it since the load (StorageConflict if so)."""
        self.ports.storage.compare_and_swap(
            ACCOUNT, self.place_key(waiter), loaded.place_version, place.to_bytes(), ttl_ms
        )

    def write_place(
        self, waiter: Waiter, loaded: LoadedDocument[Document], place: Place, ttl_ms: int
    ) -> None:
        """Best effort: the gate is decided and the place only guides the waiter's next
        call, so a concurrent writer is overwritten rather than undoing the decision."""
        for _ in range(max(1, self.config.cas_retries)):
            try:
                return self.save_place(waiter, loaded, place, ttl_ms)
            except StorageConflict:
                entry = self.ports.storage.get(ACCOUNT, self.place_key(waiter))
                loaded.place_version = None if entry is None else entry.version

    def ticket_entry(self, tenant: str, ticket: int) -> bytes | None:
        """What the ticket's liveness key holds (None: expired, its waiter is gone)."""
        entry = self.ports.storage.get(ACCOUNT, ticket_key(tenant, ticket, self.prefix))
        return None if entry is None else entry.value

    def forget(self, waiter: Waiter, ticket: int | None) -> None:
        """The waiter no longer waits: its place and its ticket's liveness key go."""
        self.ports.storage.delete(ACCOUNT, self.place_key(waiter), None)
        self.forget_ticket(waiter, ticket)

    def forget_ticket(self, waiter: Waiter, ticket: int | None) -> None:
        if ticket is not None:
            # On failure it expires on its own; it is out of the queue either way.
            with contextlib.suppress(StorageError):
                key = ticket_key(waiter.tenant, ticket, self.prefix)
                self.ports.storage.delete(ACCOUNT, key, None)

    @retried
    def ask(self, waiter: Waiter) -> Answer | Queued | Rejected:
        loaded = self.load(waiter)
        located = self.locate(waiter, loaded)
        if not isinstance(located, Place):
            if isinstance(located, Rejected):
                self.save_gate(loaded)
                self.forget(waiter, None)
            return located
        why = self.timed_out(loaded, located)
        if why is None:
            return self.judge(waiter, loaded, located)
        # Waited too long: out of the queue, and refused (asking again queues it afresh).
        self.unplace(loaded.state, waiter, located)
        self.save_gate(loaded)
        self.forget(waiter, located.ticket)
        return Rejected(Failure(FailureCode.QUEUE_TIMEOUT, why, retryable=True))

    def judge(
        self, waiter: Waiter, loaded: LoadedDocument[Document], place: Place
    ) -> Answer | Queued:
        seen = self.assess(waiter, loaded, place)
        if seen.queued is None:
            self.unplace(loaded.state, waiter, place, granted=True)
            loaded.state.grants += 1
            return self.grant(waiter, loaded, place)
        reserved, own = self.reserve(loaded, seen.scheduled, Turn.of(waiter, place))
        changed = place is not loaded.place or seen.dropped or reserved
        return self.wait_on(waiter, loaded, place, seen.queued, changed=changed, own=own)

    def unplace(
        self, state: Document, waiter: Waiter, place: Place, *, granted: bool = False
    ) -> None:
        """Take the waiter out of the queue (in memory)."""
        if place.stage is Stage.RETRYING:
            state.drop_retry(waiter.tenant, waiter.entity)
        elif place.ticket is not None:
            remove_ticket(state, waiter.tenant, place.ticket, granted=granted)

    def wait_on(
        self,
        waiter: Waiter,
        loaded: LoadedDocument[Document],
        place: Place,
        queued: Queued,
        *,
        changed: bool,
        own: Reservation | None,
    ) -> Queued:
        """Answer Queued, naming the permit promised to the waiter (`own`); keep its place
        alive until it is back and the queue timeout longer (a waiter that dies and
        returns keeps when it first asked), and its ticket's liveness key."""
        if own is not None:
            queued = replace(queued, reservation=own.rid, claim_by_ms=own.by_ms)
        if changed or loaded.moved:
            self.save_gate(loaded)
        ttl = queued.expected_back_ms(loaded.now_ms) + self.config.waiter_ttl_ms
        renewed = replace(place, lease_id=None, alive_until_ms=loaded.now_ms + ttl)
        try:
            self.save_place(waiter, loaded, renewed, ttl + self.queue_timeout_ms)
        except StorageConflict:
            # Another invocation of this waiter moved first; a ticket made here has no
            # liveness key, so it is skipped as dead.
            raise Again("waiter record moved") from None
        if place.ticket is not None:
            key = ticket_key(waiter.tenant, place.ticket, self.prefix)
            entry = self.ports.storage.get(ACCOUNT, key)
            value = waiter.entity.encode() if self.ticket_value is None else self.ticket_value
            self.ports.storage.compare_and_swap(
                ACCOUNT, key, None if entry is None else entry.version, value, ttl
            )
        return queued

    @abstractmethod
    def catch_up(self, state: Document, now_ms: int) -> bool:
        """Bring the document up to now; True when that changed it."""

    @abstractmethod
    def locate(
        self, waiter: Waiter, loaded: LoadedDocument[Document]
    ) -> Place | Answer | Queued | Rejected: ...

    @abstractmethod
    def timed_out(self, loaded: LoadedDocument[Document], place: Place) -> str | None:
        """Why the wait is over, if it is."""

    @abstractmethod
    def assess(
        self, waiter: Waiter, loaded: LoadedDocument[Document], place: Place
    ) -> Assessment: ...

    @abstractmethod
    def grant(self, waiter: Waiter, loaded: LoadedDocument[Document], place: Place) -> Answer:
        """The permit, to a waiter already out of the queue and counted in `grants`."""

    @abstractmethod
    def reserve(
        self, loaded: LoadedDocument[Document], scheduled: list[Scheduled], mine: Turn
    ) -> tuple[bool, Reservation | None]:
        """Whether promising the permits changed the document, and the waiter's own."""


def prune(state: ResourceState, gate: ResourceGate, now_ms: int) -> None:
    """Drop expired leases, charging their margins (their calls may have cost their worst
    case; a later settle charges the actual in full), and the buckets that are full and
    charged by no open lease."""
    expired = [lease for lease in state.leases if lease.expires_ms <= now_ms]
    state.leases = [lease for lease in state.leases if lease.expires_ms > now_ms]
    for lease in expired:
        charge_margins(state, gate, lease, now_ms)
    charged = {charge.bucket for charge in state.open_charges()}
    state.buckets = {
        name: tat for name, tat in state.buckets.items() if tat > now_ms or name in charged
    }


def charge_margins(
    state: ResourceState, gate: ResourceGate, lease: ResourceLease, now_ms: int
) -> None:
    """Charge every bucket `lease` (out of `state.leases`) charged its worst-case error."""
    rates = {rate.bucket_id(lease.tenant): rate for rate in rate_limits(gate)}
    for charge in lease.charges:
        rate = rates.get(charge.bucket)
        margin = 0.0 if rate is None else lease.margin(rate.kind)
        if rate is not None and margin > 0:
            tat = state.buckets.get(charge.bucket, 0.0)
            set_bucket(state, charge.bucket, rate.bucket.charge(tat, now_ms, margin), now_ms)


def read_state(ports: Ports, gate: ResourceGate, now_ms: int) -> tuple[ResourceState, int | None]:
    state, version = read_document(ports, gate_key(resource_prefix(gate.name)), ResourceState)
    prune(state, gate, now_ms)
    return state, version


def set_bucket(state: ResourceState, name: str, tat_ms: float, now_ms: int) -> None:
    """Change a bucket's clock, telling every open charge on it first (`bucket.note_change`)."""
    note_change(state.open_charges(), name, state.buckets.get(name, 0.0), now_ms)
    state.buckets[name] = tat_ms
