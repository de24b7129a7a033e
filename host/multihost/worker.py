"""One host process of a multi-host run: `python -m host.multihost.worker SETTINGS.json`.

The process loads the component, opens the shared storage (a `redis://` URL, so every host
shares one store and one clock) and the shared mock E2B, then runs CurationJob sessions with
the session driver. Work arrives on stdin, one JSON line per assignment
(`{"jobs": [{"id": ..., "tenant": ...}, ...]}`), and each assignment runs in its own driver
at once (a line `{"release": [{"id": ..., "tenant": ...}]}` instead releases those entities
out of band, as a cancel would, reported as `cancel_released`), so a coordinator can hand
this host a dead host's jobs mid-run. End of stdin means
no more work: the process exits once its sessions have ended.

Everything the coordinator needs comes back on stdout as JSON lines, each stamped with the
storage backend's clock (`at_ms`), which all hosts share:
- `ready` once the host can take work;
- `granted` when the component grants a create slot to one of this host's sessions, with
  `gate_version`, the store's version of the gate write that committed it (a total order
  of every host's grants);
- `create_sent` / `create_answered` around each create request to E2B (by idempotency key);
- `kill_sent` / `kill_answered` around each kill (`sandbox_id`), and `list_sent` /
  `list_answered` around each list of sandboxes (`query`), so a coordinator can kill this
  host in the middle of a release;
- `outcome` for every invocation (action, and the queue reason or failure code);
- `session` for each session event (queued, ready, completed, failed, ...);
- `result` when a session has ended (and released what it held);
- `exit` last.
Diagnostics go to stderr.

Planted bugs, for showing that the soak's audit catches what it claims to (test-only, inert
unless `WorkerSettings.planted_bug` names one; `sandbox-provisioner soak` sets it only
through its hidden `--planted-bug` flag):
- `release-forgets-before-kill`: the host answers every kill with 204 without sending it,
  so a release forgets its record while the sandbox still runs at E2B (an orphan).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TextIO
from urllib.parse import urlsplit

from host.runtime.component_runtime import ComponentRuntime, HostServices
from host.runtime.loader import load_component
from host.services.http_gateway import HttpGateway
from host.services.telemetry import InvocationTag
from host.sessions.invocations import RELEASE, job_invocation
from host.sessions.invokers import ComponentInvoker
from host.sessions.legacy_driver import DriverSettings, LegacySessionEvent, SessionDriver
from host.sessions.model import Job
from host.storage import storage_from_uri
from host.storage.base import StorageBackend
from provisioner.admission.inspect import GATE_KEY
from provisioner.model import SANDBOX_FAILED, SANDBOX_QUEUED, Invocation, Outcome
from provisioner.ports import Entry, HttpError, HttpRequest, HttpResponse, LogLevel

RELEASE_FORGETS_BEFORE_KILL = "release-forgets-before-kill"
PLANTED_BUGS: tuple[str, ...] = (RELEASE_FORGETS_BEFORE_KILL,)


@dataclass(frozen=True)
class WorkerSettings:
    """What every host process of one run shares (written as JSON for the processes)."""

    storage_url: str
    e2b_url: str
    api_key: str
    account: str
    run_id: str
    config: tuple[tuple[str, str], ...] = ()
    turns: int = 2
    turn_s: float = 0.2
    # Liveness is not under test here: long enough that only a real hang trips it.
    liveness_s: float = 60.0
    # A host outlives storage and E2B outages by retrying retryable failures, as Temper
    # re-dispatches them; these bound a run that never recovers.
    failure_retries: int = 1_000
    failure_retry_delay_s: float = 0.2
    release_attempts: int = 1_000
    session_threads: int = 16
    component: str | None = None
    cache_dir: str | None = None
    # Test-only: one of PLANTED_BUGS, or None (the module docstring says what each does).
    planted_bug: str | None = None

    def __post_init__(self) -> None:
        if self.planted_bug is not None and self.planted_bug not in PLANTED_BUGS:
            raise ValueError(f"unknown planted bug {self.planted_bug!r}; known: {PLANTED_BUGS}")

    def driver_settings(self) -> DriverSettings:
        return DriverSettings(
            turns=self.turns,
            turn_s=self.turn_s,
            liveness_s=self.liveness_s,
            failure_retries=self.failure_retries,
            failure_retry_delay_s=self.failure_retry_delay_s,
            release_attempts=self.release_attempts,
            workers=self.session_threads,
            config=self.config,
            run_id=self.run_id,
        )

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["config"] = [list(pair) for pair in self.config]
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> WorkerSettings:
        values = dict(data)
        values["config"] = tuple((str(k), str(v)) for k, v in values.get("config", ()))
        return cls(**values)


class EventWriter:
    """JSON lines on stdout, one writer at a time, stamped with the shared clock."""

    def __init__(self, out: TextIO, clock: Callable[[], int]) -> None:
        self._out = out
        self._clock = clock
        self._lock = threading.Lock()

    def emit(self, event: str, **fields: Any) -> None:
        line = json.dumps({"event": event, "at_ms": self._clock(), **fields}, default=str)
        with self._lock:
            self._out.write(line + "\n")
            self._out.flush()


@dataclass
class _Routing:
    """Which driver runs which job, so progress events reach the right session."""

    drivers: dict[str, SessionDriver] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, jobs: list[Job], driver: SessionDriver) -> None:
        with self.lock:
            for job in jobs:
                self.drivers[job.id] = driver

    def get(self, job_id: str) -> SessionDriver | None:
        with self.lock:
            return self.drivers.get(job_id)


class _GateVersions:
    """The storage backend, noting per thread the version its last write of the account's
    gate produced. A grant is committed by exactly such a write, just before the guest
    reports it on the same thread, and versions come from one counter in the shared store:
    so they order every host's grants exactly, where timestamps could not."""

    def __init__(self, inner: StorageBackend) -> None:
        self.inner = inner
        self._local = threading.local()

    def last_gate_version(self) -> int | None:
        version: int | None = getattr(self._local, "version", None)
        return version

    def get(self, namespace: str, key: str) -> Entry | None:
        return self.inner.get(namespace, key)

    def compare_and_swap(
        self, namespace: str, key: str, expected: int | None, value: bytes, ttl: int | None
    ) -> int:
        version = self.inner.compare_and_swap(namespace, key, expected, value, ttl)
        if key == GATE_KEY:
            self._local.version = version
        return version

    def delete(self, namespace: str, key: str, expected: int | None) -> bool:
        return self.inner.delete(namespace, key, expected)

    def now_ms(self) -> int:
        return self.inner.now_ms()

    def close(self) -> None:
        self.inner.close()


