"""One host process of a multi-host run: `python -m harness.multihost.worker SETTINGS.json`.

The process loads the component, opens the shared storage (a `redis://` URL, so every host
shares one store and one clock) and the shared mock E2B, then runs CurationJob sessions with
the session driver (`harness/simulator/driver.py`) on the example spec
(`examples/temper_agent.ioa.toml`), under Temper's rules as `simulate` runs it:
the spec's timers are the only way back for a queued entity (Queued's timer is the poll;
`WorkerSettings.poll_s` sets it), a SandboxFailed goes where the spec sends it, and the
host retries nothing. Work arrives on stdin, one JSON line per assignment
(`{"jobs": [{"id": ..., "tenant": ...}, ...]}`), and each assignment runs in its own driver
at once (a line `{"release": [{"id": ..., "tenant": ...}]}` instead cancels those entities
out of band: the spec's `Fail` from `Created`, whose trigger releases whatever the entity
holds, reported as `cancel_released`), so a coordinator can hand this host a dead host's
jobs mid-run. End of stdin means no more work: the process exits once its sessions have
ended.

Everything the coordinator needs comes back on stdout as JSON lines, each stamped with the
storage backend's clock (`at_ms`), which all hosts share:
- `ready` once the host can take work;
- `granted` when the component grants a create slot to one of this host's sessions, with
  `gate_version`, the store's version of the gate write that committed it (a total order
  of every host's grants);
- `create_sent` / `create_answered` around each create request to E2B (by idempotency key,
  with the `job` its metadata names);
- `kill_sent` / `kill_answered` around each kill (`sandbox_id`), and `list_sent` /
  `list_answered` around each list of sandboxes (`query`), so a coordinator can kill this
  host in the middle of a release;
- `outcome` for every invocation (action, and the queue reason or failure code);
- `session` for each session event: `submitted`; `queued` (each SandboxQueued, with its
  params); `ready` (`sandbox_id`); `turn`; `releasing`; `completed`; `failed` (`reason`,
  `action`); and `timer` (a timer other than the poll), `rejected`, `unhandled_failure`
  as the executor reports them;
- `result` when a session has ended (`state` is the entity's final status; a Failed one has
  a typed `reason`, `code: message`; `release_error` is the last release's failure, if it
  never succeeded afterwards);
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
import re
import sys
import threading
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TextIO
from urllib.parse import urlsplit

from harness.simulator.detsim import with_poll
from harness.simulator.driver import DriverSettings, Invoker, RealTimeLoop, SessionDriver
from harness.simulator.executor import ConfigHook, Entity, Executor, overlay_config
from harness.simulator.invokers import ComponentInvoker
from harness.simulator.model import Job, SessionEvent
from harness.simulator.runner import SessionScript
from harness.simulator.scenario import EXAMPLE_SPEC
from harness.simulator.spec import Spec, load_spec, packaged_spec
from host.runtime.component_runtime import ComponentRuntime, HostServices
from host.runtime.loader import load_component
from host.services.http_gateway import HttpGateway
from host.services.telemetry import InvocationTag
from host.storage import storage_from_uri
from host.storage.base import StorageBackend
from host.storage.forwarding import ForwardingBackend
from provisioner.gates.view import GATE_KEY
from provisioner.model import (
    SANDBOX_FAILED,
    SANDBOX_QUEUED,
    Invocation,
    Outcome,
)
from provisioner.ports import HttpError, HttpRequest, HttpResponse, LogLevel

MODULE = "sandbox_provisioner"
# The caller's own cancel in the example spec: `Fail` fires from Created and its trigger
# releases the entity (the component finds an unrecorded sandbox by its idempotency key).
CANCEL_ACTION = "Fail"
RELEASE_TRIGGER = "release_sandbox"
_TYPED_REASON = re.compile(r"^[a-z][a-z0-9_]*(: |$)")

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
    # Queued's timer (whole seconds, as Temper's after_seconds), in place of the spec's:
    # the component drops a waiter that has not polled for `waiter_ttl_ms`, so a run with a
    # short waiter TTL needs a poll inside it. None keeps the spec's.
    poll_s: int | None = 1
    # The spec the sessions run (a path); None: the packaged example spec.
    spec: str | None = None
    session_threads: int = 16
    component: str | None = None
    cache_dir: str | None = None
    # Test-only: one of PLANTED_BUGS, or None (the module docstring says what each does).
    planted_bug: str | None = None

    def __post_init__(self) -> None:
        if self.planted_bug is not None and self.planted_bug not in PLANTED_BUGS:
            raise ValueError(f"unknown planted bug {self.planted_bug!r}; known: {PLANTED_BUGS}")
        if self.poll_s is not None and self.poll_s < 1:
            raise ValueError("poll_s must be at least 1 (Temper's timers count whole seconds)")

    def driver_settings(self) -> DriverSettings:
        # No keep-up stop: a host of a multi-host run serves what it is given; the spec's
        # own guards decide what is too late.
        return DriverSettings(
            turns=self.turns,
            turn_s=self.turn_s,
            workers=self.session_threads,
            run_id=self.run_id,
            keep_up=False,
        )

    def session_spec(self) -> Spec:
        """The spec every session of the run executes (its name is the entity type)."""
        spec = load_spec(self.spec) if self.spec else packaged_spec(EXAMPLE_SPEC)
        if self.poll_s is not None:
            spec = with_poll(spec, SessionScript.for_spec(spec), self.poll_s)
        return spec

    def configure(self) -> ConfigHook:
        """Lays the run's integration config over each trigger's, as `simulate` does."""
        return overlay_config(dict(self.config))

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


class _GateVersions(ForwardingBackend):
    """The storage backend, noting per thread the version its last write of the account's
    gate produced. A grant is committed by exactly such a write, just before the guest
    reports it on the same thread, and versions come from one counter in the shared store:
    so they order every host's grants exactly, where timestamps could not."""

    def __init__(self, inner: StorageBackend) -> None:
        super().__init__(inner)
        self._local = threading.local()

    def last_gate_version(self) -> int | None:
        version: int | None = getattr(self._local, "version", None)
        return version

    def compare_and_swap(
        self, namespace: str, key: str, expected: int | None, value: bytes, ttl: int | None
    ) -> int:
        version = self.inner.compare_and_swap(namespace, key, expected, value, ttl)
        if key == GATE_KEY:
            self._local.version = version
        return version


