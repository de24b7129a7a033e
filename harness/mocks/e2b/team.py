"""What E2B decides for one team, at a time the caller gives: the route limiter, 429 storms,
the concurrent-create slots, the concurrent-sandbox cap, faults, latency, sandbox lifetimes
and idempotency keys.

One model for both stand-ins: the mock server (``state.py``, real time, over HTTP) and the
simulator's fake (``harness/simulator/fake_e2b.py``, virtual time, in process). Times are
milliseconds on the caller's clock; nothing here reads a clock, sleeps or locks, so the
caller serialises every call.
"""

from __future__ import annotations

import bisect
import math
import random
import string
from collections import Counter
from dataclasses import dataclass, replace
from typing import Literal

from harness.mocks.e2b.config import FaultRule, MockE2BConfig
from harness.mocks.e2b.faults import FaultPicker
from harness.mocks.e2b.latency import LatencySampler
from harness.mocks.e2b.limits import Gcra, RateDecision
from harness.mocks.e2b.stats import MockE2BStats

_ID_ALPHABET = string.ascii_lowercase + string.digits


@dataclass
class SandboxRecord:
    sandbox_id: str
    template_id: str
    alias: str | None
    client_id: str
    metadata: dict[str, str]
    env_vars: dict[str, str]
    started_at_ms: float
    end_at_ms: float
    envd_access_token: str
    allow_internet_access: bool | None
    auto_pause: bool
    idempotency_key: str | None
    state: str = "running"  # or "paused"

    def has_metadata(self, wanted: dict[str, str]) -> bool:
        """Whether every ``wanted`` key is set to its value (E2B's ``metadata`` filter)."""
        return all(self.metadata.get(k) == v for k, v in wanted.items())


@dataclass(frozen=True)
class SandboxSpec:
    """What a create asks for (the mock reads it from the request body)."""

    template_id: str = "base"
    timeout_s: int | None = None  # None: the config's default
    metadata: tuple[tuple[str, str], ...] = ()
    env_vars: tuple[tuple[str, str], ...] = ()
    allow_internet_access: bool | None = None
    auto_pause: bool = False
    idempotency_key: str | None = None


@dataclass(frozen=True)
class Admitted:
    """The create holds a create slot and a sandbox slot until ``commit`` or ``abandon``;
    its sandbox's id is chosen now, as E2B names a sandbox when it starts making it.
    ``rate`` is what the route limiter's headers say (None: no limit)."""

    sandbox_id: str
    rate: RateDecision | None


RefusalKind = Literal["storm", "rate", "concurrency", "capacity"]


@dataclass(frozen=True)
class Refused:
    """A 429: ``retry_after_ms`` is what Retry-After says (None: no header); ``cap`` is the
    sandbox cap that was hit."""

    kind: RefusalKind
    retry_after_ms: int | None
    rate: RateDecision | None = None
    cap: int | None = None


@dataclass(frozen=True)
class MustWait:
    """Every create slot is taken and the config says to wait for one ("slow" overload):
    the caller waits until ``has_create_slot`` and calls ``admit_create(after_wait=True)``.
    ``rate``: the route limiter's answer, which the wait does not ask again."""

    rate: RateDecision | None


CreateVerdict = Admitted | Refused | MustWait

# E2B's concurrent-create 429 asks the caller to come back in a second.
_CONCURRENCY_RETRY_MS = 1000


