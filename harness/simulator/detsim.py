"""Deterministic simulation: the session executor (Temper's rules, `executor.py`) on virtual
time, with the provisioner's admission logic running natively in front of a fake E2B.

The same executor and the same spec as the real-time driver; only the loop differs. Time
moves only from event to event, randomness is seeded, storage is in memory, so a run replays
exactly from its seed and thousands of sessions take seconds. The module `sandbox_provisioner`
is played by `NativeProvisioner`: a provision invocation asks a fresh `AdmissionController`,
and a grant sends one create to the fake E2B that answers after its latency (the invocation
is in flight meanwhile, as the component's would be); a release frees the entity's permits.
Between the executor and the module sits `serve` (`virtual_serve.py`): held answers and push
wake-ups as `host/serve/pace.py` decides (off by default: `hold_ms = 0`, no push).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from harness.mocks.e2b.config import MockE2BConfig
from harness.simulator.executor import (
    Executor,
    ExternalAccess,
    Secrets,
    no_such_module,
    overlay_config,
)
from harness.simulator.fake_e2b import SIMULATED_E2B, START_MS, FakeE2B
from harness.simulator.model import Job
from harness.simulator.report import Limits, ideal_makespan_s
from harness.simulator.runner import (
    RunResult,
    RunSettings,
    SessionRunner,
    SessionScript,
    timer_scale,
)
from harness.simulator.simulated_ports import EventLog, SeededRandom, VirtualClock
from harness.simulator.spec import Spec, StateTimeout
from harness.simulator.timers import Timer, TimerHeap
from harness.simulator.virtual_guest import GuestProvisioner
from harness.simulator.virtual_serve import WAKE_ACTION, VirtualInvoker, VirtualServe
from host.runtime.native import native_ports
from host.serve.pace import PaceSettings
from host.storage.memory import MemoryBackend
from provisioner.config import AdmissionConfig
from provisioner.failures import FailureCode
from provisioner.gates.controller import AdmissionController
from provisioner.gates.resource import action_name
from provisioner.gates.results import Created, Grant, Queued, Rejected, Waiter
from provisioner.model import (
    SANDBOX_QUEUED,
    SANDBOX_READY,
    SANDBOX_RELEASED,
    Failure,
    Invocation,
    Outcome,
    ProvisionerError,
    failed,
)
from provisioner.operations import with_wake_ups
from provisioner.ports import HttpRequest, HttpResponse

ACCOUNT = "sim-account"
# The E2B key the guest is configured with; the in-process E2B takes any.
GUEST_API_KEY = "e2b_simulated_key"


class VirtualLoop:
    """A `Loop` on virtual seconds since the start."""

    def __init__(self, clock: VirtualClock, *, max_events: int = 5_000_000) -> None:
        self.clock = clock
        self.modules: dict[str, VirtualInvoker] = {}
        self._timers = TimerHeap()
        self._now = 0.0
        self.max_events = max_events

    def now(self) -> float:
        return self._now

    def call_at(self, when: float, callback: Callable[[], None]) -> Timer:
        return self._timers.arm(max(when, self._now), callback)

    def call_later(self, delay: float, callback: Callable[[], None]) -> Timer:
        return self.call_at(self._now + max(0.0, delay), callback)

    def invoke(self, module: str, invocation: Invocation, done: Callable[[Outcome], None]) -> None:
        invoker = self.modules.get(module)
        if invoker is None:
            outcome = no_such_module(module)
            self.call_later(0.0, lambda: done(outcome))
            return
        invoker.start(invocation, done)

    def run(self, until: Callable[[], bool]) -> str:
        events = 0
        while not until():
            timer = self._timers.pop_next()
            if timer is None:
                return "idle"
            self._now = timer.when
            self.clock.set(START_MS + round(timer.when * 1000))
            timer.callback()
            events += 1
            if events >= self.max_events:
                raise RuntimeError(f"simulation did not settle after {events} events")
        return "done"


class _NoHttp:
    def send(self, request: HttpRequest) -> HttpResponse:
        raise AssertionError("admission control never calls HTTP itself")


@dataclass
class NativeProvisioner:
    """Plays module `sandbox_provisioner` in virtual time: the provisioner's admission
    logic natively over shared in-memory storage, creates against the fake E2B."""

    loop: VirtualLoop
    admission: AdmissionConfig
    e2b: FakeE2B
    backend: MemoryBackend
    random: SeededRandom
    telemetry: EventLog = field(default_factory=EventLog)
    held: dict[str, str] = field(default_factory=dict)  # entity id -> sandbox id
    creating: set[str] = field(default_factory=set)
    # Entity id -> sandboxes created for it (more than one is a duplicate).
    created: Counter[str] = field(default_factory=Counter)

    @property
    def duplicates(self) -> int:
        """Sandboxes created beyond one per entity."""
        return sum(n - 1 for n in self.created.values() if n > 1)

    def close(self) -> None:
        return None

    def _controller(self, tenant: str) -> AdmissionController:
        ports = native_ports(
            self.backend,
            tenant=tenant,
            account=ACCOUNT,
            http=_NoHttp(),
            clock=self.loop.clock,
            random=self.random,
            telemetry=self.telemetry,
        )
        return AdmissionController(ports, self.admission)

    def start(self, invocation: Invocation, done: Callable[[Outcome], None]) -> None:
        self.telemetry.events.clear()  # kept only as the port needs one; long runs stay small
        operation = dict(invocation.config).get("operation", "provision")
        # Named as the guest names it (`provisioner.invocation.Request.entity`).
        waiter = Waiter(invocation.tenant, f"{invocation.entity_type}/{invocation.entity_id}")
        if operation == "release":
            self._release(invocation, waiter, done)
            return
        sandbox = self.held.get(waiter.entity)
        if sandbox is not None:
            done(_ready(sandbox))
            return
        controller = self._controller(waiter.tenant)
        decision = controller.admit(waiter)
        if not isinstance(decision, Grant):
            done(with_wake_ups(_decided(decision), controller))
            return
        self.creating.add(waiter.entity)
        answer, latency_ms = self.e2b.begin_create(self.loop.clock.now_ms())

        def answered() -> None:
            self.e2b.end_create(answer)
            self.creating.discard(waiter.entity)
            settled = controller.settle(waiter, decision, answer)
            if isinstance(answer, Created):
                self.created[waiter.entity] += 1
            if isinstance(answer, Created) and settled is None:
                self.held[waiter.entity] = answer.sandbox_id
                done(with_wake_ups(_ready(answer.sandbox_id), controller))
            else:
                done(with_wake_ups(_decided(settled), controller))

        self.loop.call_later(latency_ms / 1000, answered)

    def _release(
        self, invocation: Invocation, waiter: Waiter, done: Callable[[Outcome], None]
    ) -> None:
        try:
            # The component's name for the answer (`released_action`, e.g. Failing -> Failed).
            name = action_name(dict(invocation.config), "released_action", SANDBOX_RELEASED)
        except ProvisionerError as error:
            done(failed(error.failure))
            return
        sandbox = self.held.pop(waiter.entity, None)
        if sandbox is not None:
            self.e2b.kill(sandbox)
        controller = self._controller(waiter.tenant)
        controller.release(waiter)
        released = Outcome(name, {"released": sandbox is not None, "sandbox_id": sandbox or ""})
        done(with_wake_ups(released, controller))


def _ready(sandbox_id: str) -> Outcome:
    return Outcome(
        SANDBOX_READY,
        {"sandbox_id": sandbox_id, "sandbox_url": f"https://49983-{sandbox_id}.e2b.app"},
    )


def _decided(decision: Grant | Queued | Rejected | None) -> Outcome:
    if isinstance(decision, Queued):
        return Outcome(SANDBOX_QUEUED, decision.params())
    if isinstance(decision, Rejected):
        return failed(decision.failure)
    return failed(Failure(FailureCode.INTERNAL_ERROR, f"unexpected decision {decision!r}", False))


@dataclass(frozen=True)
class VirtualScenario:
    """A run in virtual seconds."""

    jobs: int = 10
    tenants: int = 1
    turns: int = 10
    turn_s: float = 0.5
    admission: AdmissionConfig = field(default_factory=AdmissionConfig)
    # The fake's seed is the scenario's (`seed`), whatever this one says.
    e2b: MockE2BConfig = SIMULATED_E2B
    seed: int = 0
    # Replace the poll timer's after_seconds (the first timer of the queued state).
    poll_s: int | None = None
    # Session time per virtual second, for the working state's timers (as in real time).
    sim_per_real: float = 600.0
    batch_size: int | None = None
    # `serve` in front of the module: held answers and push wake-ups (host/serve/pace.py).
    pace: PaceSettings = field(default_factory=lambda: PaceSettings(hold_ms=0))
    wake_action: str = WAKE_ACTION
    # A push that fails ("409", "403", "503", "down"): see virtual_serve.py.
    wake_fault: str | None = None
    # True: the module runs the guest's whole path (virtual_guest.py) with `integration`
    # laid over each trigger's config (admission, sandbox timeout); False: the admission
    # logic alone (NativeProvisioner) with `admission`.
    guest: bool = False
    integration: tuple[tuple[str, str], ...] = ()

    def limits(self) -> Limits:
        """E2B's limits as the fake enforces them."""
        e2b = self.e2b
        return Limits(
            create_slots=e2b.max_concurrent_creates or self.admission.create_slots,
            create_rate_per_s=e2b.create_rate_per_s,
            create_burst=e2b.create_burst,
            max_sandboxes=e2b.max_sandboxes,
            create_latency_s=e2b.create_latency_ms / 1000,
        )

    @property
    def session_s(self) -> float:
        """How long a session holds its sandbox: the runner's turns, then its finish."""
        return (self.turns + 1) * self.turn_s


