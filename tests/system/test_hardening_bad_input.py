"""Bad input (issue 7): each row gets a typed failure code and a message, changes no stored
state and shows no traceback. Rows run through the built component against a host whose
storage already holds a provisioned entity, and the whole storage is compared before and
after."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import Any

import pytest

from host.runtime.loader import LoadedComponent
from host.runtime.temper_context import InvalidContext, parse_context
from host.storage.base import StorageUnavailable
from provisioner.model import Invocation, Outcome
from provisioner.ports import Entry
from tests.host.runtime.test_end_to_end import Host, invocation, make_host
from tests.system.hardening_support import DOCUMENTED_CODES, SnapshotBackend

pytestmark = pytest.mark.component

FAST = {"create_rate_per_s": "1000", "create_slots": "16"}


@pytest.fixture(scope="module")
def provisioned(loaded_component: LoadedComponent) -> Iterator[tuple[Host, Any]]:
    """One host for the module: tenant acme's job-1 is provisioned before the rows run."""
    from harness.mocks.e2b import MockE2BConfig, MockE2BServer
    from tests.conftest import API_KEY

    with MockE2BServer(MockE2BConfig(api_key=API_KEY)) as mock:
        host = make_host(loaded_component, mock.url, storage=SnapshotBackend())
        ready = host.run("job-1", **FAST)
        assert ready.action == "SandboxReady", ready
        yield host, mock
        host.runtime.close()


def good(url: str, operation: str = "provision", **config: str) -> Invocation:
    return invocation(url, "job-1", operation, **{**FAST, **config})


def fields(**changes: Any) -> Any:
    return lambda url, operation: dataclasses.replace(good(url, operation), **changes)


def config(**settings: str) -> Any:
    def build(url: str, operation: str) -> Invocation:
        chosen = {**settings}
        return good(url, chosen.pop("operation", operation), **chosen)

    return lambda url, operation: build(url, operation)


