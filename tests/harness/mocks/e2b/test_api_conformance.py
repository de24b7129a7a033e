"""The mock's routes behave as E2B's published API says (spec/openapi.yml in e2b-dev/infra,
vendored in ./openapi) and as E2B's API server does (its handlers, cited in the mock)."""

from __future__ import annotations

import base64
from collections.abc import Iterator
from datetime import datetime
from typing import Any

import httpx
import pytest

from harness.mocks.e2b import MockE2BServer
from tests.harness.mocks.e2b.fixtures import (
    FrozenClock,
    SteerableClock,
    client,
    create,
    running_mock,
)


@pytest.fixture
def clock() -> FrozenClock:
    return FrozenClock()


@pytest.fixture
def server(clock: FrozenClock) -> Iterator[MockE2BServer]:
    with running_mock(clock=clock) as mock:
        yield mock


@pytest.fixture
def http(server: MockE2BServer) -> Iterator[httpx.Client]:
    with client(server) as c:
        yield c


def made(http: httpx.Client, clock: FrozenClock, n: int, **body: Any) -> list[str]:
    """``n`` sandboxes started one second apart, oldest first."""
    ids = []
    for _ in range(n):
        response = create(http, timeout=3600, **body)
        assert response.status_code == 201, response.text
        ids.append(response.json()["sandboxID"])
        clock.advance(1.0)
    return ids


def assert_lives_15_seconds_more(http: httpx.Client, clock: FrozenClock, sandbox_id: str) -> None:
    """E2B's 15 s (the refresh default and floor): still there 14 s on, gone at 15.5 s."""
    clock.advance(14.0)
    assert http.get(f"/sandboxes/{sandbox_id}").status_code == 200
    clock.advance(1.5)
    assert http.get(f"/sandboxes/{sandbox_id}").status_code == 404


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/no/such/route"),
        ("POST", "/sandboxes/abc/snapshots"),
        ("GET", "/templates"),
        ("PUT", "/sandboxes"),
    ],
)
def test_unserved_routes_answer_the_error_json_body(
    http: httpx.Client, method: str, path: str
) -> None:
    # Catches Starlette's text/plain 404/405, which the SDK cannot parse.
    response = http.request(method, path)
    assert response.status_code in (404, 405)
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert body["code"] == response.status_code and isinstance(body["message"], str)


def test_both_lists_answer_newest_first_and_v2_honours_order_asc(
    http: httpx.Client, clock: FrozenClock
) -> None:
    # Catches the old oldest-first order.
    ids = made(http, clock, 3)
    newest_first = list(reversed(ids))
    assert [s["sandboxID"] for s in http.get("/sandboxes").json()] == newest_first
    assert [s["sandboxID"] for s in http.get("/v2/sandboxes").json()] == newest_first
    ascending = http.get("/v2/sandboxes", params={"order": "asc"}).json()
    assert [s["sandboxID"] for s in ascending] == ids


def test_v2_list_reports_x_total_running_before_paging_and_only_for_running(
    http: httpx.Client, clock: FrozenClock
) -> None:
    # Catches a missing X-Total-Running, or one counting the page or the paused.
    ids = made(http, clock, 4, metadata={"team": "a"})
    made(http, clock, 1, metadata={"team": "b"})
    assert http.post(f"/sandboxes/{ids[0]}/pause").status_code == 204
    page = http.get("/v2/sandboxes", params={"limit": 1, "metadata": "team=a"})
    assert len(page.json()) == 1
    assert page.headers["X-Total-Running"] == "3"
    paused_only = http.get("/v2/sandboxes", params={"state": "paused"})
    assert [s["sandboxID"] for s in paused_only.json()] == [ids[0]]
    assert "X-Total-Running" not in paused_only.headers


def test_v2_list_honours_started_after_and_template(http: httpx.Client, clock: FrozenClock) -> None:
    # Catches startedAfter being ignored.
    older = made(http, clock, 2)
    newer = made(http, clock, 2, templateID="other")
    cut = http.get(f"/sandboxes/{newer[0]}").json()["startedAt"]
    after = http.get("/v2/sandboxes", params={"startedAfter": cut}).json()
    assert [s["sandboxID"] for s in after] == list(reversed(newer))
    assert all(s["sandboxID"] not in older for s in after)
    only_base = http.get("/v2/sandboxes", params={"template": "base"}).json()
    assert {s["sandboxID"] for s in only_base} == set(older)


