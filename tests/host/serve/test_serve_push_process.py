"""A real `serve --push` process: its lifespan's sender sends a due wake-up another
process left in the shared storage, and SIGTERM still ends it with status 0."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from host.serve.pace_options import TEMPER_TOKEN_ENV
from host.serve.wakeups import WakeupStore, new_wakeup
from host.storage import storage_from_uri
from tests.conftest import API_KEY
from tests.host.mock_e2b.fixtures import running_mock
from tests.host.serve.fake_temper import FakeTemper
from tests.host.serve.serve_process import serve_process

pytestmark = [pytest.mark.component, pytest.mark.slow]


def test_a_started_serve_sends_a_due_wake_up_left_in_storage(
    tmp_path: Path, component_cache_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Catches: a sender that is not started with the app (lifespan off), or one that only
    # sends the wake-ups its own process stored (a dead process's would be lost).
    monkeypatch.setenv(TEMPER_TOKEN_ENV, "temper-token")
    storage_url = f"sqlite:///{tmp_path / 's.db'}"
    storage = storage_from_uri(storage_url)
    store = WakeupStore(storage)
    wakeup = new_wakeup("acme", "TemperAgent", "agent-1", store.now_ms(), "r-1")
    assert store.schedule(wakeup)
    with (
        FakeTemper({}) as temper,
        running_mock(api_key=API_KEY) as mock,
        serve_process(
            e2b_url=mock.url,
            storage=storage_url,
            cache_dir=component_cache_dir,
            extra=["--push", "--temper-api-url", temper.url, "--wake-action", "Wake"],
        ) as serve,
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
