"""Tenancy and bounds on the service's HTTP surface in-process, with a fake component:
403 for a tenant the token does not cover, per-client /metrics, 413 before the body is
read, 429 after a burst of refusals, JSON for every error."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from starlette.testclient import TestClient
from starlette.types import Message, Receive, Scope, Send

from host.runtime.temper_context import MAX_CONTEXT_BYTES
from host.serve import InvocationPool, ServeState, create_app
from host.serve.bounds import BodyBounds, RefusalLimiter
from host.serve.metrics import ServeMetrics
from host.serve.tenants import TenantAccess
from provisioner.model import Invocation, Outcome
from tests.host.serve.tenancy_support import OPERATOR_TOKEN, T1_TOKEN, T2_TOKEN, write_tenants


class Recorder:
    def __init__(self) -> None:
        self.calls: list[Invocation] = []

    def __call__(self, invocation: Invocation) -> Outcome:
        self.calls.append(invocation)
        return Outcome("SandboxReady", {"sandbox_id": f"sb-{invocation.entity_id}"})


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Service:
    def __init__(self, tmp_path: Path) -> None:
        self.component = Recorder()
        self.lines: list[dict[str, Any]] = []
        self.clock = FakeClock()
        self.metrics = ServeMetrics()
        self.state = ServeState(
            token="",
            pool=InvocationPool(2),
            invoke=self.component,
            e2b_url="http://e2b.local",
            storage_probe=lambda: None,
            metrics=self.metrics,
            log=self.lines.append,
            access=TenantAccess(write_tenants(tmp_path / "tenants.toml")),
            limiter=RefusalLimiter(burst=5, interval_s=2.0, clock=self.clock),
        )
        self.http = TestClient(create_app(self.state))

    def invoke(self, token: str, tenant: str, entity: str = "job-1", **kw: Any) -> Any:
        return self.http.post(
            "/v1/invocations",
            json=context(tenant, entity),
            headers={"Authorization": f"Bearer {token}"},
            **kw,
        )

    def metric_lines(self, token: str) -> list[str]:
        response = self.http.get("/metrics", headers={"Authorization": f"Bearer {token}"})
        assert response.status_code == 200
        return [line for line in response.text.splitlines() if not line.startswith("#")]


def context(tenant: str, entity: str, operation: str = "provision") -> dict[str, Any]:
    return {
        "tenant": tenant,
        "entity_type": "CurationJob",
        "entity_id": entity,
        "integration_config": {"operation": operation},
    }


@pytest.fixture
def service(tmp_path: Path) -> Iterator[Service]:
    yield Service(tmp_path)


def sample(lines: list[str], name: str, **labels: str) -> float | None:
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in lines:
        series, _, value = line.rpartition(" ")
        if series == f"{name}{{{want}}}" or (not labels and series == name):
            return float(value)
    return None


def test_each_tenant_acts_for_itself_and_a_forged_tenant_is_403_before_anything_runs(
    service: Service,
) -> None:
    assert service.invoke(T1_TOKEN, "t1").status_code == 200
    assert service.invoke(T2_TOKEN, "t2").status_code == 200
    assert [c.tenant for c in service.component.calls] == ["t1", "t2"]

    forged = service.invoke(T1_TOKEN, "t2", "job-of-t2")
    assert forged.status_code == 403
    assert forged.json()["error"]["code"] == "forbidden_tenant"
    assert len(service.component.calls) == 2  # nothing ran
    [line] = [line for line in service.lines if line["event"] == "refused"]
    assert line == {
        "event": "refused",
        "code": "forbidden_tenant",
        "status": 403,
        "remote": "testclient",
        "path": "/v1/invocations",
        "client": "client-one",
        "tenant": "t2",
        "entity_id": "job-of-t2",
    }
    assert T1_TOKEN not in json.dumps(service.lines)
    ops = service.metric_lines(OPERATOR_TOKEN)
    assert sample(ops, "sandbox_provisioner_forbidden_tenant_total", client="client-one") == 1
    assert sample(ops, "sandbox_provisioner_refused_total", code="forbidden_tenant") == 1

    for tenant in ("t1", "t2", "t3"):  # the operator acts for every tenant
        assert service.invoke(OPERATOR_TOKEN, tenant, "ops-job").status_code == 200


def test_a_tenant_s_metrics_show_only_its_own_tenants_labelled_series(service: Service) -> None:
    service.invoke(T1_TOKEN, "t1")
    service.invoke(T2_TOKEN, "t2")
    service.invoke(T2_TOKEN, "t1")  # client-two forges t1: counted under client-two
    name = "sandbox_provisioner_tenant_invocations_total"
    forbidden = "sandbox_provisioner_forbidden_tenant_total"
    one = service.metric_lines(T1_TOKEN)
    assert sample(one, name, tenant="t1", action="SandboxReady") == 1
    assert sample(one, name, tenant="t2", action="SandboxReady") is None
    assert sample(one, forbidden, client="client-two") is None
    assert not any('tenant="t2"' in line or "client-two" in line for line in one)
    # account-level series stay visible
    assert (
        sample(one, "sandbox_provisioner_invocations_total", action="SandboxReady", reason="none")
        == 2
    )
    two = service.metric_lines(T2_TOKEN)
    assert sample(two, name, tenant="t2", action="SandboxReady") == 1
    assert sample(two, name, tenant="t1", action="SandboxReady") is None
    assert sample(two, forbidden, client="client-two") == 1
    ops = service.metric_lines(OPERATOR_TOKEN)
    assert sample(ops, name, tenant="t1", action="SandboxReady") == 1
    assert sample(ops, name, tenant="t2", action="SandboxReady") == 1


def test_a_burst_of_bad_tokens_is_rate_limited_while_good_tokens_keep_working(
    service: Service,
) -> None:
    answers = [service.invoke("guess-" + str(i), "t1").status_code for i in range(8)]
    assert answers == [401] * 5 + [429] * 3
    limited = service.invoke("guess-again", "t1")
    assert limited.json()["error"]["code"] == "rate_limited"
    assert limited.headers["retry-after"] == "2"
    # forging a tenant from the same address is limited too ...
    assert service.invoke(T1_TOKEN, "t2").status_code == 429
    # ... but a good token for its own tenant is never
    assert service.invoke(T1_TOKEN, "t1").status_code == 200
    assert service.invoke(T2_TOKEN, "t2").status_code == 200
    assert len(service.component.calls) == 2
    service.clock.now += 2.0  # one refusal's worth of refill
    assert service.invoke("guess-later", "t1").status_code == 401
    assert service.invoke("guess-later", "t1").status_code == 429
    ops = service.metric_lines(OPERATOR_TOKEN)
    assert sample(ops, "sandbox_provisioner_refused_total", code="unauthorized") == 6
    assert sample(ops, "sandbox_provisioner_refused_total", code="rate_limited") == 6


def test_an_oversized_body_is_413_from_its_declared_length_before_it_is_read(
    service: Service,
) -> None:
    auth = {"Authorization": f"Bearer {T1_TOKEN}"}
    declared = service.http.post(
        "/v1/invocations",
        content=b"{}",
        headers={**auth, "Content-Length": str(MAX_CONTEXT_BYTES + 1)},
    )
    assert declared.status_code == 413
    assert declared.json()["error"]["code"] == "too_large"
    assert declared.headers["connection"] == "close"
    assert service.component.calls == []
    just_under = json.dumps(context("t1", "job-1")).encode()
    padded = just_under + b" " * (MAX_CONTEXT_BYTES - len(just_under))
    assert service.http.post("/v1/invocations", content=padded, headers=auth).status_code == 200


def test_a_streamed_body_is_cut_off_as_soon_as_it_passes_the_cap() -> None:
    """BodyBounds on its own: a chunked body (no Content-Length) is refused at the chunk
    that passes the cap; the rest is never read and the app never runs."""
    pulled: list[int] = []
    sent: list[Message] = []
    reached: list[Scope] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        reached.append(scope)

    async def receive() -> Message:
        pulled.append(1)
        return {"type": "http.request", "body": b" " * 65536, "more_body": True}

    async def send(message: Message) -> None:
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": "/v1/invocations", "headers": []}
    asyncio.run(BodyBounds(app, max_bytes=4 * 65536)(scope, receive, send))
    assert len(pulled) == 5  # the fifth chunk passes 256 KiB
    assert reached == []
    assert sent[0]["status"] == 413


def test_a_body_that_does_not_arrive_in_time_is_408() -> None:
    sent: list[Message] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        raise AssertionError("the app must not run")

    async def receive() -> Message:
        await asyncio.sleep(0.05)
        return {"type": "http.request", "body": b"x", "more_body": True}

    async def send(message: Message) -> None:
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": "/v1/invocations", "headers": []}
    asyncio.run(BodyBounds(app, body_timeout_s=0.3)(scope, receive, send))
    assert sent[0]["status"] == 408
    assert json.loads(sent[1]["body"])["error"]["code"] == "body_timeout"


@pytest.mark.parametrize(
    ("method", "path", "status", "code"),
    [
        ("GET", "/nowhere", 404, "not_found"),
        ("GET", "/v1/invocations", 405, "method_not_allowed"),
    ],
)
def test_every_error_route_answers_json(
    service: Service, method: str, path: str, status: int, code: str
) -> None:
    response = service.http.request(method, path, headers={"Authorization": f"Bearer {T1_TOKEN}"})
    assert response.status_code == status
    assert response.headers["content-type"] == "application/json"
    assert response.json()["error"]["code"] == code
