"""The reason `status` and `/metrics` report for a waiter is the component's answer, not a
gate that holds nothing (issue 26, point 7: status showed the head waiter held by
`create_slots`, ETA 0.0 s, 0 of 4 slots in use, while the invocation had answered `rate`;
the rate token had refilled since, so the waiter's next poll is a grant)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from host.operator.gates import read_gates_offline
from host.runtime.component_runtime import HostServices
from host.runtime.native import NativeRuntime
from host.services.http_gateway import HttpGateway
from host.storage.memory import MemoryBackend
from tests.builders import invocation
from tests.conftest import API_KEY
from tests.doubles import RecordingTelemetrySink
from tests.harness.mocks.e2b.fixtures import running_mock

START_MS = 1_700_000_000_000
CONFIG = {"operation": "provision", "template_id": "base", "create_slots": "4",
          "create_rate_per_s": "1", "create_burst": "1", "max_sandboxes": "20"}  # fmt: skip


class Clock:
    def __init__(self) -> None:
        self.now = START_MS

    def __call__(self) -> int:
        return self.now


@pytest.fixture
def account() -> Iterator[tuple[NativeRuntime, MemoryBackend, Clock, dict[str, str]]]:
    clock = Clock()
    storage = MemoryBackend(clock)
    with running_mock(api_key=API_KEY) as mock:
        gateway = HttpGateway(mock.url, API_KEY, allow_private_network=True)
        runtime = NativeRuntime(HostServices(storage, gateway, RecordingTelemetrySink()))
        yield runtime, storage, clock, {**CONFIG, "e2b_api_url": mock.url}
        gateway.close()


def test_a_waiter_whose_turn_has_come_is_reported_due_not_held_by_create_slots(
    account: tuple[NativeRuntime, MemoryBackend, Clock, dict[str, str]],
) -> None:
    runtime, storage, clock, config = account
    assert runtime.invoke(invocation(config, entity_id="a")).action == "SandboxReady"
    queued = runtime.invoke(invocation(config, entity_id="b"))
    assert (queued.action, queued.params["reason"]) == ("SandboxQueued", "rate")

    # At once, the view and the answer agree.
    [waiter] = read_gates_offline(storage, "default", CONFIG)["waiters"]
    assert waiter["reason"] == "rate" and waiter["eta_ms"] > 0

    # The rate token refills: no gate holds the waiter any more; its next poll is a grant.
    clock.now += 1_500
    view = read_gates_offline(storage, "default", CONFIG)
    [waiter] = view["waiters"]
    assert view["create_slots"]["in_use"] == 0
    assert (waiter["reason"], waiter["eta_ms"]) == ("due", 0)
    assert runtime.invoke(invocation(config, entity_id="b")).action == "SandboxReady"
