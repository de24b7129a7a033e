"""The service's HTTP surface in-process, with a fake component behind it."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from typing import Any

import pytest
from starlette.testclient import TestClient

from harness.temper_abi import Trigger, decode_terminal_result, dispatch_for
from host.serve import InvocationPool, ServeState, create_app, temper_result
from host.serve.metrics import ServeMetrics
from provisioner.model import Failure, Invocation, Outcome, failed

TOKEN = "t0ken"
CONTEXT = {
    "tenant": "acme",
    "entity_type": "CurationJob",
    "entity_id": "job-1",
    "integration_config": {
        "operation": "provision",
        "provisioner_token": TOKEN,
        "provisioner_url": "http://x/v1/invocations",
    },
}


class FakeComponent:
    def __init__(self, outcome: Outcome | None = None) -> None:
        self.calls: list[Invocation] = []
        self.outcome = outcome or Outcome("SandboxReady", {"sandbox_id": "sb-1"})
        self.release = threading.Event()
        self.release.set()

    def __call__(self, invocation: Invocation) -> Outcome:
        self.calls.append(invocation)
        self.release.wait(10)
        return self.outcome


class LoggedClient(TestClient):
    """A test client that also holds the log lines the service wrote."""

    def __init__(self, state: ServeState, lines: list[dict[str, Any]]) -> None:
        super().__init__(create_app(state))
        self.state = state
        self.lines = lines


def client(
    component: Callable[[Invocation], Outcome],
    *,
    workers: int = 2,
    probe: Any = None,
    metrics: ServeMetrics | None = None,
) -> LoggedClient:
    lines: list[dict[str, Any]] = []
    state = ServeState(
        token=TOKEN,
        pool=InvocationPool(workers),
        invoke=component,
        e2b_url="http://e2b.local",
        storage_probe=probe or (lambda: None),
        retry_after_s=3,
        metrics=metrics,
        log=lines.append,
    )
    return LoggedClient(state, lines)


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Bearer wrong"},
        {"Authorization": f"Basic {TOKEN}"},
        {"Authorization": f"Bearer {TOKEN}x"},
    ],
)
def test_a_missing_or_wrong_token_is_401_and_reaches_no_component(headers: dict[str, str]) -> None:
    component = FakeComponent()
    http = client(component)
    response = http.post("/v1/invocations", json=CONTEXT, headers=headers)
    assert response.status_code == 401
    assert response.headers["www-authenticate"] == "Bearer"
    assert http.get("/anything", headers=headers).status_code == 401
    assert component.calls == []


def test_health_needs_no_token_and_readiness_reports_storage() -> None:
    def broken() -> None:
        raise ConnectionError("redis down")

    assert client(FakeComponent()).get("/healthz").status_code == 200
    assert client(FakeComponent()).get("/readyz").json()["status"] == "ready"
    unready = client(FakeComponent(), probe=broken).get("/readyz")
    assert unready.status_code == 503 and "redis down" in unready.json()["storage"]


def test_an_invocation_answers_temper_s_result_and_logs_one_line() -> None:
    component = FakeComponent()
    http = client(component)
    response = http.post(
        "/v1/invocations", json=CONTEXT, headers={"Authorization": f"Bearer {TOKEN}"}
    )
    assert response.status_code == 200
    assert response.json() == {
        "action": "SandboxReady",
        "params": {"sandbox_id": "sb-1"},
        "success": True,
    }
    decode_terminal_result(response.text)  # Temper would accept it
    [invocation] = component.calls
    config = dict(invocation.config)
    assert "provisioner_token" not in config and "provisioner_url" not in config
    assert config["e2b_api_url"] == "http://e2b.local"
    [line] = http.lines
    assert line["event"] == "invocation" and line["entity_id"] == "job-1"
    assert line["action"] == "SandboxReady" and line["duration_ms"] >= 0
    assert {"tenant", "entity_type", "reason"} <= set(line)


def test_a_malformed_or_oversized_context_is_refused_before_the_component() -> None:
    component = FakeComponent()
    http = client(component)
    auth = {"Authorization": f"Bearer {TOKEN}"}
    bad = http.post("/v1/invocations", content=b"{nope", headers=auth)
    assert bad.status_code == 400 and bad.json()["error"]["code"] == "invalid_context"
    huge = http.post("/v1/invocations", content=b" " * (1024 * 1024 + 1), headers=auth)
    assert huge.status_code == 413
    assert component.calls == []


def test_a_saturated_pool_answers_503_with_retry_after_without_queueing() -> None:
    component = FakeComponent()
    component.release.clear()
    http = client(component, workers=1)
    auth = {"Authorization": f"Bearer {TOKEN}"}
    held: list[Any] = []
    first = threading.Thread(
        target=lambda: held.append(http.post("/v1/invocations", json=CONTEXT, headers=auth))
    )
    first.start()
    for _ in range(500):
        if component.calls:
            break
        threading.Event().wait(0.01)
    assert len(component.calls) == 1  # the only worker is inside the component
    refused = http.post("/v1/invocations", json=CONTEXT, headers=auth)
    assert refused.status_code == 503 and refused.headers["retry-after"] == "3"
    assert len(component.calls) == 1
    component.release.set()
    first.join(10)
    assert held[0].status_code == 200


def test_a_draining_service_refuses_new_invocations_and_closes_their_connection() -> None:
    # Catches: a draining service that keeps answering the polls of a connection kept
    # alive, so the drain lasts as long as its client polls (seen: uvicorn's whole limit).
    component = FakeComponent()
    http = client(component)
    auth = {"Authorization": f"Bearer {TOKEN}"}
    http.state.draining = True
    refused = http.post("/v1/invocations", json=CONTEXT, headers=auth)
    assert refused.status_code == 503 and refused.json()["error"]["code"] == "draining"
    assert refused.headers["retry-after"] == "3"
    assert refused.headers["connection"] == "close"
    assert component.calls == []
    assert [line["event"] for line in http.lines] == ["refused"]
    assert http.post("/v1/invocations", json=CONTEXT).status_code == 401  # the token first
    assert http.get("/readyz").status_code == 503


def test_host_failures_become_typed_failures_temper_accepts() -> None:
    # Catches: a trap or a budget reported as a success, or a typed failure Temper refuses.
    retryable = failed(Failure("deadline_exceeded", "ran past 120000 ms", retryable=True))
    odd = Outcome(
        "SandboxFailed", {}, success=False, error=Failure("invalid config!", "x" * 600, False)
    )
    first, second = temper_result(retryable), temper_result(odd)
    for result in (first, second):
        decoded = decode_terminal_result(json.dumps(result))
        assert not decoded.success
    assert first["typed_failure"]["category"] == "transient"
    assert first["typed_failure"]["diagnostic"] == "ran past 120000 ms"
    assert second["typed_failure"]["category"] == "permanent"
    assert second["typed_failure"]["code"] == "invalid_config_"
    assert "diagnostic" not in second["typed_failure"]  # over 512 bytes: omitted whole


def test_guest_failures_and_queueing_are_successes_that_keep_their_params() -> None:
    # Catches: SandboxFailed/SandboxQueued as Temper failures, which would reach the spec as
    # {error, error_message, integration} only; or an `error` key on a success.
    guest = failed(Failure("queue_timeout", "queued too long", retryable=False))
    queued = Outcome("SandboxQueued", {"position": 3, "retry_after_ms": 500})
    for outcome in (guest, queued):
        result = temper_result(outcome)
        assert set(result) == {"action", "params", "success"}
        decoded = decode_terminal_result(json.dumps(result))
        assert decoded.success and decoded.callback_params == outcome.params
        assert dispatch_for(Trigger("provision"), decoded).action == outcome.action
    assert temper_result(guest)["params"]["code"] == "queue_timeout"


@pytest.mark.parametrize("operation", ["inspect", " Inspect "])
def test_an_invocation_may_not_ask_for_the_account_inspection(operation: str) -> None:
    # Catches: a tenant's spec reading every tenant's waiting entities through serve.
    component = FakeComponent(Outcome("GatesInspected", {"waiters": [{"tenant": "other"}]}))
    http = client(component)
    context = {
        **CONTEXT,
        "integration_config": {**CONTEXT["integration_config"], "operation": operation},  # type: ignore[dict-item]
    }
    response = http.post(
        "/v1/invocations", json=context, headers={"Authorization": f"Bearer {TOKEN}"}
    )
    assert response.status_code == 200
    result = decode_terminal_result(response.text)
    assert result.callback_action == "SandboxFailed"
    assert result.callback_params["code"] == "unknown_operation"
    assert "other" not in response.text
    assert component.calls == []


def test_the_gauges_inspect_with_the_latest_settings_the_component_accepted() -> None:
    component = FakeComponent()
    http = client(component)
    headers = {"Authorization": f"Bearer {TOKEN}"}
    good = {**CONTEXT["integration_config"], "create_slots": "3"}  # type: ignore[dict-item]
    http.post("/v1/invocations", json={**CONTEXT, "integration_config": good}, headers=headers)
    assert http.state.settings["create_slots"] == "3"
    component.outcome = failed(Failure("invalid_config", "create_slots: not a number", False))
    bad = {**good, "create_slots": "lots"}
    http.post("/v1/invocations", json={**CONTEXT, "integration_config": bad}, headers=headers)
    assert http.state.settings["create_slots"] == "3"
