"""What one admission decision reads and writes: the gate document and the waiter's place.

`Ledger` is the base of the three decisions (`admit`, `settle`, `release`): the sandbox
gate's keys on `gates.ledger.GateLedger`, its document brought up to now by `catch_up`.
"""

from __future__ import annotations

from provisioner.config import AdmissionConfig
from provisioner.gates.document import GATE_KEY, SANDBOX_PREFIX, GateState
from provisioner.gates.ledger import GateLedger, LoadedDocument
from provisioner.gates.policies import (
    refill_retries,
)
from provisioner.gates.promises import WakeUp
from provisioner.gates.queue import pass_over_unclaimed
from provisioner.gates.sandbox_leases import prune_expired
from provisioner.ports import Ports, Scope

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
    refill_retries(state, config, now_ms)
    return bool(pass_over_unclaimed(state, now_ms, config.reservation_claim_ms, state.drop_retry))


class Ledger(GateLedger[GateState]):
    def __init__(self, ports: Ports, config: AdmissionConfig) -> None:
        super().__init__(ports, config, SANDBOX_PREFIX)
        # The waiters this decision promised a permit to (`promises.promise`).
        self.wake_ups: list[WakeUp] = []

    def read(self, raw: bytes | None) -> GateState:
        return GateState() if raw is None else GateState.from_bytes(raw)

    def catch_up(self, state: GateState, now_ms: int) -> bool:
        return catch_up(state, self.config, now_ms)
