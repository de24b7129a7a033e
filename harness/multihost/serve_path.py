"""`sandbox-provisioner soak --path serve`: the path a Temper deployment takes, under chaos.

Sessions run in this process, on the session driver and the example spec, as the soak's
worker hosts run them. Each integration invocation runs the shim (`dist/temper_shim.wasm`)
in the Temper-ABI host (`harness/temper_abi`). The shim calls one of several `sandbox-provisioner
serve` processes, which share one Redis and run the component against the mock E2B. Each
tenant presents its own token (`serve --tenants`). The invoker spreads the calls over the
live services, round-robin, as a load balancer in front of them would.

A killed `serve` loses nothing the audit should forgive. The shim meets a reset connection
and answers a typed transient failure. The spec's `Fail` then releases what the entity
holds, through another `serve`, which finds the sandbox by its idempotency key.

Faults (`SERVE_FAULT_KINDS`, on the soak's seeded schedule; the E2B bursts and the Redis
restart are the multihost soak's own):
- `kill_serve_mid_create`: kill -9 a `serve` with a provision call in flight while a create
  is in flight at E2B (a replacement starts);
- `redis_restart`, `rate_429`, `capacity_429`, `status_5xx`, `hangs`, `slow_creates`.
The pace work's kinds (`PACE_FAULT_KINDS`): `kill_serve_mid_hold`, kill -9 a `serve` while it
holds a queued answer (the permit promised to that waiter passes on at its claim deadline).
Each is a name in that tuple and a `_fault_<name>` method of `ServeSoak`.

The planted bug `release-forgets-before-kill` puts a proxy between the services and the
mock. The proxy answers every kill 204 without passing it on, so a release forgets its
record while the sandbox still runs. The audit must then fail.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import itertools
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO, cast

import httpx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from harness.mocks.shared.server import LoopbackServer
from harness.multihost.run import ChildProcess, ChildProcesses, ClusterError, Event
from harness.multihost.soak import (
    SHARED_FAULT_KINDS,
    SOAK_TENANTS,
    FaultRecord,
    Soak,
    soak_with,
)
from harness.multihost.worker import (
    MODULE,
    RELEASE_FORGETS_BEFORE_KILL,
    EventWriter,
    WorkerSettings,
    run_assignment,
)
from harness.simulator.model import Job
from harness.simulator.served import outcome_of, shim_context
from harness.temper_abi import AbiInvocation, TemperAbiModule
from host.cli.options import fail
from host.runtime.paths import default_shim
from host.serve.tenants import token_digest
from host.storage import storage_from_uri
from provisioner.model import SANDBOX_QUEUED, Invocation, Outcome

if TYPE_CHECKING:
    from harness.mocks.e2b import MockE2BServer
    from host.storage.base import StorageBackend

SHIM = default_shim()
SERVE_FAULT_KINDS: tuple[str, ...] = ("kill_serve_mid_create", *SHARED_FAULT_KINDS)
# Added by the pace work: "kill_serve_mid_held_answer", "temper_api_failure".
PACE_FAULT_KINDS: tuple[str, ...] = ("kill_serve_mid_hold",)
SERVE_STARTUP_S = 300.0


@dataclass
class ServeProcess(ChildProcess):
    """One `serve` and the calls the invoker has in flight to it."""

    url: str = ""
    in_flight: dict[int, str] = field(default_factory=dict)  # call id -> operation


def tenant_token(run_id: str, tenant: str) -> str:
    return f"soak-{run_id}-{tenant}"


def tenants_file(path: Path, run_id: str, tenants: Sequence[str]) -> Path:
    """One client per tenant, covering that tenant only."""
    entries = [
        f'[[client]]\ntoken_sha256 = "{token_digest(tenant_token(run_id, t)).hex()}"\n'
        f'tenants = ["{t}"]\nname = "{t}"\n'
        for t in tenants
    ]
    path.write_text("\n".join(entries))
    return path


class ServeFleet(ChildProcesses[ServeProcess]):
    """`serve` processes on one storage, and the sessions that call them through the shim.

    It offers what `Soak` drives a cluster with (assign, results, events, live_hosts, kill,
    add_host, finish); its hosts are the services."""

    def __init__(
        self,
        settings: WorkerSettings,
        *,
        serves: int,
        workdir: Path,
        tenants: Sequence[str],
        e2b_url: str,
        workers: int = 8,
    ) -> None:
        super().__init__()
        self.settings = settings
        self.workdir = workdir
        self.serve_count = serves
        self.tenants = list(tenants)
        self.e2b_url = e2b_url
        self.workers = workers
        self._threads: list[threading.Thread] = []
        self._calls = itertools.count(1)
        self._storage: StorageBackend | None = None
        self._shim: TemperAbiModule | None = None

    # -- lifecycle ---------------------------------------------------------------------

    def start(self, timeout: float = SERVE_STARTUP_S) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        tenants_file(self.workdir / "tenants.toml", self.settings.run_id, self.tenants)
        self._storage = storage_from_uri(self.settings.storage_url)
        self._shim = TemperAbiModule.load(SHIM)
        for _ in range(self.serve_count):
            self.add_host(timeout)

    def add_host(self, timeout: float = SERVE_STARTUP_S) -> ServeProcess:
        name = f"serve-{len(self.hosts) + 1}"
        stderr_path = self.workdir / f"{name}.stderr"
        env = {**os.environ, "SOAK_E2B_API_KEY": self.settings.api_key}
        env.pop("SANDBOX_PROVISIONER_TOKEN", None)
        if self.settings.cache_dir:
            env["SANDBOX_PROVISIONER_CACHE"] = self.settings.cache_dir
        args = [
            sys.executable, "-m", "host.cli", "serve",
            "--listen", "127.0.0.1:0",
            "--workers", str(self.workers),
            "--tenants", str(self.workdir / "tenants.toml"),
            "--storage", self.settings.storage_url,
            "--account", self.settings.account,
            "--e2b-url", self.e2b_url,
            "--api-key-env", "SOAK_E2B_API_KEY",
            "--allow-private-network",
        ]  # fmt: skip
        if self.settings.component:
            args += ["--component", self.settings.component]
        with stderr_path.open("wb") as stderr:
            process = subprocess.Popen(
                args, cwd=self.workdir, env=env, stdout=subprocess.DEVNULL, stderr=stderr
            )
        host = ServeProcess(name, process, stderr_path)
        with self._cond:
            self.hosts.append(host)
        host.url = self._await_listening(host, timeout)
        return host

    def _await_listening(self, host: ServeProcess, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if host.process.poll() is not None:
                raise ClusterError(f"{host.name} exited at start:\n{host.stderr_tail()}")
            for line in host.stderr_tail(100_000).splitlines():
                with contextlib.suppress(ValueError):
                    event = json.loads(line)
                    if isinstance(event, dict) and event.get("event") == "listening":
                        return f"http://127.0.0.1:{event['port']}"
            time.sleep(0.1)
        raise ClusterError(f"{host.name} did not listen within {timeout} s")

    def close(self) -> None:
        for host in self.hosts:
            if host.process.poll() is None:
                host.process.kill()
            host.process.wait()
        for thread in self._threads:
            thread.join(timeout=5)
        if self._shim is not None:
            self._shim.close()
        if self._storage is not None:
            self._storage.close()

    def __enter__(self) -> ServeFleet:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- what the soak drives ----------------------------------------------------------

    def held_requests(self, host: ServeProcess) -> int:
        """The requests `host` holds open now (its `/metrics` gauge; 0 when unreadable)."""
        token = tenant_token(self.settings.run_id, self.tenants[0])
        try:
            answer = httpx.get(
                f"{host.url}/metrics", headers={"Authorization": f"Bearer {token}"}, timeout=2
            )
        except httpx.HTTPError:
            return 0
        for line in answer.text.splitlines():
            if line.startswith("sandbox_provisioner_held_requests "):
                return int(float(line.split()[1]))
        return 0

    def assign(self, jobs: Sequence[Job]) -> None:
        """Runs the jobs' sessions here, at once, each invocation through the shim."""
        with self._cond:
            for job in jobs:
                self._jobs[job.id] = job
        writer = EventWriter(cast(TextIO, _Sink(self._record)), self._now_ms)
        invoker = ShimInvoker(self, writer)
        thread = threading.Thread(
            target=run_assignment,
            args=(list(jobs), self.settings.session_spec(), invoker, self.settings, writer),
            name=f"sessions-{len(self._threads)}",
            daemon=True,
        )
        self._threads.append(thread)
        thread.start()

    def kill(self, name: str) -> list[Job]:
        """kill -9 the service; sessions live here, so none needs another home."""
        host = self.host(name)
        host.killed = True
        host.process.send_signal(signal.SIGKILL)
        host.process.wait()
        return []

    def release(self, name: str, jobs: Sequence[Job]) -> None:
        raise NotImplementedError("the serve path has no out-of-band release fault")

    def finish(self, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        with self._cond:
            while len(self._results) < len(self._jobs):
                left = deadline - time.monotonic()
                if left <= 0:
                    missing = sorted(set(self._jobs) - set(self._results))
                    tails = "\n".join(f"--- {h.name}\n{h.stderr_tail(800)}" for h in self.hosts)
                    raise ClusterError(f"jobs without a result: {missing[:20]}\n{tails}")
                self._cond.wait(min(left, 0.5))

    # -- the invoker's side ------------------------------------------------------------

    def pick(self) -> ServeProcess:
        live = self.live_hosts()
        if not live:  # every service down: the call fails as it would against Temper
            return self.hosts[-1]
        return live[next(self._round_robin) % len(live)]

    def _now_ms(self) -> int:
        assert self._storage is not None
        try:
            return self._storage.now_ms()
        except Exception:  # Redis down: the local clock is close enough for a log stamp
            return int(time.time() * 1000)

    def _record(self, event: Event) -> None:
        with self._cond:
            self._events.append(event)
            host = event.get("host")
            if host is not None:
                with contextlib.suppress(KeyError):
                    self.host(host).events.append(event)
            if event["event"] == "result":
                self._results[event["id"]] = event
            self._cond.notify_all()

    def call(self, context: dict[str, Any], writer: EventWriter) -> tuple[str, AbiInvocation]:
        assert self._shim is not None
        host = self.pick()
        call_id = next(self._calls)
        config = context["integration_config"]
        operation = config.get("operation", "provision")
        config["provisioner_url"] = f"{host.url}/v1/invocations"
        config["provisioner_token"] = tenant_token(self.settings.run_id, context["tenant"])
        with self._cond:
            host.in_flight[call_id] = operation
        writer.emit("call_sent", host=host.name, call=call_id, job=context["entity_id"],
                    operation=operation)  # fmt: skip
        try:
            report = self._shim.invoke(context)
        finally:
            with self._cond:
                host.in_flight.pop(call_id, None)
            writer.emit("call_answered", host=host.name, call=call_id)
        return host.name, report


class _Sink(io.TextIOBase):
    """EventWriter's stream: each JSON line becomes an event in the fleet."""

    def __init__(self, record: Callable[[Event], None]) -> None:
        self._record = record

    def write(self, text: str) -> int:
        for line in text.splitlines():
            if line.strip():
                self._record(json.loads(line))
        return len(text)


class ShimInvoker:
    """A session's invocation as Temper makes it: the context to the shim, which calls a
    `serve`; the shim's terminal result back as the outcome the executor dispatches.

    A transient shim failure is sent again, as the spec's typed route for it would
    (`[[action.triggers.failure_routes]] category = "transient"` back to the trigger,
    shim/README.md). The session executor has no typed routes, and its spec's plain
    `on_failure = "Fail"` would release the entity at once. A create that a killed `serve`
    left in flight at E2B lands after that release has looked for it, and its sandbox runs
    on until E2B's own timeout. Sending the same context again reconciles instead: the
    component adopts the sandbox by its idempotency key."""

    def __init__(
        self, fleet: ServeFleet, writer: EventWriter, *, retries: int = 6, backoff_s: float = 0.25
    ) -> None:
        self.fleet = fleet
        self.writer = writer
        self.retries = retries
        self.backoff_s = backoff_s

    def invoke(self, invocation: Invocation) -> Outcome:
        context = shim_context(invocation, MODULE)
        for attempt in range(self.retries + 1):
            host, report = self.fleet.call(json.loads(json.dumps(context)), self.writer)
            outcome = outcome_of(report)
            detail: dict[str, Any] = {}
            if outcome.action == SANDBOX_QUEUED:
                detail["reason"] = outcome.params.get("reason")
            if outcome.error is not None:
                detail["code"] = outcome.error.code
            self.writer.emit("outcome", host=host, job=invocation.entity_id,
                             operation=context["integration_config"].get("operation", "provision"),
                             action=outcome.action, attempt=attempt, **detail)  # fmt: skip
            if outcome.success or outcome.error is None or not outcome.error.retryable:
                break
            time.sleep(min(2.0, self.backoff_s * 2**attempt))
        return outcome


class ServeSoak(Soak):
    """The soak's run and audit over a `ServeFleet`."""

    fault_kinds = SERVE_FAULT_KINDS + PACE_FAULT_KINDS

    def _fault_kill_serve_mid_create(self, record: FaultRecord) -> None:
        cut = self._kill_serve_providing(record, lambda _: self.mock.stats().creates_in_flight > 0)
        if cut is not None:
            calls, in_flight_at_e2b = cut
            record.detail.update(hit=bool(calls) and in_flight_at_e2b > 0)

    def _fault_kill_serve_mid_hold(self, record: FaultRecord) -> None:
        fleet = self.cluster
        assert isinstance(fleet, ServeFleet)
        cut = self._kill_serve_providing(record, lambda host: fleet.held_requests(host) > 0)
        if cut is not None:
            calls, _ = cut
            record.detail.update(hit=bool(calls))

    def _kill_serve_providing(
        self, record: FaultRecord, also: Callable[[ServeProcess], bool]
    ) -> tuple[set[int], int] | None:
        """Once a serve has a provision call in flight and `also` holds for it (None if the
        window never opens), kills it and starts another: the calls it cut and the creates
        in flight at E2B just before."""
        fleet = self.cluster
        assert isinstance(fleet, ServeFleet)

        def victim() -> str | None:
            for host in fleet.live_hosts():
                if "provision" in host.in_flight.values() and also(host):
                    return host.name
            return None

        name = self._window(record, victim)
        if name is None:
            return None
        calls = set(fleet.host(name).in_flight)
        in_flight_at_e2b = self.mock.stats().creates_in_flight
        self._kill_and_replace(name)
        record.detail.update(host=name, calls_cut=len(calls))
        return calls, in_flight_at_e2b


# -- the planted bug's proxy -----------------------------------------------------------------


def forgetful_proxy(upstream: str) -> LoopbackServer:
    """E2B as the services see it with the planted bug: every kill is answered 204 and
    never sent, everything else is passed on."""
    client = httpx.AsyncClient(base_url=upstream, timeout=None)

    async def forward(request: Request) -> Response:
        path = request.url.path
        if request.method == "DELETE" and "/sandboxes/" in path:
            return Response(status_code=204)
        headers = [(k, v) for k, v in request.headers.items() if k.lower() != "host"]
        answer = await client.request(
            request.method,
            path,
            params=request.query_params,
            headers=headers,
            content=await request.body(),
        )
        kept = {k: v for k, v in answer.headers.items() if k.lower() not in _HOP_HEADERS}
        return Response(answer.content, answer.status_code, headers=kept)

    methods = ["GET", "POST", "PUT", "PATCH", "DELETE"]
    app = Starlette(routes=[Route("/{path:path}", forward, methods=methods)])
    return LoopbackServer(app, lambda: None, name="forgetful E2B proxy")


_HOP_HEADERS = frozenset({"content-length", "transfer-encoding", "connection", "content-encoding"})


def serve_path_settings(settings: WorkerSettings, e2b_url: str) -> WorkerSettings:
    """The run's settings with the component's E2B URL pointed at `e2b_url`."""
    config = tuple((k, e2b_url if k == "e2b_api_url" else v) for k, v in settings.config)
    return replace(settings, e2b_url=e2b_url, config=config)


@contextlib.contextmanager
def e2b_for_services(mock_url: str, planted_bug: str | None) -> Iterator[str]:
    """The E2B URL the services call: the mock, or the planted bug's proxy in front of it."""
    if planted_bug != RELEASE_FORGETS_BEFORE_KILL:
        yield mock_url
        return
    with forgetful_proxy(mock_url) as proxy:
        yield proxy.url


def run_serve_soak(args: argparse.Namespace) -> int:
    """`soak --path serve`: exit 0 when the audit is clean, 1 on a violation, 2 when the
    soak could not run."""
    serves = 2 if args.hosts is None else args.hosts
    if serves < 2:
        return fail("the service path's soak needs at least 2 serve processes")
    if not SHIM.is_file():
        return fail(f"{SHIM} is missing: run ./build.sh")

    def open_fleet(
        stack: ExitStack, settings: WorkerSettings, mock: MockE2BServer, workdir: Path
    ) -> ServeFleet:
        e2b_url = stack.enter_context(e2b_for_services(mock.url, settings.planted_bug))
        return stack.enter_context(
            ServeFleet(
                serve_path_settings(settings, e2b_url),
                serves=serves,
                workdir=workdir,
                tenants=SOAK_TENANTS,
                e2b_url=e2b_url,
            )
        )

    return soak_with(args, serves, ServeSoak, open_fleet)


__all__ = [
    "PACE_FAULT_KINDS",
    "SERVE_FAULT_KINDS",
    "ServeFleet",
    "ServeSoak",
    "ShimInvoker",
    "e2b_for_services",
    "outcome_of",
    "run_serve_soak",
    "serve_path_settings",
]
