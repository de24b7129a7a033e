"""The WIT outcome is `{action, params}`: the host reads success and the failure from what a
component answers (`component_runtime.decided`) and maps the result to Temper's shape in one
place."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest

from host.runtime.loader import LoadedComponent
from host.runtime.temper_context import outcome_to_json
from provisioner.model import Failure, Outcome
from tests.system.hardening_support import ProbeHost, make_probe_host, probe_component

pytestmark = pytest.mark.component
__all__ = ["probe_component"]

DENIED = {"code": "e2b_denied", "message": "no", "retryable": True, "error_message": "no"}


@pytest.fixture(scope="module")
def probe(probe_component: LoadedComponent) -> Iterator[ProbeHost]:
    host = make_probe_host(probe_component)
    yield host
    host.close()


def answer(probe: ProbeHost, action: str, params: str) -> Outcome:
    return probe.call("answer", probe_action=action, probe_params=params)


def test_a_decided_failure_is_a_success_carrying_its_typed_params(probe: ProbeHost) -> None:
    outcome = answer(probe, "SandboxFailed", json.dumps(DENIED))
    assert outcome.success and outcome.params == DENIED
    assert outcome.error == Failure("e2b_denied", "no", retryable=True)
    assert outcome_to_json(outcome) == {
        "action": "SandboxFailed",
        "params": DENIED,
        "success": True,
    }


def test_any_other_action_is_a_success_without_a_failure(probe: ProbeHost) -> None:
    outcome = answer(probe, "SandboxReady", '{"sandbox_id": "sb-1"}')
    assert (outcome.success, outcome.error) == (True, None)
    assert outcome_to_json(outcome) == {
        "action": "SandboxReady",
        "params": {"sandbox_id": "sb-1"},
        "success": True,
    }
    assert answer(probe, "SandboxStatus", "").params == {}


@pytest.mark.parametrize(
    ("action", "params", "reason"),
    [
        ("SandboxReady", "[1]", "not a JSON object"),
        ("SandboxReady", "{", "Expecting"),
        ("SandboxFailed", '{"code": "e2b_denied", "message": "no"}', "retryable"),
        ("SandboxFailed", '{"code": "e2b_denied", "message": "no", "retryable": "yes"}', "bool"),
        ("SandboxFailed", '{"code": 7, "message": "no", "retryable": false}', "code"),
        ("SandboxFailed", "{}", "code"),
        (
            "SandboxFailed",
            '{"code": "guest_trap", "message": "no", "retryable": true}',
            "host code guest_trap",
        ),
    ],
)
def test_an_answer_off_the_contract_is_the_hosts_malformed_result(
    probe: ProbeHost, action: str, params: str, reason: str
) -> None:
    outcome = answer(probe, action, params)
    assert not outcome.success and outcome.error is not None, outcome
    assert outcome.error.code == "malformed_result" and reason in outcome.error.message
    result = outcome_to_json(outcome)
    assert result["success"] is False
    assert result["typed_failure"]["code"] == "malformed_result"
