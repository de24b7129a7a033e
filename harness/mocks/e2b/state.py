"""The mock's model of one E2B team: sandboxes, capacity, idempotency keys and counters.

Request handlers run on the server's event loop while tests read stats and reconfigure
from other threads, so every read and change goes through one lock, held only for
bookkeeping (never across an await).
"""

from __future__ import annotations

import bisect
import random
import string
import time
from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from harness.mocks.e2b.config import FaultRule, MockE2BConfig
from harness.mocks.e2b.faults import FaultPicker
from harness.mocks.e2b.latency import LatencySampler
from harness.mocks.e2b.limits import Gcra, RateDecision
from harness.mocks.e2b.stats import MockE2BStats
from harness.mocks.shared.state import Clock, GuardedState

if TYPE_CHECKING:  # wire's answer bodies read SandboxRecord, so wire imports this module
    from harness.mocks.e2b.wire import CreateRequest

_ID_ALPHABET = string.ascii_lowercase + string.digits


@dataclass
class SandboxRecord:
    sandbox_id: str
    template_id: str
    alias: str | None
    client_id: str
    metadata: dict[str, str]
    env_vars: dict[str, str]
    started_at: float
    end_at: float
    envd_access_token: str
    allow_internet_access: bool | None
    auto_pause: bool
    idempotency_key: str | None
    state: str = "running"  # or "paused"


