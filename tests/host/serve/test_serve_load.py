"""Issue 13, acceptance 3 and 4: 200 concurrent jobs against one `serve` with 4 workers,
and SIGTERM during that load."""

from __future__ import annotations

import asyncio
import signal
import threading
import time
from pathlib import Path

import pytest

from tests.conftest import API_KEY
from tests.host.mock_e2b.fixtures import running_mock
from tests.host.serve.load import LoadRecord, run_jobs, sqlite_url, status_json
from tests.host.serve.serve_process import serve_process

pytestmark = [pytest.mark.component, pytest.mark.slow]

JOBS = 200
WORKERS = 4
CREATE_SLOTS = 3  # fewer than the workers: the gate, not the pool, bounds the creates
# A high create rate and room for every sandbox, so only the create slots hold jobs back.
CONFIG = {
    "create_slots": str(CREATE_SLOTS),
    "create_rate_per_s": "500",
    "create_burst": "50",
    "max_sandboxes": "1000",
    # Under a saturated pool a grant waits for CPU, not for E2B, so the slot estimates are
    # short; a long poll_max keeps the waiters at the back from crowding the workers.
    "poll_min_ms": "200",
    "poll_max_ms": "60000",
}
STATUS_CONFIG = tuple(f"{key}={value}" for key, value in CONFIG.items())
# Temper's invocation deadline (WasmResourceLimits: 120 s).
INVOCATION_DEADLINE_S = 120


def test_200_concurrent_jobs_get_only_200_or_503_and_all_end_with_a_sandbox(
    tmp_path: Path, component_cache_dir: Path
) -> None:
    storage = sqlite_url(tmp_path / "s.db")
    record = LoadRecord()
    entities = [f"job-{n:03d}" for n in range(JOBS)]
    with (
        running_mock(api_key=API_KEY, create_latency_ms=40) as mock,
        serve_process(
            e2b_url=mock.url,
            storage=storage,
            cache_dir=component_cache_dir,
            workers=WORKERS,
            extra=["--retry-after", "1"],
        ) as serve,
    ):
        asyncio.run(run_jobs(serve.url, entities, CONFIG, record, timeout_s=900))
        stats = mock.stats()
        print(
            f"answers: {len(record.statuses)} ({record.statuses.count(503)} x 503), "
            f"actions {record.actions}, reasons {record.reasons}, transport errors "
            f"{record.transport_errors}, mock max concurrent creates "
            f"{stats.max_concurrent_creates}"
        )
        assert set(record.statuses) <= {200, 503}, record.unexpected
        assert record.retry_after_missing == 0 and record.unexpected == [] and not record.stopped
        assert sorted(record.sandboxes) == entities
        assert len(set(record.sandboxes.values())) == JOBS  # one sandbox per job
        assert stats.sandboxes_created == JOBS
        assert 1 <= stats.max_concurrent_creates <= CREATE_SLOTS
        view = status_json(storage, *STATUS_CONFIG)
        assert view["create_slots"]["in_use"] == 0 and view["waiters"] == []
        assert view["capacity"]["running"] == JOBS


def test_sigterm_under_load_exits_zero_and_leaves_no_create_slot_held(
    tmp_path: Path, component_cache_dir: Path
) -> None:
    storage = sqlite_url(tmp_path / "s.db")
    record = LoadRecord()
    entities = [f"job-{n:03d}" for n in range(JOBS)]
    # Creates take long enough that one is provably in flight when the signal lands.
    with running_mock(api_key=API_KEY, create_latency_ms=400) as mock:
        with serve_process(
            e2b_url=mock.url,
            storage=storage,
            cache_dir=component_cache_dir,
            workers=WORKERS,
            extra=["--retry-after", "1"],
        ) as serve:
            load = threading.Thread(
                target=lambda: asyncio.run(
                    run_jobs(serve.url, entities, CONFIG, record, timeout_s=900)
                )
            )
            load.start()
            mock.wait_for(
                lambda s: s.sandboxes_created >= 3 and s.creates_in_flight >= 1, timeout=300
            )
            signalled = time.monotonic()
            serve.process.send_signal(signal.SIGTERM)
            code = serve.process.wait(timeout=INVOCATION_DEADLINE_S + 30)
            drained_s = time.monotonic() - signalled
            load.join(300)
        assert code == 0
        assert drained_s < INVOCATION_DEADLINE_S
        assert set(record.statuses) <= {200, 503}, record.unexpected
        assert record.unexpected == [] and record.stopped  # the service went away mid-load
        stats = mock.stats()
        assert stats.creates_in_flight == 0
        assert stats.max_concurrent_creates <= CREATE_SLOTS
        view = status_json(storage, *STATUS_CONFIG)
        assert view["create_slots"]["in_use"] == 0 and view["create_slots"]["leases"] == []
        # Every sandbox E2B made is recorded as held (none orphaned by the shutdown).
        held = {lease["sandbox_id"] for lease in view["capacity"]["leases"]}
        assert held == {s["sandbox_id"] for s in mock.running_sandboxes()}
        assert len(held) == stats.sandboxes_created
        print(f"drained in {drained_s:.2f} s; {len(held)} sandboxes, all recorded")
