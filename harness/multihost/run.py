"""Several host processes sharing one storage and one E2B account, as several Temper nodes.

    cluster = Cluster(settings, hosts=3, workdir=tmp)
    with cluster:
        cluster.start()                      # N `python -m harness.multihost.worker` processes
        cluster.assign(jobs)                 # round-robin over the live hosts
        cluster.wait_for(lambda events: ...) # awaits what the hosts report
        cluster.kill("host-2")               # kill -9; its unfinished jobs go to survivors
        outcome = cluster.finish(timeout=60) # every job ended; hosts exited

A killed host's unfinished sessions are re-driven by the survivors, the way Temper
re-dispatches an entity's pending action on another node: a job is finished when the host
it is assigned to reports its result (a result a host wrote before it died counts). Every
host reports JSON lines (see harness.multihost.worker), stamped with the storage's clock,
which all hosts share when the storage is Redis.

Also here: the measures the tests and the report use (grant order by gate version, tenant
lead, the stored gate and how long a dead host's leases take to leave it), and the
`multihost` command (`add_multihost_arguments`, `run_multihost`) for harness/cli/main.py to wire.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import secrets
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Generic, TypeVar

from harness.multihost.worker import WorkerSettings
from harness.simulator.model import Job
from host.cli.options import add_component_option, fail, load_or_fail, positive
from host.services.namespaces import ScopedStorage
from host.storage import storage_from_uri
from provisioner.config import AdmissionConfig
from provisioner.gates.view import GateView, inspect_gates

if TYPE_CHECKING:
    from harness.mocks.e2b import MockE2BServer


Event = dict[str, Any]


class ClusterError(RuntimeError):
    """A host failed, or the run did not end in time."""


@dataclass
class ChildProcess:
    """A process the harness started (a worker host, a `serve`): alive until it exits or
    the harness kills it; its stderr is kept in a file for diagnosis."""

    name: str
    process: subprocess.Popen[Any]
    stderr_path: Path
    killed: bool = False
    events: list[Event] = field(default_factory=list)

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def alive(self) -> bool:
        return not self.killed and self.process.poll() is None

    def stderr_tail(self, limit: int = 4000) -> str:
        try:
            return self.stderr_path.read_text(errors="replace")[-limit:]
        except OSError:
            return ""


P = TypeVar("P", bound=ChildProcess)


class ChildProcesses(Generic[P]):
    """The processes a harness started, by name: the worker hosts, the `serve`s; and the
    jobs they were given, the events they reported and each finished job's result."""

    def __init__(self) -> None:
        self.hosts: list[P] = []
        self._cond = threading.Condition()
        self._events: list[Event] = []
        self._jobs: dict[str, Job] = {}
        self._results: dict[str, Event] = {}
        self._round_robin = itertools.count()

    def results(self) -> dict[str, Event]:
        """Each finished job's result, by job id."""
        with self._cond:
            return dict(self._results)

    def job(self, job_id: str) -> Job:
        with self._cond:
            return self._jobs[job_id]

    def events(self) -> list[Event]:
        with self._cond:
            return list(self._events)

    def live_hosts(self) -> list[P]:
        return [host for host in self.hosts if host.alive]

    def host(self, name: str) -> P:
        for host in self.hosts:
            if host.name == name:
                return host
        raise KeyError(name)


@dataclass
class HostProcess(ChildProcess):
    """One worker process and everything it reported."""

    assigned: list[Job] = field(default_factory=list)
    reader: threading.Thread | None = None

    def results(self) -> list[Event]:
        return [e for e in self.events if e["event"] == "result"]

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "pid": self.pid,
            "killed": self.killed,
            "exit_code": self.process.returncode,
            "jobs_assigned": [job.id for job in self.assigned],
            "results": self.results(),
            "outcomes": outcome_counts(self.events),
        }


