"""Admission control inside the guest: fair leased gates in front of E2B creates.

Gates: create slots (concurrent creates), create rate (GCRA), sandbox capacity (with
multiplicative shrink on the concurrent-cap 429 and additive regrowth), a shared cooldown
after 429/5xx, and a retry budget. Waiters queue FIFO per tenant, round-robin across
tenants. All state lives in host storage (account scope, keys under `adm/`) and changes
only by compare-and-swap; see `state.py` for the stored representation.

Use (a fresh controller per invocation)::

    controller = AdmissionController(ports, AdmissionConfig.from_config(config))
    decision = controller.admit(Waiter(tenant, f"{entity_type}/{entity_id}"))
    if isinstance(decision, Grant):           # send ONE create now, then:
        decision = controller.settle(waiter, decision, result)  # None once Created
    # Queued -> SandboxQueued(decision.params()); Rejected -> SandboxFailed(decision.failure)
    controller.release(waiter)                # when the sandbox is killed
    controller.status(tenant)                 # every gate, JSON-serialisable

Module map: results (answers), state (the sandbox gate document), leases, gates (slots,
rate, capacity), blocking (what blocks a waiter and when it may go), promises, ledger
(what a decision loads and saves), admit, settle, release, status (estimates and the
snapshot), inspect (the public read-only view), controller (the façade). The shared
machinery (fair queue and reservations, place, cooldown, retry budget, token bucket, the
compare-and-swap loop) is in `provisioner.gates`.
"""

from provisioner.admission.controller import AdmissionController
from provisioner.admission.state import DEFAULT_SANDBOX_TIMEOUT_MS
from provisioner.config import AdmissionConfig
from provisioner.gates.results import (
    REASON_BACKOFF,
    REASON_CAPACITY,
    REASON_CREATE_SLOTS,
    REASON_RATE,
    REASON_STORAGE,
    CapacityExhausted,
    Created,
    CreateFailed,
    CreateResult,
    Decision,
    Grant,
    Queued,
    RateLimited,
    Rejected,
    Unavailable,
    Waiter,
)

__all__ = [
    "DEFAULT_SANDBOX_TIMEOUT_MS",
    "REASON_BACKOFF",
    "REASON_CAPACITY",
    "REASON_CREATE_SLOTS",
    "REASON_RATE",
    "REASON_STORAGE",
    "AdmissionConfig",
    "AdmissionController",
    "CapacityExhausted",
    "CreateFailed",
    "CreateResult",
    "Created",
    "Decision",
    "Grant",
    "Queued",
    "RateLimited",
    "Rejected",
    "Unavailable",
    "Waiter",
]
