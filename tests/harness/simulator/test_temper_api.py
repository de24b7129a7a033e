"""Temper's external dispatch over HTTP on 127.0.0.1, as a real-time session run serves it
for `serve`'s push wake-ups. Each check reads the entity and the module's calls (stored
state), not the clock."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass, field

import httpx
import pytest

from harness.simulator.driver import RealTimeLoop
from harness.simulator.executor import Entity, Executor, ExternalAccess
from harness.simulator.model import Job
from harness.simulator.spec import Spec, packaged_spec_text, parse_spec
from harness.simulator.temper_api import TemperApiServer
from provisioner.model import Invocation, Outcome
from tests.harness.simulator import answers

QUEUED = answers.queued_for_a_minute()


@dataclass
class Module:
    """Answers the first provision Queued and every later one Ready."""

    calls: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def invoke(self, invocation: Invocation) -> Outcome:
        with self.lock:
            self.calls.append(invocation.trigger_action)
            first = len(self.calls) == 1
        if answers.operation(invocation) == "release":
            return answers.released(invocation, "sbx-1")
        return QUEUED if first else answers.ready("sbx-1")


@dataclass
class Running:
    executor: Executor
    loop: RealTimeLoop
    module: Module
    entity: Entity
    api: TemperApiServer


QUEUED_TIMER = 'state = "Queued"\nafter_seconds = 2\n'


def without_the_queued_timer() -> Spec:
    """The example with its 2 s Queued poll an hour away: on a loaded machine the checks
    below can take longer than 2 s, and the poll would take the entity out of Queued."""
    text = packaged_spec_text("temper_agent.ioa.toml")
    assert text.count(QUEUED_TIMER) == 1, "the example's Queued timer changed"
    return parse_spec(text.replace(QUEUED_TIMER, QUEUED_TIMER.replace("2", "3600")))


@pytest.fixture
def running() -> Iterator[Running]:
    module = Module()
    loop = RealTimeLoop({"sandbox_provisioner": module}, workers=2)
    executor = Executor(
        without_the_queued_timer(),
        loop,
        access=ExternalAccess("TemperAgents", {"tok-a": "tenant-a", "tok-b": "tenant-b"}),
    )
    entity = executor.create(Job("job-1", "tenant-a"))
    assert executor.dispatch(entity, "Provision", {"user_message": "hi"}) is None
    stop = threading.Event()
    loop.call_later(3600, lambda: None)  # keeps the loop from going idle
    thread = threading.Thread(target=loop.run, args=(stop.is_set,), daemon=True)
    thread.start()
    api = TemperApiServer(executor, loop).start()
    try:
        yield Running(executor, loop, module, entity, api)
    finally:
        api.stop()
        stop.set()
        loop.stop()
        thread.join(10)
        loop.close(wait=True)


def post(
    api: TemperApiServer,
    path: str,
    *,
    tenant: str = "tenant-a",
    token: str | None = "tok-a",
    key: str | None = None,
) -> httpx.Response:
    headers = {"X-Tenant-Id": tenant}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    if key is not None:
        headers["Idempotency-Key"] = key
    return httpx.post(f"{api.url}/tdata/{path}", json={}, headers=headers, timeout=10)


WAKE = "TemperAgents('job-1')/Temper.WakeProvision"


def wait_for(running: Running, status: str, calls: int) -> None:
    for _ in range(200):
        future = running.loop.submit(lambda: (running.entity.status, running.entity.in_flight))
        if future.result(10) == (status, 0) and len(running.module.calls) >= calls:
            return
        threading.Event().wait(0.02)
    raise AssertionError(f"entity never reached {status} with {calls} calls")


def test_the_endpoint_follows_temper_rules_and_runs_the_trigger(running: Running) -> None:
    wait_for(running, "Queued", 1)
    api = running.api
    assert post(api, "TemperAgents('job-9')/Temper.WakeProvision").status_code == 404
    assert post(api, "Orders('job-1')/Temper.WakeProvision").status_code == 404
    assert post(api, WAKE, token=None).status_code == 401
    assert post(api, WAKE, token="tok-b").status_code == 403
    assert post(api, "TemperAgents('job-1')/Temper.SandboxReleased").status_code == 409
    assert post(api, "TemperAgents('job-1')").status_code == 400
    assert running.module.calls == ["Provision"]  # none of those ran anything
    answer = post(api, WAKE, key="r-1")
    assert answer.status_code == 200, answer.text
    assert answer.json()["Status"] == "Queued"  # a self-loop; its trigger is in flight
    wait_for(running, "Thinking", 2)
    assert running.module.calls == ["Provision", "WakeProvision"]
    assert post(api, WAKE, key="r-1").status_code == 200  # replayed, not dispatched
    assert post(api, WAKE).status_code == 409  # no longer Queued
    assert running.module.calls == ["Provision", "WakeProvision"]
    assert api.answers == {404: 2, 401: 1, 403: 1, 409: 2, 200: 2}


def test_a_loop_that_does_not_take_the_request_answers_503() -> None:
    loop = RealTimeLoop({}, workers=1)
    executor = Executor(
        without_the_queued_timer(),
        loop,
        access=ExternalAccess("TemperAgents", {"tok-a": "tenant-a"}),
    )
    entity = executor.create(Job("job-1", "tenant-a"))
    with TemperApiServer(executor, loop, answer_timeout_s=0.2) as api:
        answer = post(api, WAKE)
    assert answer.status_code == 503 and answer.headers["Retry-After"] == "1"
    loop.run(lambda: True)  # the loop runs now: the cancelled request must not dispatch
    assert entity.status == "Created" and entity.rejected == 0
    loop.close(wait=True)


def test_an_interrupt_during_a_dispatched_call_stops_the_loop() -> None:
    """Bug caught: Ctrl-C landing while the loop's thread runs a call from the Temper API
    endpoint was kept in that call's future (read only by the endpoint), and the run went
    on as if nothing had happened."""
    loop = RealTimeLoop({}, workers=1)

    def interrupted() -> None:
        raise KeyboardInterrupt

    future = loop.submit(interrupted)
    with pytest.raises(KeyboardInterrupt):
        loop.run(lambda: False)
    assert isinstance(future.exception(timeout=0), KeyboardInterrupt)
    failing = loop.submit(lambda: 1 // 0)
    assert loop.run(lambda: True) == "done"  # an ordinary error stays the caller's
    assert isinstance(failing.exception(timeout=0), ZeroDivisionError)
    loop.close(wait=True)
