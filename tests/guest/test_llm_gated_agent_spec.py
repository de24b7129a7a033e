"""examples/llm_gated_agent.ioa.toml: consistent with itself, with the Temper rules it
cites, and with what the component answers to its triggers."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

from provisioner.app import run
from provisioner.config import read_config
from provisioner.model import Outcome
from tests.builders import invocation
from tests.guest.resource_harness import ResourceHarness

SPEC = Path(__file__).resolve().parents[2] / "examples" / "llm_gated_agent.ioa.toml"
WAITING = {
    "WaitingForSlot": ("PollSessionSlot", "SessionSlotQueued", "SessionSlotGranted"),
    "WaitingForLlm": ("PollLlmPermit", "LlmPermitQueued", "LlmPermitGranted"),
}


def load() -> dict[str, Any]:
    with SPEC.open("rb") as handle:
        return tomllib.load(handle)


def actions(spec: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {action["name"]: action for action in spec["action"]}


def component_triggers(spec: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    return [
        (action["name"], trigger)
        for action in spec["action"]
        for trigger in action.get("triggers", [])
        if trigger["module"] == "sandbox_provisioner"
    ]


def test_every_state_action_and_timer_reference_resolves() -> None:
    spec = load()
    states = set(spec["automaton"]["states"])
    named = actions(spec)
    assert spec["automaton"]["initial"] in states
    fields = {state["name"] for state in spec["state"]}
    for action in named.values():
        # No `to`: the action stays where it is (types/action.rs).
        assert set(action["from"]) <= states, action["name"]
        assert action.get("to") is None or action["to"] in states, action["name"]
        for trigger in action.get("triggers", []):
            assert trigger["kind"] == "wasm"
            for key in ("on_success", "on_failure"):
                assert trigger.get(key) is None or trigger[key] in named, trigger["name"]
        assert set(action.get("params", [])) - fields <= {
            "queue_length", "in_use", "limit", "waited_ms", "input_tokens",
            "output_tokens", "status", "headers", "code", "message", "retryable",
        }  # fmt: skip
    assert "integration" not in spec  # retired in the newest syntax
    names = [t["name"] for a in spec["action"] for t in a.get("triggers", [])]
    assert len(names) == len(set(names))
    for timer in spec["state_timeout"]:
        assert timer["state"] in states and timer["on_timeout"] in named
        assert set(timer.get("reset_on", [])) <= set(named)


def test_one_timer_per_state_and_the_waiting_ones_poll_and_are_reset_by_the_queued_answer() -> None:
    # Temper arms only the first [[state_timeout]] of a state (state_timeouts/arming.rs),
    # and reset_on acts only on a self-loop that stays in the state (tracker.rs).
    spec = load()
    named = actions(spec)
    timed = [timer["state"] for timer in spec["state_timeout"]]
    assert len(timed) == len(set(timed))
    for state, (poll, queued, _) in WAITING.items():
        timer = next(t for t in spec["state_timeout"] if t["state"] == state)
        assert timer["on_timeout"] == poll and timer["reset_on"] == [queued]
        assert named[queued]["from"] == [state] and named[queued]["to"] == state
        assert named[poll]["from"] == [state] and named[poll]["to"] == state
        (trigger,) = named[poll]["triggers"]
        assert trigger["config"]["operation"] == "acquire"
        # The component never advises a wait longer than the poll interval.
        assert int(trigger["config"]["poll_max_ms"]) <= timer["after_seconds"] * 1000


def test_a_waiting_state_polls_past_its_gate_s_queue_timeout() -> None:
    # Catches the stranded session on a Temper that caps fires: upstream's timers never read
    # max_occurrences, but the durable timeout delivery of the nikstern/temper fork fires a
    # state's timer at most max_occurrences times per entity, reset_on giving none back
    # (docs/temper-upstream.md), so there a budget that ends at the queue timeout (720
    # polls of 5 s against 3600 s) leaves the last queued answer re-arming nothing.
    spec = load()
    named = actions(spec)
    for state, (poll, _, _) in WAITING.items():
        timer = next(t for t in spec["state_timeout"] if t["state"] == state)
        (trigger,) = named[poll]["triggers"]
        config = read_config(trigger["config"])
        gate = config.resources[trigger["config"]["resource"]]
        timeout_ms = gate.queue_timeout_ms or config.admission.queue_timeout_ms
        polls_ms = timer["max_occurrences"] * timer["after_seconds"] * 1000
        assert polls_ms >= timeout_ms + timer["after_seconds"] * 1000, state


def test_the_gated_triggers_have_no_on_success_and_their_answers_are_declared() -> None:
    # With an on_success the runtime would dispatch it for the queued answer too, and the
    # queue status would be lost (dispatch/wasm/invocation.rs).
    spec = load()
    named = actions(spec)
    gated: set[str] = set()
    for _, trigger in component_triggers(spec):
        config = trigger["config"]
        # Every operation may answer SandboxFailed as a success: no trigger has on_success.
        assert "on_success" not in trigger, trigger["name"]
        if config["operation"] != "acquire":
            continue
        gated.add(config["resource"])
        assert config["granted_action"] in named and config["queued_action"] in named
        queued = named[config["queued_action"]]
        assert {"position", "reason", "retry_after_ms", "eta_ms"} <= set(queued["params"])
    # Both gates were checked (a spec whose acquires were renamed would check nothing).
    assert gated == {"sessions", "llm"}


def test_every_trigger_config_is_valid_and_one_gate_has_one_set_of_limits() -> None:
    spec = load()
    limits: dict[str, dict[str, str]] = {}
    for _, trigger in component_triggers(spec):
        config = trigger["config"]
        assert all(isinstance(value, str) for value in config.values())
        gates = read_config(config).resources
        resource = config["resource"]
        assert resource in gates
        mine = {k: v for k, v in config.items() if k.startswith(f"resource.{resource}.")}
        assert limits.setdefault(resource, mine) == mine, trigger["name"]
    assert set(limits) == {"sessions", "llm"}


FAILURE_PATH = ("Failing", "FailingRetried", "Failed")


def test_every_way_to_failed_gives_back_the_permit_and_the_slot() -> None:
    # Every way into the failure path, and every ask on it, releases both; Failed is
    # reached from it only by the slot's confirmed release or by giving up.
    spec = load()
    ways_to_failed = [
        action
        for action in spec["action"]
        if action.get("to") in FAILURE_PATH and action["name"] != "FailureSlotReleased"
    ]
    assert len(ways_to_failed) == 5, "expected Fail, SandboxFailed, LivenessTimeout, retry, give-up"
    into_failed = {a["name"] for a in spec["action"] if a.get("to") == "Failed"}
    assert into_failed == {"FailureSlotReleased", "GiveUpRelease"}
    for action in ways_to_failed:
        released = {
            t["config"]["resource"]
            for t in action.get("triggers", [])
            if t["module"] == "sandbox_provisioner" and t["config"]["operation"] == "release"
        }
        assert released == {"llm", "sessions"}, action["name"]


def fire(
    harness: ResourceHarness, trigger: dict[str, Any], entity: str, state: dict[str, Any]
) -> Outcome:
    made = invocation(
        trigger["config"],
        entity_type="LlmGatedAgent",
        entity_id=entity,
        trigger_action="Submit",
        entity_state=state,
    )
    return run(made, harness.ports("acme"))


def test_a_burst_of_submits_queues_at_the_slot_and_the_answers_drive_the_spec() -> None:
    # The component's answers to the spec's own triggers are actions the spec can take
    # from the state it is in, with the params it declares.
    spec = load()
    named = actions(spec)
    triggers = {t["name"]: t for _, t in component_triggers(spec)}
    harness = ResourceHarness({})
    state = {s["name"]: s["initial"] for s in spec["state"]}
    answers = [fire(harness, triggers["acquire_session_slot"], f"job-{i}", state) for i in range(4)]
    assert [a.action for a in answers] == ["SessionSlotGranted"] * 2 + ["SessionSlotQueued"] * 2
    for answer in answers:
        assert "WaitingForSlot" in named[answer.action]["from"]
    assert set(named["SessionSlotQueued"]["params"]) <= set(answers[2].params)
    llm = fire(harness, triggers["acquire_first_llm_permit"], "job-0", state)
    assert llm.action == "LlmPermitGranted" and "WaitingForLlm" in named[llm.action]["from"]
    released = fire(harness, triggers["release_session_slot"], "job-0", state)
    assert released.action == "SessionSlotReleased" and released.params["released"] is True
    assert "Releasing" in named[released.action]["from"]
    polled = fire(harness, triggers["poll_session_slot"], "job-2", state)
    assert polled.action == "SessionSlotGranted"


def test_a_static_on_success_on_a_settle_or_release_is_flagged() -> None:
    """Issue 26, point 2: every operation may answer SandboxFailed as a success, so a static
    on_success on settle_llm_call would dispatch LlmSettled for a failed settle
    (invocation.rs). Bug caught: the contract check counting one answer for settle and
    release, and passing such a spec."""
    from harness.simulator.contract import check_spec
    from harness.simulator.spec import parse_spec

    text = SPEC.read_text()
    for trigger in ("settle_llm_call", "release_session_slot"):
        named = f'name = "{trigger}"\nkind = "wasm"\nmodule = "sandbox_provisioner"\n'
        assert named in text
        broken = text.replace(named, named + 'on_success = "LlmSettled"\n', 1)
        findings = check_spec(parse_spec(broken, source=trigger))
        assert any(f.rule == "static-on-success" and trigger in f.where for f in findings)
