"""What several benchmarks share: a quiet telemetry sink, hosts over a mock E2B, loading,
and the `main` of a figure's module run alone."""

from __future__ import annotations

import argparse
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.table import Row, print_rows
from harness.mocks.e2b import MockE2BConfig, MockE2BServer
from harness.simulator.invocations import job_invocation
from harness.simulator.model import Job
from host.runtime.component_runtime import ComponentRuntime, HostServices
from host.runtime.loader import LoadedComponent, load_component
from host.runtime.native import NativeRuntime
from host.services.http_gateway import HttpGateway
from host.services.telemetry import InvocationTag
from host.storage.base import StorageBackend
from host.storage.memory import MemoryBackend
from provisioner.model import Invocation
from provisioner.ports import LogLevel

API_KEY = "e2b_bench_key"
# The admission gates opened wide: a benchmark that is not about pacing must not be paced.
WIDE_OPEN = (
    ("create_rate_per_s", "1000"),
    ("create_burst", "1000"),
    ("create_slots", "1000"),
    ("max_sandboxes", "100000"),
)


class QuietTelemetry:
    """Drops everything: the benchmarks price the guest, not the host's logging."""

    def log(self, tag: InvocationTag, level: LogLevel, message: str) -> None:
        pass

    def progress(self, tag: InvocationTag, event: dict[str, Any]) -> None:
        pass


@contextmanager
def mock_e2b(**config: Any) -> Iterator[MockE2BServer]:
    with MockE2BServer(MockE2BConfig(api_key=API_KEY, **config)) as server:
        yield server


@dataclass
class Hosts:
    """A component host, a probe host and a native host sharing the same services."""

    services: HostServices
    component: ComponentRuntime
    native: NativeRuntime
    probe: ComponentRuntime | None

    def close(self) -> None:
        self.component.close()
        if self.probe is not None:
            self.probe.close()
        self.services.http.close()
        self.services.storage.close()


def open_hosts(
    loaded: LoadedComponent,
    e2b_url: str,
    *,
    probe: LoadedComponent | None = None,
    storage: StorageBackend | None = None,
) -> Hosts:
    services = HostServices(
        storage=storage if storage is not None else MemoryBackend(),
        http=HttpGateway(e2b_url, API_KEY, allow_private_network=True),
        telemetry=QuietTelemetry(),
        account="bench",
    )
    return Hosts(
        services=services,
        component=ComponentRuntime(loaded, services),
        native=NativeRuntime(services),
        probe=None if probe is None else ComponentRuntime(probe, services),
    )


def invocation(
    e2b_url: str,
    entity_id: str,
    *,
    operation: str = "provision",
    tenant: str = "bench",
    config: tuple[tuple[str, str], ...] = WIDE_OPEN,
) -> Invocation:
    """What the Temper runtime hands the guest for one CurationJob (the product's builder)."""
    return job_invocation(
        Job(entity_id, tenant),
        operation=operation,
        trigger_action="Provision",
        trigger_params={},
        entity_state={},
        config=(("e2b_api_url", e2b_url), *config),
        run_id="bench",
    )


def load(path: Path | None = None, cache_dir: Path | None = None) -> LoadedComponent:
    return load_component(path, cache_dir=cache_dir)


def load_cached(path: Path | None = None) -> LoadedComponent:
    """The component as a host loads it after its first start: from the compile cache.
    (Instances of a component compiled in this process started about 10% slower in one
    trial; loading every compared component the same way keeps that out of the ratios.)"""
    loaded = load_component(path)
    return loaded if loaded.from_cache else load_component(path)


def run_alone(doc: str, figure: Callable[[bool], Sequence[Row]]) -> None:
    """`python -m benchmarks.NAME [--quick]`: one figure's rows, as `python -m benchmarks`
    prints them; `figure` takes `quick`."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    print_rows(figure(parser.parse_args().quick))