class _HostTelemetry:
    """Progress events are signs of life for their session; grants are reported."""

    def __init__(self, routing: _Routing, storage: _GateVersions) -> None:
        self.routing = routing
        self.storage = storage
        self.writer: EventWriter | None = None

    def log(self, tag: InvocationTag, level: LogLevel, message: str) -> None:
        if level in (LogLevel.WARN, LogLevel.ERROR):
            print(f"guest {level.value} [{tag.tenant} {tag.entity_id}] {message}", file=sys.stderr)

    def progress(self, tag: InvocationTag, event: dict[str, Any]) -> None:
        if event.get("event") == "admission_granted" and self.writer is not None:
            self.writer.emit(
                "granted",
                job=tag.entity_id,
                tenant=tag.tenant,
                lease_id=event.get("lease_id"),
                attempt=event.get("attempt"),
                gate_version=self.storage.last_gate_version(),
            )
        driver = self.routing.get(tag.entity_id)
        if driver is not None:
            driver.sign_of_life(tag.entity_id)


class _ReportingGateway(HttpGateway):
    """Reports each create, kill and list as it leaves for E2B and when it is answered, so a
    coordinator can kill this host while one is in flight."""

    writer: EventWriter | None = None
    planted_bug: str | None = None

    def send(
        self,
        request: HttpRequest,
        *,
        deadline_ms: int | None = None,
        api_key: str | None = None,
    ) -> HttpResponse:
        writer = self.writer
        method = request.method.upper()
        path = urlsplit(request.url).path.rstrip("/")
        if method == "DELETE" and self.planted_bug == RELEASE_FORGETS_BEFORE_KILL:
            return HttpResponse(status=204, headers=(), body=b"")
        if writer is None:
            return super().send(request, deadline_ms=deadline_ms, api_key=api_key)
        if method == "POST" and path.endswith("/sandboxes"):
            key = dict((k.lower(), v) for k, v in request.headers).get("idempotency-key")
            return self._reported(request, deadline_ms, api_key, writer, "create", key=key)
        if method == "DELETE" and "/sandboxes/" in path:
            sandbox_id = path.rsplit("/", 1)[-1]
            return self._reported(
                request, deadline_ms, api_key, writer, "kill", sandbox_id=sandbox_id
            )
        if method == "GET" and path.endswith("/sandboxes"):
            query = urlsplit(request.url).query
            return self._reported(request, deadline_ms, api_key, writer, "list", query=query)
        return super().send(request, deadline_ms=deadline_ms, api_key=api_key)

    def _reported(
        self,
        request: HttpRequest,
        deadline_ms: int | None,
        api_key: str | None,
        writer: EventWriter,
        what: str,
        **fields: Any,
    ) -> HttpResponse:
        writer.emit(f"{what}_sent", **fields)
        try:
            response = super().send(request, deadline_ms=deadline_ms, api_key=api_key)
        except HttpError as error:
            writer.emit(f"{what}_answered", **fields, error=error.kind.value)
            raise
        writer.emit(f"{what}_answered", **fields, status=response.status)
        return response


