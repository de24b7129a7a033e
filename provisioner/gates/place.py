"""Where a waiter stands: one enum, one dataclass, one stored encoding.

A waiter's `Place` is stored under its own key (`state.waiter_key`). The gate document
decides every limit, so the place is checked against it (`admit.locate`): a place whose gate
entry is gone (a ticket skipped as dead, a retry dropped, a create lease expired) is moved
to where that waiter now belongs. `attempt` lives here and nowhere else: the number of the
create this waiter is making (CREATING) or will make next (every other stage), 1 for the
first.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from enum import Enum


class Stage(Enum):
    """The stage a waiter is at; the value is its stored letter."""

    QUEUED = "q"  # holds a fresh ticket in its tenant's queue
    RETRYING = "r"  # among the retries, ahead of every fresh ticket
    CREATING = "c"  # its create is in flight under a create lease
    HOLDING = "h"  # holds a sandbox (a capacity lease)


_STAGES = {stage.value: stage for stage in Stage}


@dataclass(frozen=True, slots=True)
class Place:
    """A waiter's place. `since_ms` is when it first asked: it outlives a waiter that stops
    polling by the queue timeout (the key's TTL), so dying and returning cannot dodge the
    queue timeout. `ticket` is set for QUEUED, `lease_id` for CREATING and HOLDING;
    `alive_until_ms` is when a QUEUED or RETRYING waiter counts as gone if it has not asked
    again (0 for the other stages)."""

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
        return json.dumps(
            [
                self.stage.value,
                self.since_ms,
                self.attempt,
                -1 if self.ticket is None else self.ticket,
                self.lease_id or "",
                self.alive_until_ms,
            ],
            separators=(",", ":"),
        ).encode()

    @classmethod
    def from_bytes(cls, raw: bytes) -> Place:
        stage, since, attempt, ticket, lease, alive = json.loads(raw.decode())
        return cls(
            _STAGES[str(stage)],
            int(since),
            int(attempt),
            None if int(ticket) < 0 else int(ticket),
            str(lease) or None,
            int(alive),
        )
