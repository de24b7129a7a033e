"""`sandbox-provisioner soak`: several hosts on one Redis against the mock E2B, sessions
arriving all the time, faults on a seeded schedule, and an audit from the mock's records.

    sandbox-provisioner soak --minutes 20 --seed 7 [--hosts 3] [--json]

Faults, one at a time, in a seeded order (every kind once per round, shuffled), a seeded
pause apart:
- `kill_mid_create`: kill -9 a host with a create in flight at E2B (a replacement starts);
- `kill_after_e2b_kill`: E2B holds kills open after killing (a `hang` after the kill), and a
  host is killed while its release waits there: between the E2B kill and forgetting;
- `kill_after_find`: E2B holds a create open after making the sandbox and holds lists open
  after answering them; a cancel releases that job's entity on another host, which finds
  the sandbox by its idempotency key and is killed before it can kill the sandbox;
- `redis_restart`: Redis killed (SIGKILL) until a host meets the outage, then restarted;
- `rate_429`, `capacity_429`: bursts of E2B's two 429s (the route rate limit with
  Retry-After; the concurrent-sandbox cap, whose count also drops only `kill_lag_ms` after
  each kill throughout the run);
- `status_5xx`, `hangs`, `slow_creates`: bursts of 503s, of creates hung until the client
  gives up, and of slow creates.
Each kill reports whether it hit its window, proven from the killed host's full event
stream (what it had heard back when it died) and the mock's state.

The audit reads the mock's own records, never the provisioner's storage (but for permits):
1. every job ended Completed, or Failed with a typed reason (`code: message`);
2. once every job ended, no sandbox runs at E2B (nobody owns one any more);
3. no idempotency key made two sandboxes, and no entity had two running at once (the mock's
   running sandboxes, sampled through the run);
4. creates in flight at E2B never above the create slots; sandboxes running never above
   `max_sandboxes` (the mock's cap is set `cap_slack` above it so an overrun is seen, not
   refused);
5. once the dead hosts' create leases expired, no permit or waiter is left in the gate (nor
   an unsettled create: one whose sandbox nobody adopted or released).
Exit 0 when the audit is clean, 1 when anything is violated, 2 when the soak could not run.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeVar
from urllib.parse import unquote

from harness.multihost.run import (
    Cluster,
    ClusterError,
    Event,
    RunShape,
    add_component_arguments,
    answered_creates,
    creates_in_flight,
    read_gate,
    run_settings,
)
from harness.multihost.worker import PLANTED_BUGS, WorkerSettings
from harness.simulator.model import Job
from host.cli.options import add_value_option, fail, load_or_fail, positive
from host.services.namespaces import ScopedStorage
from host.storage import storage_from_uri
from provisioner.entity_records import EntityRecords
from provisioner.gates.view import GateView, plain

if TYPE_CHECKING:
    from harness.mocks.e2b import MockE2BServer
    from harness.multihost.redis_server import RedisServer

SOAK_API_KEY = "e2b_soak_key"
SOAK_TENANTS = ("tenant-a", "tenant-b", "tenant-c")
# The faults either path injects (Redis's and E2B's); each path adds its own kills.
SHARED_FAULT_KINDS: tuple[str, ...] = (
    "redis_restart",
    "rate_429",
    "capacity_429",
    "status_5xx",
    "hangs",
    "slow_creates",
)
FAULT_KINDS: tuple[str, ...] = (
    "kill_mid_create",
    "kill_after_e2b_kill",
    "kill_after_find",
    *SHARED_FAULT_KINDS,
)
_Found = TypeVar("_Found")
_TYPED_REASON = re.compile(r"^[a-z][a-z0-9_]*(: |$)")
_KEY_IN_QUERY = re.compile(r"temper_idempotency_key=([^&]+)")


@dataclass(frozen=True, kw_only=True)
class SoakPlan(RunShape):
    """The soak's knobs: the run's shape, then the soak's own (the command line sets the
    first few)."""

    minutes: float
    seed: int
    hosts: int = 3
    cap_slack: int = 2
    kill_lag_ms: int = 1500
    hang_s: float = 2.0
    arrival_gap_s: tuple[float, float] = (0.3, 1.2)
    # Backpressure: no new job while this many are unfinished, so the arrivals never
    # outrun what the account can serve (a growing backlog would end in liveness timeouts).
    # At or below `max_sandboxes` the cap check cannot fire: every job holds at most one
    # sandbox at a time.
    max_open_jobs: int = 16
    fault_gap_s: tuple[float, float] = (1.5, 4.0)
    burst_s: tuple[float, float] = (1.0, 3.0)
    window_timeout_s: float = 10.0
    finish_timeout_s: float = 300.0
    planted_bug: str | None = None


@dataclass
class FaultRecord:
    kind: str
    started_s: float
    detail: dict[str, Any] = field(default_factory=dict)


class SoakHost(Protocol):
    name: str
    events: list[Event]
    stderr_path: Path


class RunRecord(Protocol):
    """What the audit reads of a run: every host started (killed ones too), the events
    they reported and each finished job's result."""

    @property
    def hosts(self) -> Sequence[SoakHost]: ...
    def results(self) -> dict[str, Event]: ...
    def events(self) -> list[Event]: ...


