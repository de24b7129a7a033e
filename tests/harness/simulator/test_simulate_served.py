"""`simulate`'s provisioner mode in real time through the Temper shim and a real `serve`
(harness/simulator/served.py): held answers, push wake-ups through the run's own Temper API,
and the direct path kept for the comparison. Bounded: no speed thresholds (those belong
in benchmarks/)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from harness.cli.main import main
from harness.simulator.detsim import with_poll
from harness.simulator.runner import SessionScript
from harness.simulator.scenario import E2BLimits, Scenario, mode_spec
from harness.simulator.simulate import ModeRun, run_mode, serve_pace
from host.runtime.loader import LoadedComponent
from host.serve.pace import PaceSettings
from tests.harness.simulator.interrupted import interrupt_when_first_queued

pytestmark = pytest.mark.component

# Six jobs behind E2B's four create slots: two wait for a slot. One-second creates and
# short sessions keep the run a few seconds long.
SCENARIO = Scenario(jobs=6, e2b=E2BLimits(create_latency_ms=1000.0), turns=2, turn_sim_s=60.0)


def assert_clean(done: ModeRun) -> dict[str, Any]:
    s = done.report["summary"]
    print(f"\n{s}")
    assert (s["completed"], s["failed"], s["unfinished"]) == (SCENARIO.jobs, 0, 0)
    assert s["throttled"] == 0 and s["max_concurrent_creates_seen"] <= 4
    assert s["orphaned_sandboxes"] == 0 and s["duplicate_sandboxes"] == 0
    assert s["killed_by_liveness"] == 0 and s["overloaded"] is None
    served: dict[str, Any] = s["serve"]
    # Every invocation the executor made reached serve, and nothing else did.
    assert served["requests"] == sum(r.invocations for r in done.run.results)
    return served


def test_the_provisioner_mode_goes_through_serve_which_holds_the_waiters(
    loaded_component: LoadedComponent,
) -> None:
    """Bug caught: the real-time provisioner mode invoking the component directly (serve's
    log sees nothing), or serve's held answers off in it (no request held, no re-ask)."""
    done = run_mode(
        SCENARIO, "provisioner", loaded=loaded_component, pace=PaceSettings(hold_ms=1500)
    )
    served = assert_clean(done)
    assert served["held_requests"] > 0 and served["reasks"] > 0
    assert served["max_held_at_once"] > 0
    assert served["wake_ups"] == {}  # push is off


def test_push_wakes_queued_entities_through_the_runs_temper_api(
    loaded_component: LoadedComponent,
) -> None:
    """Bug caught: push wake-ups never sent, sent to the wrong place or as the wrong
    tenant (Temper's endpoint refuses them: no WakeProvision invocation follows), or
    refused by the spec. The poll is 30 s, so the run does not wait for it to prove
    anything: the WakeProvision invocations are what push caused."""
    base = mode_spec("provisioner")
    spec = with_poll(base, SessionScript.for_spec(base), 30)
    done = run_mode(
        SCENARIO,
        "provisioner",
        loaded=loaded_component,
        spec=spec,
        pace=PaceSettings(hold_ms=0, push=True),
    )
    served = assert_clean(done)
    assert served["wake_ups"].get("sent", 0) > 0, served
    assert served["wake_ups"].get("denied", 0) == 0
    assert served["requests_by_trigger"].get("WakeProvision", 0) > 0, served


def test_a_hold_at_or_past_the_poll_is_refused_and_the_default_stays_below_it() -> None:
    """Bug caught: a held request outliving the spec's poll (its entity would poll again
    while it is held), or the default hold refusing a short poll instead of shrinking."""
    spec = mode_spec("provisioner")  # polls every 2 s
    with pytest.raises(ValueError, match="below the spec's poll"):
        serve_pace(2000, False, spec)
    default = serve_pace(None, False, spec)
    assert default is not None and 0 < default.hold_ms < 2000
    one_second = with_poll(spec, SessionScript.for_spec(spec), 1)
    shrunk = serve_pace(None, False, one_second)
    assert shrunk is not None and 0 < shrunk.hold_ms < 1000
    assert serve_pace(0, False, spec) is None  # the direct path
    assert serve_pace(0, True, spec) == PaceSettings(hold_ms=0, push=True)


def test_hold_ms_zero_on_the_command_line_invokes_the_component_directly(
    loaded_component: LoadedComponent, capsys: pytest.CaptureFixture[str]
) -> None:
    """Bug caught: the old direct path unreachable from the command line, so the
    comparison with serve could not be made."""
    code = main(
        [
            "simulate", "--mode", "provisioner", "--jobs", "3", "--hold-ms", "0",
            "--component", str(loaded_component.path), "--no-tradeoff", "--json",
            "--e2b-create-latency-ms", "100", "--turns", "1", "--turn-ms", "60000",
        ]
    )  # fmt: skip
    assert code == 0
    summary = json.loads(capsys.readouterr().out)["summary"]
    assert summary["completed"] == 3 and summary["serve"] is None


@pytest.mark.usefixtures("ctrl_c_raises_keyboard_interrupt")
def test_an_interrupted_served_run_leaves_no_thread_running(
    loaded_component: LoadedComponent,
) -> None:
    """Bug caught: Ctrl-C leaving serve's server, its worker pool, the shim's epoch ticker
    or the Temper API endpoint running in the process."""
    interrupt_when_first_queued(loaded_component, pace=PaceSettings(hold_ms=1500, push=True))