@dataclass
class ClusterOutcome:
    """Where every job ended, and what each host reported."""

    results: dict[str, Event]
    hosts: list[HostProcess]
    events: list[Event]
    reassigned: dict[str, list[str]]

    def grant_order(self) -> list[Event]:
        """Each job's first create grant, in commit order: the gate's version orders every
        host's grants exactly (clock stamps can be off by a scheduling delay)."""
        grants = [e for e in self.events if e["event"] == "granted"]
        grants.sort(key=lambda e: (e.get("gate_version") or 0, e["at_ms"]))
        seen: set[str] = set()
        order = []
        for event in grants:
            if event["job"] not in seen:
                seen.add(event["job"])
                order.append(event)
        return order

    def ready_order(self) -> list[Event]:
        """Each job's first SandboxReady, in the shared clock's order (a re-driven job
        counts once)."""
        return self._first_per_job(lambda e: e["event"] == "session" and e["kind"] == "ready")

    def _first_per_job(self, wanted: Callable[[Event], bool]) -> list[Event]:
        seen: set[str] = set()
        order = []
        for event in sorted(self.events, key=lambda e: e["at_ms"]):
            if wanted(event) and event["job"] not in seen:
                seen.add(event["job"])
                order.append(event)
        return order

    def to_json(self) -> dict[str, Any]:
        return {
            "results": self.results,
            "hosts": [host.to_json() for host in self.hosts],
            "reassigned": self.reassigned,
            "outcomes": outcome_counts(self.events),
        }


def outcome_counts(events: Sequence[Event]) -> dict[str, int]:
    """Invocation outcomes by action and reason/code, e.g. `SandboxQueued:storage`."""
    counts: dict[str, int] = {}
    for event in events:
        if event["event"] != "outcome":
            continue
        label = event["action"]
        detail = event.get("reason") or event.get("code")
        if detail:
            label += f":{detail}"
        counts[label] = counts.get(label, 0) + 1
    return counts


def max_tenant_lead(order: Sequence[Event]) -> int:
    """Over every prefix of the ready order, the largest gap between the most and the least
    served tenant (tenants counted from the whole order). Round-robin grants keep it near 1;
    first-come-first-served across a burst of one tenant lets it grow to that burst.

    Counting stops once a tenant has had its last grant: from then on it has nobody
    waiting, so the others pulling ahead says nothing about fairness."""
    totals: dict[str, int] = {}
    for event in order:
        totals[event["tenant"]] = totals.get(event["tenant"], 0) + 1
    served = dict.fromkeys(totals, 0)
    worst = 0
    for event in order:
        served[event["tenant"]] += 1
        worst = max(worst, max(served.values()) - min(served.values()))
        if served[event["tenant"]] == totals[event["tenant"]]:
            break
    return worst


def grants_after(order: Sequence[Event], events: Sequence[Event], jobs: set[str]) -> list[Event]:
    """The grants in `order` made after every one of `jobs` had its first answer: from the
    moment those sessions were all waiting."""
    answered: dict[str, int] = {}
    for event in events:
        if event["event"] == "outcome" and event["job"] in jobs:
            answered.setdefault(event["job"], event["at_ms"])
    if set(answered) != jobs:
        return []
    cut = max(answered.values())
    return [event for event in order if event["at_ms"] > cut]


def mean_rank_gap(order: Sequence[Event]) -> float:
    """The spread of the tenants' mean places in the order (0: perfectly interleaved; two
    tenants of n jobs served one after the other: n)."""
    ranks: dict[str, list[int]] = {}
    for rank, event in enumerate(order):
        ranks.setdefault(event["tenant"], []).append(rank)
    means = [sum(r) / len(r) for r in ranks.values()]
    return max(means) - min(means) if means else 0.0


