"""What the session driver works on and reports: jobs, phases, events, results."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any


class Phase(StrEnum):
    """A CurationJob session's state, as the example spec names them."""

    PENDING = "Pending"  # not submitted yet (a later batch)
    PROVISIONING = "Provisioning"  # a provision invocation is in flight
    QUEUED = "Queued"  # SandboxQueued: waiting to invoke again
    RUNNING = "Running"  # holds a sandbox, taking turns
    RELEASING = "Releasing"  # the release invocation is in flight
    COMPLETED = "Completed"
    FAILED = "Failed"

    @property
    def terminal(self) -> bool:
        return self in (Phase.COMPLETED, Phase.FAILED)


@dataclass(frozen=True)
class Job:
    """One CurationJob: `id` is the entity id, unique across the run."""

    id: str
    tenant: str
    title: str = ""

    @property
    def label(self) -> str:
        return self.title or self.id


@dataclass(frozen=True)
class SessionEvent:
    """One thing that happened to a session, `at_s` real seconds into the run."""

    at_s: float
    job: Job
    kind: str  # submitted, queued, ready, turn, released, completed, failed, retry, ignored
    phase: Phase
    detail: dict[str, Any] = field(default_factory=dict)


# Why a session failed, when the driver (not the component) decided it.
LIVENESS_TIMEOUT = "liveness_timeout"
INTERRUPTED = "interrupted"


@dataclass
class SessionResult:
    """Where a job ended up; `waited_ms` is submit to sandbox (or to the end, without one)."""

    job: Job
    state: Phase = Phase.PENDING
    reason: str | None = None
    sandbox_id: str | None = None
    turns: int = 0
    waited_ms: int | None = None
    invocations: int = 0
    queued_outcomes: int = 0
    failure_retries: int = 0
    submitted_at_s: float | None = None
    ready_at_s: float | None = None
    finished_at_s: float | None = None
    killed_while_queued: bool = False
    release_error: str | None = None
    last_queue: dict[str, Any] | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.job.id,
            "tenant": self.job.tenant,
            "state": str(self.state),
            "reason": self.reason,
            "sandbox_id": self.sandbox_id,
            "turns": self.turns,
            "waited_ms": self.waited_ms,
            "invocations": self.invocations,
        }