class MockState(GuardedState[MockE2BConfig, MockE2BStats]):
    """One team's sandboxes and the limits that apply to them."""

    name = "mock E2B"

    def __init__(self, config: MockE2BConfig, clock: Clock = time.monotonic) -> None:
        super().__init__(clock)
        self._config = config
        self._clear(config)

    def _clear(self, config: MockE2BConfig) -> None:
        # Running sandboxes (the only ones that count against the cap) and paused ones.
        self._sandboxes: dict[str, SandboxRecord] = {}
        self._paused: dict[str, SandboxRecord] = {}
        # Killed and expired sandboxes, so a replayed Idempotency-Key still names its sandbox.
        self._gone: dict[str, SandboxRecord] = {}
        # Clock times at which killed sandboxes stop counting against the cap, sorted.
        self._lingering: list[float] = []
        self._reserved = 0
        self._by_key: dict[str, str] = {}
        self._sandboxes_per_key: Counter[str] = Counter()
        self._ordinals: Counter[str] = Counter()
        self._counters = MockE2BStats()
        self._gcra = self._make_gcra(config)
        self._faults = FaultPicker(config.seed)
        self._latency = LatencySampler(config.seed)
        self._ids = random.Random(f"ids:{config.seed}")
        self._anchor_wall_time()

    @staticmethod
    def _make_gcra(config: MockE2BConfig) -> Gcra | None:
        if config.create_rate_per_s is None:
            return None
        return Gcra(config.create_rate_per_s, config.create_burst)

    # -- configuration -------------------------------------------------------------------

    @property
    def config(self) -> MockE2BConfig:
        with self._lock:
            return self._config

    def configure(self, config: MockE2BConfig) -> None:
        with self._mutating():
            old = self._config
            self._config = config
            if (old.create_rate_per_s, old.create_burst) != (
                config.create_rate_per_s,
                config.create_burst,
            ):
                self._gcra = self._make_gcra(config)
            if old.seed != config.seed:
                self._faults = FaultPicker(config.seed)
                self._latency = LatencySampler(config.seed)
                self._ids = random.Random(f"ids:{config.seed}")

    def reset(self) -> None:
        """Forget every sandbox, key and counter; restart the seeded streams."""
        with self._mutating():
            self._clear(self._config)

    # -- requests ------------------------------------------------------------------------

    def count_request(self, route: str) -> int:
        """Counts a request on ``route`` and returns its number there (from 1)."""
        with self._mutating():
            self._counters.requests_total += 1
            self._ordinals[route] += 1
            self._sweep(self._clock())
            return self._ordinals[route]

    def count_unauthorized(self) -> None:
        with self._mutating():
            self._counters.requests_total += 1
            self._counters.unauthorized += 1

    def count_bad_request(self, new_request: bool = False) -> None:
        """Counts a 400; ``new_request`` when ``count_request`` did not count it already."""
        with self._mutating():
            self._counters.bad_requests += 1
            if new_request:
                self._counters.requests_total += 1

    def count_abandoned_request(self) -> None:
        with self._mutating():
            self._counters.abandoned_requests += 1

    def pick_fault(self, route: str, ordinal: int, after_create: bool) -> FaultRule | None:
        with self._mutating():
            rule = self._faults.pick(self._config.faults, route, ordinal, after_create)
            if rule is not None:
                name = f"{rule.status}" if rule.kind == "status" else rule.kind
                by_kind = self._counters.faults_by_kind
                by_kind[name] = by_kind.get(name, 0) + 1
                self._counters.faults_injected += 1
            return rule

    def sample_latency_ms(self) -> float:
        with self._lock:
            c = self._config
            return self._latency.sample_ms(
                c.create_latency_ms, c.create_latency_sigma, c.create_latency_max_ms
            )

    # -- creates -------------------------------------------------------------------------

    def begin_create(self) -> None:
        with self._mutating():
            counters = self._counters
            counters.creates_attempted += 1
            counters.creates_in_flight += 1
            counters.max_concurrent_creates = max(
                counters.max_concurrent_creates, counters.creates_in_flight
            )

    def end_create(self) -> None:
        with self._mutating():
            self._counters.creates_in_flight -= 1

    def count_concurrency_limited(self) -> None:
        with self._mutating():
            self._counters.concurrency_limited += 1

    def count_overload_timeout(self) -> None:
        with self._mutating():
            self._counters.overload_timeouts += 1

    def take_rate(self) -> RateDecision | None:
        """Spends one unit of the create rate; None when no rate limit is configured."""
        with self._mutating():
            if self._gcra is None:
                return None
            decision = self._gcra.take(self._clock())
            if not decision.allowed:
                self._counters.rate_limited += 1
            return decision

    def replay(self, key: str) -> SandboxRecord | None:
        """The sandbox an earlier create with ``key`` made, counted as a replay."""
        with self._mutating():
            sandbox_id = self._by_key.get(key)
            if sandbox_id is None:
                return None
            self._counters.idempotent_replays += 1
            record = self._sandboxes.get(sandbox_id)
            return record if record is not None else self._gone.get(sandbox_id)

    def reserve_capacity(self) -> int | None:
        """Reserves a sandbox slot; returns None on success, else the cap that was hit."""
        with self._mutating():
            now = self._clock()
            self._sweep(now)
            cap = self._config.max_sandboxes
            if cap is not None and self._capacity_in_use() >= cap:
                self._counters.capacity_limited += 1
                return cap
            self._reserved += 1
            return None

    def release_reservation(self) -> None:
        with self._mutating():
            self._reserved -= 1

    def commit_create(self, request: CreateRequest) -> SandboxRecord:
        """Turns a reservation into a running sandbox, made as ``request`` asks."""
        with self._mutating():
            now = self._clock()
            self._reserved -= 1
            sandbox_id = "i" + "".join(self._ids.choices(_ID_ALPHABET, k=19))
            record = SandboxRecord(
                sandbox_id=sandbox_id,
                template_id=request.template_id,
                alias=request.template_id,
                client_id="6532622b",
                metadata=dict(request.metadata),
                env_vars=dict(request.env_vars),
                started_at=now,
                end_at=now + request.timeout_s,
                envd_access_token="".join(self._ids.choices(_ID_ALPHABET, k=32)),
                allow_internet_access=request.allow_internet_access,
                auto_pause=request.auto_pause,
                idempotency_key=request.idempotency_key,
            )
            self._sandboxes[sandbox_id] = record
            counters = self._counters
            counters.sandboxes_created += 1
            counters.max_running_sandboxes = max(
                counters.max_running_sandboxes, len(self._sandboxes)
            )
            if request.idempotency_key is not None:
                self._by_key[request.idempotency_key] = sandbox_id
                self._sandboxes_per_key[request.idempotency_key] += 1
            return record

    # -- other routes --------------------------------------------------------------------

    def get(self, sandbox_id: str) -> SandboxRecord | None:
        """A running or paused sandbox."""
        with self._lock:
            self._sweep(self._clock())
            return self._sandboxes.get(sandbox_id) or self._paused.get(sandbox_id)

    def all_running(self) -> list[SandboxRecord]:
        with self._lock:
            self._sweep(self._clock())
            return sorted(self._sandboxes.values(), key=lambda r: (r.started_at, r.sandbox_id))

    def listed(self, states: frozenset[str]) -> list[SandboxRecord]:
        """Running and/or paused sandboxes, oldest first."""
        with self._lock:
            self._sweep(self._clock())
            records = list(self._sandboxes.values()) if "running" in states else []
            if "paused" in states:
                records += self._paused.values()
            return sorted(records, key=lambda r: (r.started_at, r.sandbox_id))

    def pause(self, sandbox_id: str) -> str:
        """Pauses a running sandbox: "paused", "already_paused" or "not_found". A paused
        sandbox stops counting against the cap and does not expire."""
        with self._mutating():
            self._sweep(self._clock())
            if sandbox_id in self._paused:
                return "already_paused"
            record = self._sandboxes.pop(sandbox_id, None)
            if record is None:
                return "not_found"
            self._park(record)
            return "paused"

    def resume(self, sandbox_id: str, timeout_s: int, extend_running: bool) -> tuple[str, Any]:
        """Brings a sandbox back for ``timeout_s``: ("resumed", record), ("running", record)
        (already running: its end moves only later with ``extend_running``, else it is left
        alone), ("capacity", cap) when resuming would pass the cap, or ("not_found", None)."""
        with self._mutating():
            now = self._clock()
            self._sweep(now)
            running = self._sandboxes.get(sandbox_id)
            if running is not None:
                if extend_running:
                    running.end_at = max(running.end_at, now + timeout_s)
                return "running", running
            record = self._paused.get(sandbox_id)
            if record is None:
                return "not_found", None
            cap = self._config.max_sandboxes
            if cap is not None and self._capacity_in_use() >= cap:
                self._counters.capacity_limited += 1
                return "capacity", cap
            del self._paused[sandbox_id]
            record.state = "running"
            record.end_at = now + timeout_s
            self._sandboxes[sandbox_id] = record
            counters = self._counters
            counters.sandboxes_resumed += 1
            counters.max_running_sandboxes = max(
                counters.max_running_sandboxes, len(self._sandboxes)
            )
            return "resumed", record

    def kill(self, sandbox_id: str) -> bool:
        with self._mutating():
            now = self._clock()
            self._sweep(now)
            record = self._sandboxes.pop(sandbox_id, None)
            if record is None:
                paused = self._paused.pop(sandbox_id, None)
                if paused is None:
                    self._counters.kills_not_found += 1
                    return False
                # A paused sandbox held no slot: its kill frees nothing, so no lag either.
                self._gone[sandbox_id] = paused
                self._counters.sandboxes_killed += 1
                return True
            self._gone[sandbox_id] = record
            self._counters.sandboxes_killed += 1
            lag_s = self._config.kill_capacity_lag_ms / 1000.0
            if lag_s > 0:
                bisect.insort(self._lingering, now + lag_s)
            return True

    def set_end(self, sandbox_id: str, timeout_s: int, extend_only: bool) -> bool:
        """Moves a sandbox's end to ``now + timeout_s`` (never earlier, with ``extend_only``)."""
        with self._mutating():
            now = self._clock()
            self._sweep(now)
            record = self._sandboxes.get(sandbox_id)
            if record is None:
                return False
            end = now + timeout_s
            record.end_at = max(record.end_at, end) if extend_only else end
            return True

    # -- reading -------------------------------------------------------------------------

    def stats(self) -> MockE2BStats:
        with self._lock:
            self._sweep(self._clock())
            return self._counters.snapshot(
                running_sandboxes=len(self._sandboxes),
                paused_sandboxes=len(self._paused),
                capacity_in_use=self._capacity_in_use(),
                duplicates=sum(1 for n in self._sandboxes_per_key.values() if n > 1),
            )

    def running(self) -> list[dict[str, Any]]:
        return [
            {
                "sandbox_id": r.sandbox_id,
                "template_id": r.template_id,
                "metadata": dict(r.metadata),
                "started_at": self.wall_time(r.started_at).isoformat(),
                "end_at": self.wall_time(r.end_at).isoformat(),
                "idempotency_key": r.idempotency_key,
            }
            for r in self.all_running()
        ]

    def orphans(self, held_ids: set[str]) -> list[str]:
        return [r.sandbox_id for r in self.all_running() if r.sandbox_id not in held_ids]

    # -- internals (lock held) -----------------------------------------------------------

    def _capacity_in_use(self) -> int:
        return len(self._sandboxes) + self._reserved + len(self._lingering)

    def _park(self, record: SandboxRecord) -> None:
        record.state = "paused"
        self._paused[record.sandbox_id] = record
        self._counters.sandboxes_paused += 1

    def _sweep(self, now: float) -> None:
        expired = [sid for sid, r in self._sandboxes.items() if r.end_at <= now]
        for sandbox_id in expired:
            record = self._sandboxes.pop(sandbox_id)
            if record.auto_pause:  # NewSandbox.autoPause: pause, not kill, at the timeout
                self._park(record)
            else:
                self._gone[sandbox_id] = record
                self._counters.sandboxes_expired += 1
        released = bisect.bisect_right(self._lingering, now)
        if released:
            del self._lingering[:released]
