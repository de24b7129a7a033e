"""Guest operations natively, with E2B faked at the Http port: what happens around a grant."""

from __future__ import annotations

import json

from host.runtime.component_runtime import HostServices
from host.runtime.native import NativeRuntime
from host.sessions.simulated_ports import VirtualClock
from host.storage.memory import MemoryBackend
from provisioner.model import Outcome
from provisioner.ports import HttpRequest, HttpResponse
from tests.builders import invocation
from tests.doubles import RecordingTelemetrySink

BASE = "https://api.e2b.test"


class ExplodingE2B:
    """Raises something no port promises on the first create, then behaves."""

    def __init__(self) -> None:
        self.creates = 0

    def send(self, request: HttpRequest, *, deadline_ms: int | None = None) -> HttpResponse:
        self.creates += request.method == "POST"
        if request.method == "POST" and self.creates == 1:
            raise RuntimeError("a bug below the port")
        body = {"sandboxID": f"sbx-{self.creates}", "templateID": "base", "clientID": "c"}
        return HttpResponse(201, (), json.dumps(body).encode())


def provision(runtime: NativeRuntime, entity_id: str) -> Outcome:
    config = {"e2b_api_url": BASE, "create_slots": "1", "create_rate_per_s": "1000"}
    return runtime.invoke(
        invocation(config, entity_type="Job", entity_id=entity_id, trigger_action="Submit")
    )


def test_a_grant_is_settled_even_when_the_create_blows_up() -> None:
    """With create_slots=1, a slot kept after the failure would queue the next entity
    (reason create_slots) until its 150 s lease expired."""
    clock = VirtualClock()
    e2b = ExplodingE2B()
    runtime = NativeRuntime(
        HostServices(
            MemoryBackend(clock.now_ms),
            e2b,  # type: ignore[arg-type]
            RecordingTelemetrySink(),
            clock_ms=clock.now_ms,
        )
    )
    broken = provision(runtime, "job-1")
    assert broken.error is not None and broken.error.code == "internal_error"
    clock.advance(10)  # past the rate gate's spacing, far inside the slot's lease
    after = provision(runtime, "job-2")
    assert after.action == "SandboxReady", after
