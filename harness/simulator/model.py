"""What a session run works on and reports: jobs, events, results."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Job:
    """One entity to run: `id` is the entity id, unique across the run."""

    id: str
    tenant: str
    title: str = ""

    @property
    def label(self) -> str:
        return self.title or self.id


@dataclass(frozen=True)
class SessionEvent:
    """One thing that happened to a session, `at_s` seconds into the run (real or virtual).
    `phase` is the entity's status after it."""

    at_s: float
    job: Job
    kind: str  # submitted, transition, rejected, invoked, answered, timer, turn, ...
    phase: str
    detail: dict[str, Any] = field(default_factory=dict)


# How a session ended.
COMPLETED = "completed"
FAILED = "failed"
UNFINISHED = "unfinished"  # the run ended (or was interrupted) before the session did
INTERRUPTED = "interrupted"


@dataclass
class SessionResult:
    """Where a job ended up; `waited_ms` is submit to sandbox (or to the end, without one).
    `history` is every status with the time it was entered, for the timeline."""

    job: Job
    state: str = ""
    outcome: str = UNFINISHED
    reason: str | None = None
    sandbox_id: str | None = None
    turns: int = 0
    waited_ms: int | None = None
    invocations: int = 0
    queued_outcomes: int = 0
    submitted_at_s: float | None = None
    ready_at_s: float | None = None
    finished_at_s: float | None = None
    killed_by_timer: bool = False
    killed_while_queued: bool = False
    history: list[tuple[float, str]] = field(default_factory=list)

    @property
    def completed(self) -> bool:
        return self.outcome == COMPLETED

    @property
    def failed(self) -> bool:
        return self.outcome == FAILED

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.job.id,
            "tenant": self.job.tenant,
            "state": self.state,
            "reason": self.reason,
            "sandbox_id": self.sandbox_id,
            "turns": self.turns,
            "waited_ms": self.waited_ms,
            "invocations": self.invocations,
        }
