"""Each mock answer against E2B's vendored OpenAPI description (see ./openapi/README.md).

The suite-wide hook in tests/conftest.py checks every answer any test makes the mock send;
this file drives every route the mock serves, success and failure, checks each answer
directly, and shows the checker catching answers that do not conform."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from harness.mocks.e2b import MockE2BServer
from harness.mocks.e2b.connection import KeepRawSend
from tests.harness.mocks.e2b.fixtures import client, running_mock
from tests.harness.mocks.e2b.openapi_check import Answer, ResponseTap, checker


def answer_of(response: httpx.Response) -> Answer:
    return Answer(
        response.request.method,
        response.request.url.path,
        response.status_code,
        {k.lower(): v for k, v in response.headers.items()},
        response.content,
    )


@pytest.fixture
def server() -> Iterator[MockE2BServer]:
    with running_mock(max_sandboxes=2) as mock:
        yield mock


def test_every_route_the_mock_serves_answers_as_the_spec_says(server: MockE2BServer) -> None:
    answers: list[httpx.Response] = []
    with client(server) as http:

        def call(method: str, path: str, **kwargs: Any) -> httpx.Response:
            response = http.request(method, path, **kwargs)
            answers.append(response)
            return response

        body = {"templateID": "base", "timeout": 600, "metadata": {"k": "v"}}
        first = call("POST", "/sandboxes", json=body).json()["sandboxID"]
        second = call(
            "POST", "/v2/sandboxes", json=body, headers={"Idempotency-Key": "k-1"}
        ).json()["sandboxID"]
        call("POST", "/v2/sandboxes", json=body, headers={"Idempotency-Key": "k-1"})
        call("POST", "/v2/sandboxes", json=body)  # the cap's 429
        call("POST", "/sandboxes", json={"templateID": "base", "timeout": 0})  # 400
        call("GET", "/sandboxes")
        call("GET", "/sandboxes", params={"metadata": "k=v"})
        page = call("GET", "/v2/sandboxes", params={"limit": 1})
        call("GET", "/v2/sandboxes", params={"nextToken": page.headers["X-Next-Token"]})
        call("GET", "/v2/sandboxes", params={"state": "paused", "order": "asc"})
        call("GET", "/v2/sandboxes", params={"limit": 500})  # 400
        call("GET", f"/sandboxes/{first}")
        call("GET", "/sandboxes/nosuch")  # 404
        call("GET", "/sandboxes/Bad-Id-Form")  # 400
        call("POST", f"/sandboxes/{first}/timeout", json={"timeout": 900})
        call("POST", f"/sandboxes/{first}/timeout", json={})  # 400
        call("POST", f"/sandboxes/{first}/refreshes", json={"duration": 60})
        call("POST", "/sandboxes/nosuch/refreshes")  # 404
        call("POST", f"/sandboxes/{first}/pause")
        call("POST", f"/sandboxes/{first}/pause")  # 409
        call("GET", f"/sandboxes/{first}")  # paused detail
        call("GET", "/v2/sandboxes")  # running and paused items
        call("POST", "/v2/sandboxes", json=body)  # the freed slot
        call("POST", f"/sandboxes/{first}/resume", json={"timeout": 60})  # the cap's 429
        call("DELETE", f"/sandboxes/{second}")
        call("POST", f"/sandboxes/{first}/resume", json={"timeout": 60})  # 201
        call("POST", f"/sandboxes/{first}/resume")  # 409: running
        call("POST", f"/sandboxes/{first}/connect", json={"timeout": 60})  # 200
        call("POST", f"/v2/sandboxes/{first}/connect", json={"timeout": 60})
        call("POST", f"/sandboxes/{first}/pause")
        call("POST", f"/v2/sandboxes/{first}/connect", json={})  # 201: resumed
        call("POST", "/sandboxes/nosuch/connect", json={"timeout": 5})  # 404
        call("DELETE", f"/sandboxes/{first}")
        call("DELETE", f"/sandboxes/{first}")  # 404
        call("GET", "/no/such/route")  # unserved: 404 Error body
        call("PATCH", "/sandboxes")  # unserved method: 405 Error body
        http.headers["X-API-Key"] = "wrong"
        call("GET", "/v2/sandboxes")  # 401

    problems = [p for response in answers for p in checker().check(answer_of(response))]
    assert problems == []
    statuses = {(r.request.method, r.status_code) for r in answers}
    assert {
        ("POST", 201),
        ("POST", 200),
        ("POST", 204),
        ("POST", 409),
        ("POST", 429),
        ("GET", 200),
        ("GET", 400),
        ("GET", 404),
        ("DELETE", 204),
        ("DELETE", 404),
        ("GET", 401),
        ("PATCH", 405),
    } <= statuses
    assert server.stats().sandboxes_resumed == 2


def listed_item(**changes: Any) -> dict[str, Any]:
    item = {
        "templateID": "base",
        "alias": "base",
        "sandboxID": "isbx",
        "clientID": "c",
        "startedAt": "2026-01-01T00:00:00Z",
        "endAt": "2026-01-01T00:05:00Z",
        "cpuCount": 2,
        "memoryMB": 512,
        "diskSizeMB": 1024,
        "state": "running",
        "envdVersion": "0.2.0",
        "metadata": {},
    }
    item.update(changes)
    return {k: v for k, v in item.items() if v is not None}


def json_answer(method: str, path: str, status: int, body: Any, **headers: str) -> Answer:
    return Answer(
        method,
        path,
        status,
        {"content-type": "application/json", **headers},
        json.dumps(body).encode(),
    )


@pytest.mark.parametrize(
    ("answer", "wrong"),
    [
        (json_answer("GET", "/v2/sandboxes", 200, [listed_item(cpuCount=None)]), "cpuCount"),
        (json_answer("GET", "/v2/sandboxes", 200, [listed_item(state="asleep")]), "asleep"),
        (json_answer("GET", "/v2/sandboxes", 200, [listed_item(startedAt="noon")]), "noon"),
        (
            json_answer("GET", "/v2/sandboxes", 200, [], **{"x-total-running": "many"}),
            "X-Total-Running",
        ),
        (
            json_answer(
                "POST", "/v2/sandboxes", 201, {"sandboxID": "i", "templateID": "b", "clientID": "c"}
            ),
            "envdVersion",
        ),
        (json_answer("POST", "/sandboxes", 200, {}), "not documented"),
        (json_answer("GET", "/sandboxes/x", 404, {"message": "gone"}), "code"),
        (
            Answer("GET", "/no/such", 404, {"content-type": "text/plain"}, b"Not Found"),
            "text/plain",
        ),
        (Answer("POST", "/sandboxes/x/pause", 204, {}, b"{}"), "bodiless"),
    ],
)
def test_the_checker_catches_answers_that_break_the_spec(answer: Answer, wrong: str) -> None:
    problems = checker().check(answer)
    assert problems and wrong in " ".join(problems)


def test_the_suite_wide_hook_taps_every_mock_server(server: MockE2BServer) -> None:
    # Catches a hook that stopped wrapping the app (then nothing would be checked).
    app: Any = server._app
    assert isinstance(app, KeepRawSend) and isinstance(app.app, ResponseTap)