class Cluster(ChildProcesses[HostProcess]):
    def __init__(
        self,
        settings: WorkerSettings,
        *,
        hosts: int,
        workdir: Path,
        python: str = sys.executable,
    ) -> None:
        if hosts < 1:
            raise ValueError("at least one host")
        super().__init__()
        self.settings = settings
        self.workdir = workdir
        self.python = python
        self.host_count = hosts
        self._owner: dict[str, str] = {}
        self._reassigned: dict[str, list[str]] = {}

    # -- lifecycle ---------------------------------------------------------------------

    def start(self, timeout: float = 60.0) -> None:
        """Starts every host and waits until each can take work."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._settings_path().write_text(json.dumps(self.settings.to_json()))
        for index in range(self.host_count):
            self._spawn(f"host-{index + 1}")
        self.wait_for(
            lambda _: all(any(e["event"] == "ready" for e in h.events) for h in self.hosts),
            timeout,
            "every host ready",
        )

    def add_host(self, timeout: float = 60.0) -> HostProcess:
        """Starts one more host (e.g. to replace a killed one) and waits until it is ready."""
        host = self._spawn(f"host-{len(self.hosts) + 1}")
        self.wait_for(
            lambda _: any(e["event"] == "ready" for e in host.events),
            timeout,
            f"{host.name} ready",
        )
        return host

    def _settings_path(self) -> Path:
        return self.workdir / "worker-settings.json"

    def _spawn(self, name: str) -> HostProcess:
        stderr_path = self.workdir / f"{name}.stderr"
        with stderr_path.open("w") as stderr:
            process = subprocess.Popen(
                [
                    self.python,
                    "-m",
                    "harness.multihost.worker",
                    str(self._settings_path()),
                    "--name",
                    name,
                ],
                cwd=self.workdir,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=stderr,
                text=True,
                bufsize=1,
            )
        host = HostProcess(name, process, stderr_path)
        host.reader = threading.Thread(
            target=self._read, args=(host,), name=f"read-{name}", daemon=True
        )
        with self._cond:
            self.hosts.append(host)
        host.reader.start()
        return host

    def close(self) -> None:
        """Ends every host still running (kill -9: nothing is left to finish)."""
        for host in self.hosts:
            if host.process.poll() is None:
                host.process.kill()
            host.process.wait()
            if host.process.stdin is not None:
                with contextlib.suppress(OSError):
                    host.process.stdin.close()
            if host.reader is not None:
                host.reader.join(timeout=10)

    def __enter__(self) -> Cluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- work --------------------------------------------------------------------------

    def assign(self, jobs: Sequence[Job]) -> dict[str, list[Job]]:
        """Deals the jobs round-robin over the live hosts (each host gets its share as one
        assignment, so its sessions start together)."""
        live = self.live_hosts()
        if not live:
            raise ClusterError("no live host to assign jobs to")
        shares: dict[str, list[Job]] = {host.name: [] for host in live}
        for job in jobs:
            host = live[next(self._round_robin) % len(live)]
            shares[host.name].append(job)
        for name, share in shares.items():
            if share:
                self._send(self.host(name), share)
        return shares

    def _send(self, host: HostProcess, jobs: list[Job]) -> None:
        with self._cond:
            for job in jobs:
                self._jobs[job.id] = job
                self._owner[job.id] = host.name
            host.assigned.extend(jobs)
        line = json.dumps({"jobs": [{"id": j.id, "tenant": j.tenant} for j in jobs]})
        assert host.process.stdin is not None
        host.process.stdin.write(line + "\n")
        host.process.stdin.flush()

    def release(self, name: str, jobs: Sequence[Job]) -> None:
        """Has host `name` release the jobs' entities out of band (a cancel); the jobs'
        sessions go on wherever they run."""
        host = self.host(name)
        line = json.dumps({"release": [{"id": j.id, "tenant": j.tenant} for j in jobs]})
        assert host.process.stdin is not None
        host.process.stdin.write(line + "\n")
        host.process.stdin.flush()

    def owner(self, job_id: str) -> str | None:
        with self._cond:
            return self._owner.get(job_id)

    def kill(self, name: str) -> list[Job]:
        """kill -9 the host, then hand its unfinished jobs to the survivors; returns them."""
        host = self.host(name)
        host.killed = True
        host.process.send_signal(signal.SIGKILL)
        host.process.wait()
        # Read what it said before it died: a result it reported is a finished job.
        if host.reader is not None:
            host.reader.join(timeout=10)
        with self._cond:
            unfinished = [
                self._jobs[job_id]
                for job_id, owner in self._owner.items()
                if owner == name and job_id not in self._results
            ]
        survivors = self.live_hosts()
        if unfinished and not survivors:
            raise ClusterError(f"{name} died with {len(unfinished)} jobs and no survivor")
        for index, survivor in enumerate(survivors):
            share = unfinished[index :: len(survivors)]
            if share:
                self._reassigned.setdefault(survivor.name, []).extend(j.id for j in share)
                self._send(survivor, share)
        return unfinished

    def finish(self, timeout: float = 120.0) -> ClusterOutcome:
        """Waits until every assigned job has a result from a live host, then lets the
        hosts exit and collects everything."""
        self.wait_for(lambda _: len(self._results) == len(self._jobs), timeout, "every job ended")
        for host in self.live_hosts():
            assert host.process.stdin is not None
            host.process.stdin.close()
        deadline = time.monotonic() + timeout
        for host in self.hosts:
            if host.killed:
                continue
            try:
                host.process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                raise ClusterError(f"{host.name} did not exit:\n{host.stderr_tail()}") from None
            if host.reader is not None:
                host.reader.join(timeout=10)
            if host.process.returncode != 0:
                raise ClusterError(
                    f"{host.name} exited with {host.process.returncode}:\n{host.stderr_tail()}"
                )
        with self._cond:
            return ClusterOutcome(
                results=dict(self._results),
                hosts=list(self.hosts),
                events=list(self._events),
                reassigned={k: list(v) for k, v in self._reassigned.items()},
            )

    # -- what the hosts report ---------------------------------------------------------

    def wait_for(
        self, predicate: Callable[[list[Event]], bool], timeout: float, what: str = "condition"
    ) -> list[Event]:
        """Blocks until `predicate(all events so far)` holds; woken by every event."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while not predicate(self._events):
                left = deadline - time.monotonic()
                if left <= 0:
                    raise ClusterError(f"timed out waiting for {what}\n{self._diagnosis()}")
                died = [h for h in self.hosts if not h.killed and h.process.poll() not in (None, 0)]
                if died:
                    raise ClusterError(
                        f"{died[0].name} exited with {died[0].process.returncode} while "
                        f"waiting for {what}:\n{died[0].stderr_tail()}"
                    )
                self._cond.wait(min(left, 0.5))
            return list(self._events)

    def _diagnosis(self) -> str:
        missing = sorted(set(self._jobs) - set(self._results))
        lines = [f"jobs without a result: {missing[:20]}"]
        for host in self.hosts:
            lines.append(f"--- {host.name} (pid {host.pid}, killed={host.killed}) stderr:")
            lines.append(host.stderr_tail(1500))
        return "\n".join(lines)

    def _read(self, host: HostProcess) -> None:
        stdout: IO[str] | None = host.process.stdout
        assert stdout is not None
        with stdout:
            for line in stdout:
                try:
                    event: Event = json.loads(line)
                except ValueError:
                    continue
                event["host"] = host.name
                with self._cond:
                    host.events.append(event)
                    self._events.append(event)
                    # A dead host's stream ends with what it wrote before it died.
                    if event["event"] == "result" and self._owner.get(event["id"]) == host.name:
                        self._results[event["id"]] = event
                    self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()


