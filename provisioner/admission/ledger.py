"""What one admission decision reads and writes: the gate document and the waiter's place.

`Ledger` is the base of the three decisions (`admit`, `settle`, `release`): it loads the
gate (pruned of expired leases, the retry budget refilled to now) with the waiter's place,
and writes them back. The gate is always written with compare-and-swap against the version
read, so a decision that lost a race raises `StorageConflict` and runs again from a fresh
read (`cas.until_settled`).
"""

from __future__ import annotations

import contextlib

from provisioner.admission.leases import prune_expired
from provisioner.admission.promises import WakeUp
from provisioner.admission.results import Waiter
from provisioner.admission.state import GATE_KEY, GateState, ticket_key, waiter_key
from provisioner.config import AdmissionConfig
from provisioner.gates import budget
from provisioner.gates.cas import until_settled
from provisioner.gates.ledger import LoadedDocument
from provisioner.gates.place import Place
from provisioner.gates.queue import pass_over_unclaimed
from provisioner.ports import Ports, Scope, StorageConflict, StorageError

ACCOUNT = Scope.ACCOUNT


Loaded = LoadedDocument[GateState]


def load_gate(ports: Ports, config: AdmissionConfig, now_ms: int) -> tuple[GateState, int | None]:
    """The gate as the next decision sees it: expired leases pruned, budget refilled."""
    entry = ports.storage.get(ACCOUNT, GATE_KEY)
    state = GateState() if entry is None else GateState.from_bytes(entry.value)
    catch_up(state, config, now_ms)
    return state, None if entry is None else entry.version


def catch_up(state: GateState, config: AdmissionConfig, now_ms: int) -> bool:
    """The gate as of `now_ms`: expired leases pruned, the budget refilled, unclaimed
    reservations passed over. True when reservations moved (the caller should save)."""
    prune_expired(state, now_ms)
    budget.refill(state, config, now_ms)
    return bool(pass_over_unclaimed(state, now_ms, config.reservation_claim_ms, state.drop_retry))


class Ledger:
    def __init__(self, ports: Ports, config: AdmissionConfig) -> None:
        self.ports = ports
        self.config = config
        # The waiters this decision promised a permit to (`promises.promise`).
        self.wake_ups: list[WakeUp] = []

    def load(self, waiter: Waiter) -> Loaded:
        storage = self.ports.storage
        place_entry = storage.get(ACCOUNT, waiter_key(waiter.tenant, waiter.entity))
        gate_entry = storage.get(ACCOUNT, GATE_KEY)
        now = self.ports.clock.now_ms()
        state = GateState() if gate_entry is None else GateState.from_bytes(gate_entry.value)
        moved = catch_up(state, self.config, now)
        return Loaded(
            now_ms=now,
            state=state,
            gate_version=None if gate_entry is None else gate_entry.version,
            place=None if place_entry is None else Place.from_bytes(place_entry.value),
            place_version=None if place_entry is None else place_entry.version,
            moved=moved,
        )

    def save_gate(self, loaded: Loaded) -> None:
        loaded.gate_version = self.ports.storage.compare_and_swap(
            ACCOUNT, GATE_KEY, loaded.gate_version, loaded.state.to_bytes(), None
        )

    def save_place(self, waiter: Waiter, loaded: Loaded, place: Place, ttl_ms: int) -> None:
        """Write the place only if nobody moved it since the load (StorageConflict if so)."""
        self.ports.storage.compare_and_swap(
            ACCOUNT,
            waiter_key(waiter.tenant, waiter.entity),
            loaded.place_version,
            place.to_bytes(),
            ttl_ms,
        )

    def write_place(self, waiter: Waiter, loaded: Loaded, place: Place, ttl_ms: int) -> None:
        """The gate is already decided; the place only guides the waiter's next call, so a
        concurrent writer is overwritten rather than undoing the decision (best effort)."""
        key = waiter_key(waiter.tenant, waiter.entity)
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

    def forget_place(self, waiter: Waiter) -> None:
        self.ports.storage.delete(ACCOUNT, waiter_key(waiter.tenant, waiter.entity), None)

    def touch_ticket(self, waiter: Waiter, ticket: int, ttl_ms: int) -> None:
        """The ticket's liveness key: while it exists, the ticket's waiter counts as alive."""
        key = ticket_key(waiter.tenant, ticket)
        storage = self.ports.storage
        entry = storage.get(ACCOUNT, key)
        storage.compare_and_swap(
            ACCOUNT, key, None if entry is None else entry.version, waiter.entity.encode(), ttl_ms
        )

    def forget_ticket(self, waiter: Waiter, ticket: int | None) -> None:
        if ticket is not None:
            # On failure it expires on its own; it is out of the queue either way.
            with contextlib.suppress(StorageError):
                self.ports.storage.delete(ACCOUNT, ticket_key(waiter.tenant, ticket), None)
