"""Issue 13, acceptance 5: `status` and `/metrics` show a queue of 10 waiting entities with
their reasons while it exists, and nothing once it has drained.

The queue is held by construction: one create slot, and the mock holds the one create
open (its latency is sampled when the create starts, so later creates are quick)."""

from __future__ import annotations

import asyncio
import threading

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.host.serve.load import (
    LoadRecord,
    job_context,
    run_jobs,
    status_json,
    status_table,
)
from tests.host.serve.serve_process import ServeProcess, ServingAMock

pytestmark = [pytest.mark.component, pytest.mark.slow]

CONFIG = {
    "create_slots": "1",
    "create_rate_per_s": "100",
    "create_burst": "20",
    "max_sandboxes": "100",
    "poll_min_ms": "50",
    "poll_max_ms": "500",
}
STATUS_CONFIG = tuple(f"{key}={value}" for key, value in CONFIG.items())
WAITERS = [f"job-{n:02d}" for n in range(1, 11)]
HOLD_MS = 20_000


def gauges(serve: ServeProcess) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with serve.client() as http:
        response = http.get("/metrics")
    assert response.status_code == 200
    found: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


def test_status_and_metrics_show_ten_waiters_while_queued_and_nothing_once_drained(
    serving_mock: ServingAMock,
) -> None:
    with (
        # Poll only: each waiter's queued answer comes back at once (a held answer would
        # ask the component again meanwhile, and count those answers too).
        serving_mock(workers=4, extra=["--hold-ms", "0"], create_latency_ms=HOLD_MS) as (
            mock,
            serve,
        ),
        serve.client() as http,
    ):
        storage = serve.storage
        holder: list[object] = []
        first = threading.Thread(
            target=lambda: holder.append(
                http.post("/v1/invocations", json=job_context("job-00", CONFIG))
            )
        )
        first.start()
        mock.wait_for(lambda s: s.creates_in_flight == 1, timeout=60)
        mock.configure(create_latency_ms=20)  # only the creates after the held one
        for entity in WAITERS:
            answer = http.post("/v1/invocations", json=job_context(entity, CONFIG)).json()
            assert answer["action"] == "SandboxQueued", answer
            assert answer["params"]["reason"] == "create_slots"

        view = status_json(storage, *STATUS_CONFIG)
        table = status_table(storage, *STATUS_CONFIG)
        metrics = gauges(serve)
        # The precondition held throughout: the one create is still in the mock.
        assert mock.stats().creates_in_flight == 1 and mock.stats().sandboxes_created == 0

        assert view["create_slots"] == {
            "in_use": 1,
            "limit": 1,
            "leases": view["create_slots"]["leases"],
        }
        assert [lease["entity"] for lease in view["create_slots"]["leases"]] == [
            "CurationJob/job-00"
        ]
        waiting = view["waiters"]
        assert [w["entity"] for w in waiting] == [f"CurationJob/{e}" for e in WAITERS]
        assert [w["position"] for w in waiting] == list(range(1, 11))
        assert {w["reason"] for w in waiting} == {"create_slots"}
        assert all(w["tenant"] == "acme" and w["waited_ms"] >= 0 for w in waiting)
        for entity in WAITERS:
            assert f"CurationJob/{entity}" in table
        assert "10 waiting" in table

        assert metrics[("sandbox_provisioner_queue_length", ())] == 10
        assert metrics[("sandbox_provisioner_queue_waiters", (("reason", "create_slots"),))] == 10
        assert metrics[("sandbox_provisioner_gate_in_use", (("gate", "create_slots"),))] == 1
        assert metrics[("sandbox_provisioner_gate_limit", (("gate", "create_slots"),))] == 1
        queued = (("action", "SandboxQueued"), ("reason", "create_slots"))
        assert metrics[("sandbox_provisioner_invocations_total", queued)] == 10

        # Drain: the waiters keep polling until each has its sandbox.
        record = LoadRecord()
        asyncio.run(run_jobs(serve.url, WAITERS, CONFIG, record, timeout_s=300))
        first.join(120)
        assert sorted(record.sandboxes) == WAITERS and record.unexpected == []

        drained = status_json(storage, *STATUS_CONFIG)
        assert drained["waiters"] == [] and drained["create_slots"]["in_use"] == 0
        assert drained["capacity"]["running"] == 11
        after = gauges(serve)
        assert after[("sandbox_provisioner_queue_length", ())] == 0
        assert after[("sandbox_provisioner_queue_waiters", (("reason", "create_slots"),))] == 0
        assert after[("sandbox_provisioner_gate_in_use", (("gate", "create_slots"),))] == 0
        assert "0 waiting" in status_table(storage, *STATUS_CONFIG)