class SoakCluster(RunRecord, Protocol):
    """What the soak drives: the worker hosts (`Cluster`) or the services
    (`serve_path.ServeFleet`)."""

    def assign(self, jobs: Sequence[Job]) -> object: ...
    def live_hosts(self) -> Sequence[SoakHost]: ...
    def host(self, name: str) -> SoakHost: ...
    def kill(self, name: str) -> list[Job]: ...
    def add_host(self, timeout: float = ...) -> object: ...
    def release(self, name: str, jobs: Sequence[Job]) -> None: ...
    def job(self, job_id: str) -> Job: ...
    def finish(self, timeout: float = ...) -> object: ...
    def start(self, timeout: float = ...) -> None: ...

    @property
    def settings(self) -> WorkerSettings: ...


class Soak:
    fault_kinds: tuple[str, ...] = FAULT_KINDS

    def __init__(
        self,
        plan: SoakPlan,
        cluster: SoakCluster,
        mock: MockE2BServer,
        redis: RedisServer,
        settings: WorkerSettings,
    ) -> None:
        self.plan = plan
        self.cluster = cluster
        self.mock = mock
        self.redis = redis
        self.settings = settings
        self.rng = random.Random(f"soak:{plan.seed}")
        self.faults: list[FaultRecord] = []
        self.jobs: list[Job] = []
        self.sampled_doubles: list[dict[str, Any]] = []
        self.samples = 0
        self._lock = threading.Lock()  # one writer to the hosts' stdin at a time
        self._stop = threading.Event()
        self._stop_sampling = threading.Event()
        self._started = time.monotonic()
        self._job_numbers = iter(range(1, 1_000_000))

    # -- the run -----------------------------------------------------------------------

    def run(self) -> None:
        arrivals = threading.Thread(target=self._arrive, name="soak-arrivals", daemon=True)
        sampler = threading.Thread(target=self._sample, name="soak-sampler", daemon=True)
        arrivals.start()
        sampler.start()
        try:
            deadline = self._started + self.plan.minutes * 60
            for kind in self._schedule():
                self._pause(self.rng.uniform(*self.plan.fault_gap_s))
                if time.monotonic() >= deadline:
                    break
                record = FaultRecord(kind, round(time.monotonic() - self._started, 2))
                self.faults.append(record)
                getattr(self, f"_fault_{kind}")(record)
                self._calm()
        finally:
            self._stop.set()
            arrivals.join()
        self._calm()
        if not self.redis.running:
            self._start_redis()
        self.cluster.finish(timeout=self.plan.finish_timeout_s)
        self._stop_sampling.set()
        sampler.join()

    def _schedule(self) -> Iterator[str]:
        while True:
            kinds = list(self.fault_kinds)
            self.rng.shuffle(kinds)
            yield from kinds

    def _pause(self, seconds: float) -> None:
        time.sleep(max(0.0, seconds))

    def _arrive(self) -> None:
        rng = random.Random(f"arrivals:{self.plan.seed}")
        tenants = list(SOAK_TENANTS)
        while not self._stop.wait(rng.uniform(*self.plan.arrival_gap_s)):
            if len(self.jobs) - len(self.cluster.results()) >= self.plan.max_open_jobs:
                continue
            batch = [
                Job(
                    id=f"{self.settings.run_id}-{next(self._job_numbers):05d}",
                    tenant=rng.choice(tenants),
                )
                for _ in range(rng.randint(1, 3))
            ]
            with self._lock:
                self.cluster.assign(batch)
                self.jobs.extend(batch)

    def _sample(self) -> None:
        """Entities with two sandboxes running at once, as the mock lists them."""
        while not self._stop_sampling.wait(0.2):
            self.samples += 1
            per_entity: dict[str, list[str]] = {}
            for sandbox in self.mock.running_sandboxes():
                entity = sandbox["metadata"].get("temper_entity_id", "?")
                per_entity.setdefault(entity, []).append(sandbox["sandbox_id"])
            for entity, ids in per_entity.items():
                if len(ids) > 1 and len(self.sampled_doubles) < 20:
                    self.sampled_doubles.append({"entity": entity, "sandboxes": ids})

    def _calm(self) -> None:
        """Back to the base fault-free configuration."""
        self.mock.configure(
            faults=(),
            create_rate_per_s=None,
            max_sandboxes=self.plan.max_sandboxes + self.plan.cap_slack,
            create_latency_ms=self.plan.create_latency_ms,
        )

    def _start_redis(self) -> None:
        self.redis.start()
        self.redis.fsync_every_write()

    # -- waiting on what the hosts and the mock report ---------------------------------

    def _poll(self, predicate: Callable[[], Any], timeout: float) -> Any:
        deadline = time.monotonic() + timeout
        while True:
            found = predicate()
            if found:
                return found
            if time.monotonic() >= deadline:
                return None
            time.sleep(0.02)

    def _window(self, record: FaultRecord, find: Callable[[], _Found | None]) -> _Found | None:
        """What `find` finds within the window timeout: the fault's window opened (a miss
        is recorded as one)."""
        found: _Found | None = self._poll(find, self.plan.window_timeout_s)
        if found is None:
            record.detail["hit"] = False
        return found

    def _live_events(self) -> tuple[list[Event], set[str]]:
        live = {h.name for h in self.cluster.live_hosts()}
        return self.cluster.events(), live

    def _kill_and_replace(self, name: str) -> None:
        with self._lock:
            self.cluster.kill(name)
        self.cluster.add_host()

    def _hangs(self) -> int:
        return self.mock.stats().faults_by_kind.get("hang", 0)

    # -- faults ------------------------------------------------------------------------

    def _fault_kill_mid_create(self, record: FaultRecord) -> None:
        cut = self._kill_host_when(
            record, lambda events, name: creates_in_flight(events, name) or None
        )
        if cut is None:
            return
        name, keys, in_flight_at_e2b = cut
        heard = answered_creates(self.cluster.host(name).events)
        record.detail.update(
            host=name,
            hit=bool(keys - heard) and in_flight_at_e2b > 0,
            creates_unanswered=len(keys - heard),
        )

    def _fault_kill_after_e2b_kill(self, record: FaultRecord) -> None:
        before = self._hangs()
        self.mock.configure(faults=["hang:p=1:route=kill:after-create"])

        def unanswered_kill(events: list[Event], name: str) -> str | None:
            """A sandbox gone from E2B whose kill the host sent and never heard answered."""
            if self._hangs() <= before:
                return None
            running = {s["sandbox_id"] for s in self.mock.running_sandboxes()}
            mine = [e for e in events if e["host"] == name]
            sent = {e["sandbox_id"] for e in mine if e["event"] == "kill_sent"}
            done = {e["sandbox_id"] for e in mine if e["event"] == "kill_answered"}
            return min(sent - done - running, default=None)

        cut = self._kill_host_when(record, unanswered_kill)
        if cut is None:
            return
        name, sandbox_id, _ = cut
        heard = {
            e["sandbox_id"] for e in self.cluster.host(name).events if e["event"] == "kill_answered"
        }
        record.detail.update(host=name, sandbox_id=sandbox_id, hit=sandbox_id not in heard)

    def _kill_host_when(
        self, record: FaultRecord, find: Callable[[list[Event], str], _Found | None]
    ) -> tuple[str, _Found, int] | None:
        """Once `find` finds something in the events of a live host (hosts in name order;
        None if the window never opens), kills that host and starts another: the host, what
        was found, and the creates in flight at E2B just before the kill."""

        def victim() -> tuple[str, _Found] | None:
            events, live = self._live_events()
            for name in sorted(live):
                found = find(events, name)
                if found is not None:
                    return name, found
            return None

        found = self._window(record, victim)
        if found is None:
            return None
        name, what = found
        in_flight_at_e2b = self.mock.stats().creates_in_flight
        self._kill_and_replace(name)
        return name, what, in_flight_at_e2b

    def _fault_kill_after_find(self, record: FaultRecord) -> None:
        before = self._hangs()
        self.mock.configure(
            faults=["hang:p=1:route=create:after-create", "hang:p=1:route=list:after-create"]
        )

        def made_unanswered() -> tuple[str, str, str] | None:
            """(job, its host, key): a create that made its sandbox and is held open."""
            if self._hangs() <= before:
                return None
            events, live = self._live_events()
            running = {
                s["idempotency_key"]: s["metadata"].get("temper_entity_id")
                for s in self.mock.running_sandboxes()
            }
            for name in sorted(live):
                for key in sorted(creates_in_flight(events, name)):
                    job = running.get(key)
                    if job:
                        return job, name, key
            return None

        found = self._window(record, made_unanswered)
        if found is None:
            return
        job_id, owner, key = found
        others = sorted(h.name for h in self.cluster.live_hosts() if h.name != owner)
        releaser = others[0] if others else owner
        with self._lock:
            self.cluster.release(releaser, [self.cluster.job(job_id)])

        def listing() -> bool:
            mine = [e for e in self.cluster.events() if e["host"] == releaser]
            sent = {e["query"] for e in mine if e["event"] == "list_sent"}
            done = {e["query"] for e in mine if e["event"] == "list_answered"}
            return any(key in unquote(unquote(q)) for q in sent - done)

        if not self._poll(listing, self.plan.window_timeout_s):
            record.detail.update(hit=False, job=job_id)
            return
        self._kill_and_replace(releaser)
        answered = [e for e in self.cluster.host(releaser).events if e["event"] == "list_answered"]
        still_running = any(s["idempotency_key"] == key for s in self.mock.running_sandboxes())
        record.detail.update(
            host=releaser,
            job=job_id,
            hit=not any(key in unquote(unquote(e["query"])) for e in answered) and still_running,
        )

    def _fault_redis_restart(self, record: FaultRecord) -> None:
        self.redis.kill()
        killed = len(self.cluster.events())

        def met() -> bool:
            return any(
                e["event"] == "outcome"
                and (e.get("reason") == "storage" or e.get("code") == "storage_unavailable")
                for e in self.cluster.events()[killed:]
            )

        seen = bool(self._poll(met, self.plan.window_timeout_s))
        down_s = self.rng.uniform(0.5, 2.0)
        self._pause(down_s)
        self._start_redis()
        record.detail.update(hit=seen, extra_down_s=round(down_s, 2))

    def _burst(self, record: FaultRecord, **changes: Any) -> None:
        seconds = self.rng.uniform(*self.plan.burst_s)
        self.mock.configure(**changes)
        self._pause(seconds)
        record.detail.update(hit=True, seconds=round(seconds, 2))

    def _fault_rate_429(self, record: FaultRecord) -> None:
        self._burst(record, create_rate_per_s=0.5, create_burst=1)

    def _fault_capacity_429(self, record: FaultRecord) -> None:
        running = self.mock.stats().running_sandboxes
        self._burst(record, max_sandboxes=max(1, running - 1))

    def _fault_status_5xx(self, record: FaultRecord) -> None:
        self._burst(record, faults=["503:p=0.5:route=create", "502:p=0.3:route=kill"])

    def _fault_hangs(self, record: FaultRecord) -> None:
        self._burst(record, faults=["hang:p=0.4:route=create"])

    def _fault_slow_creates(self, record: FaultRecord) -> None:
        self._burst(record, create_latency_ms=self.plan.create_lease_ms // 2)


# -- the audit -----------------------------------------------------------------------------


def audit(soak: Soak, finished: bool, error: str | None) -> dict[str, Any]:
    """The five checks of the module docstring, each with what it saw."""
    plan, mock = soak.plan, soak.mock
    results = soak.cluster.results()
    violations: list[str] = []
    if error is not None:
        violations.append(f"the run did not end: {error}")

    # 1. every job ended, typed
    job_ids = {job.id for job in soak.jobs}
    missing = sorted(job_ids - set(results))
    untyped = [
        {"id": r["id"], "state": r["state"], "reason": r.get("reason")}
        for r in results.values()
        if not (
            r["state"] == "Completed"
            or (r["state"] == "Failed" and _TYPED_REASON.match(str(r.get("reason") or "")))
        )
    ]
    if missing:
        violations.append(f"{len(missing)} jobs never ended: {missing[:10]}")
    if untyped:
        violations.append(f"{len(untyped)} jobs ended without a typed reason: {untyped[:5]}")
    failed: dict[str, int] = {}
    for r in results.values():
        if r["state"] == "Failed":
            code = str(r.get("reason") or "").split(":", 1)[0]
            failed[code] = failed.get(code, 0) + 1

    # 2. no sandbox alive without an owner: its job has ended (or it names no job of the
    # run); once every job ended, that is every running sandbox. Late creates of dead hosts
    # have landed by now.
    settled = _wait(lambda: mock.stats().creates_in_flight == 0, plan.hang_s * 3 + 5)
    ended = set(results)
    orphans = [
        s
        for s in mock.running_sandboxes()
        if finished
        or s["metadata"].get("temper_entity_id") in ended
        or s["metadata"].get("temper_entity_id") not in job_ids
    ]
    if orphans:
        violations.append(
            f"{len(orphans)} sandboxes alive at E2B whose job has ended: "
            f"{[s['sandbox_id'] for s in orphans[:10]]}"
        )

    # 3. one sandbox per provisioning cycle
    stats = mock.stats()
    if stats.duplicates:
        violations.append(f"{stats.duplicates} idempotency keys made more than one sandbox")
    if soak.sampled_doubles:
        violations.append(f"entities with two sandboxes running at once: {soak.sampled_doubles}")

    # 4. limits as E2B saw them
    if stats.max_concurrent_creates > plan.create_slots:
        violations.append(
            f"{stats.max_concurrent_creates} creates in flight at E2B (gate {plan.create_slots})"
        )
    if stats.max_running_sandboxes > plan.max_sandboxes:
        violations.append(
            f"{stats.max_running_sandboxes} sandboxes running at E2B (cap {plan.max_sandboxes})"
        )

    # 5. no permit left once the dead hosts' leases expired
    permits: dict[str, Any] = {}
    leftovers: list[dict[str, Any]] = []
    if finished and soak.redis.running:
        url, account = soak.settings.storage_url, soak.settings.account

        def gate_clear() -> bool:
            gate, _ = read_gate(url, account)
            return gate.permits_held == 0 and not gate.live_waiters

        _wait(gate_clear, plan.create_lease_ms / 1000 * 2 + 5)
        gate, _ = read_gate(url, account)
        permits = {
            "create_leases": len(gate.create_slots.leases),
            "sandbox_leases": len(gate.capacity.leases),
            "unsettled_creates": len(gate.capacity.unsettled),
            "waiters": len(gate.live_waiters),
        }
        if any(permits.values()):
            leftovers = leftover_permits(soak.cluster, soak.faults, gate)
            for item in leftovers:
                owner = (item["stored"].get("tenant"), item["stored"].get("entity"))
                item["entity_record"] = read_entity_record(url, account, *owner)
            violations.append(
                f"permits left in the gate: {permits}; "
                + "; ".join(_leftover_line(item) for item in leftovers[:5])
            )
        if gate.orphaned_reservations:
            violations.append(f"reservations for no waiting turn: {gate.orphaned_reservations}")
        # Tickets left by hosts killed mid-decision: reported, not a violation (they hold
        # nothing, and the next decision that meets one drops it); so are the permits
        # promised to them, which pass on at their claim deadline.
        permits["dead_tickets"] = len(gate.dead_tickets)
        permits["reservations"] = len(gate.reservations)

    kills = [f for f in soak.faults if f.kind.startswith("kill_")]
    return {
        "ok": not violations,
        "violations": violations,
        "checks": {
            "jobs": len(job_ids),
            "completed": sum(1 for r in results.values() if r["state"] == "Completed"),
            "failed_by_code": failed,
            "jobs_without_result": len(missing),
            "orphaned_sandboxes": len(orphans),
            "creates_settled_at_e2b": settled,
            "duplicate_keys": stats.duplicates,
            "entities_with_two_sandboxes": len(soak.sampled_doubles),
            "running_samples": soak.samples,
            "max_concurrent_creates": stats.max_concurrent_creates,
            "create_slots": plan.create_slots,
            "max_running_sandboxes": stats.max_running_sandboxes,
            "max_sandboxes": plan.max_sandboxes,
            "permits_left": permits,
            "kill_windows_hit": sum(1 for f in kills if f.detail.get("hit")),
            "kill_windows_tried": len(kills),
        },
        # Each permit left: its stored fields, its job's result and history.
        "leftover_permits": leftovers,
    }


def leftover_permits(
    run: RunRecord, faults: Sequence[FaultRecord], gate: GateView
) -> list[dict[str, Any]]:
    """Each permit or live waiter left in the gate: what is stored (`kind`, its fields, how
    long it still holds), and the history of its job (`job_history`)."""
    stored: list[tuple[str, Any]] = [
        *(("create_lease", lease) for lease in gate.create_slots.leases),
        *(("sandbox_lease", lease) for lease in gate.capacity.leases),
        *(("unsettled_create", create) for create in gate.capacity.unsettled),
        *(("waiter", waiter) for waiter in gate.live_waiters),
    ]
    found = []
    for kind, item in stored:
        fields = plain(item) if kind == "waiter" else asdict(item)
        until = fields.get("expires_ms", fields.get("until_ms"))
        entity = str(fields.get("entity") or "")
        found.append(
            {
                "kind": kind,
                "stored": fields,
                "now_ms": gate.now_ms,
                "holds_for_ms": None if until is None else until - gate.now_ms,
                **job_history(run, faults, entity.rpartition("/")[2]),
            }
        )
    return found


def job_history(
    run: RunRecord, faults: Sequence[FaultRecord], job_id: str, limit: int = 80
) -> dict[str, Any]:
    """What the run knows of one job: its result, the hosts that ran it, every event about
    it or its sandboxes (creates by job, kills by sandbox id, lists by idempotency key;
    the last `limit`), the guest's warnings that name it, and the faults at its hosts."""
    events = run.events()
    mine = [e for e in events if job_id in (e.get("job"), e.get("id"))]
    sandboxes = {e.get("sandbox_id") for e in mine} | {
        (e.get("detail") or {}).get("sandbox_id") for e in mine
    }
    sandboxes.discard(None)
    keys = {str(e["key"]) for e in mine if e.get("key")}

    def about(event: Event) -> bool:
        if job_id in (event.get("job"), event.get("id")):
            return True
        if event["event"].startswith("kill_"):
            return event.get("sandbox_id") in sandboxes
        if event["event"].startswith("list_"):
            query = unquote(unquote(str(event.get("query", ""))))
            return any(key in query for key in keys)
        return False

    history = [e for e in events if about(e)]
    hosts = sorted({str(e["host"]) for e in history})
    warnings = []
    for host in run.hosts:
        if host.name in hosts:
            warnings += [
                f"{host.name}: {line[:300]}" for line in _stderr_lines(host) if job_id in line
            ]
    releases = [
        {k: e.get(k) for k in ("host", "at_ms", "action", "code", "sandbox_id") if e.get(k)}
        for e in history
        if e["event"] == "outcome" and e.get("operation") == "release"
    ]
    return {
        "job": job_id,
        "result": run.results().get(job_id),
        "hosts": hosts,
        "releases": releases,
        "sandboxes": sorted(sandboxes),
        "guest_warnings": warnings[-20:],
        "faults_at_its_hosts": [
            asdict(f) for f in faults if f.detail.get("host") in hosts or job_id in str(f)
        ],
        "events": history[-limit:],
        "events_left_off": max(0, len(history) - limit),
    }


def read_entity_record(
    storage_url: str, account: str, tenant: str | None, entity: str | None
) -> dict[str, Any] | None:
    """The entity's stored record (its cycle's state, nonce and sandbox) with its version;
    None when there is none: a release forgot it, or it never had one."""
    if not tenant or not entity:
        return None
    backend = storage_from_uri(storage_url)
    try:
        loaded = EntityRecords(ScopedStorage(backend, tenant=tenant, account=account)).load(entity)
    finally:
        backend.close()
    return None if loaded is None else {**asdict(loaded[0]), "version": loaded[1]}


def _stderr_lines(host: SoakHost) -> list[str]:
    try:
        return host.stderr_path.read_text(errors="replace").splitlines()
    except OSError:
        return []


def _leftover_line(item: dict[str, Any]) -> str:
    """One permit left, in one line: whose, what is stored, how its job ended and what its
    releases answered (the rest is in the audit's `leftover_permits`)."""
    result = item["result"] or {}
    reason = f" ({result['reason']})" if result.get("reason") else ""
    ended = f"{result.get('state')}{reason}" if result else "no result"
    releases = [f"{r.get('host')}: {r.get('action')} {r.get('code') or ''}".strip()
                for r in item["releases"]]  # fmt: skip
    return (
        f"{item['kind']} {item['stored']} holding {item['holds_for_ms']} ms more; "
        f"job {item['job']} {ended} on {item['hosts']}, releases {releases}, "
        f"{len(item['guest_warnings'])} guest warnings naming it"
    )


def _wait(predicate: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.1)
    return True


# -- the command line ----------------------------------------------------------------------


_positive_float = positive(float)


def add_soak_arguments(parser: argparse.ArgumentParser) -> None:
    add_value_option(parser, "--minutes", _positive_float, 5.0, "how long faults are injected")
    parser.add_argument("--seed", type=int, default=0, help="the fault and arrival schedule")
    parser.add_argument(
        "--path",
        choices=("hosts", "serve"),
        default="hosts",
        help="hosts (default): worker hosts that each run the component; serve: the "
        "service path, sessions through the Temper-ABI host and the shim to `serve` "
        "processes (harness/multihost/serve_path.py)",
    )
    parser.add_argument(
        "--hosts",
        type=int,
        default=None,
        help="host processes, or serve processes with --path serve (default 3, or 2)",
    )
    add_component_arguments(parser)
    add_value_option(
        parser,
        "--finish-timeout-s",
        _positive_float,
        SoakPlan.finish_timeout_s,
        "after the faults, how long every job may take to end",
    )
    add_value_option(
        parser,
        "--max-open-jobs",
        int,
        SoakPlan.max_open_jobs,
        "no new job while this many are unfinished",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON report")
    # Test-only: makes every host misbehave so the audit can be seen to fail.
    parser.add_argument("--planted-bug", choices=PLANTED_BUGS, default=None, help=argparse.SUPPRESS)


def soak_mock(plan: SoakPlan) -> MockE2BServer:
    """The mock E2B of a soak: the account's cap `cap_slack` above the plan's, so an
    overrun is seen rather than refused."""
    from harness.mocks.e2b import MockE2BConfig, MockE2BServer

    return MockE2BServer(
        MockE2BConfig(
            api_key=SOAK_API_KEY,
            seed=plan.seed,
            create_latency_ms=plan.create_latency_ms,
            create_latency_sigma=0.3,
            create_latency_max_ms=plan.create_lease_ms / 2,
            max_sandboxes=plan.max_sandboxes + plan.cap_slack,
            kill_capacity_lag_ms=plan.kill_lag_ms,
            hang_s=plan.hang_s,
        )
    )


def soak_settings(
    plan: SoakPlan, redis_url: str, mock: MockE2BServer, component: Path, cache_dir: Path | None
) -> WorkerSettings:
    return run_settings(
        redis_url,
        mock,
        SOAK_API_KEY,
        "soak",
        plan,
        component=component,
        cache_dir=cache_dir,
        planted_bug=plan.planted_bug,
    )


def report_soak(soak: Soak, run_error: str | None, mock: MockE2BServer) -> dict[str, Any]:
    return {
        "plan": asdict(soak.plan),
        "audit": audit(soak, finished=run_error is None, error=run_error),
        "faults": [asdict(f) for f in soak.faults],
        "faults_by_kind": {
            kind: sum(1 for f in soak.faults if f.kind == kind) for kind in soak.fault_kinds
        },
        "mock": mock.stats().to_json(),
    }


def print_report(report: dict[str, Any], as_json: bool) -> int:
    out = sys.stderr if as_json else sys.stdout
    if as_json:
        print(json.dumps(report, indent=2, default=str))
    else:
        for fault in report["faults"]:
            print(f"  {fault['started_s']:8.2f}s {fault['kind']:20} {fault['detail']}", file=out)
        print(json.dumps(report["faults_by_kind"]), file=out)
        print(json.dumps(report["audit"], indent=2, default=str), file=out)
    return 0 if report["audit"]["ok"] else 1


def run_soak(args: argparse.Namespace) -> int:
    if args.path == "serve":
        from harness.multihost.serve_path import run_serve_soak

        return run_serve_soak(args)
    hosts = 3 if args.hosts is None else args.hosts
    if hosts < 2:
        return fail("the soak needs at least 2 hosts")

    def open_hosts(
        stack: ExitStack, settings: WorkerSettings, _mock: MockE2BServer, workdir: Path
    ) -> Cluster:
        return stack.enter_context(Cluster(settings, hosts=hosts, workdir=workdir))

    return soak_with(args, hosts, Soak, open_hosts)


OpenCluster = Callable[[ExitStack, "WorkerSettings", "MockE2BServer", Path], SoakCluster]


def soak_with(
    args: argparse.Namespace, hosts: int, soak_class: type[Soak], open_cluster: OpenCluster
) -> int:
    """Runs a soak of `soak_class` over what `open_cluster` opens (given the run's
    settings, the mock and a work directory); prints the report; the exit code."""
    from harness.multihost.redis_server import RedisServer, RedisServerError

    plan = SoakPlan(
        minutes=args.minutes,
        seed=args.seed,
        hosts=hosts,
        finish_timeout_s=args.finish_timeout_s,
        max_open_jobs=args.max_open_jobs,
        planted_bug=args.planted_bug,
    )
    loaded = load_or_fail(args.component, args.cache_dir)
    if isinstance(loaded, int):
        return loaded
    out = sys.stderr if args.json else sys.stdout
    with ExitStack() as stack:
        try:
            redis = stack.enter_context(RedisServer())
        except RedisServerError as error:
            return fail(str(error))
        redis.fsync_every_write()
        mock = stack.enter_context(soak_mock(plan))
        settings = soak_settings(plan, redis.url, mock, loaded.path, args.cache_dir)
        workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="soak-")))
        cluster = open_cluster(stack, settings, mock, workdir)
        print(
            f"soak ({soak_class.__name__}): {plan.hosts} hosts, {plan.minutes} min, "
            f"seed {plan.seed}, redis {redis.url}, mock E2B {mock.url}",
            file=out,
            flush=True,
        )
        soak = soak_class(plan, cluster, mock, redis, cluster.settings)
        run_error: str | None = None
        try:
            cluster.start()
            soak.run()
        except ClusterError as exc:
            run_error = str(exc)[:2000]
        report = report_soak(soak, run_error, mock)
    return print_report(report, args.json)
