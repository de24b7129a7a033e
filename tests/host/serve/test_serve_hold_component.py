"""A held request through the service with the real component and the mock E2B: a slot
frees during the hold, and the grant goes back in the same call."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from starlette.testclient import TestClient

from host.runtime.component_runtime import ComponentRuntime, HostServices
from host.runtime.loader import LoadedComponent
from host.serve import InvocationPool, ServeState, create_app
from host.serve.pace import PaceSettings
from host.serve.pacing import ServePace
from host.services.http_gateway import HttpGateway
from host.storage.memory import MemoryBackend
from provisioner.model import SANDBOX_QUEUED, SANDBOX_READY, SANDBOX_RELEASED
from tests.conftest import API_KEY

TOKEN = "t0ken"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def context(entity_id: str, operation: str) -> dict[str, Any]:
    return {
        "tenant": "acme",
        "entity_type": "CurationJob",
        "entity_id": entity_id,
        # The held waiter's turn is estimated from the only sandbox's lease (its E2B
        # timeout): within the hold window, so the precondition "job-2 is held" holds.
        "integration_config": {
            "operation": operation,
            "max_sandboxes": "1",
            "sandbox_timeout_s": "30",
        },
    }


@dataclass
class Service:
    http: TestClient
    state: ServeState
    pace: ServePace
    lines: list[dict[str, Any]]


@pytest.fixture
def service(loaded_component: LoadedComponent, mock_e2b: Any) -> Iterator[Service]:
    storage = MemoryBackend()
    gateway = HttpGateway(mock_e2b.url, API_KEY, allow_private_network=True)
    runtime = ComponentRuntime(loaded_component, HostServices(storage, gateway))
    lines: list[dict[str, Any]] = []
    pace = ServePace(PaceSettings(hold_ms=60_000), storage.now_ms)
    state = ServeState(
        token=TOKEN,
        pool=InvocationPool(2),
        invoke=runtime.invoke,
        e2b_url=mock_e2b.url,
        storage_probe=lambda: None,
        pace=pace,
        log=lines.append,
    )
    try:
        yield Service(TestClient(create_app(state)), state, pace, lines)
    finally:
        runtime.close()
        gateway.close()


@pytest.mark.component
def test_a_slot_freed_during_the_hold_is_granted_in_the_same_call(service: Service) -> None:
    # Catches: a held request that never asks again (or only at its poll), so a sandbox
    # freed during the hold reaches the waiter one poll later.
    http = service.http
    first = http.post("/v1/invocations", json=context("job-1", "provision"), headers=AUTH)
    assert first.json()["action"] == SANDBOX_READY  # job-1 holds the only sandbox
    answers: list[Any] = []
    waiter = threading.Thread(
        target=lambda: answers.append(
            http.post("/v1/invocations", json=context("job-2", "provision"), headers=AUTH)
        )
    )
    waiter.start()
    deadline = time.monotonic() + 30
    while service.pace.holds.count == 0:  # job-2 queued behind job-1 and held
        assert time.monotonic() < deadline and waiter.is_alive(), "job-2 was never held"
        time.sleep(0.005)
    released = http.post("/v1/invocations", json=context("job-1", "release"), headers=AUTH)
    assert released.json()["action"] == SANDBOX_RELEASED
    waiter.join(60)
    assert not waiter.is_alive()
    answer = answers[0].json()
    assert answer["action"] == SANDBOX_READY, answer
    held = [line for line in service.lines if line["entity_id"] == "job-2"]
    assert held[0]["component_calls"] >= 2 and held[0]["held_ms"] > 0
    assert SANDBOX_QUEUED not in [line["action"] for line in held]