def pages_after(http: httpx.Client, token: str | None) -> list[str]:
    seen: list[str] = []
    while token:
        page = http.get("/v2/sandboxes", params={"limit": 2, "nextToken": token})
        assert page.status_code == 200, page.text
        seen += [s["sandboxID"] for s in page.json()]
        token = page.headers.get("X-Next-Token")
    return seen


def test_next_token_is_a_cursor_that_neither_skips_nor_repeats_as_sandboxes_come_and_go(
    http: httpx.Client, clock: FrozenClock
) -> None:
    # Catches an offset token: a listed sandbox killed between pages made an offset skip
    # one, and a sandbox started between pages made it repeat one.
    ids = made(http, clock, 6)
    first = http.get("/v2/sandboxes", params={"limit": 2})
    assert [s["sandboxID"] for s in first.json()] == [ids[5], ids[4]]
    token = first.headers["X-Next-Token"]
    decoded = base64.urlsafe_b64decode(token).decode()
    assert decoded.endswith(f"__{ids[4]}")  # E2B's <RFC3339Nano>__<sandboxID> cursor
    assert http.delete(f"/sandboxes/{ids[5]}").status_code == 204
    assert pages_after(http, token) == [ids[3], ids[2], ids[1], ids[0]]

    first = http.get("/v2/sandboxes", params={"limit": 2})
    assert [s["sandboxID"] for s in first.json()] == [ids[4], ids[3]]
    made(http, clock, 1)
    assert pages_after(http, first.headers["X-Next-Token"]) == [ids[2], ids[1], ids[0]]


def test_cursor_order_is_kept_and_a_garbled_token_is_400(
    http: httpx.Client, clock: FrozenClock
) -> None:
    ids = made(http, clock, 3)
    page = http.get("/v2/sandboxes", params={"limit": 1, "order": "asc"})
    token = page.headers["X-Next-Token"]
    rest = http.get("/v2/sandboxes", params={"order": "asc", "nextToken": token}).json()
    assert [s["sandboxID"] for s in rest] == ids[1:]
    assert http.get("/v2/sandboxes", params={"nextToken": token}).status_code == 400
    assert http.get("/v2/sandboxes", params={"nextToken": "%%%"}).status_code == 400


@pytest.mark.parametrize(
    "params",
    [
        {"limit": 0},
        {"limit": 101},
        {"limit": "ten"},
        {"state": "running,sleeping"},
        {"order": "newest"},
        {"startedAfter": "yesterday"},
        {"startedAfter": "2026-01-01T00:00:00"},
    ],
)
def test_list_parameters_outside_the_spec_are_400(
    server: MockE2BServer, http: httpx.Client, params: dict[str, Any]
) -> None:
    # Catches a list that clamps or ignores what E2B's request validator refuses.
    response = http.get("/v2/sandboxes", params=params)
    assert response.status_code == 400, response.text
    assert response.json()["code"] == 400
    assert server.stats().bad_requests == 1


@pytest.mark.parametrize(
    "body",
    [
        {"templateID": "base", "autoPause": "yes"},
        {"templateID": "base", "secure": 1},
        {"templateID": "base", "allow_internet_access": "false"},
        {"templateID": "base", "timeout": True},
        {"templateID": "base", "timeout": -5},
        {"templateID": "base", "envVars": {"A": 1}},
        {"templateID": "base", "autoResume": {"enabled": "true"}},
        {"templateID": "base", "volumeMounts": [{"name": "v"}]},
        {"templateID": 7},
    ],
)
def test_wrongly_typed_create_fields_are_400_and_make_nothing(
    server: MockE2BServer, http: httpx.Client, body: dict[str, Any]
) -> None:
    # Catches fields the mock read loosely (autoPause "yes" made an auto-pausing sandbox).
    for path in ("/sandboxes", "/v2/sandboxes"):
        response = http.post(path, json=body)
        assert response.status_code == 400, response.text
    assert server.stats().sandboxes_created == 0


