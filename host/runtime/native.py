"""The guest run in this process, with the same services and contract as the component."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from host.runtime.component_runtime import HostServices
from host.runtime.credentials import gateway_call, key_arguments
from host.services.http_gateway import HttpGateway
from host.services.namespaces import ScopedStorage
from host.services.telemetry import InvocationTag, LoggingTelemetry, TelemetrySink
from host.storage.base import StorageBackend
from provisioner.app import run
from provisioner.model import Invocation, Outcome
from provisioner.ports import (
    Clock,
    Http,
    HttpError,
    HttpErrorKind,
    HttpRequest,
    HttpResponse,
    LogLevel,
    Ports,
    Random,
    Telemetry,
)


def native_ports(
    backend: StorageBackend,
    *,
    tenant: str,
    account: str,
    http: Http,
    clock: Clock,
    random: Random,
    telemetry: Telemetry,
) -> Ports:
    return Ports(
        storage=ScopedStorage(backend, tenant=tenant, account=account),
        http=http,
        clock=clock,
        random=random,
        telemetry=telemetry,
    )


class _TaggedTelemetry:
    """The guest's Telemetry port, forwarding to a host sink with the invocation's tag."""

    def __init__(self, sink: TelemetrySink, tag: InvocationTag) -> None:
        self._sink = sink
        self._tag = tag

    def log(self, level: LogLevel, message: str) -> None:
        self._sink.log(self._tag, level, message)

    def progress(self, event: dict[str, Any]) -> None:
        self._sink.progress(self._tag, event)


class _FunctionClock:
    def __init__(self, now_ms: Callable[[], int]) -> None:
        self._now_ms = now_ms

    def now_ms(self) -> int:
        return self._now_ms()


class _FunctionRandom:
    def __init__(self, next_u64: Callable[[], int]) -> None:
        self._next_u64 = next_u64

    def next_u64(self) -> int:
        return self._next_u64()


class _KeyedHttp:
    """The gateway with the invocation's own E2B key (None: the host's)."""

    def __init__(self, gateway: HttpGateway, api_key: str | None) -> None:
        self._gateway = gateway
        self._api_key = api_key

    def send(self, request: HttpRequest) -> HttpResponse:
        return self._gateway.send(request, **key_arguments(self._api_key))


class NativeRuntime:
    """Same `invoke` contract as `ComponentRuntime`, without the sandbox or its budgets:
    for tests, simulations and the benchmark that prices the component boundary."""

    def __init__(self, services: HostServices) -> None:
        self.services = services
        self._clock = _FunctionClock(services.clock_ms or services.storage.now_ms)
        self._random = _FunctionRandom(services.random_u64)

    def invoke(self, invocation: Invocation) -> Outcome:
        gateway = self.services.http
        call = gateway_call(gateway, invocation)
        invocation = call.invocation
        tag = InvocationTag(
            invocation.tenant, invocation.entity_type, invocation.entity_id, invocation.trace_id
        )
        ports = native_ports(
            self.services.storage,
            tenant=invocation.tenant,
            account=self.services.account,
            http=_KeyedHttp(gateway, call.api_key),
            clock=self._clock,
            random=self._random,
            telemetry=_TaggedTelemetry(self.services.telemetry, tag),
        )
        return run(invocation, ports)

    def close(self) -> None:
        pass


class _NoHttp:
    """The Http port of an invocation that must not reach E2B: every call is refused."""

    def send(self, request: HttpRequest) -> HttpResponse:
        raise HttpError(HttpErrorKind.DENIED, "this invocation may not send HTTP")


def run_offline(invocation: Invocation, backend: StorageBackend, *, account: str) -> Outcome:
    """The guest run in this process over `backend` with no HTTP, the backend's clock and
    no randomness it could need: for reads such as `operation = inspect`."""
    tag = InvocationTag(
        invocation.tenant, invocation.entity_type, invocation.entity_id, invocation.trace_id
    )
    ports = native_ports(
        backend,
        tenant=invocation.tenant,
        account=account,
        http=_NoHttp(),
        clock=_FunctionClock(backend.now_ms),
        random=_FunctionRandom(_no_random),
        telemetry=_TaggedTelemetry(LoggingTelemetry(), tag),
    )
    return run(invocation, ports)


def _no_random() -> int:
    raise RuntimeError("an offline invocation draws no random numbers")
