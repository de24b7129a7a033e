"""A real `serve` process: a held request granted after a release, and with `--push` its
lifespan's sender sends a due wake-up another process left in the shared storage."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import httpx
import pytest

from host.serve.pace_options import TEMPER_TOKEN_ENV
from host.serve.wakeups import WakeupStore, new_wakeup
from host.storage import storage_from_uri
from tests.host.serve.fake_temper import FakeTemper
from tests.host.serve.serve_process import ServingAMock, invocation_events, serve_storage
from tests.host.serve.test_serve_hold_component import context

pytestmark = [pytest.mark.component, pytest.mark.slow]


def test_a_started_serve_sends_a_due_wake_up_left_in_storage(
    tmp_path: Path, serving_mock: ServingAMock, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Catches: a sender that is not started with the app (lifespan off), or one that only
    # sends the wake-ups its own process stored (a dead process's would be lost).
    monkeypatch.setenv(TEMPER_TOKEN_ENV, "temper-token")
    storage = storage_from_uri(serve_storage(tmp_path))
    store = WakeupStore(storage)
    wakeup = new_wakeup("acme", "TemperAgent", "agent-1", store.now_ms(), "r-1")
    assert store.schedule(wakeup)
    with (
        FakeTemper({}) as temper,
        serving_mock(extra=["--push", "--temper-api-url", temper.url, "--wake-action", "Wake"]) as (
            _,
            serve,
        ),
    ):
        sent = 'sandbox_provisioner_wakeups_total{result="sent"} 1.0'
        deadline = time.monotonic() + 60
        with serve.client() as http:
            while sent not in http.get("/metrics").text:
                assert time.monotonic() < deadline, "the wake-up was never sent"
                time.sleep(0.05)
        assert store.pending() == {}
        [request] = temper.requests
        assert request["path"] == "/tdata/TemperAgents('agent-1')/Temper.Wake"
        assert request["headers"]["Authorization"] == "Bearer temper-token"
        assert request["headers"]["Idempotency-Key"] == wakeup.idempotency_key
        assert serve.terminate() == 0
    storage.close()


def test_a_real_serve_holds_a_queued_request_and_answers_the_grant_after_a_release(
    serving_mock: ServingAMock,
) -> None:
    # Catches, under uvicorn: a held request answered at once, or one that never asks
    # again after the only sandbox is released.
    held = "sandbox_provisioner_held_requests 1.0"
    with (
        serving_mock(extra=["--hold-ms", "60000"]) as (_, serve),
        serve.client() as http,
    ):
        first = http.post("/v1/invocations", json=context("job-1", "provision"))
        assert first.json()["action"] == "SandboxReady"
        answers: list[httpx.Response] = []
        waiter = threading.Thread(
            target=lambda: answers.append(
                http.post("/v1/invocations", json=context("job-2", "provision"))
            )
        )
        waiter.start()
        deadline = time.monotonic() + 60
        with serve.client() as probe:
            while held not in probe.get("/metrics").text:
                assert time.monotonic() < deadline and waiter.is_alive(), "job-2 never held"
                time.sleep(0.05)
            released = probe.post("/v1/invocations", json=context("job-1", "release"))
        assert released.json()["action"] == "SandboxReleased"
        waiter.join(60)
        assert answers[0].json()["action"] == "SandboxReady"
        events = serve.wait_for_events(
            lambda es: any(e.get("entity_id") == "job-2" for e in invocation_events(es))
        )
        [line] = [e for e in invocation_events(events) if e["entity_id"] == "job-2"]
        assert line["component_calls"] >= 2 and line["held_ms"] > 0
        assert serve.terminate() == 0