def answered_creates(events: Sequence[Event]) -> set[str]:
    """Idempotency keys of creates E2B has answered."""
    return {e["key"] for e in events if e["event"] == "create_answered"}


def creates_in_flight(events: Sequence[Event], host: str | None = None) -> set[str]:
    """Idempotency keys of creates sent (by `host`, or by any) and not yet answered."""
    mine = [e for e in events if host is None or e["host"] == host]
    return {e["key"] for e in mine if e["event"] == "create_sent"} - answered_creates(mine)


def creating_with_sessions_queued(host: str) -> Callable[[Sequence[Event]], bool]:
    """A predicate: `host` has a create in flight at E2B and a session in the queue, the
    moment a crash costs the most (a slot held, a sandbox half made, waiters waiting)."""

    def holds(events: Sequence[Event]) -> bool:
        queued = any(
            e["host"] == host and e["event"] == "session" and e["kind"] == "queued" for e in events
        )
        return queued and bool(creates_in_flight(events, host))

    return holds


def read_gate(storage_url: str, account: str, *, pruned: bool = True) -> tuple[GateView, int]:
    """The account's admission state (the guest's public inspection view), and the storage
    clock's now; `pruned` drops the leases that have expired by then (what the next
    decision will see)."""
    backend = storage_from_uri(storage_url)
    try:
        now = backend.now_ms()
        view = inspect_gates(ScopedStorage(backend, tenant="", account=account), now, prune=pruned)
    finally:
        backend.close()
    return view, now


