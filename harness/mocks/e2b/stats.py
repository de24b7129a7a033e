"""The counters tests and simulations read, and the live tally the state keeps of them."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from harness.mocks.shared.stats import MockStats


@dataclass
class MockE2BStats(MockStats):
    """A consistent snapshot: every field was read under the same lock acquisition.

    ``creates_attempted`` counts authenticated create requests (v1 and v2, replays included);
    each ends as exactly one of: created, idempotent replay, a 429 of some kind, a fault
    answered before the sandbox existed, a 504 overload timeout, or a 400 bad request.
    ``running_sandboxes``, ``paused_sandboxes``, ``capacity_in_use`` and ``duplicates`` are
    measured when the snapshot is taken; the rest are counted.
    """

    creates_attempted: int = 0
    creates_in_flight: int = 0
    max_concurrent_creates: int = 0
    sandboxes_created: int = 0
    sandboxes_killed: int = 0
    sandboxes_expired: int = 0
    running_sandboxes: int = 0
    paused_sandboxes: int = 0
    sandboxes_paused: int = 0
    sandboxes_resumed: int = 0
    max_running_sandboxes: int = 0
    capacity_in_use: int = 0
    rate_limited: int = 0
    concurrency_limited: int = 0
    capacity_limited: int = 0
    overload_timeouts: int = 0
    faults_injected: int = 0
    faults_by_kind: dict[str, int] = field(default_factory=dict)
    idempotent_replays: int = 0
    duplicates: int = 0
    bad_requests: int = 0
    # Requests whose client went away before its body arrived (a killed caller): no answer.
    abandoned_requests: int = 0
    unauthorized: int = 0
    kills_not_found: int = 0
    requests_total: int = 0

    @property
    def throttled(self) -> int:
        """All 429s: rate + concurrency + capacity."""
        return self.rate_limited + self.concurrency_limited + self.capacity_limited

    def to_json(self) -> dict[str, Any]:
        data = super().to_json()
        data["throttled"] = self.throttled
        return data
