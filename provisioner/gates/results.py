"""What a gate answers (a sandbox gate's grant, a resource gate's permit, settle and
release; a waiting answer is `Queued` for both), and what a granted create came back with."""

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
    """One entity asking for a sandbox; `entity` is unique within its tenant."""

    tenant: str
    entity: str


@dataclass(frozen=True, slots=True)
class Grant:
    """Permission to send ONE create request now; settle it with its outcome."""

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
        """The SandboxQueued outcome params: every field."""
        return fields_of(self)

    def expected_back_ms(self, now_ms: int) -> int:
        """How long until the waiter is expected to ask again: at `retry_at_ms` when a host
        wakes it there (later than poll_max allows `retry_after_ms` to say)."""
        return max(self.retry_after_ms, self.retry_at_ms - now_ms)


@dataclass(frozen=True, slots=True)
class Rejected:
    failure: Failure


Decision = Grant | Queued | Rejected


@dataclass(frozen=True, slots=True)
class Created:
    sandbox_id: str
    sandbox_timeout_ms: int


@dataclass(frozen=True, slots=True)
class RateLimited:
    """A 429 from the route rate limiter; `retry_after_ms` from its headers when sent."""

    retry_after_ms: int | None = None


@dataclass(frozen=True, slots=True)
class CapacityExhausted:
    """The account's concurrent-sandbox cap: someone else shares the account."""

    reported_limit: int | None = None


@dataclass(frozen=True, slots=True)
class Unavailable:
    """5xx, timeout or connection error: the create may or may not have happened."""

    status: int | None = None


@dataclass(frozen=True, slots=True)
class CreateFailed:
    """A non-retryable answer (401, 400, ...)."""

    failure: Failure


CreateResult = Created | RateLimited | CapacityExhausted | Unavailable | CreateFailed


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


# What the provider answered a gated call (`resource.read_answer`).
SUCCESS = "success"
RATE_LIMITED = "rate_limited"
OVERLOADED = "overloaded"
FAILED = "failed"


@dataclass(frozen=True, slots=True)
class ProviderAnswer:
    status: int
    pause_ms: int | None = None

    @property
    def kind(self) -> str:
        if 200 <= self.status < 300:
            return SUCCESS
        if self.status == 429:
            return RATE_LIMITED
        if self.status == 529 or 500 <= self.status < 600:
            return OVERLOADED
        return FAILED

    @property
    def backs_off(self) -> bool:
        return self.kind in (RATE_LIMITED, OVERLOADED)