@dataclass
class VirtualRun:
    run: RunResult
    e2b: FakeE2B
    # Temper's invocations of the module (what Temper runs and pays for).
    invocations: int
    # Of those, the ones the queued state's timer started: Temper re-arms it on every
    # entry (`after_seconds` is a literal), so a job waiting W seconds gets W / poll of
    # them whatever serve does.
    timer_invocations: int
    end_s: float
    provisioner: NativeProvisioner | GuestProvisioner
    serve: VirtualServe
    ideal_s: float

    def summary(self) -> dict[str, Any]:
        serve = self.serve.figures
        completed = self.run.completed
        return {
            "jobs": len(self.run.results),
            "completed": completed,
            "failed": self.run.failed,
            "makespan_s": round(self.run.makespan_s, 3),
            "ideal_makespan_s": round(self.ideal_s, 3),
            "makespan_ratio": round(self.run.makespan_s / self.ideal_s, 3)
            if self.ideal_s
            else None,
            "invocations": self.invocations,
            "invocations_per_completed": round(self.invocations / completed, 2)
            if completed
            else None,
            "timer_invocations_per_completed": round(self.timer_invocations / completed, 2)
            if completed
            else None,
            # Calls of the provisioner itself: a held request's re-asks count too.
            "component_calls": serve.calls,
            "component_calls_per_completed": round(serve.calls / completed, 2)
            if completed
            else None,
            "max_concurrent_creates_seen": self.e2b.max_in_flight,
            "max_running_sandboxes_seen": self.e2b.max_sandboxes,
            "throttled": self.e2b.throttled,
            # Every session has ended and released: whatever still runs belongs to nobody.
            "orphaned_sandboxes": len(self.e2b.sandboxes),
            "duplicate_sandboxes": self.provisioner.duplicates,
            "max_held_at_once": serve.max_holding,
            "reasks": serve.reasks,
            "wake_ups": dict(sorted(serve.wakes.items())),
            "answers": dict(sorted(self.e2b.answers.items())),
        }


