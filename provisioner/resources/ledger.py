"""What one resource-gate decision reads and writes: the gate's document and the waiter's
place, in the account scope. Like `admission.ledger`, the document is written with
compare-and-swap against the version read; a lost race re-reads (`cas.until_settled`)."""

from __future__ import annotations

import contextlib

from provisioner.admission.results import Waiter
from provisioner.config import AdmissionConfig, ResourceGate
from provisioner.gates.bucket import note_change
from provisioner.gates.ledger import LoadedDocument
from provisioner.gates.place import Place
from provisioner.gates.queue import pass_over_unclaimed
from provisioner.ports import Ports, Scope, StorageError
from provisioner.resources.limits import rate_limits
from provisioner.resources.state import (
    Costs,
    ResourceLease,
    ResourceState,
    decode_ticket,
    encode_ticket,
    gate_key,
    ticket_key,
    waiter_key,
)

ACCOUNT = Scope.ACCOUNT


Loaded = LoadedDocument[ResourceState]


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
    entry = ports.storage.get(ACCOUNT, gate_key(gate.name))
    state = ResourceState() if entry is None else ResourceState.from_bytes(entry.value)
    prune(state, gate, now_ms)
    return state, None if entry is None else entry.version


def set_bucket(state: ResourceState, name: str, tat_ms: float, now_ms: int) -> None:
    """Change a bucket's clock, telling every open charge on it first (`bucket.note_change`)."""
    note_change(state.open_charges(), name, state.buckets.get(name, 0.0), now_ms)
    state.buckets[name] = tat_ms


class ResourceLedger:
    def __init__(self, ports: Ports, admission: AdmissionConfig, gate: ResourceGate) -> None:
        self.ports = ports
        self.admission = admission
        self.gate = gate

    @property
    def queue_timeout_ms(self) -> int:
        timeout = self.gate.queue_timeout_ms
        return self.admission.queue_timeout_ms if timeout is None else timeout

    def load(self, waiter: Waiter) -> Loaded:
        storage = self.ports.storage
        place_entry = storage.get(ACCOUNT, waiter_key(self.gate.name, waiter.tenant, waiter.entity))
        now = self.ports.clock.now_ms()
        state, version = read_state(self.ports, self.gate, now)
        moved = bool(pass_over_unclaimed(state, now, self.admission.reservation_claim_ms))
        return Loaded(
            now_ms=now,
            state=state,
            gate_version=version,
            place=None if place_entry is None else Place.from_bytes(place_entry.value),
            place_version=None if place_entry is None else place_entry.version,
            moved=moved,
        )

    def save_gate(self, loaded: Loaded) -> None:
        loaded.gate_version = self.ports.storage.compare_and_swap(
            ACCOUNT, gate_key(self.gate.name), loaded.gate_version, loaded.state.to_bytes(), None
        )

    def save_place(self, waiter: Waiter, loaded: Loaded, place: Place, ttl_ms: int) -> None:
        """Only if nobody moved the place since the load (StorageConflict if so)."""
        self.ports.storage.compare_and_swap(
            ACCOUNT,
            waiter_key(self.gate.name, waiter.tenant, waiter.entity),
            loaded.place_version,
            place.to_bytes(),
            ttl_ms,
        )

    def forget_place(self, waiter: Waiter) -> None:
        key = waiter_key(self.gate.name, waiter.tenant, waiter.entity)
        self.ports.storage.delete(ACCOUNT, key, None)

    def touch_ticket(self, waiter: Waiter, ticket: int, costs: Costs, ttl_ms: int) -> None:
        """The ticket's liveness key, holding the waiter's entity and estimated cost."""
        key = ticket_key(self.gate.name, waiter.tenant, ticket)
        storage = self.ports.storage
        entry = storage.get(ACCOUNT, key)
        storage.compare_and_swap(
            ACCOUNT,
            key,
            None if entry is None else entry.version,
            encode_ticket(waiter.entity, costs),
            ttl_ms,
        )

    def read_ticket(self, tenant: str, ticket: int) -> Costs | None:
        entry = self.ports.storage.get(ACCOUNT, ticket_key(self.gate.name, tenant, ticket))
        return None if entry is None else decode_ticket(entry.value)[1]

    def forget_ticket(self, waiter: Waiter, ticket: int | None) -> None:
        if ticket is not None:
            # On failure it expires on its own; it is out of the queue either way.
            with contextlib.suppress(StorageError):
                key = ticket_key(self.gate.name, waiter.tenant, ticket)
                self.ports.storage.delete(ACCOUNT, key, None)