ROWS: list[tuple[str, Any, str, str]] = [
    # (row, invocation from the E2B url, expected code, a fragment of the message)
    ("malformed JSON params", fields(trigger_params="{not json"), "invalid_invocation", "JSON"),
    ("malformed JSON state", fields(entity_state='{"a": '), "invalid_invocation", "JSON"),
    ("params are an array", fields(trigger_params="[1, 2]"), "invalid_invocation", "object"),
    ("params are a string", fields(trigger_params='"x"'), "invalid_invocation", "object"),
    ("state is a number", fields(entity_state="42"), "invalid_invocation", "object"),
    ("integer setting is text", config(create_slots="four"), "invalid_config", "create_slots"),
    ("integer setting is a float", config(sandbox_timeout_s="1.5"), "invalid_config", "integer"),
    ("missing tenant", fields(tenant=""), "invalid_invocation", "tenant"),
    ("missing entity id", fields(entity_id=""), "invalid_invocation", "entity_id"),
    ("missing entity type", fields(entity_type=""), "invalid_invocation", "entity_type"),
    (
        "oversized params",
        fields(trigger_params='{"a": "' + "x" * (64 * 1024) + '"}'),
        "invalid_invocation",
        "larger",
    ),
    (
        "oversized state",
        fields(entity_state='{"a": "' + "x" * (64 * 1024) + '"}'),
        "invalid_invocation",
        "larger",
    ),
    ("oversized id", fields(entity_id="j" * 129), "invalid_invocation", "longer"),
    ("oversized config value", config(template_id="t" * 5000), "invalid_config", "too long"),
    (
        "too many config entries",
        fields(config=tuple((f"k{i}", "v") for i in range(65))),
        "invalid_config",
        "config entries",
    ),
    ("unknown operation", config(operation="explode"), "unknown_operation", "explode"),
    ("empty-looking operation", config(operation="provision;drop"), "unknown_operation", ""),
    ("template id empty", config(template_id=" "), "invalid_config", "template_id"),
    ("template id traversal", config(template_id="../etc"), "invalid_config", "template_id"),
    ("template id with space", config(template_id="a b"), "invalid_config", "template_id"),
    ("template id too long", config(template_id="t" * 129), "invalid_config", "template_id"),
    ("template id unicode", config(template_id="tëmplate"), "invalid_config", "template_id"),
    ("template id control", config(template_id="base\x00"), "invalid_config", "template_id"),
    ("NUL in tenant", fields(tenant="ac\x00me"), "invalid_invocation", "control"),
    ("newline in entity id", fields(entity_id="job\n1"), "invalid_invocation", "control"),
    ("DEL in entity type", fields(entity_type="Job\x7f"), "invalid_invocation", "control"),
    ("escape in session id", fields(session_id="s\x1b[2J"), "invalid_invocation", "control"),
    ("lone surrogate in tenant", fields(tenant="ac\ud800me"), "invalid_invocation", "Unicode"),
    ("lone surrogate in id", fields(entity_id="\udfff"), "invalid_invocation", "Unicode"),
    ("lone surrogate in config", config(template_id="\ud83d"), "invalid_invocation", "Unicode"),
    ("negative slots", config(create_slots="-1"), "invalid_config", "create_slots"),
    ("zero slots", config(create_slots="0"), "invalid_config", "create_slots"),
    ("huge slots", config(create_slots="1e12"), "invalid_config", "create_slots"),
    ("NaN rate", config(create_rate_per_s="nan"), "invalid_config", "create_rate_per_s"),
    ("infinite rate", config(create_rate_per_s="inf"), "invalid_config", "create_rate_per_s"),
    ("zero rate", config(create_rate_per_s="0"), "invalid_config", "create_rate_per_s"),
    ("negative rate", config(create_rate_per_s="-5"), "invalid_config", "create_rate_per_s"),
    ("zero sandboxes", config(max_sandboxes="0"), "invalid_config", "max_sandboxes"),
    ("huge sandboxes", config(max_sandboxes="1e300"), "invalid_config", "max_sandboxes"),
    ("negative queue timeout", config(queue_timeout_s="-1"), "invalid_config", "queue_timeout"),
    ("huge queue timeout", config(queue_timeout_s="1e9"), "invalid_config", "queue_timeout"),
    ("negative retry budget", config(retry_budget="-1"), "invalid_config", "retry_budget"),
    ("zero attempts", config(max_create_attempts="0"), "invalid_config", "max_create_attempts"),
    ("poll bounds crossed", config(poll_min_ms="900", poll_max_ms="800"), "invalid_config", "poll"),
    (
        "tenant cap over account cap",
        config(max_sandboxes="5", max_sandboxes_per_tenant="6"),
        "invalid_config",
        "max_sandboxes_per_tenant",
    ),
    ("zero sandbox timeout", config(sandbox_timeout_s="0"), "invalid_config", "sandbox_timeout_s"),
    ("huge sandbox timeout", config(sandbox_timeout_s="9" * 30), "invalid_config", "at most"),
    ("zero create timeout", config(create_timeout_ms="0"), "invalid_config", "create_timeout_ms"),
    ("E2B URL not http", config(e2b_api_url="ftp://x"), "invalid_config", "e2b_api_url"),
    ("E2B URL with query", config(e2b_api_url="http://a/?q"), "invalid_config", "e2b_api_url"),
]


def assert_typed_failure(outcome: Outcome, code: str, fragment: str) -> None:
    # A refusal the guest decided: a Temper success whose action is SandboxFailed.
    assert outcome.action == "SandboxFailed" and outcome.success, outcome
    assert outcome.error is not None
    assert outcome.error.code == code, outcome
    assert outcome.error.code in DOCUMENTED_CODES
    assert outcome.params["code"] == code and outcome.params["message"] == outcome.error.message
    assert fragment.lower() in outcome.error.message.lower(), outcome.error.message
    assert outcome.error.message and "Traceback" not in outcome.error.message