def test_refresh_duration_above_an_hour_is_400_and_short_ones_get_the_default(
    http: httpx.Client, clock: FrozenClock
) -> None:
    # Catches a refresh that clamped 3601 s (the spec caps duration at 3600), or one that
    # shortened a sandbox below E2B's 15 s floor.
    sandbox_id = made(http, clock, 1)[0]
    refresh = f"/sandboxes/{sandbox_id}/refreshes"
    assert http.post(refresh, json={"duration": 3601}).status_code == 400
    assert http.post(refresh, json={"duration": "60"}).status_code == 400
    assert http.post(f"/sandboxes/{sandbox_id}/timeout", json={"timeout": 1}).status_code == 204
    assert http.post(refresh, json={"duration": 2}).status_code == 204
    assert_lives_15_seconds_more(http, clock, sandbox_id)


def test_v1_create_and_refresh_default_to_15_seconds(
    http: httpx.Client, clock: FrozenClock
) -> None:
    # Catches the old 300 s default (NewSandbox.timeout and the refresh default are 15 s).
    created = http.post("/sandboxes", json={"templateID": "base"})
    assert created.status_code == 201
    sandbox_id = created.json()["sandboxID"]
    detail = http.get(f"/sandboxes/{sandbox_id}").json()
    lifetime = datetime.fromisoformat(detail["endAt"]) - datetime.fromisoformat(detail["startedAt"])
    assert lifetime.total_seconds() == 15
    clock.advance(10.0)
    assert http.post(f"/sandboxes/{sandbox_id}/refreshes").status_code == 204
    # Alive at 24 s after start only because the refresh gave 15 s more.
    assert_lives_15_seconds_more(http, clock, sandbox_id)


def test_the_id_with_a_client_id_suffix_names_the_sandbox_and_malformed_ids_are_400(
    http: httpx.Client, clock: FrozenClock
) -> None:
    sandbox_id = made(http, clock, 1)[0]
    legacy = f"{sandbox_id}-6532622b"
    assert http.get(f"/sandboxes/{legacy}").json()["sandboxID"] == sandbox_id
    assert http.post(f"/sandboxes/{legacy}/timeout", json={"timeout": 60}).status_code == 204
    for bad in ("a-b-c", "UPPER", "x_y"):
        response = http.get(f"/sandboxes/{bad}")
        assert response.status_code == 400 and response.json()["message"] == "Invalid sandbox ID"
    assert http.delete(f"/sandboxes/{legacy}").status_code == 204


def test_pause_resume_and_connect_over_http(http: httpx.Client, clock: FrozenClock) -> None:
    # Catches the status codes of E2B's handlers (sandbox_pause.go, sandbox_connect.go).
    sandbox_id = made(http, clock, 1)[0]
    assert http.post(f"/sandboxes/{sandbox_id}/resume").status_code == 409  # running
    assert http.post(f"/sandboxes/{sandbox_id}/pause").status_code == 204
    assert http.post(f"/sandboxes/{sandbox_id}/pause").status_code == 409
    clock.advance(7200.0)  # a paused sandbox does not expire
    assert http.get(f"/sandboxes/{sandbox_id}").json()["state"] == "paused"
    assert http.post(f"/sandboxes/{sandbox_id}/connect", json={}).status_code == 400  # v1
    resumed = http.post(f"/sandboxes/{sandbox_id}/resume", json={"timeout": 30})
    assert resumed.status_code == 201 and resumed.json()["sandboxID"] == sandbox_id
    connected = http.post(f"/sandboxes/{sandbox_id}/connect", json={"timeout": 30})
    assert connected.status_code == 200
    assert http.post(f"/sandboxes/{sandbox_id}/pause", json={"memory": "no"}).status_code == 400
    assert http.post("/sandboxes/nosuch/pause").status_code == 404
    assert http.post("/v2/sandboxes/nosuch/connect", json={}).status_code == 404


def test_auto_pause_pauses_at_the_timeout_instead_of_killing() -> None:
    clock = SteerableClock()
    with running_mock(clock=clock) as server, client(server) as http:
        sandbox_id = create(http, timeout=60, autoPause=True).json()["sandboxID"]
        clock.advance(61.0)
        assert http.get(f"/sandboxes/{sandbox_id}").json()["state"] == "paused"
        stats = server.stats()
        assert (stats.paused_sandboxes, stats.sandboxes_expired) == (1, 0)
