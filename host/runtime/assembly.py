"""Assembling a host: component + storage + HTTP gateway + telemetry, as one runtime."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from host.runtime.component_runtime import Budgets, ComponentRuntime, HostServices
from host.runtime.loader import LoadedComponent, Pooling, load_component
from host.runtime.paths import state_dir
from host.services.http_gateway import HttpGateway
from host.services.telemetry import LoggingTelemetry, TelemetrySink
from host.storage import storage_from_uri

API_KEY_ENV = "E2B_API_KEY"


def default_storage_url() -> str:
    return f"sqlite:///{(state_dir() / 'state.db').resolve()}"


@contextmanager
def open_runtime(
    *,
    e2b_url: str,
    api_key: str,
    storage_url: str | None = None,
    account: str = "default",
    component: Path | None = None,
    loaded: LoadedComponent | None = None,
    telemetry: TelemetrySink | None = None,
    budgets: Budgets | None = None,
    allow_private_network: bool = False,
    pooling: Pooling | None = None,
    temperfs_url: str | None = None,
) -> Iterator[ComponentRuntime]:
    """A ready runtime; closes its storage, HTTP client and epoch ticker on exit.

    `api_key` is the host's E2B key, used when an invocation's config brings no usable
    `e2b_api_key` (`host/runtime/credentials.py`). `temperfs_url` is the Temper API base
    the guest may reach for the conversation storage (None: none). `allow_private_network`
    lets these URLs resolve to loopback or private addresses (a mock on this machine); a
    production host leaves it off. `pooling` loads the component on wasmtime's pooling
    allocator (ignored when `loaded` is given); for every core, see host/runtime/pool.py."""
    loaded = loaded or load_component(component, pooling=pooling)
    storage = storage_from_uri(storage_url or default_storage_url())
    gateway = HttpGateway(
        e2b_url,
        api_key,
        temperfs_url=temperfs_url,
        allow_private_network=allow_private_network,
    )
    services = HostServices(
        storage=storage,
        http=gateway,
        telemetry=telemetry or LoggingTelemetry(),
        account=account,
    )
    runtime = ComponentRuntime(loaded, services, budgets)
    try:
        yield runtime
    finally:
        runtime.close()
        gateway.close()
        storage.close()