def with_poll(spec: Spec, script: SessionScript, poll_s: int) -> Spec:
    """The spec with its queued state's poll timer set to `poll_s`."""
    timeouts: list[StateTimeout] = []
    done = False
    for timeout in spec.timeouts:
        if not done and timeout.state in script.queued_states:
            timeout = timeout.model_copy(update={"after_seconds": poll_s})
            done = True
        timeouts.append(timeout)
    if not done:
        raise ValueError(f"{spec.source}: no timer on {script.queued_states}")
    return spec.model_copy(update={"timeouts": tuple(timeouts)})


def jobs_for(count: int, tenants: int, run_id: str = "v") -> list[Job]:
    per = -(-count // max(1, tenants))
    return [Job(f"job-{run_id}-{i + 1:04d}", f"tenant-{i // per + 1}") for i in range(count)]


def run_virtual(
    spec: Spec,
    scenario: VirtualScenario,
    *,
    script: SessionScript | None = None,
    jobs: Sequence[Job] | None = None,
    modules: Mapping[str, VirtualInvoker] | None = None,
) -> VirtualRun:
    """Runs the scenario's jobs through `spec` on virtual time."""
    script = script or SessionScript.for_spec(spec)
    if scenario.poll_s is not None:
        spec = with_poll(spec, script, scenario.poll_s)
    clock = VirtualClock(START_MS)
    loop = VirtualLoop(clock)
    e2b = FakeE2B(scenario.e2b.replace(seed=scenario.seed ^ 0x5EED), clock.now_ms)
    backend = MemoryBackend(clock.now_ms)
    provisioner: NativeProvisioner | GuestProvisioner
    configure = None
    secrets = Secrets()
    if scenario.guest:
        provisioner = GuestProvisioner(loop, e2b, backend, SeededRandom(scenario.seed))
        configure = overlay_config(dict(scenario.integration))
        secrets = Secrets({"e2b_api_key": GUEST_API_KEY})
    else:
        provisioner = NativeProvisioner(
            loop=loop,
            admission=scenario.admission,
            e2b=e2b,
            backend=backend,
            random=SeededRandom(scenario.seed),
        )
    serve = VirtualServe(
        loop,
        provisioner,
        scenario.pace,
        wake_action=scenario.wake_action,
        fault=scenario.wake_fault,
    )
    loop.modules = {"sandbox_provisioner": serve, **(modules or {})}
    job_list = list(jobs) if jobs is not None else jobs_for(scenario.jobs, scenario.tenants)
    credentials = {
        tenant: f"agent-credential-{tenant}" for tenant in sorted({job.tenant for job in job_list})
    }
    executor = Executor(
        spec,
        loop,
        run_id="virtual",
        secrets=secrets,
        configure=configure,
        timer_seconds=timer_scale(script, scenario.sim_per_real),
        access=ExternalAccess(f"{spec.name}s", {c: t for t, c in credentials.items()}),
    )
    serve.bind(executor, credentials)
    runner = SessionRunner(
        executor,
        script,
        RunSettings(scenario.turns, scenario.turn_s, scenario.batch_size),
        loop.call_later,
    )
    try:
        runner.start(job_list)
        loop.run(runner.done)
    finally:
        provisioner.close()
    run = RunResult(
        results=runner.results(),
        makespan_s=runner.last_finish,
        host={"peak_admission_permits": executor.admission.peak_held},
    )
    ideal = ideal_makespan_s(len(job_list), scenario.limits(), scenario.session_s)
    invocations = sum(entity.invocations for entity in executor.entities.values())
    queued_timers = [
        index
        for index, timeout in enumerate(spec.timeouts)
        if timeout.state in script.queued_states
    ]
    timer_invocations = sum(
        entity.fired[index] for entity in executor.entities.values() for index in queued_timers
    )
    return VirtualRun(
        run, e2b, invocations, timer_invocations, loop.now(), provisioner, serve, ideal
    )


def poll_tradeoff(
    spec: Spec, scenario: VirtualScenario, polls: Sequence[int]
) -> list[dict[str, Any]]:
    """Makespan against invocations for each poll interval, in virtual time."""
    rows = []
    for poll in polls:
        done = run_virtual(spec, replace(scenario, poll_s=poll))
        rows.append({"poll_s": poll, **done.summary()})
    return rows
