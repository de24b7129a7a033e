"""The mock server's hold on one E2B team (``team.py``): the lock, the clock and wall
time around the model both stand-ins share.

Request handlers run on the server's event loop while tests read stats and reconfigure
from other threads, so every read and change goes through one lock, held only for
bookkeeping (never across an await).
"""

from __future__ import annotations

import time
from datetime import datetime
from typing import Any

from harness.mocks.e2b.config import FaultRule, MockE2BConfig
from harness.mocks.e2b.stats import MockE2BStats
from harness.mocks.e2b.team import CreateVerdict, E2BTeam, SandboxRecord, SandboxSpec
from harness.mocks.e2b.wire import CreateRequest
from harness.mocks.shared.state import Clock, GuardedState

__all__ = ["MockState", "SandboxRecord"]


class MockState(GuardedState[MockE2BConfig, MockE2BStats]):
    """One team's sandboxes and the limits that apply to them, on the server's clock."""

    name = "mock E2B"

    def __init__(self, config: MockE2BConfig, clock: Clock = time.monotonic) -> None:
        super().__init__(clock)
        self._team = E2BTeam(config, self._now_ms())

    def _now_ms(self) -> float:
        return self._clock() * 1000.0

    def wall_time_ms(self, clock_ms: float) -> datetime:
        """A record's time (milliseconds on this state's clock) as a UTC datetime."""
        return self.wall_time(clock_ms / 1000.0)

    # -- configuration -------------------------------------------------------------------

    @property
    def config(self) -> MockE2BConfig:
        with self._lock:
            return self._team.config

    def configure(self, config: MockE2BConfig) -> None:
        with self._mutating():
            self._team.configure(config)

    def reset(self) -> None:
        """Forget every sandbox, key and counter; restart the seeded streams."""
        with self._mutating():
            self._team.reset(self._now_ms())
            self._anchor_wall_time()

    # -- requests ------------------------------------------------------------------------

    def count_request(self, route: str) -> int:
        """Counts a request on ``route`` and returns its number there (from 1)."""
        with self._mutating():
            return self._team.count_request(route, self._now_ms())

    def count_unauthorized(self) -> None:
        with self._mutating():
            counters = self._team.counters
            counters.requests_total += 1
            counters.unauthorized += 1

    def count_bad_request(self, new_request: bool = False) -> None:
        """Counts a 400; ``new_request`` when ``count_request`` did not count it already."""
        with self._mutating():
            counters = self._team.counters
            counters.bad_requests += 1
            if new_request:
                counters.requests_total += 1

    def count_abandoned_request(self) -> None:
        with self._mutating():
            self._team.counters.abandoned_requests += 1

    def pick_fault(self, route: str, ordinal: int, after_create: bool) -> FaultRule | None:
        with self._mutating():
            return self._team.pick_fault(route, ordinal, after_create)

    def sample_latency_ms(self) -> float:
        with self._lock:
            return self._team.create_latency_ms()

    # -- creates -------------------------------------------------------------------------

    def begin_create(self) -> None:
        with self._mutating():
            self._team.begin_create()

    def end_create(self) -> None:
        with self._mutating():
            self._team.end_create()

    def admit_create(self, after_wait: bool = False) -> CreateVerdict:
        """E2B's checks on a create (``E2BTeam.admit_create``)."""
        with self._mutating():
            return self._team.admit_create(self._now_ms(), after_wait)

    def has_create_slot(self) -> bool:
        with self._lock:
            return self._team.has_create_slot()

    def count_overload_timeout(self) -> None:
        with self._mutating():
            self._team.count_overload_timeout()

    def replay(self, key: str) -> SandboxRecord | None:
        """The sandbox an earlier create with ``key`` made, counted as a replay."""
        with self._mutating():
            return self._team.replay(key)

    def abandon_create(self) -> None:
        with self._mutating():
            self._team.abandon()

    def commit_create(self, sandbox_id: str, request: CreateRequest) -> SandboxRecord:
        """Turns the admitted create of ``sandbox_id`` into a running sandbox, made as
        ``request`` asks."""
        spec = SandboxSpec(
            template_id=request.template_id,
            timeout_s=request.timeout_s,
            metadata=tuple(request.metadata.items()),
            env_vars=tuple(request.env_vars.items()),
            allow_internet_access=request.allow_internet_access,
            auto_pause=request.auto_pause,
            idempotency_key=request.idempotency_key,
        )
        with self._mutating():
            return self._team.commit(self._now_ms(), sandbox_id, spec)

    # -- other routes --------------------------------------------------------------------

    def get(self, sandbox_id: str) -> SandboxRecord | None:
        """A running or paused sandbox."""
        with self._lock:
            return self._team.get(sandbox_id, self._now_ms())

    def all_running(self) -> list[SandboxRecord]:
        return self.listed(frozenset({"running"}))

    def listed(self, states: frozenset[str]) -> list[SandboxRecord]:
        """Running and/or paused sandboxes, oldest first."""
        with self._lock:
            return self._team.listed(states, self._now_ms())

    def pause(self, sandbox_id: str) -> str:
        """Pauses a running sandbox: "paused", "already_paused" or "not_found"."""
        with self._mutating():
            return self._team.pause(sandbox_id, self._now_ms())

    def resume(self, sandbox_id: str, timeout_s: int, extend_running: bool) -> tuple[str, Any]:
        """Brings a sandbox back for ``timeout_s`` (``E2BTeam.resume``)."""
        with self._mutating():
            return self._team.resume(sandbox_id, timeout_s, extend_running, self._now_ms())

    def kill(self, sandbox_id: str) -> bool:
        with self._mutating():
            return self._team.kill(sandbox_id, self._now_ms())

    def set_end(self, sandbox_id: str, timeout_s: int, extend_only: bool) -> bool:
        """Moves a sandbox's end to ``now + timeout_s`` (never earlier, with ``extend_only``)."""
        with self._mutating():
            return self._team.set_end(sandbox_id, timeout_s, extend_only, self._now_ms())

    # -- reading -------------------------------------------------------------------------

    def stats(self) -> MockE2BStats:
        with self._lock:
            return self._team.stats(self._now_ms())

    def running(self) -> list[dict[str, Any]]:
        return [
            {
                "sandbox_id": r.sandbox_id,
                "template_id": r.template_id,
                "metadata": dict(r.metadata),
                "started_at": self.wall_time_ms(r.started_at_ms).isoformat(),
                "end_at": self.wall_time_ms(r.end_at_ms).isoformat(),
                "idempotency_key": r.idempotency_key,
            }
            for r in self.all_running()
        ]

    def orphans(self, held_ids: set[str]) -> list[str]:
        return [r.sandbox_id for r in self.all_running() if r.sandbox_id not in held_ids]
