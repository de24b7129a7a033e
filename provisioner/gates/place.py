"""Where a waiter stands, stored under its own key (`document.waiter_key`) and checked
against the gate document, which decides every limit (`SandboxLedger.locate`)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from enum import Enum


class Stage(Enum):
    QUEUED = "q"  # holds a fresh ticket in its tenant's queue
    RETRYING = "r"  # among the retries, ahead of every fresh ticket
    CREATING = "c"  # its create is in flight under a create lease
    HOLDING = "h"  # holds a sandbox (a capacity lease)


@dataclass(frozen=True, slots=True)
class Place:
    """`since_ms`, when it first asked, outlives a waiter that stops polling by the queue
    timeout, so dying and returning cannot dodge it. `attempt` is the number of the create
    it makes (CREATING) or will make next. `ticket` is set for QUEUED, `lease_id` for
    CREATING and HOLDING; a QUEUED or RETRYING waiter counts as gone from `alive_until_ms`."""

    stage: Stage
    since_ms: int
    attempt: int
    ticket: int | None = None
    lease_id: str | None = None
    alive_until_ms: int = 0

    def alive(self, now_ms: int) -> bool:
        return self.alive_until_ms > now_ms

    @property
    def queued_ticket(self) -> int | None:
        return self.ticket if self.stage is Stage.QUEUED else None

    def to_bytes(self) -> bytes:
        ticket, lease = -1 if self.ticket is None else self.ticket, self.lease_id or ""
        row = [self.stage.value, self.since_ms, self.attempt, ticket, lease, self.alive_until_ms]
        return json.dumps(row, separators=(",", ":")).encode()

    @classmethod
    def from_bytes(cls, raw: bytes) -> Place:
        stage, since, attempt, ticket, lease, alive = json.loads(raw.decode())
        lease_id, queued = str(lease) or None, None if int(ticket) < 0 else int(ticket)
        return cls(Stage(str(stage)), int(since), int(attempt), queued, lease_id, int(alive))
