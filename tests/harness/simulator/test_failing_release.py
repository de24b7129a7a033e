"""A release on the way into Failed that fails is asked again until it frees the permit.

Temper's rules (the executor) on virtual time, the guest's whole path natively
(`virtual_guest.py`): a session that fails after its sandbox is up sends its release, and
the first kill (or the first write of the gate) fails. The example specs go through
Failing, whose timer asks again; with the old shape (straight into Failed, no timer) the
permit stays held and the sandbox lives on.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import pytest

from harness.simulator.detsim import VirtualLoop
from harness.simulator.executor import Entity, Executor, overlay_config
from harness.simulator.fake_e2b import SIMULATED_E2B, START_MS, FakeE2B
from harness.simulator.model import Job
from harness.simulator.simulated_ports import SeededRandom, VirtualClock
from harness.simulator.spec import Spec, packaged_spec, packaged_spec_text, parse_spec
from harness.simulator.virtual_guest import ACCOUNT, E2BHttp, GuestProvisioner
from host.services.namespaces import account_namespace
from host.storage.base import Write
from host.storage.memory import MemoryBackend
from provisioner.gates.document import GATE_KEY, GateState
from provisioner.ports import HttpRequest, HttpResponse, StorageUnavailable

TENANT = "tenant-a"
INTEGRATION = {"e2b_api_url": "http://e2b.virtual", "e2b_api_key": "e2b_simulated_key"}
# Per spec: its start action, the state where the sandbox is up, and its caller's Fail.
SPECS = {
    "temper_agent.ioa.toml": ("Provision", "Thinking"),
    "curation_job.ioa.toml": ("Submit", "Running"),
}


@dataclass
class KillFailsOnce(E2BHttp):
    """E2B whose first kill answers 503 (and kills nothing)."""

    kills: list[int] = field(default_factory=list)

    def send(self, request: HttpRequest, pause: Callable[[int], None]) -> HttpResponse:
        if request.method == "DELETE":
            self.kills.append(self.loop.clock.now_ms())
            if len(self.kills) == 1:
                return HttpResponse(503, (), b'{"message": "kill failed"}')
        return super().send(request, pause)


class GateWriteFailsOnce(MemoryBackend):
    """Storage whose first write of the gate after `armed` is set fails (an outage)."""

    def __init__(self, now_ms: Callable[[], int]) -> None:
        super().__init__(now_ms)
        self.armed = False

    def _compare_and_swap(self, write: Write) -> int:
        if self.armed and write.key == GATE_KEY:
            self.armed = False
            raise StorageUnavailable("storage unavailable")
        return super()._compare_and_swap(write)


@dataclass
class Run:
    loop: VirtualLoop
    executor: Executor
    e2b: FakeE2B
    backend: MemoryBackend
    guest: GuestProvisioner

    def held_permits(self) -> int:
        entry = self.backend.get(account_namespace(ACCOUNT), GATE_KEY)
        return 0 if entry is None else len(GateState.from_bytes(entry.value).sandbox_leases)


def session(spec: Spec, backend_of: Callable[[Callable[[], int]], MemoryBackend]) -> Run:
    clock = VirtualClock(START_MS)
    loop = VirtualLoop(clock, max_events=50_000)
    e2b = FakeE2B(SIMULATED_E2B, clock.now_ms)
    backend = backend_of(clock.now_ms)
    guest = GuestProvisioner(loop, e2b, backend, SeededRandom(7))
    loop.modules = {"sandbox_provisioner": guest}
    executor = Executor(spec, loop, configure=overlay_config(INTEGRATION))
    return Run(loop, executor, e2b, backend, guest)


def fail_after_ready(run: Run, start: str, working: str) -> Entity:
    entity = run.executor.create(Job("job-1", TENANT))
    assert run.executor.dispatch(entity, start, {"user_message": "hi"}) is None
    run.loop.run(lambda: entity.status == working)
    assert len(run.e2b.sandboxes) == 1 and run.held_permits() == 1  # the precondition
    assert run.executor.dispatch(entity, "Fail", {"error_message": "the caller gave up"}) is None
    return entity


@pytest.mark.parametrize("name", SPECS)
def test_a_kill_that_fails_once_is_asked_again_and_the_session_ends_failed_and_freed(
    name: str,
) -> None:
    """Bug caught: a release on the way into Failed asked once (Failed final, no timer):
    the 503 leaves the sandbox running and its permit held until the lease expires."""
    run = session(packaged_spec(name), MemoryBackend)
    http = KillFailsOnce(run.e2b, run.loop)
    run.guest.http = http
    entity = fail_after_ready(run, *SPECS[name])
    run.loop.run(lambda: entity.status == "Failed" and entity.in_flight == 0)
    assert len(http.kills) == 2  # the failed kill, then Failing's retry
    assert (http.kills[1] - http.kills[0]) / 1000 == pytest.approx(30.0, abs=1.0)
    assert run.e2b.sandboxes == set() and run.held_permits() == 0
    assert entity.fields["release_error"] == ""  # confirmed: not a give-up
    run.guest.close()


@pytest.mark.parametrize("name", SPECS)
def test_a_release_whose_storage_fails_once_is_asked_again(name: str) -> None:
    """Bug caught: the guest's storage_unavailable answer (a retryable SandboxFailed) to a
    release on the way into Failed, never asked again: the permit stays counted."""
    backends: list[GateWriteFailsOnce] = []

    def backend_of(now_ms: Callable[[], int]) -> MemoryBackend:
        backends.append(GateWriteFailsOnce(now_ms))
        return backends[0]

    run = session(packaged_spec(name), backend_of)
    start, working = SPECS[name]
    entity = run.executor.create(Job("job-1", TENANT))
    assert run.executor.dispatch(entity, start, {"user_message": "hi"}) is None
    run.loop.run(lambda: entity.status == working)
    assert run.held_permits() == 1
    backends[0].armed = True
    assert run.executor.dispatch(entity, "Fail", {"error_message": "the caller gave up"}) is None
    failed_at = run.loop.now()
    run.loop.run(lambda: entity.status == "Failed" and entity.in_flight == 0)
    assert not backends[0].armed  # the outage was met
    # Failing, then 30 s later Failing's retry, whose release was confirmed.
    states = [state for _, state in entity.history]
    assert states[-3:] == ["Failing", "FailingRetried", "Failed"]
    assert entity.history[-2][0] - failed_at == pytest.approx(30.0)
    assert run.e2b.sandboxes == set() and run.held_permits() == 0
    run.guest.close()


def test_a_release_that_keeps_failing_gives_up_into_failed_with_a_reason() -> None:
    """Bug caught: a failing path that strands the entity in a non-final state once its
    retries run out, or gives up without telling an operator why."""

    class KillAlwaysFails(E2BHttp):
        def send(self, request: HttpRequest, pause: Callable[[int], None]) -> HttpResponse:
            if request.method == "DELETE":
                return HttpResponse(503, (), b'{"message": "kill failed"}')
            return super().send(request, pause)

    run = session(packaged_spec("temper_agent.ioa.toml"), MemoryBackend)
    run.guest.http = KillAlwaysFails(run.e2b, run.loop)
    entity = fail_after_ready(run, "Provision", "Thinking")
    failed_at = run.loop.now()
    run.loop.run(lambda: entity.status == "Failed" and entity.in_flight == 0)
    assert run.loop.now() - failed_at == pytest.approx(330.0)
    assert entity.last_action == "GiveUpRelease"
    assert "not confirmed" in entity.fields["release_error"]
    run.guest.close()


def test_the_old_shape_leaves_the_permit_held() -> None:
    """The planted bug, kept as a test: Fail straight into Failed, no timer. The same 503
    leaves the sandbox and the permit behind, which the tests above would catch."""
    text = packaged_spec_text("temper_agent.ioa.toml")
    old = text.replace(
        'from = ["Created", "Provisioning", "Queued", "Thinking"]\nto = "Failing"',
        'from = ["Created", "Provisioning", "Queued", "Thinking"]\nto = "Failed"',
    )
    assert old != text
    run = session(parse_spec(old, source="old shape"), MemoryBackend)
    run.guest.http = KillFailsOnce(run.e2b, run.loop)
    entity = fail_after_ready(run, "Provision", "Thinking")
    run.loop.run(lambda: entity.in_flight == 0)
    run.loop.run(lambda: run.loop.now() > 600)
    assert entity.status == "Failed"
    assert len(run.e2b.sandboxes) == 1 and run.held_permits() == 1
    run.guest.close()
