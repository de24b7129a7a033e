"""The resource operations through the built component (wasmtime, the host's imports) and
natively with the same services: the same answers, and the guest's date parsing of the
provider's reset headers works inside CPython 3.14 in the component."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import pytest

from harness.simulator.simulated_ports import VirtualClock
from host.runtime.component_runtime import ComponentRuntime, HostServices
from host.runtime.loader import LoadedComponent
from host.runtime.native import NativeRuntime
from host.services.http_gateway import HttpGateway
from host.storage.memory import MemoryBackend
from provisioner.model import Outcome
from tests.doubles import RecordingTelemetrySink
from tests.guest.resource_harness import gate_invocation

GATE = {
    "resource": "llm",
    "resource.llm.concurrency": "1",
    "resource.llm.itpm": "6000",
    "resource.llm.otpm": "600",
}


class Gates:
    def __init__(self, runtime: ComponentRuntime | NativeRuntime, clock: VirtualClock) -> None:
        self.runtime = runtime
        self.clock = clock

    def call(self, operation: str, entity: str, params: dict[str, Any] | None = None) -> Outcome:
        config = {**GATE, "operation": operation}
        return self.runtime.invoke(gate_invocation(config, "acme", entity, params))


@pytest.fixture(params=["component", "native"])
def gates(request: pytest.FixtureRequest) -> Iterator[Gates]:
    clock = VirtualClock()
    gateway = HttpGateway("https://api.e2b.test", "k")
    services = HostServices(
        MemoryBackend(clock.now_ms), gateway, RecordingTelemetrySink(), clock_ms=clock.now_ms
    )
    if request.param == "component":
        loaded: LoadedComponent = request.getfixturevalue("loaded_component")
        runtime: ComponentRuntime | NativeRuntime = ComponentRuntime(loaded, services)
    else:
        runtime = NativeRuntime(services)
    yield Gates(runtime, clock)
    runtime.close()
    gateway.close()


def test_acquire_settle_release_through_the_component(gates: Gates) -> None:
    first = gates.call("acquire", "a", {"estimated_input_tokens": 1000})
    assert first.action == "ResourceGranted" and first.success, first
    wait = gates.call("acquire", "b", {"estimated_input_tokens": 1000})
    assert wait.action == "ResourceQueued" and wait.success, wait
    assert wait.params["reason"] == "concurrency" and wait.params["position"] == 1
    reset = datetime.fromtimestamp((gates.clock.now_ms() + 4_000) / 1000, tz=UTC)
    settled = gates.call(
        "settle",
        "a",
        {
            "input_tokens": 1500,
            "output_tokens": 700,
            "status": 429,
            "headers": {
                "anthropic-ratelimit-output-tokens-remaining": "0",
                "anthropic-ratelimit-output-tokens-reset": reset.isoformat(),
            },
        },
    )
    assert settled.action == "ResourceSettled", settled
    assert settled.params["answer"] == "rate_limited"
    assert settled.params["cooling_ms"] == 4_000
    assert settled.params["charged"] == {"input": 500.0, "output": 700.0}
    held = gates.call("acquire", "b", {"estimated_input_tokens": 1000})
    assert held.params["reason"] == "backoff", held
    gates.clock.advance(10_000)  # the cooldown is over, and 100 output tokens of debt paid
    granted = gates.call("acquire", "b", {"estimated_input_tokens": 1000})
    assert granted.action == "ResourceGranted", granted
    released = gates.call("release", "b")
    assert released.action == "ResourceReleased" and released.params["released"] is True
    status = gates.call("status", "b").params["resources"]["llm"]
    assert status["concurrency"]["in_use"] == 0 and status["grants"] == 2
