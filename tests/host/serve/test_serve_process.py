"""A real `sandbox-provisioner serve` process: saturation, readiness, SIGTERM drain."""

from __future__ import annotations

import signal
import socket
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from harness.mocks.e2b import MockE2BServer
from tests.conftest import API_KEY
from tests.harness.mocks.e2b.fixtures import running_mock
from tests.host.serve.serve_process import ServingAMock, serve_process

pytestmark = [pytest.mark.component, pytest.mark.slow]


def context(entity_id: str, operation: str = "provision") -> dict[str, Any]:
    return {
        "tenant": "acme",
        "entity_type": "CurationJob",
        "entity_id": entity_id,
        "trigger_action": "Provision",
        "trigger_params": {},
        "entity_state": {},
        "integration_config": {"operation": operation, "template_id": "base"},
    }


def wait_until(predicate: Any, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached")
        time.sleep(0.02)


def post_in_thread(
    client: httpx.Client, body: dict[str, Any]
) -> tuple[threading.Thread, list[Any]]:
    out: list[Any] = []

    def run() -> None:
        try:
            out.append(client.post("/v1/invocations", json=body))
        except Exception as error:
            out.append(error)

    thread = threading.Thread(target=run)
    thread.start()
    return thread, out


def creates_in_flight(mock: MockE2BServer) -> int:
    return mock.stats().creates_in_flight


def test_saturated_serve_answers_503_retry_after_and_readyz_is_ready(
    serving_mock: ServingAMock,
) -> None:
    # The mock holds each create for 4 s, so the one worker is provably busy.
    with (
        serving_mock(workers=1, extra=["--retry-after", "2"], create_latency_ms=4000) as (
            mock,
            serve,
        ),
        serve.client() as http,
    ):
        ready = http.get("/readyz")
        assert ready.status_code == 200 and ready.json()["status"] == "ready"
        no_token = serve.client(token=None).post("/v1/invocations", json=context("job-x"))
        assert no_token.status_code == 401
        assert mock.stats().requests_total == 0

        thread, out = post_in_thread(http, context("job-1"))
        wait_until(lambda: creates_in_flight(mock) == 1)
        refused = http.post("/v1/invocations", json=context("job-2"))
        assert refused.status_code == 503
        assert refused.headers["retry-after"] == "2"
        assert mock.stats().creates_attempted == 1  # job-2 never reached the component
        thread.join(60)
        assert out[0].status_code == 200 and out[0].json()["action"] == "SandboxReady"


def test_sigterm_finishes_the_invocation_in_flight_and_exits_zero(
    tmp_path: Path, component_cache_dir: Path
) -> None:
    storage = f"sqlite:///{tmp_path / 's.db'}"
    with running_mock(api_key=API_KEY, create_latency_ms=3000) as mock:
        with serve_process(
            e2b_url=mock.url, storage=storage, cache_dir=component_cache_dir, workers=2
        ) as serve:
            http = serve.client()
            thread, out = post_in_thread(http, context("job-drain"))
            wait_until(lambda: creates_in_flight(mock) == 1)
            serve.process.send_signal(signal.SIGTERM)

            # The listener closes while the invocation is still running.
            def refused() -> bool:
                try:
                    socket.create_connection(("127.0.0.1", serve.port), timeout=0.5).close()
                except OSError:
                    return True
                return False

            wait_until(refused, timeout=30)
            assert serve.process.wait(timeout=150) == 0
            thread.join(10)
            answer = out[0]
            assert isinstance(answer, httpx.Response) and answer.status_code == 200
            ready = answer.json()
            assert ready["action"] == "SandboxReady"
            serve.wait_for_events(lambda es: any(e.get("entity_id") == "job-drain" for e in es))
            http.close()
        # The create was recorded: a new process answers the same sandbox, creates none.
        with (
            serve_process(
                e2b_url=mock.url, storage=storage, cache_dir=component_cache_dir
            ) as again,
            again.client() as http2,
        ):
            same = http2.post("/v1/invocations", json=context("job-drain")).json()
            assert same["params"]["sandbox_id"] == ready["params"]["sandbox_id"]
            assert mock.stats().sandboxes_created == 1


def _children(pid: int) -> set[int]:
    found: set[int] = set()
    for task in Path(f"/proc/{pid}/task").iterdir():
        found |= {int(child) for child in (task / "children").read_text().split()}
    return found


def test_processes_run_the_invocations_in_worker_processes_and_keep_the_e2b_metrics(
    serving_mock: ServingAMock,
) -> None:
    with (
        serving_mock(workers=4, extra=["--processes", "2"]) as (mock, serve),
        serve.client() as http,
    ):
        workers = _children(serve.process.pid)
        assert len(workers) >= 2, f"serve started {workers} as worker processes"
        for index in range(4):
            body = context(f"job-{index}")
            body["integration_config"].update(create_rate_per_s="1000", create_burst="10")
            answer = http.post("/v1/invocations", json=body)
            assert answer.status_code == 200, answer.text
            assert answer.json()["action"] == "SandboxReady", answer.json()
        assert mock.stats().sandboxes_created == 4
        # The creates were made by the workers: their exchanges reached this process's metrics.
        metrics = http.get("/metrics").text
        assert 'sandbox_provisioner_e2b_responses_total{method="POST",status="201"} 4.0' in (
            metrics
        ), metrics
        assert serve.terminate() == 0