class E2BTeam:
    """One team's sandboxes and the limits that apply to them, on the caller's clock."""

    def __init__(self, config: MockE2BConfig, now_ms: float) -> None:
        self.config = config
        self.reset(now_ms)

    def reset(self, now_ms: float) -> None:
        """Forget every sandbox, key and counter; restart the seeded streams; storms count
        from ``now_ms``."""
        config = self.config
        self._origin_ms = now_ms
        # Running sandboxes (the only ones that count against the cap) and paused ones.
        self._running: dict[str, SandboxRecord] = {}
        self._paused: dict[str, SandboxRecord] = {}
        # Killed and expired sandboxes, so a replayed Idempotency-Key still names its sandbox.
        self._gone: dict[str, SandboxRecord] = {}
        # Times at which killed sandboxes stop counting against the cap, sorted.
        self._lingering: list[float] = []
        self._reserved = 0
        self._creating = 0  # creates holding a create slot
        self._by_key: dict[str, str] = {}
        self._sandboxes_per_key: Counter[str] = Counter()
        self._ordinals: Counter[str] = Counter()
        self.counters = MockE2BStats()
        self._gcra = _make_gcra(config)
        self._faults = FaultPicker(config.seed)
        self._latency = LatencySampler(config.seed)
        self._ids = random.Random(f"ids:{config.seed}")

    def configure(self, config: MockE2BConfig) -> None:
        old = self.config
        self.config = config
        if (old.create_rate_per_s, old.create_burst) != (
            config.create_rate_per_s,
            config.create_burst,
        ):
            self._gcra = _make_gcra(config)
        if old.seed != config.seed:
            self._faults = FaultPicker(config.seed)
            self._latency = LatencySampler(config.seed)
            self._ids = random.Random(f"ids:{config.seed}")

    # -- requests ------------------------------------------------------------------------

    def count_request(self, route: str, now_ms: float) -> int:
        """Counts a request on ``route`` and returns its number there (from 1)."""
        self.counters.requests_total += 1
        self._ordinals[route] += 1
        self._sweep(now_ms)
        return self._ordinals[route]

    def pick_fault(self, route: str, ordinal: int, after_create: bool) -> FaultRule | None:
        rule = self._faults.pick(self.config.faults, route, ordinal, after_create)
        if rule is not None:
            name = f"{rule.status}" if rule.kind == "status" else rule.kind
            by_kind = self.counters.faults_by_kind
            by_kind[name] = by_kind.get(name, 0) + 1
            self.counters.faults_injected += 1
        return rule

    # -- creates -------------------------------------------------------------------------

    def begin_create(self) -> None:
        """A create request arrived (whatever its answer will be)."""
        counters = self.counters
        counters.creates_attempted += 1
        counters.creates_in_flight += 1
        counters.max_concurrent_creates = max(
            counters.max_concurrent_creates, counters.creates_in_flight
        )

    def end_create(self) -> None:
        self.counters.creates_in_flight -= 1

    def replay(self, key: str) -> SandboxRecord | None:
        """The sandbox an earlier create with ``key`` made, counted as a replay."""
        sandbox_id = self._by_key.get(key)
        if sandbox_id is None:
            return None
        self.counters.idempotent_replays += 1
        record = self._running.get(sandbox_id)
        return record if record is not None else self._gone.get(sandbox_id)

    def admit_create(self, now_ms: float, after_wait: bool = False) -> CreateVerdict:
        """E2B's checks on a create, in its order: a 429 storm and the route limiter (the
        route's middleware), then the concurrent-create slots and the sandbox cap (the
        handler). ``after_wait``: the create already passed the route and waited for a slot."""
        config = self.config
        rate: RateDecision | None = None
        if not after_wait:
            rel = now_ms - self._origin_ms
            for storm in config.storms:
                if storm.start_ms <= rel < storm.end_ms:
                    self.counters.rate_limited += 1
                    return Refused("storm", _whole_ms(storm.end_ms - rel))
            if self._gcra is not None:
                # The limiter runs on milliseconds since the origin: whole-millisecond
                # arrivals and intervals stay exact there, where a sum of 0.2 s intervals in
                # seconds drifts above a create arriving exactly on its turn.
                taken = self._gcra.take(rel)
                rate = _in_seconds(taken)
                if not taken.allowed:
                    self.counters.rate_limited += 1
                    return Refused("rate", _whole_ms(taken.retry_after_s), rate)
        if not self.has_create_slot():
            if config.create_overload_mode == "slow":
                return MustWait(rate)
            self.counters.concurrency_limited += 1
            return Refused("concurrency", _CONCURRENCY_RETRY_MS, rate)
        self._sweep(now_ms)
        cap = config.max_sandboxes
        if cap is not None and self._capacity_in_use() >= cap:
            self.counters.capacity_limited += 1
            return Refused("capacity", None, rate, cap)
        self._creating += 1
        self._reserved += 1
        return Admitted("i" + "".join(self._ids.choices(_ID_ALPHABET, k=19)), rate)

    def has_create_slot(self) -> bool:
        slots = self.config.max_concurrent_creates
        return slots is None or self._creating < slots

    def count_overload_timeout(self) -> None:
        self.counters.overload_timeouts += 1

    def create_latency_ms(self) -> float:
        """How long an admitted create takes to make its sandbox."""
        c = self.config
        return self._latency.sample_ms(
            c.create_latency_ms,
            c.create_latency_sigma,
            c.create_latency_max_ms,
            c.create_latency_jitter_ms,
        )

    def abandon(self) -> None:
        """An admitted create ends without a sandbox: its slots are free again."""
        self._creating -= 1
        self._reserved -= 1

    def commit(self, now_ms: float, sandbox_id: str, spec: SandboxSpec) -> SandboxRecord:
        """Turns the admitted create of ``sandbox_id`` into a running sandbox, made as
        ``spec`` asks."""
        self._creating -= 1
        self._reserved -= 1
        timeout_s = self.config.default_timeout_s if spec.timeout_s is None else spec.timeout_s
        record = SandboxRecord(
            sandbox_id=sandbox_id,
            template_id=spec.template_id,
            alias=spec.template_id,
            client_id="6532622b",
            metadata=dict(spec.metadata),
            env_vars=dict(spec.env_vars),
            started_at_ms=now_ms,
            end_at_ms=now_ms + timeout_s * 1000,
            envd_access_token="".join(self._ids.choices(_ID_ALPHABET, k=32)),
            allow_internet_access=spec.allow_internet_access,
            auto_pause=spec.auto_pause,
            idempotency_key=spec.idempotency_key,
        )
        self._running[sandbox_id] = record
        counters = self.counters
        counters.sandboxes_created += 1
        counters.max_running_sandboxes = max(counters.max_running_sandboxes, len(self._running))
        if spec.idempotency_key is not None:
            self._by_key[spec.idempotency_key] = sandbox_id
            self._sandboxes_per_key[spec.idempotency_key] += 1
        return record

    # -- other routes --------------------------------------------------------------------

    def get(self, sandbox_id: str, now_ms: float) -> SandboxRecord | None:
        """A running or paused sandbox."""
        self._sweep(now_ms)
        return self._running.get(sandbox_id) or self._paused.get(sandbox_id)

    def listed(self, states: frozenset[str], now_ms: float) -> list[SandboxRecord]:
        """Running and/or paused sandboxes, oldest first."""
        self._sweep(now_ms)
        records = list(self._running.values()) if "running" in states else []
        if "paused" in states:
            records += self._paused.values()
        return sorted(records, key=lambda r: (r.started_at_ms, r.sandbox_id))

    def pause(self, sandbox_id: str, now_ms: float) -> str:
        """Pauses a running sandbox: "paused", "already_paused" or "not_found". A paused
        sandbox stops counting against the cap and does not expire."""
        self._sweep(now_ms)
        if sandbox_id in self._paused:
            return "already_paused"
        record = self._running.pop(sandbox_id, None)
        if record is None:
            return "not_found"
        self._park(record)
        return "paused"

    def resume(
        self, sandbox_id: str, timeout_s: int, extend_running: bool, now_ms: float
    ) -> tuple[str, SandboxRecord | int | None]:
        """Brings a sandbox back for ``timeout_s``: ("resumed", record), ("running", record)
        (already running: its end moves only later with ``extend_running``, else it is left
        alone), ("capacity", cap) when resuming would pass the cap, or ("not_found", None)."""
        self._sweep(now_ms)
        end_ms = now_ms + timeout_s * 1000
        running = self._running.get(sandbox_id)
        if running is not None:
            if extend_running:
                running.end_at_ms = max(running.end_at_ms, end_ms)
            return "running", running
        record = self._paused.get(sandbox_id)
        if record is None:
            return "not_found", None
        cap = self.config.max_sandboxes
        if cap is not None and self._capacity_in_use() >= cap:
            self.counters.capacity_limited += 1
            return "capacity", cap
        del self._paused[sandbox_id]
        record.state = "running"
        record.end_at_ms = end_ms
        self._running[sandbox_id] = record
        counters = self.counters
        counters.sandboxes_resumed += 1
        counters.max_running_sandboxes = max(counters.max_running_sandboxes, len(self._running))
        return "resumed", record

    def kill(self, sandbox_id: str, now_ms: float) -> bool:
        self._sweep(now_ms)
        record = self._running.pop(sandbox_id, None)
        if record is None:
            paused = self._paused.pop(sandbox_id, None)
            if paused is None:
                self.counters.kills_not_found += 1
                return False
            # A paused sandbox held no slot: its kill frees nothing, so no lag either.
            self._gone[sandbox_id] = paused
            self.counters.sandboxes_killed += 1
            return True
        self._gone[sandbox_id] = record
        self.counters.sandboxes_killed += 1
        lag_ms = self.config.kill_capacity_lag_ms
        if lag_ms > 0:
            bisect.insort(self._lingering, now_ms + lag_ms)
        return True

    def set_end(self, sandbox_id: str, timeout_s: int, extend_only: bool, now_ms: float) -> bool:
        """Moves a sandbox's end to ``now + timeout_s`` (never earlier, with ``extend_only``)."""
        self._sweep(now_ms)
        record = self._running.get(sandbox_id)
        if record is None:
            return False
        end_ms = now_ms + timeout_s * 1000
        record.end_at_ms = max(record.end_at_ms, end_ms) if extend_only else end_ms
        return True

    # -- reading -------------------------------------------------------------------------

    def stats(self, now_ms: float) -> MockE2BStats:
        self._sweep(now_ms)
        return self.counters.snapshot(
            running_sandboxes=len(self._running),
            paused_sandboxes=len(self._paused),
            capacity_in_use=self._capacity_in_use(),
            duplicates=sum(1 for n in self._sandboxes_per_key.values() if n > 1),
        )

    # -- internals -----------------------------------------------------------------------

    def _capacity_in_use(self) -> int:
        return (
            len(self._running)
            + self._reserved
            + len(self._lingering)
            + self.config.foreign_sandboxes
        )

    def _park(self, record: SandboxRecord) -> None:
        record.state = "paused"
        self._paused[record.sandbox_id] = record
        self.counters.sandboxes_paused += 1

    def _sweep(self, now_ms: float) -> None:
        expired = [sid for sid, r in self._running.items() if r.end_at_ms <= now_ms]
        for sandbox_id in expired:
            record = self._running.pop(sandbox_id)
            if record.auto_pause:  # NewSandbox.autoPause: pause, not kill, at the timeout
                self._park(record)
            else:
                self._gone[sandbox_id] = record
                self.counters.sandboxes_expired += 1
        released = bisect.bisect_right(self._lingering, now_ms)
        if released:
            del self._lingering[:released]


def _make_gcra(config: MockE2BConfig) -> Gcra | None:
    if config.create_rate_per_s is None:
        return None
    return Gcra(config.create_rate_per_s / 1000, config.create_burst)


def _in_seconds(decision: RateDecision) -> RateDecision:
    """A decision taken on milliseconds, as its headers state it (seconds)."""
    return replace(
        decision,
        reset_s=decision.reset_s / 1000,
        retry_after_s=decision.retry_after_s / 1000,
    )


def _whole_ms(ms: float) -> int:
    # Never below the millisecond: a Retry-After of 0 would mean "now".
    return max(1, math.ceil(ms))
