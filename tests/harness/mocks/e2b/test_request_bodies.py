"""The mock E2B refuses (400) every request body that E2B's published OpenAPI description
refuses, checked over generated JSON bodies per operation (issue 26, point 8: the mock
answered `null` on POST /sandboxes/{id}/refreshes with 204, where the description requires
an object)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from harness.mocks.e2b import MockE2BServer
from tests.harness.mocks.e2b.fixtures import client, running_mock
from tests.harness.mocks.e2b.openapi_check import SpecChecker

CHECKER = SpecChecker()
# (path under the sandbox, or "" for a create) -> the operation's request body schema.
ROUTES = ["/sandboxes", "/timeout", "/refreshes", "/pause", "/resume", "/connect"]


def request_schema(path: str) -> dict[str, Any]:
    template = path if path == "/sandboxes" else "/sandboxes/{sandboxID}" + path
    operation = CHECKER.spec["paths"][template]["post"]
    body = CHECKER._resolve(operation["requestBody"])
    schema: dict[str, Any] = body["content"]["application/json"]["schema"]
    return schema


def property_names(schema: dict[str, Any]) -> list[str]:
    return sorted(CHECKER._resolve(schema).get("properties", {}))


def json_values(keys: list[str]) -> st.SearchStrategy[Any]:
    scalars = (
        st.none()
        | st.booleans()
        | st.integers(min_value=-(2**40), max_value=2**40)
        | st.floats(allow_nan=False, allow_infinity=False)
        | st.text(max_size=8)
    )
    names = st.sampled_from(keys) | st.text(max_size=6) if keys else st.text(max_size=6)
    return st.recursive(
        scalars,
        lambda inner: st.lists(inner, max_size=3) | st.dictionaries(names, inner, max_size=4),
        max_leaves=8,
    )


def refused_by_the_spec(schema: dict[str, Any], body: Any) -> bool:
    return any(True for _ in CHECKER._validator(schema).iter_errors(body))


@pytest.fixture(scope="module")
def sandbox() -> Iterator[tuple[MockE2BServer, httpx.Client, str]]:
    with running_mock(max_sandboxes=5) as mock, client(mock) as http:
        created = http.post("/sandboxes", json={"templateID": "base", "timeout": 600})
        yield mock, http, created.json()["sandboxID"]


def test_a_null_body_on_refreshes_is_refused(
    sandbox: tuple[MockE2BServer, httpx.Client, str],
) -> None:
    _, http, sandbox_id = sandbox
    answer = http.post(f"/sandboxes/{sandbox_id}/refreshes", content=b"null",
                       headers={"content-type": "application/json"})  # fmt: skip
    assert answer.status_code == 400, answer.text
    # No body at all is still allowed (the body is optional there).
    assert http.post(f"/sandboxes/{sandbox_id}/refreshes").status_code == 204


@pytest.mark.parametrize("path", ROUTES)
def test_every_body_the_spec_refuses_is_refused(
    sandbox: tuple[MockE2BServer, httpx.Client, str], path: str
) -> None:
    _, http, sandbox_id = sandbox
    schema = request_schema(path)
    url = path if path == "/sandboxes" else f"/sandboxes/{sandbox_id}{path}"

    @settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
    @given(body=json_values(property_names(schema)))
    def check(body: Any) -> None:
        if not refused_by_the_spec(schema, body):
            return  # only bodies the spec refuses are sent (a valid one may change state)
        answer = http.post(url, content=json.dumps(body).encode(),
                           headers={"content-type": "application/json"})  # fmt: skip
        assert answer.status_code == 400, (path, body, answer.status_code, answer.text)

    check()