class _HostTelemetry:
    """Grants are reported. Progress events are nothing more: Temper broadcasts them and
    never resets a timer on one (crates/temper-server/src/state/dispatch/wasm/callbacks.rs)."""

    def __init__(self, storage: _GateVersions) -> None:
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
            job = _created_for(request.body)
            return self._reported(request, deadline_ms, api_key, writer, "create", key=key, job=job)
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


def _created_for(body: bytes) -> str | None:
    """The job a create is for, from its metadata (so a job's history has its creates)."""
    try:
        metadata = json.loads(body).get("metadata") or {}
    except (ValueError, AttributeError):
        return None
    job = metadata.get("temper_entity_id")
    return job if isinstance(job, str) else None


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


class _SessionEvents:
    """Maps the executor's events onto the worker's `session` lines, and notes per job what
    its releases answered (for `release_error`)."""

    def __init__(self, script: SessionScript, writer: EventWriter) -> None:
        self.script = script
        self.writer = writer
        self.release_error: dict[str, str | None] = {}

    def __call__(self, event: SessionEvent) -> None:
        detail = event.detail
        kind: str | None = None
        fields: dict[str, Any] = {}
        if event.kind in ("submitted", "turn", "rejected", "unhandled_failure"):
            kind, fields = event.kind, dict(detail)
        elif event.kind == "timer" and detail.get("state") not in self.script.queued_states:
            kind, fields = "timer", dict(detail)  # the poll is not news: it runs every poll_s
        elif event.kind == "answered" and detail.get("trigger") == RELEASE_TRIGGER:
            params = detail.get("params") or {}
            # Any answer but SandboxFailed is the release's (SandboxReleased, or the name
            # the trigger's released_action gives it, such as FailureReleased).
            self.release_error[event.job.id] = (
                None
                if detail.get("success") and detail.get("action") != SANDBOX_FAILED
                else _typed_reason(str(detail.get("action")), params)
            )
        elif event.kind == "transition":
            kind, fields = self._transition(detail)
        if kind is not None:
            self.writer.emit(
                "session",
                job=event.job.id,
                tenant=event.job.tenant,
                kind=kind,
                phase=event.phase,
                detail=fields,
            )

    def _transition(self, detail: Mapping[str, Any]) -> tuple[str | None, dict[str, Any]]:
        before, after = detail.get("before"), detail.get("after")
        action = str(detail.get("action"))
        params: dict[str, Any] = dict(detail.get("params") or {})
        if action == "SandboxQueued":
            return "queued", params
        if before == after:
            return None, {}
        if after == self.script.working_state:
            return "ready", {"sandbox_id": params.get("sandbox_id")}
        if after in self.script.completed_states:
            return "completed", params
        if after in self.script.failure_states and before in self.script.failure_states:
            return None, {}  # the release on the way into Failed: the session failed before
        if after in self.script.failure_states:
            return "failed", {
                "action": action,
                "reason": _typed_reason(action, params),
                "queued": before in self.script.queued_states,
            }
        if after == "Releasing":
            return "releasing", {}
        return None, {}


