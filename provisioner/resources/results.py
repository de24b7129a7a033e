"""What a resource gate answers. A waiting answer is `admission.results.Queued` (the same
queue status as SandboxQueued) and a refusal `admission.results.Rejected`."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class ResourceGrant:
    """A permit: make the call now, then settle it (or release it unused).
    `renewed`: the entity already held it, and asking again extended its lease."""

    lease_id: str
    expires_at_ms: int
    queued_ms: int
    renewed: bool = False


@dataclass(frozen=True, slots=True)
class Settled:
    """`held`: the lease was still held (else its cost was charged in full, since what the
    grant charged had expired with it). `charged`: tokens charged by this settle per cost
    kind (negative: given back). `cooling_ms`: the shared cooldown now in force."""

    lease_id: str | None
    held: bool
    answer: str
    charged: dict[str, float]
    cooling_ms: int


@dataclass(frozen=True, slots=True)
class Released:
    lease_id: str | None
    held: bool
    waited: bool
