"""examples/curation_job.toml: consistent with itself and with what the component does."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

from provisioner.config import AdmissionConfig, SandboxSettings

SPEC = Path(__file__).resolve().parents[3] / "examples" / "curation_job.toml"


def load() -> dict[str, Any]:
    with SPEC.open("rb") as handle:
        return tomllib.load(handle)


def actions(spec: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {action["name"]: action for action in spec["action"]}


def test_every_state_action_trigger_and_timer_reference_resolves() -> None:
    """Bug caught: a typo in a state or action name makes the runtime reject the spec, or
    silently never fire a timer."""
    spec = load()
    states = set(spec["automaton"]["states"])
    named = actions(spec)
    assert spec["automaton"]["initial"] in states
    for action in named.values():
        assert set(action["from"]) <= states, action["name"]
        assert action["to"] in states, action["name"]
    triggers = {integration["trigger"] for integration in spec["integration"]}
    fired = {
        effect["name"]
        for action in named.values()
        for effect in action.get("effect", [])
        if effect["type"] == "trigger"
    }
    assert fired == triggers
    for timer in spec["state_timeout"]:
        assert timer["state"] in states
        assert timer["on_timeout"] in named
        assert set(timer.get("reset_on", [])) <= set(named)
    for integration in spec["integration"]:
        for key in ("on_success", "on_failure"):
            assert integration[key] in named
    assert set(spec["admission"]["max_concurrent_actions"]) <= set(named)


def test_a_queued_job_counts_as_alive_and_is_polled_again() -> None:
    """Bug caught: the incident itself: a liveness timer that SandboxQueued cannot reset."""
    spec = load()
    provisioning = [t for t in spec["state_timeout"] if t["state"] == "Provisioning"]
    liveness = [t for t in provisioning if t["on_timeout"] == "LivenessTimeout"]
    assert liveness and all("SandboxQueued" in t["reset_on"] for t in liveness)
    polls = [t for t in provisioning if t["on_timeout"] == "PollSandbox"]
    assert polls and polls[0]["after_seconds"] < liveness[0]["after_seconds"]
    poll = actions(spec)["PollSandbox"]
    assert {"type": "trigger", "name": "provision_sandbox"} in poll["effect"]
    # The component is told not to advise waits longer than the poll interval.
    provision = next(i for i in spec["integration"] if i["name"] == "provision_sandbox")
    assert int(provision["config"]["poll_max_ms"]) <= polls[0]["after_seconds"] * 1000


def test_every_outcome_of_provision_has_a_transition_out_of_provisioning() -> None:
    """Bug caught: an outcome the spec cannot take leaves the job waiting silently."""
    named = actions(load())
    for outcome in ("SandboxReady", "SandboxQueued", "SandboxFailed"):
        assert "Provisioning" in named[outcome]["from"], outcome
    assert named["SandboxReleased"]["from"] == ["Releasing"]


def test_every_way_out_of_a_sandbox_releases_it() -> None:
    """Bug caught: a job that fails or completes without triggering the release, leaving
    its sandbox (and its admission permit) behind."""
    named = actions(load())
    for name, action in named.items():
        if action["to"] in ("Failed", "Releasing") and action["to"] not in action["from"]:
            assert {"type": "trigger", "name": "release_sandbox"} in action.get("effect", []), name


def test_integration_configs_are_valid_component_config() -> None:
    """Bug caught: a key or value the component would answer with invalid_config."""
    spec = load()
    operations = set()
    for integration in spec["integration"]:
        assert integration["type"] == "wasm"
        assert integration["module"] == "sandbox_provisioner"
        config = {key: str(value) for key, value in integration["config"].items()}
        assert all(isinstance(value, str) for value in integration["config"].values())
        SandboxSettings.from_config(config)
        AdmissionConfig.from_config(config)
        operations.add(config["operation"])
    assert operations == {"provision", "release"}
