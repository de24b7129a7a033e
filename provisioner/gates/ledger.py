"""What one gate decision reads and writes: the gate's document and the waiter's place,
in the account scope. The document is written with compare-and-swap against the version
read, so a decision that lost a race raises `StorageConflict` and runs again from a fresh
read (`cas.until_settled`)."""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar

from provisioner.config import AdmissionConfig
from provisioner.gates.cas import until_settled
from provisioner.gates.document import gate_key, ticket_key, waiter_key
from provisioner.gates.place import Place
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
