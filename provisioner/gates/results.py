"""What a gate answers (a waiting answer is `Queued` at both), and what a create returned."""

from __future__ import annotations

from dataclasses import dataclass

from provisioner.model import Failure, fields_of

# Why a waiter is still waiting; each names the gate that holds it back.
REASON_CREATE_SLOTS = "create_slots"
REASON_RATE = "rate"
REASON_CAPACITY = "capacity"
REASON_BACKOFF = "backoff"
REASON_STORAGE = "storage"
REASON_CONCURRENCY = "concurrency"
REASON_TENANT_CONCURRENCY = "tenant_concurrency"


@dataclass(frozen=True, slots=True)
class Waiter:
    tenant: str
    entity: str


@dataclass(frozen=True, slots=True)
class Grant:
    lease_id: str
    attempt: int
    queued_ms: int
    expires_at_ms: int = 0


@dataclass(frozen=True, slots=True)
class Queued:
    position: int
    queue_length: int
    in_use: int
    limit: int
    reason: str
    retry_after_ms: int
    eta_ms: int
    waited_ms: int
    # When asking again is useful, on the host clock: the reservation's claimable time,
    # or the estimate of the waiter's turn (0: not computed, as for a storage fault).
    retry_at_ms: int = 0
    # The reservation held for this waiter ("" when none) and when it passes on.
    reservation: str = ""
    claim_by_ms: int = 0

    def params(self) -> dict[str, object]:
        return fields_of(self)

    def expected_back_ms(self, now_ms: int) -> int:
        """A host may wake the waiter at `retry_at_ms`, later than poll_max allows."""
        return max(self.retry_after_ms, self.retry_at_ms - now_ms)


@dataclass(frozen=True, slots=True)
class Rejected:
    failure: Failure


@dataclass(frozen=True, slots=True)
class Created:
    sandbox_id: str
    sandbox_timeout_ms: int


@dataclass(frozen=True, slots=True)
class RateLimited:
    retry_after_ms: int | None = None


@dataclass(frozen=True, slots=True)
class CapacityExhausted:
    reported_limit: int | None = None


@dataclass(frozen=True, slots=True)
class Unavailable:
    """5xx, timeout or connection error: the create may or may not have happened."""

    status: int | None = None


@dataclass(frozen=True, slots=True)
class CreateFailed:
    failure: Failure


CreateResult = Created | RateLimited | CapacityExhausted | Unavailable | CreateFailed


@dataclass(frozen=True, slots=True)
class ResourceGrant:
    """`renewed`: the entity already held it, and asking again extended its lease."""

    lease_id: str
    expires_at_ms: int
    queued_ms: int
    renewed: bool = False


@dataclass(frozen=True, slots=True)
class ProviderAnswer:
    """What the provider answered a gated call (its status and the pause its headers ask for)."""

    status: int
    pause_ms: int | None = None

    @property
    def kind(self) -> str:
        if 200 <= self.status < 300:
            return "success"
        if self.status == 429:
            return "rate_limited"
        return "overloaded" if 500 <= self.status < 600 else "failed"

    @property
    def backs_off(self) -> bool:
        return self.kind in ("rate_limited", "overloaded")