@pytest.mark.parametrize("operation", ["provision", "release", "status"])
@pytest.mark.parametrize(("row", "build", "code", "fragment"), ROWS, ids=[r[0] for r in ROWS])
def test_a_bad_invocation_gets_a_typed_failure_and_changes_nothing(
    provisioned: tuple[Host, Any], row: str, build: Any, code: str, fragment: str, operation: str
) -> None:
    """Breaks if a bad input is accepted, answered with an untyped or host-level failure,
    or if any stored key or version changes (checked for every operation)."""
    host, mock = provisioned
    made = build(mock.url, operation)
    storage = host.storage
    assert isinstance(storage, SnapshotBackend)
    before = storage.snapshot()
    requests_before = mock.stats().requests_total
    outcome = host.runtime.invoke(made)
    assert_typed_failure(outcome, code, fragment)
    assert storage.snapshot() == before
    assert mock.stats().requests_total == requests_before


def test_valid_unicode_ids_are_accepted(provisioned: tuple[Host, Any]) -> None:
    host, mock = provisioned
    made = dataclasses.replace(good(mock.url), tenant="ünï 😀", entity_id="作业-1")
    assert host.runtime.invoke(made).action == "SandboxReady"


class UnavailableOnGet(SnapshotBackend):
    def get(self, namespace: str, key: str) -> Entry | None:
        raise StorageUnavailable("backend down")


def test_a_storage_outage_is_a_retryable_storage_failure(
    loaded_component: LoadedComponent, mock_e2b: Any
) -> None:
    """Breaks if a storage error on `get` cannot cross the WIT boundary (it used to trap the
    guest as host_error: wasmtime-py could not lower result<option<entry>, _>'s err case),
    or if a provision during an outage ends the session: it must stay queued (reason
    `storage`), since Temper routes a SandboxFailed to Failed."""
    host = make_host(loaded_component, mock_e2b.url, storage=UnavailableOnGet())
    queued = host.run(operation="provision", **FAST)
    assert queued.action == "SandboxQueued" and queued.success, queued
    assert queued.params["reason"] == "storage" and int(queued.params["retry_after_ms"]) > 0
    for operation in ("release", "status"):
        outcome = host.run(operation=operation, **FAST)
        assert_typed_failure(outcome, "storage_unavailable", "backend down")
        assert outcome.error is not None and outcome.error.retryable
    assert mock_e2b.stats().requests_total == 0
    host.runtime.close()


# -- the context a runtime hands over (the CLI's input) -----------------------------------


CONTEXTS = [
    ("{", "not valid JSON"),
    ("[]", "JSON object"),
    ('{"entity_type": "Job", "entity_id": "j"}', "tenant is missing"),
    ('{"tenant": "t", "entity_type": "Job"}', "entity_id is missing"),
    ('{"tenant": 5, "entity_type": "Job", "entity_id": "j"}', "tenant must be a string"),
    ('{"tenant": "t", "entity_type": "J", "entity_id": "j", "trigger_params": [1]}', "object"),
    ('{"tenant": "t", "entity_type": "J", "entity_id": "j", "integration_config": []}', "config"),
    (
        '{"tenant": "t", "entity_type": "J", "entity_id": "j", "integration_config": {"a": []}}',
        "integration_config.a",
    ),
    ('{"tenant": "t", "entity_type": "J", "entity_id": "j", "session_id": 3}', "session_id"),
    ('{"tenant": "' + "x" * (1 << 20) + '"}', "larger than"),
]


@pytest.mark.parametrize(("text", "complaint"), CONTEXTS, ids=[c[1] for c in CONTEXTS])
def test_a_bad_context_is_refused_with_a_clear_message(text: str, complaint: str) -> None:
    with pytest.raises(InvalidContext) as refused:
        parse_context(text)
    assert complaint in str(refused.value)


def test_the_rows_run_against_a_provisioned_entity(provisioned: tuple[Host, Any]) -> None:
    """The snapshot comparison means something only if there is state to disturb."""
    host, mock = provisioned
    status = host.runtime.invoke(good(mock.url, "status"))
    assert status.params["entity"]["state"] == "ready", status
    assert status.params["gates"]["account"]["capacity"]["in_use"] >= 1
