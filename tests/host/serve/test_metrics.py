"""`/metrics` in-process: the gateway's exchange observer, 429 kinds, invocation counts,
the token, and a registry of the service's own."""

from __future__ import annotations

import threading

import httpx
import pytest
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

from host.serve.metrics import ServeMetrics
from host.services.http_gateway import Exchange, HttpGateway
from provisioner.model import Failure, Outcome, failed
from provisioner.ports import HttpError, HttpErrorKind, HttpRequest
from tests.host.serve.test_serve_app import CONTEXT, TOKEN, FakeComponent, client

BASE = "http://e2b.test"
CAP_MESSAGE = (
    '{"code":429,"message":"you have reached the maximum number of concurrent E2B '
    'sandboxes (20). Please contact us or kill some sandboxes."}'
)


def samples(metrics: ServeMetrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = metrics.exposition().decode()
    found: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


def create_request() -> HttpRequest:
    return HttpRequest("POST", f"{BASE}/v2/sandboxes", (), b"{}", 5000)


def gateway(handler: httpx.MockTransport) -> HttpGateway:
    return HttpGateway(BASE, "key-123", allow_private_network=True, transport=handler)


def test_the_observer_sees_every_exchange_and_cannot_change_its_answer() -> None:
    answers = iter(
        [
            httpx.Response(429, text="Rate limit exceeded", headers={"Retry-After": "2"}),
            httpx.Response(429, text=CAP_MESSAGE),
            httpx.Response(201, json={"sandboxID": "abc"}),
        ]
    )
    seen: list[Exchange] = []

    def broken(_: Exchange) -> None:
        raise RuntimeError("a metrics bug")

    http = gateway(httpx.MockTransport(lambda _: next(answers)))
    http.observe(broken)
    http.observe(seen.append)
    statuses = [http.send(create_request()).status for _ in range(3)]
    assert statuses == [429, 429, 201]  # the broken observer changed nothing
    assert [e.response.status for e in seen if e.response] == [429, 429, 201]
    assert all(e.error is None and e.duration_s >= 0 for e in seen)

    def refuse(_: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("refused")

    failing = gateway(httpx.MockTransport(refuse))
    failing.observe(seen.append)
    with pytest.raises(HttpError) as raised:
        failing.send(create_request())
    assert raised.value.kind is HttpErrorKind.CONNECTION
    assert seen[-1].response is None and seen[-1].error is raised.value


def test_e2b_answers_and_429s_are_counted_by_status_and_kind() -> None:
    metrics = ServeMetrics()
    answers = iter(
        [
            httpx.Response(429, text="Rate limit exceeded", headers={"Retry-After": "2"}),
            httpx.Response(429, text="Rate limit exceeded", headers={"Retry-After": "1"}),
            httpx.Response(429, text=CAP_MESSAGE),
            httpx.Response(201, json={"sandboxID": "abc"}),
        ]
    )
    http = gateway(httpx.MockTransport(lambda _: next(answers)))
    http.observe(metrics.observe_exchange)
    for _ in range(4):
        http.send(create_request())
    found = samples(metrics)
    assert found[("sandbox_provisioner_e2b_429_total", (("kind", "rate_limit"),))] == 2
    assert found[("sandbox_provisioner_e2b_429_total", (("kind", "sandbox_cap"),))] == 1
    responses = "sandbox_provisioner_e2b_responses_total"
    assert found[(responses, (("method", "POST"), ("status", "429")))] == 3
    assert found[(responses, (("method", "POST"), ("status", "201")))] == 1


def test_invocations_are_counted_by_action_and_reason_behind_the_token() -> None:
    outcomes = iter(
        [
            Outcome("SandboxQueued", {"reason": "create_slots", "position": 3}),
            Outcome("SandboxQueued", {"reason": "create_slots", "position": 2}),
            Outcome("SandboxReady", {"sandbox_id": "sb-1"}),
            failed(Failure("queue_timeout", "waited too long", retryable=False)),
        ]
    )
    metrics = ServeMetrics(workers_busy=lambda: 0)
    http = client(lambda _: next(outcomes), workers=2, metrics=metrics)
    auth = {"Authorization": f"Bearer {TOKEN}"}
    for _ in range(4):
        assert http.post("/v1/invocations", json=CONTEXT, headers=auth).status_code == 200
    assert http.get("/metrics").status_code == 401
    assert http.get("/metrics", headers={"Authorization": "Bearer nope"}).status_code == 401
    response = http.get("/metrics", headers=auth)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    found = samples(metrics)
    invocations = "sandbox_provisioner_invocations_total"
    assert found[(invocations, (("action", "SandboxQueued"), ("reason", "create_slots")))] == 2
    assert found[(invocations, (("action", "SandboxReady"), ("reason", "none")))] == 1
    assert found[(invocations, (("action", "SandboxFailed"), ("reason", "queue_timeout")))] == 1
    histogram = "sandbox_provisioner_decision_seconds_count"
    assert found[(histogram, (("action", "SandboxQueued"),))] == 2
    assert found[("sandbox_provisioner_workers_busy", ())] == 0
    # The service's own registry: nothing leaks into the process-global one.
    assert REGISTRY.get_sample_value("sandbox_provisioner_invocations_total") is None
    assert not any(name.startswith("sandbox_provisioner") for name in REGISTRY._names_to_collectors)


def test_a_refused_invocation_counts_as_saturated() -> None:
    component = FakeComponent()
    component.release.clear()
    metrics = ServeMetrics()
    http = client(component, workers=1, metrics=metrics)
    auth = {"Authorization": f"Bearer {TOKEN}"}
    first = threading.Thread(
        target=lambda: http.post("/v1/invocations", json=CONTEXT, headers=auth)
    )
    first.start()
    for _ in range(500):
        if component.calls:
            break
        threading.Event().wait(0.01)
    assert http.post("/v1/invocations", json=CONTEXT, headers=auth).status_code == 503
    component.release.set()
    first.join(10)
    assert samples(metrics)[("sandbox_provisioner_saturated_total", ())] == 1
