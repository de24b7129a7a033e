"""Budgets (issue 7): a guest that loops, allocates without end, returns a huge result or
traps is stopped and reported with a typed code, and the host keeps serving meanwhile."""

from __future__ import annotations

import re
import threading
from collections.abc import Callable
from functools import partial
from typing import Any

import pytest

from host.runtime.component_runtime import Budgets
from host.runtime.loader import LoadedComponent
from host.services.telemetry import InvocationTag
from provisioner.model import Outcome
from provisioner.ports import LogLevel
from tests.host.runtime.test_end_to_end import invocation, make_host
from tests.system.hardening_support import (
    ProbeHost,
    make_probe_host,
    probe_component,
)

pytestmark = pytest.mark.component
__all__ = ["probe_component"]

MIB = 1 << 20


@pytest.fixture
def probe(probe_component: LoadedComponent) -> Any:
    host = make_probe_host(probe_component)
    yield host
    host.close()


def code(outcome: Outcome) -> str | None:
    return None if outcome.error is None else outcome.error.code


def assert_still_serving(host: ProbeHost) -> None:
    assert host.call("noop").action == "ProbeDone"


def test_a_spinning_guest_runs_out_of_fuel(probe: ProbeHost) -> None:
    """Breaks if fuel is not metered (the loop would run to the 120 s deadline)."""
    outcome = probe.call("loop")
    assert outcome.action == "SandboxFailed"
    assert code(outcome) == "fuel_exhausted", outcome
    assert outcome.params["code"] == "fuel_exhausted" and not outcome.success
    assert_still_serving(probe)


def test_a_spinning_guest_with_fuel_to_spare_hits_the_deadline(
    probe_component: LoadedComponent,
) -> None:
    """Breaks if the epoch deadline does not interrupt a guest that never calls the host."""
    host = make_probe_host(probe_component, budgets=Budgets(fuel=10**15, deadline_ms=300))
    outcome = host.call("loop")
    assert code(outcome) == "deadline_exceeded", outcome
    assert outcome.error is not None and outcome.error.retryable
    assert_still_serving(host)
    host.close()


def allocated_mib(host: ProbeHost) -> int:
    reached = [
        int(match.group(1))
        for _, _, message in host.telemetry.logs
        if (match := re.fullmatch(r"probe: allocated (\d+) MiB", message))
    ]
    return max(reached, default=0)


@pytest.mark.parametrize("cap_mib", [64, 32])
def test_a_guest_allocating_without_end_is_stopped_at_the_memory_cap(
    probe_component: LoadedComponent, cap_mib: int
) -> None:
    """Breaks if the memory cap is not applied: the probe would log allocations past it
    (and, uncapped, reach wasm32's 4 GiB).

    The cap makes `memory.grow` fail (it returns -1; wasmtime does not trap), CPython raises
    MemoryError and the exception escaping the export traps: a guest stopped mid-run by its
    cap is a `guest_trap` (`memory_exhausted` is an instance the cap refuses outright)."""
    host = make_probe_host(probe_component, budgets=Budgets(memory_bytes=cap_mib * MIB))
    outcome = host.call("alloc")
    assert code(outcome) == "guest_trap", outcome
    assert outcome.error is not None and "unreachable" in outcome.error.message, outcome
    assert 0 < allocated_mib(host) < cap_mib
    assert_still_serving(host)
    host.close()


def test_a_result_over_the_limit_is_refused(probe: ProbeHost) -> None:
    outcome = probe.call("huge")
    assert code(outcome) == "result_too_large", outcome
    assert "blob" not in outcome.params
    assert_still_serving(probe)


def test_a_smaller_result_limit_is_applied_too(probe_component: LoadedComponent) -> None:
    """Breaks if the limit is a constant rather than the budget."""
    host = make_probe_host(probe_component, budgets=Budgets(result_bytes=100))
    assert code(host.call("huge")) == "result_too_large"
    assert host.call("noop").action == "ProbeDone"
    host.close()


def test_an_exception_escaping_the_guest_is_a_trap(probe: ProbeHost) -> None:
    outcome = probe.call("trap")
    assert code(outcome) == "guest_trap", outcome
    assert outcome.error is not None and not outcome.error.retryable
    # The reason, not the first line of a backtrace.
    assert "unreachable" in outcome.error.message and "backtrace" not in outcome.error.message
    assert_still_serving(probe)