def wait_until_leases_leave(
    storage_url: str,
    account: str,
    lease_ids: set[str],
    *,
    timeout: float,
    poll_s: float = 0.05,
) -> int:
    """Waits until none of `lease_ids` is left in the stored gate (a decision pruned them
    after expiry, or their holder gave them back); returns the storage clock then.
    Storage offers no change notification, so this polls."""
    deadline = time.monotonic() + timeout
    while True:
        gate, now = read_gate(storage_url, account, pruned=False)
        held = {c.lease_id for c in gate.create_slots.leases} | {
            s.lease_id for s in gate.capacity.leases
        }
        if not held & lease_ids:
            return now
        if time.monotonic() >= deadline:
            raise ClusterError(f"leases {sorted(held & lease_ids)} still held after {timeout}s")
        time.sleep(poll_s)


def iter_jobs(run_id: str, tenants: Sequence[str], per_tenant: int) -> Iterator[Job]:
    """Each tenant's jobs together, the first tenant's first: a first-come-first-served
    queue would serve them one tenant after the other."""
    for tenant in tenants:
        for index in range(per_tenant):
            yield Job(id=f"{run_id}-{tenant}-{index + 1:02d}", tenant=tenant)


# -- the command line: `sandbox-provisioner multihost` (wired by harness/cli/main.py) ---------

MULTIHOST_API_KEY = "e2b_multihost_key"
TENANT_NAMES = "abcdefghijklmnopqrstuvwxyz"


_positive_int = positive(int)


def add_component_arguments(parser: argparse.ArgumentParser) -> None:
    """The component the hosts run, and where its compiled form is cached."""
    add_component_option(parser)