class _RecordingInvoker:
    """The component, with every outcome reported."""

    def __init__(self, inner: ComponentInvoker, writer: EventWriter) -> None:
        self._inner = inner
        self._writer = writer

    def invoke(self, invocation: Invocation) -> Outcome:
        outcome = self._inner.invoke(invocation)
        operation = dict(invocation.config).get("operation", "provision")
        detail: dict[str, Any] = {}
        if outcome.action == SANDBOX_QUEUED:
            detail["reason"] = outcome.params.get("reason")
            detail["in_use"] = outcome.params.get("in_use")
            detail["limit"] = outcome.params.get("limit")
        if outcome.action == SANDBOX_FAILED and outcome.error is not None:
            detail["code"] = outcome.error.code
            detail["retryable"] = outcome.error.retryable
        if outcome.action != SANDBOX_FAILED and "sandbox_id" in outcome.params:
            detail["sandbox_id"] = outcome.params.get("sandbox_id")
        self._writer.emit(
            "outcome",
            job=invocation.entity_id,
            operation=operation,
            action=outcome.action,
            **detail,
        )
        return outcome


def _jobs_from_line(line: str) -> list[Job]:
    data = json.loads(line)
    return [Job(id=str(item["id"]), tenant=str(item["tenant"])) for item in data["jobs"]]


def _releases_from_line(line: str) -> list[Job]:
    data = json.loads(line)
    return [Job(id=str(item["id"]), tenant=str(item["tenant"])) for item in data["release"]]


def _run_release(
    job: Job, invoker: _RecordingInvoker, settings: WorkerSettings, writer: EventWriter
) -> None:
    """An out-of-band Release for `job`'s entity, as Temper dispatches one when an entity is
    cancelled: the session (on whichever host) goes on; retried while retryable."""
    invocation = job_invocation(
        job,
        operation=RELEASE,
        trigger_action="Cancel",
        trigger_params={},
        entity_state={"status": "Cancelling"},
        config=settings.config,
        run_id=settings.run_id,
    )
    for _ in range(max(1, settings.release_attempts)):
        outcome = invoker.invoke(invocation)
        if outcome.error is None or not outcome.error.retryable:
            break
        time.sleep(settings.failure_retry_delay_s)
    writer.emit("cancel_released", job=job.id, action=outcome.action)


def _run_assignment(
    jobs: list[Job],
    invoker: _RecordingInvoker,
    settings: WorkerSettings,
    routing: _Routing,
    writer: EventWriter,
) -> None:
    def on_event(event: LegacySessionEvent) -> None:
        writer.emit(
            "session",
            job=event.job.id,
            tenant=event.job.tenant,
            kind=event.kind,
            phase=str(event.phase),
            detail=event.detail,
        )

    driver = SessionDriver(invoker, settings.driver_settings(), on_event=on_event)
    routing.add(jobs, driver)
    try:
        run = driver.run(jobs)
    finally:
        driver.close()
    for result in run.results:
        writer.emit(
            "result",
            **result.to_json(),
            release_error=result.release_error,
            failure_retries=result.failure_retries,
        )


def serve(settings: WorkerSettings, name: str, work: TextIO, out: TextIO) -> int:
    loaded = load_component(
        Path(settings.component) if settings.component else None,
        cache_dir=Path(settings.cache_dir) if settings.cache_dir else None,
    )
    routing = _Routing()
    storage = _GateVersions(storage_from_uri(settings.storage_url))
    telemetry = _HostTelemetry(routing, storage)
    gateway = _ReportingGateway(settings.e2b_url, settings.api_key, allow_private_network=True)
    gateway.planted_bug = settings.planted_bug
    services = HostServices(
        storage=storage, http=gateway, telemetry=telemetry, account=settings.account
    )
    try:
        with ComponentRuntime(loaded, services) as runtime:
            writer = EventWriter(out, storage.now_ms)
            telemetry.writer = writer
            gateway.writer = writer
            invoker = _RecordingInvoker(ComponentInvoker(runtime), writer)
            writer.emit("ready", host=name, pid=os.getpid(), from_cache=loaded.from_cache)
            threads: list[threading.Thread] = []
            for line in work:
                if not line.strip():
                    continue
                if '"release"' in line:
                    for job in _releases_from_line(line):
                        thread = threading.Thread(
                            target=_run_release,
                            args=(job, invoker, settings, writer),
                            name=f"release-{job.id}",
                        )
                        thread.start()
                        threads.append(thread)
                    continue
                thread = threading.Thread(
                    target=_run_assignment,
                    args=(_jobs_from_line(line), invoker, settings, routing, writer),
                    name=f"assignment-{len(threads)}",
                )
                thread.start()
                threads.append(thread)
            for thread in threads:
                thread.join()
            writer.emit("exit", host=name)
    finally:
        gateway.close()
        storage.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m host.multihost.worker")
    parser.add_argument("settings", type=Path, help="a JSON file of WorkerSettings")
    parser.add_argument("--name", default=f"host-{os.getpid()}")
    args = parser.parse_args(argv)
    settings = WorkerSettings.from_json(json.loads(args.settings.read_text()))
    return serve(settings, args.name, sys.stdin, sys.stdout)


if __name__ == "__main__":
    sys.exit(main())