class LogEvent:
    """Sets an event when the guest logs a given message (a telemetry sink wrapper)."""

    def __init__(self, inner: Any, message: str) -> None:
        self.inner = inner
        self.message = message
        self.seen = threading.Event()

    def log(self, tag: InvocationTag, level: LogLevel, message: str) -> None:
        self.inner.log(tag, level, message)
        if message == self.message:
            self.seen.set()

    def progress(self, tag: InvocationTag, event: dict[str, Any]) -> None:
        self.inner.progress(tag, event)


def in_thread(fn: Callable[[], Outcome]) -> tuple[threading.Thread, list[Outcome]]:
    out: list[Outcome] = []
    thread = threading.Thread(target=lambda: out.append(fn()))
    thread.start()
    return thread, out


def test_the_host_serves_other_invocations_while_a_guest_spins(
    probe_component: LoadedComponent, loaded_component: LoadedComponent, mock_e2b: Any
) -> None:
    """Breaks if one spinning guest blocks the host (a global lock, a shared store): the
    other invocations would wait for it, and the spinner only stops once told to."""
    spinner = make_probe_host(probe_component, budgets=Budgets(fuel=10**15))
    started = LogEvent(spinner.runtime.services.telemetry, "probe: looping")
    spinner.runtime.services.telemetry = started
    loop_thread, loop_out = in_thread(
        lambda: spinner.call("loop", tenant="spinner", probe_stop_key="stop")
    )
    assert started.seen.wait(60), "the spinning guest never started"

    provisioner = make_host(loaded_component, mock_e2b.url)
    others: list[tuple[threading.Thread, list[Outcome]]] = []
    for i in range(4):
        others.append(in_thread(lambda: spinner.call("noop", tenant="other")))
        others.append(
            in_thread(
                partial(
                    provisioner.runtime.invoke,
                    invocation(
                        mock_e2b.url, f"job-{i}", create_rate_per_s="1000", create_slots="8"
                    ),
                )
            )
        )
    for thread, _ in others:
        thread.join()  # bounded by their budgets (a 120 s deadline)
    outcomes = [out[0] for _, out in others]
    assert [o.action for o in outcomes[0::2]] == ["ProbeDone"] * 4
    assert {o.action for o in outcomes[1::2]} <= {"SandboxReady", "SandboxQueued"}, outcomes
    # The spinner cannot have finished on its own: it waits for the stop key.
    assert loop_thread.is_alive()
    spinner.storage.compare_and_swap("tenant/spinner", "stop", None, b"1", None)
    loop_thread.join(60)
    assert loop_out[0].action == "ProbeStopped", loop_out
    spinner.close()
    provisioner.runtime.close()


def test_budget_stops_in_parallel_leave_the_others_untouched(
    probe_component: LoadedComponent, loaded_component: LoadedComponent, mock_e2b: Any
) -> None:
    """Each misbehaviour in its own thread next to good invocations: each gets its own code,
    the good ones succeed, and the runtime serves afterwards."""
    # One budget stops each misbehaviour, with the default budgets: the spinner runs out of
    # fuel seconds into a deadline of two minutes, whatever the load, and the allocator
    # hits the memory cap (a trap, as above).
    probe = make_probe_host(probe_component)
    expected = {
        "loop": "fuel_exhausted",
        "alloc": "guest_trap",
        "huge": "result_too_large",
        "trap": "guest_trap",
    }
    bad = {mode: in_thread(partial(probe.call, mode)) for mode in expected}
    provisioner = make_host(loaded_component, mock_e2b.url)
    good = [
        in_thread(
            partial(
                provisioner.runtime.invoke,
                invocation(mock_e2b.url, f"job-{i}", create_rate_per_s="1000", create_slots="8"),
            )
        )
        for i in range(4)
    ]
    for thread, _ in [*bad.values(), *good]:
        thread.join()  # every invocation is bounded by its budgets (a 120 s deadline)
    for mode, (_, out) in bad.items():
        assert code(out[0]) == expected[mode], (mode, out)
    assert {out[0].action for _, out in good} <= {"SandboxReady", "SandboxQueued"}
    assert_still_serving(probe)
    probe.close()
    provisioner.runtime.close()
