"""Invocation validation: bad input gets a typed failure before any state changes."""

from __future__ import annotations

import dataclasses

import pytest

from provisioner.config import SandboxSettings
from provisioner.invocation import validate
from provisioner.model import Invocation, ProvisionerError
from tests.builders import invocation

GOOD = invocation(trigger_action="Submit")


def code_of(invocation: Invocation) -> str:
    with pytest.raises(ProvisionerError) as refused:
        validate(invocation)
    return refused.value.failure.code


def test_a_good_invocation_defaults_to_provision() -> None:
    request = validate(GOOD)
    assert request.operation == "provision"
    assert request.entity == "CurationJob/job-1"


@pytest.mark.parametrize(
    ("changes", "code"),
    [
        ({"tenant": ""}, "invalid_invocation"),
        ({"entity_id": ""}, "invalid_invocation"),
        ({"entity_id": "x" * 129}, "invalid_invocation"),
        ({"entity_id": "job\n1"}, "invalid_invocation"),
        ({"tenant": "a\x00b"}, "invalid_invocation"),
        ({"trigger_params": "{oops"}, "invalid_invocation"),
        ({"trigger_params": "[1]"}, "invalid_invocation"),
        ({"entity_state": '"text"'}, "invalid_invocation"),
        ({"trigger_params": '{"a": "' + "x" * 70_000 + '"}'}, "invalid_invocation"),
        ({"config": (("operation", "explode"),)}, "unknown_operation"),
        ({"config": tuple((f"k{i}", "v") for i in range(65))}, "invalid_config"),
        ({"session_id": "s\x7f"}, "invalid_invocation"),
    ],
)
def test_bad_invocations_get_typed_failures(changes: dict[str, object], code: str) -> None:
    assert code_of(dataclasses.replace(GOOD, **changes)) == code  # type: ignore[arg-type]


def test_unicode_ids_are_accepted() -> None:
    request = validate(dataclasses.replace(GOOD, tenant="café", entity_id="ジョブ-1"))
    assert request.entity == "CurationJob/ジョブ-1"


@pytest.mark.parametrize(
    "config",
    [
        {"template_id": "bad template"},
        {"template_id": ""},
        {"template_id": "-starts-with-dash"},
        {"sandbox_timeout_s": "0"},
        {"sandbox_timeout_s": "-5"},
        {"sandbox_timeout_s": "1e9"},
        {"sandbox_timeout_s": "99999999999"},
        {"create_timeout_ms": "soon"},
        {"e2b_api_url": "ftp://api.e2b.app"},
        {"e2b_api_url": "https://api.e2b.app/?x=1"},
    ],
)
def test_bad_sandbox_settings_are_invalid_config(config: dict[str, str]) -> None:
    with pytest.raises(ProvisionerError) as refused:
        SandboxSettings.from_config(config)
    assert refused.value.failure.code == "invalid_config"
    assert not refused.value.failure.retryable
