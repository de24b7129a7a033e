"""A resource gate's keys and catch-up on `gates.ledger.GateLedger`: expired leases pruned
(their margins charged), full buckets dropped, unclaimed reservations passed over."""

from __future__ import annotations

from provisioner.config import AdmissionConfig, ResourceGate
from provisioner.gates.bucket import note_change
from provisioner.gates.document import (
    Costs,
    ResourceLease,
    ResourceState,
    decode_ticket,
    gate_key,
    resource_prefix,
)
from provisioner.gates.ledger import GateLedger, LoadedDocument
from provisioner.gates.policies import rate_limits
from provisioner.gates.queue import pass_over_unclaimed
from provisioner.ports import Ports, Scope

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