def _typed_reason(action: str, fields: Mapping[str, Any]) -> str:
    """`code: message`: the component's own code for a SandboxFailed; for Fail (the
    trigger's on_failure) the `code: message` Temper hands it; else the action, in snake
    case, and its message (`provision_timeout: provision_sandbox gave no answer`)."""
    code, message = fields.get("code"), fields.get("message")
    if code and action == SANDBOX_FAILED:
        return f"{code}: {message}" if message else str(code)
    error = str(fields.get("error_message") or fields.get("error") or "")
    if error and _TYPED_REASON.match(error):
        return error
    snake = re.sub(r"(?<!^)(?=[A-Z])", "_", action).lower()
    return f"{snake}: {error}" if error else snake


def run_assignment(
    jobs: list[Job],
    spec: Spec,
    invoker: Invoker,
    settings: WorkerSettings,
    writer: EventWriter,
) -> None:
    script = SessionScript.for_spec(spec)
    events = _SessionEvents(script, writer)
    driver = SessionDriver(
        spec,
        {MODULE: invoker},
        settings.driver_settings(),
        script=script,
        configure=settings.configure(),
        on_event=events,
    )
    try:
        run = driver.run(jobs)
    finally:
        driver.close()
    entities = driver.executor.entities
    for result in run.results:
        entity = entities[result.job.id]
        reason = result.reason
        if result.failed:
            reason = _typed_reason(driver.runner.failure_start(entity).action, entity.fields)
        writer.emit(
            "result",
            **{**result.to_json(), "reason": reason},
            release_error=events.release_error.get(result.job.id),
            polls=entity.fields.get("polls"),
        )


def _run_cancel(
    job: Job,
    spec: Spec,
    invoker: _RecordingInvoker,
    settings: WorkerSettings,
    writer: EventWriter,
) -> None:
    """An out-of-band cancel of `job`'s entity, as a caller on another node would dispatch
    it: the spec's `Fail` from Created, whose trigger releases what the entity holds (the
    session, on whichever host, goes on). Retried by nothing: Failed has no timer."""
    loop = RealTimeLoop({MODULE: invoker}, workers=1)
    answers: list[str] = []

    def on_event(event: SessionEvent) -> None:
        if event.kind == "answered" and event.detail.get("trigger") == RELEASE_TRIGGER:
            answers.append(str(event.detail.get("action")))

    executor = Executor(
        spec, loop, run_id=settings.run_id, configure=settings.configure(), on_event=on_event
    )
    entity: Entity = executor.create(job)
    rejected = executor.dispatch(entity, CANCEL_ACTION, {"error_message": "cancelled"})
    try:
        if rejected is None:
            loop.run(lambda: entity.in_flight == 0)
    finally:
        loop.close(wait=True)
    writer.emit("cancel_released", job=job.id, action=answers[-1] if answers else rejected)


def serve(settings: WorkerSettings, name: str, work: TextIO, out: TextIO) -> int:
    loaded = load_component(
        Path(settings.component) if settings.component else None,
        cache_dir=Path(settings.cache_dir) if settings.cache_dir else None,
    )
    spec = settings.session_spec()
    storage = _GateVersions(storage_from_uri(settings.storage_url))
    telemetry = _HostTelemetry(storage)
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
                            target=_run_cancel,
                            args=(job, spec, invoker, settings, writer),
                            name=f"release-{job.id}",
                        )
                        thread.start()
                        threads.append(thread)
                    continue
                thread = threading.Thread(
                    target=run_assignment,
                    args=(_jobs_from_line(line), spec, invoker, settings, writer),
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
    parser = argparse.ArgumentParser(prog="python -m harness.multihost.worker")
    parser.add_argument("settings", type=Path, help="a JSON file of WorkerSettings")
    parser.add_argument("--name", default=f"host-{os.getpid()}")
    args = parser.parse_args(argv)
    settings = WorkerSettings.from_json(json.loads(args.settings.read_text()))
    return serve(settings, args.name, sys.stdin, sys.stdout)


if __name__ == "__main__":
    sys.exit(main())