def add_multihost_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--hosts",
        type=_positive_int,
        default=3,
        help="host processes sharing the storage (default 3)",
    )
    parser.add_argument(
        "--jobs",
        type=_positive_int,
        default=24,
        help="CurationJobs, dealt round-robin over the hosts (default 24)",
    )
    parser.add_argument(
        "--tenants",
        type=_positive_int,
        default=2,
        help="tenants; each submits its jobs together (default 2, at most 26)",
    )
    parser.add_argument(
        "--storage",
        default=None,
        metavar="URL",
        help="shared storage (default: a redis-server started on a free loopback port for the run)",
    )
    parser.add_argument(
        "--kill",
        default=None,
        metavar="HOST",
        help="kill -9 this host (host-1, host-2, ...) while it has a create in "
        "flight and sessions queued; the survivors take its jobs",
    )
    parser.add_argument(
        "--create-slots",
        type=_positive_int,
        default=4,
        help="the account's concurrent creates (mock E2B and admission)",
    )
    parser.add_argument(
        "--max-sandboxes",
        type=_positive_int,
        default=10,
        help="the account's concurrent sandboxes (default 10)",
    )
    parser.add_argument(
        "--e2b-create-latency-ms",
        "--create-latency-ms",  # the old name, as simulate calls it --e2b-create-latency-ms
        dest="create_latency_ms",
        type=_positive_int,
        default=1000,
        help="mock E2B create latency (default 1000)",
    )
    parser.add_argument(
        "--create-lease-ms",
        type=_positive_int,
        default=3000,
        help="a create slot's lease: how long a dead host's slot stays taken "
        f"(default 3000; production default {AdmissionConfig.create_lease_ms})",
    )
    parser.add_argument("--turns", type=int, default=3, help="turns per session (default 3)")
    parser.add_argument(
        "--turn-ms", type=_positive_int, default=300, help="real time per turn (default 300)"
    )
    add_component_arguments(parser)
    parser.add_argument(
        "--finish-timeout-s",
        "--timeout-s",  # the old name; soak calls the same idea --finish-timeout-s
        dest="timeout_s",
        type=float,
        default=300.0,
        help="how long every job may take to end before giving up (default 300)",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON report")


@dataclass(frozen=True)
class RunShape:
    """What a run asks of the account and of each job (the defaults: a small, fast run)."""

    create_slots: int = 3
    max_sandboxes: int = 6
    create_latency_ms: int = 300
    create_lease_ms: int = 4000
    turns: int = 2
    turn_s: float = 0.3


def run_settings(
    storage_url: str,
    mock: MockE2BServer,
    api_key: str,
    command: str,
    shape: RunShape,
    *,
    component: Path,
    cache_dir: Path | None,
    planted_bug: str | None = None,
) -> WorkerSettings:
    """The hosts' settings for one run of `command` against `mock`: a fresh run id and
    account, admission mirroring the account (`multihost_config`)."""
    run_id = secrets.token_hex(3)
    return WorkerSettings(
        storage_url=storage_url,
        e2b_url=mock.url,
        api_key=api_key,
        account=f"{command}-{run_id}",
        run_id=run_id,
        config=multihost_config(mock.url, shape),
        turns=shape.turns,
        turn_s=shape.turn_s,
        component=str(component),
        cache_dir=None if cache_dir is None else str(cache_dir),
        planted_bug=planted_bug,
    )


def multihost_config(e2b_url: str, shape: RunShape) -> tuple[tuple[str, str], ...]:
    """The component's config for a run: admission mirrors the account; short leases and
    polls, so a dead host's permits come back within seconds."""
    return (
        ("e2b_api_url", e2b_url),
        ("create_slots", str(shape.create_slots)),
        ("create_rate_per_s", "50"),
        ("create_burst", str(shape.create_slots)),
        ("max_sandboxes", str(shape.max_sandboxes)),
        ("create_latency_ms", str(shape.create_latency_ms)),
        ("create_timeout_ms", str(max(1, shape.create_lease_ms - 500))),
        ("create_lease_ms", str(shape.create_lease_ms)),
        ("waiter_ttl_ms", "2000"),
        ("poll_min_ms", "100"),
        ("poll_max_ms", "1000"),
        ("backoff_base_ms", "100"),
        ("backoff_cap_ms", "1000"),
        ("sandbox_timeout_s", "300"),
    )


def run_multihost(args: argparse.Namespace) -> int:
    """Runs one workload over several host processes; exit 0 when every job completed
    within the limits with nothing orphaned, duplicated or leaked, 1 otherwise, 2 when it
    could not run."""
    from harness.mocks.e2b import MockE2BConfig, MockE2BServer
    from harness.multihost.redis_server import RedisServer, RedisServerError

    if args.tenants > len(TENANT_NAMES):
        return fail(f"at most {len(TENANT_NAMES)} tenants")
    if args.kill is not None and args.hosts < 2:
        return fail("--kill needs at least 2 hosts")
    if args.kill is not None and args.jobs // args.hosts <= args.create_slots:
        # The kill waits for its host to have sessions queued behind a create in flight;
        # a host with no more jobs than the account's create slots may never queue one
        # (it wins every slot when it starts first), and the wait would only time out.
        return fail(
            f"--kill needs more jobs per host than create slots, so the killed host has "
            f"sessions queued: --jobs {args.jobs} over {args.hosts} hosts is "
            f"{args.jobs // args.hosts} each, against {args.create_slots} create slots "
            f"(use --jobs {args.hosts * (args.create_slots + 1)} or more)"
        )
    # Compiles once into the cache the hosts then load from.
    loaded = load_or_fail(args.component, args.cache_dir)
    if isinstance(loaded, int):
        return loaded
    out = sys.stderr if args.json else sys.stdout
    with ExitStack() as stack:
        storage_url = args.storage
        if storage_url is None:
            try:
                storage_url = stack.enter_context(RedisServer()).url
            except RedisServerError as error:
                return fail(str(error))
        mock = stack.enter_context(
            MockE2BServer(
                MockE2BConfig(
                    api_key=MULTIHOST_API_KEY,
                    max_concurrent_creates=args.create_slots,
                    max_sandboxes=args.max_sandboxes,
                    create_latency_ms=args.create_latency_ms,
                )
            )
        )
        settings = run_settings(
            storage_url,
            mock,
            MULTIHOST_API_KEY,
            "multihost",
            RunShape(
                create_slots=args.create_slots,
                max_sandboxes=args.max_sandboxes,
                create_latency_ms=args.create_latency_ms,
                create_lease_ms=args.create_lease_ms,
                turns=max(0, args.turns),
                turn_s=args.turn_ms / 1000,
            ),
            component=loaded.path,
            cache_dir=args.cache_dir,
        )
        tenants = [f"tenant-{TENANT_NAMES[i]}" for i in range(args.tenants)]
        per_tenant = -(-args.jobs // args.tenants)
        jobs = list(iter_jobs(settings.run_id, tenants, per_tenant))[: args.jobs]
        workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="multihost-")))
        print(
            f"{args.hosts} hosts, {len(jobs)} jobs, storage {storage_url}, mock E2B {mock.url}",
            file=out,
            flush=True,
        )
        cluster = stack.enter_context(Cluster(settings, hosts=args.hosts, workdir=workdir))
        try:
            cluster.start(timeout=args.timeout_s)
            cluster.assign(jobs)
            kill_report = None
            if args.kill is not None:
                kill_report = kill_mid_create(cluster, args.kill, timeout=args.timeout_s)
                print(f"killed {args.kill}: {kill_report}", file=out, flush=True)
            outcome = cluster.finish(timeout=args.timeout_s)
        except (ClusterError, KeyError) as error:
            print(f"sandbox-provisioner: {error}", file=sys.stderr)
            return 1
        report = summarise(outcome, mock, storage_url, settings, kill_report)
    if args.json:
        print(json.dumps(report, indent=2, default=str))
    else:
        print(json.dumps(report["summary"], indent=2), file=out)
    return 0 if report["summary"]["ok"] else 1


