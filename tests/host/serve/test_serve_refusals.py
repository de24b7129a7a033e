"""Every refusal of `serve` is JSON and logged with its reason, never the token; the
OpenAPI document describes what the service answers (issue 26, points 4, 5 and 8)."""

from __future__ import annotations

import json

import pytest

from host.serve.openapi import OPENAPI
from tests.host.serve.test_serve_app import CONTEXT, TOKEN, FakeComponent, client

AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.mark.parametrize(
    ("method", "path", "headers", "body", "status", "code"),
    [
        ("POST", "/v1/invocations", {"Authorization": "Bearer wrong-secret"}, CONTEXT, 401,
         "unauthorized"),
        ("POST", "/v1/invocations", {}, CONTEXT, 401, "unauthorized"),
        ("GET", "/", AUTH, None, 404, "not_found"),
        ("POST", "/v2/invocations", AUTH, CONTEXT, 404, "not_found"),
        ("GET", "/v1/invocations", AUTH, None, 405, "method_not_allowed"),
        ("POST", "/v1/invocations", AUTH, {"tenant": "acme"}, 400, "invalid_context"),
    ],
)  # fmt: skip
def test_every_refusal_is_json_and_logged_with_its_reason_never_the_token(
    method: str, path: str, headers: dict[str, str], body: object, status: int, code: str
) -> None:
    service = client(FakeComponent())
    answer = service.request(method, path, headers=headers, json=body)
    assert answer.status_code == status
    assert answer.headers["content-type"].startswith("application/json")
    assert answer.json()["error"]["code"] == code
    [line] = [entry for entry in service.lines if entry["event"] == "refused"]
    assert (line["status"], line["code"], line["path"]) == (status, code, path)
    assert line["reason"]
    logged = json.dumps(service.lines)
    assert TOKEN not in logged and "wrong-secret" not in logged


def test_a_wrong_token_and_a_missing_one_are_told_apart_in_the_log() -> None:
    service = client(FakeComponent())
    service.post("/v1/invocations", json=CONTEXT)
    service.post("/v1/invocations", json=CONTEXT, headers={"Authorization": "Bearer x"})
    reasons = [entry["reason"] for entry in service.lines if entry["event"] == "refused"]
    assert reasons == ["no bearer token", "the bearer token does not match"]


def test_the_openapi_document_is_served_without_a_token_and_names_every_route() -> None:
    service = client(FakeComponent())
    answer = service.get("/openapi.json")
    assert answer.status_code == 200 and answer.json() == OPENAPI
    operation = OPENAPI["paths"]["/v1/invocations"]["post"]
    assert set(operation["responses"]) == {"200", "400", "401", "413", "503"}
    schemas = OPENAPI["components"]["schemas"]
    # The 200 answer matches the success schema: exactly action, params, success true.
    ready = service.post("/v1/invocations", json=CONTEXT, headers=AUTH).json()
    assert set(ready) == set(schemas["TemperResult"]["required"]) and ready["success"] is True
    required = schemas["WasmInvocationContext"]["required"]
    for missing in required:
        partial = {
            k: v for k, v in {**CONTEXT, "trigger_action": "Provision"}.items() if k != missing
        }
        refused = service.post("/v1/invocations", json=partial, headers=AUTH)
        assert refused.status_code == 400, missing
