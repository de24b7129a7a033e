"""One host process of a multi-host run: `python -m host.multihost.worker SETTINGS.json`.

The process loads the component, opens the shared storage (a `redis://` URL, so every host
shares one store and one clock) and the shared mock E2B, then runs CurationJob sessions with
the session driver. Work arrives on stdin, one JSON line per assignment
(`{"jobs": [{"id": ..., "tenant": ...}, ...]}`), and each assignment runs in its own driver
at once, so a coordinator can hand this host a dead host's jobs mid-run. End of stdin means
no more work: the process exits once its sessions have ended.

Everything the coordinator needs comes back on stdout as JSON lines, each stamped with the
storage backend's clock (`at_ms`), which all hosts share:
- `ready` once the host can take work;
- `granted` when the component grants a create slot to one of this host's sessions, with
  `gate_version`, the store's version of the gate write that committed it (a total order
  of every host's grants);
- `create_sent` / `create_answered` around each create request to E2B (by idempotency key);
- `outcome` for every invocation (action, and the queue reason or failure code);
- `session` for each session event (queued, ready, completed, failed, ...);
- `result` when a session has ended (and released what it held);
- `exit` last.
Diagnostics go to stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TextIO

from host.runtime.component_runtime import ComponentRuntime, HostServices
from host.runtime.loader import load_component
from host.services.http_gateway import HttpGateway
from host.services.telemetry import InvocationTag
from host.sessions.driver import DriverSettings, SessionDriver
from host.sessions.invokers import ComponentInvoker
from host.sessions.model import Job, SessionEvent
from host.storage import storage_from_uri
from host.storage.base import StorageBackend
from provisioner.admission.inspect import GATE_KEY
from provisioner.model import SANDBOX_FAILED, SANDBOX_QUEUED, Invocation, Outcome
from provisioner.ports import Entry, HttpError, HttpRequest, HttpResponse, LogLevel


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
    # Queued sessions a host wakes when one of its own sessions frees a permit. Temper has
    # no such wake-up (a queued session comes back after its retry_after_ms), and a wake
    # that only sees one host's sessions favours that host's waiters: off by default.
    wake_per_permit: int = 0
    component: str | None = None
    cache_dir: str | None = None

    def driver_settings(self) -> DriverSettings:
        return DriverSettings(
            turns=self.turns,
            turn_s=self.turn_s,
            liveness_s=self.liveness_s,
            failure_retries=self.failure_retries,
            failure_retry_delay_s=self.failure_retry_delay_s,
            release_attempts=self.release_attempts,
            workers=self.session_threads,
            wake_per_permit=self.wake_per_permit,
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
    """Reports each create as it leaves for E2B and when it is answered, so a coordinator
    can kill this host while a create is in flight."""

    writer: EventWriter | None = None

    def send(self, request: HttpRequest, *, deadline_ms: int | None = None) -> HttpResponse:
        writer = self.writer
        is_create = request.method.upper() == "POST" and request.url.rstrip("/").endswith(
            "/sandboxes"
        )
        if not is_create or writer is None:
            return super().send(request, deadline_ms=deadline_ms)
        key = dict((k.lower(), v) for k, v in request.headers).get("idempotency-key")
        writer.emit("create_sent", key=key)
        try:
            response = super().send(request, deadline_ms=deadline_ms)
        except HttpError as error:
            writer.emit("create_answered", key=key, error=error.kind.value)
            raise
        writer.emit("create_answered", key=key, status=response.status)
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


def _run_assignment(
    jobs: list[Job],
    invoker: _RecordingInvoker,
    settings: WorkerSettings,
    routing: _Routing,
    writer: EventWriter,
) -> None:
    def on_event(event: SessionEvent) -> None:
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