def kill_mid_create(cluster: Cluster, name: str, *, timeout: float) -> dict[str, Any]:
    """kill -9 `name` once it has a create in flight and sessions queued; reports what it
    held and how long its create slots took to come back (lease expiry)."""
    cluster.host(name)  # KeyError for an unknown host, before waiting
    cluster.wait_for(creating_with_sessions_queued(name), timeout, f"{name} mid-create")
    entity_type = cluster.settings.session_spec().name
    entities = {f"{entity_type}/{job.id}" for job in cluster.host(name).assigned}
    unfinished = cluster.kill(name)
    url, account = cluster.settings.storage_url, cluster.settings.account
    gate, killed_ms = read_gate(url, account)
    held = {c.lease_id: c.expires_ms for c in gate.create_slots.leases if c.entity in entities}
    reclaimed_ms = None
    if held:
        reclaimed_ms = wait_until_leases_leave(url, account, set(held), timeout=timeout)
    return {
        "host": name,
        "unfinished_jobs": len(unfinished),
        "create_slots_held": len(held),
        "lease_expiry_ms": max(held.values()) - killed_ms if held else None,
        "reclaimed_after_ms": None if reclaimed_ms is None else reclaimed_ms - killed_ms,
    }


def summarise(
    outcome: ClusterOutcome,
    mock: MockE2BServer,
    storage_url: str,
    settings: WorkerSettings,
    kill_report: dict[str, Any] | None,
) -> dict[str, Any]:
    stats = mock.stats()
    config = dict(settings.config)
    slots, max_sandboxes = int(config["create_slots"]), int(config["max_sandboxes"])
    orphans = mock.orphans(set())
    gate, _ = read_gate(storage_url, settings.account)
    states = [result["state"] for result in outcome.results.values()]
    grants = outcome.grant_order()
    all_waiting = grants_after(grants, outcome.events, set(outcome.results))
    summary = {
        "jobs": len(states),
        "completed": states.count("Completed"),
        "failed": len(states) - states.count("Completed"),
        "max_concurrent_creates": stats.max_concurrent_creates,
        "create_slots": slots,
        "max_running_sandboxes": stats.max_running_sandboxes,
        "max_sandboxes": max_sandboxes,
        "sandboxes_created": stats.sandboxes_created,
        "adopted_by_idempotency_key": stats.idempotent_replays,
        "duplicate_sandboxes": stats.duplicates,
        "orphaned_sandboxes": len(orphans),
        "throttled_by_e2b": stats.throttled,
        "permits_left": gate.permits_held,
        # Waiters still expected back; a ticket left by a host killed mid-decision is
        # counted apart (it holds nothing, and is dropped when a decision meets it).
        "waiters_left": len(gate.live_waiters),
        "dead_tickets_left": len(gate.dead_tickets),
        "grant_order": "".join(str(e["tenant"])[-1] for e in grants),
        "max_tenant_lead": max_tenant_lead(grants),
        "mean_place_gap": round(mean_rank_gap(grants), 2),
        "max_tenant_lead_once_all_waiting": max_tenant_lead(all_waiting),
        "kill": kill_report,
    }
    summary["ok"] = (
        summary["failed"] == 0
        and stats.max_concurrent_creates <= slots
        and stats.max_running_sandboxes <= max_sandboxes
        and not orphans
        and stats.duplicates == 0
        and summary["permits_left"] == 0
        and summary["waiters_left"] == 0
    )
    return {"summary": summary, **outcome.to_json()}
