"""Shared pieces of the hardening tests (no tests here): the probe guest, loopback HTTP
servers that misbehave on purpose, and storage snapshots."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Generator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from host.runtime.component_runtime import Budgets, ComponentRuntime, HostServices
from host.runtime.loader import LoadedComponent, load_component
from host.services.http_gateway import HttpGateway
from host.storage.memory import MemoryBackend
from provisioner.model import Invocation, Outcome
from tests.builders import invocation
from tests.conftest import API_KEY
from tests.doubles import RecordingTelemetrySink
from tests.guests.build import build_probe_component

# Every failure code docs/contract.md documents (guest and host).
DOCUMENTED_CODES = frozenset(
    {
        "invalid_invocation",
        "invalid_config",
        "unknown_operation",
        "agent_not_configured",
        "e2b_api_key_missing",
        "storage_unavailable",
        "storage_contention",
        "queue_timeout",
        "retry_budget_exhausted",
        "e2b_unauthorized",
        "e2b_bad_request",
        "e2b_template_not_found",
        "e2b_unexpected_status",
        "e2b_denied",
        "e2b_unavailable",
        "released_during_create",
        "internal_error",
        "fuel_exhausted",
        "deadline_exceeded",
        "memory_exhausted",
        "guest_trap",
        "result_too_large",
        "malformed_result",
        "host_error",
    }
)
ACTIONS = frozenset(
    {"SandboxReady", "SandboxQueued", "SandboxReleased", "SandboxStatus", "SandboxFailed"}
)


@pytest.fixture(scope="session")
def probe_component() -> LoadedComponent:
    """The probe guest, built once per input hash and compiled once per wasm hash."""
    return load_component(build_probe_component())


@dataclass
class ProbeHost:
    runtime: ComponentRuntime
    storage: MemoryBackend
    telemetry: RecordingTelemetrySink
    gateway: HttpGateway

    def call(self, mode: str, tenant: str = "attacker", **config: str) -> Outcome:
        return self.runtime.invoke(probe_invocation(mode, tenant, **config))

    def close(self) -> None:
        self.runtime.close()
        self.gateway.close()


def probe_invocation(mode: str, tenant: str = "attacker", **config: str) -> Invocation:
    return invocation(
        (("probe_mode", mode), *config.items()),
        tenant=tenant,
        entity_type="Probe",
        entity_id="probe-1",
        trigger_action="Probe",
        trace_id="probe-trace",
    )


def make_probe_host(
    loaded: LoadedComponent,
    gateway: HttpGateway | None = None,
    *,
    storage: MemoryBackend | None = None,
    budgets: Budgets | None = None,
) -> ProbeHost:
    backend = storage if storage is not None else MemoryBackend()
    gateway = gateway or HttpGateway("http://127.0.0.1:9", API_KEY, allow_private_network=True)
    telemetry = RecordingTelemetrySink()
    runtime = ComponentRuntime(loaded, HostServices(backend, gateway, telemetry), budgets)
    return ProbeHost(runtime, backend, telemetry, gateway)


# -- loopback HTTP servers ---------------------------------------------------------------


@dataclass(frozen=True)
class Reply:
    status: int = 200
    headers: tuple[tuple[str, str], ...] = ()
    body: bytes = b"{}"


@dataclass
class SeenRequest:
    method: str
    path: str
    headers: dict[str, str]


class _QuietServer(ThreadingHTTPServer):
    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # a client that hangs up (a timeout, a reset) is expected here, not news


@dataclass
class LoopbackServer:
    """A plain HTTP server on 127.0.0.1 that answers with `answer(request)` and counts."""

    answer: Callable[[SeenRequest], Reply]
    seen: list[SeenRequest] = field(default_factory=list)

    def __post_init__(self) -> None:
        owner = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _handle(self) -> None:
                length = int(self.headers.get("content-length") or 0)
                if length:
                    self.rfile.read(length)
                request = SeenRequest(self.command, self.path, dict(self.headers.items()))
                owner.seen.append(request)
                reply = owner.answer(request)
                self.send_response(reply.status)
                for name, value in reply.headers:
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(reply.body)))
                self.end_headers()
                self.wfile.write(reply.body)

            do_GET = do_POST = do_DELETE = do_PUT = do_PATCH = _handle

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._server = _QuietServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def serving(answer: Callable[[SeenRequest], Reply]) -> Generator[LoopbackServer, None, None]:
    server = LoopbackServer(answer)
    try:
        yield server
    finally:
        server.close()


def json_reply(status: int, body: Any, *headers: tuple[str, str]) -> Reply:
    content_type = ("Content-Type", "application/json")
    return Reply(status, (content_type, *headers), json.dumps(body).encode())


# -- storage snapshots ------------------------------------------------------------------


class SnapshotBackend(MemoryBackend):
    """A memory backend whose whole content can be compared before and after a call."""

    def snapshot(self) -> dict[tuple[str, str], tuple[bytes, int]]:
        with self._lock:
            return {slot: (value, version) for slot, (value, version, _) in self._data.items()}

    def namespaces(self) -> set[str]:
        with self._lock:
            return {namespace for namespace, _ in self._data}
