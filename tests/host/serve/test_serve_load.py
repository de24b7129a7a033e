"""Issue 13, acceptance 3 and 4: 200 concurrent jobs against one `serve` with 4 workers,
and SIGTERM during that load."""

from __future__ import annotations

import asyncio
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import pytest

from harness.mocks.e2b import MockE2BServer
from tests.host.serve.load import LoadRecord, run_jobs, status_json
from tests.host.serve.serve_process import ServeProcess, ServingAMock, invocation_events

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
    # short: a poll_min of a second keeps the waiters near the front from crowding the
    # workers (measured: 6.3k answers instead of 7.4k at 200 ms, 95 s instead of 113 s),
    # and poll_max bounds how long a waiter at the back sleeps past its turn.
    "poll_min_ms": "1000",
    "poll_max_ms": "10000",
}
STATUS_CONFIG = tuple(f"{key}={value}" for key, value in CONFIG.items())
# Temper's invocation deadline (WasmResourceLimits: 120 s).
INVOCATION_DEADLINE_S = 120
ENTITIES = [f"job-{n:03d}" for n in range(JOBS)]


@dataclass
class LoadRun:
    """One `serve` with WORKERS workers on SQLite storage, in front of a mock E2B, and what
    the load's clients saw."""

    mock: MockE2BServer
    serve: ServeProcess
    record: LoadRecord = field(default_factory=LoadRecord)

    def send_jobs(self) -> None:
        """The JOBS jobs at once, each retrying until it has a sandbox or the service is gone."""
        asyncio.run(run_jobs(self.serve.url, ENTITIES, CONFIG, self.record, timeout_s=900))


@contextmanager
def load_run(serving_mock: ServingAMock, *, create_latency_ms: int) -> Iterator[LoadRun]:
    """A mock E2B whose creates take `create_latency_ms`, behind a `serve` that tells a
    refused client to come back in a second."""
    with serving_mock(
        workers=WORKERS,
        extra=["--retry-after", "1"],
        create_latency_ms=create_latency_ms,
    ) as (mock, serve):
        yield LoadRun(mock, serve)


def drain_diagnosis(serve: ServeProcess, signalled: float) -> str:
    """The slowest invocations the serve logged and its last log lines, for a slow drain."""
    events = serve.log_events()
    invocations = invocation_events(events)
    slowest = sorted(invocations, key=lambda e: float(e.get("duration_ms") or 0))[-5:]
    return (
        f"drain began {time.monotonic() - signalled:.1f} s ago; {len(invocations)} invocations "
        f"logged; slowest: {slowest}; last lines: {serve.seen[-15:]}"
    )


def test_200_concurrent_jobs_get_only_200_or_503_and_all_end_with_a_sandbox(
    serving_mock: ServingAMock,
) -> None:
    with load_run(serving_mock, create_latency_ms=40) as run:
        run.send_jobs()
        record, stats = run.record, run.mock.stats()
        print(
            f"answers: {len(record.statuses)} ({record.statuses.count(503)} x 503), "
            f"actions {record.actions}, reasons {record.reasons}, transport errors "
            f"{record.transport_errors}, mock max concurrent creates "
            f"{stats.max_concurrent_creates}"
        )
        assert set(record.statuses) <= {200, 503}, record.unexpected
        assert record.retry_after_missing == 0 and record.unexpected == [] and not record.stopped
        assert sorted(record.sandboxes) == ENTITIES
        assert len(set(record.sandboxes.values())) == JOBS  # one sandbox per job
        assert stats.sandboxes_created == JOBS
        assert 1 <= stats.max_concurrent_creates <= CREATE_SLOTS
        view = status_json(run.serve.storage, *STATUS_CONFIG)
        assert view["create_slots"]["in_use"] == 0 and view["waiters"] == []
        assert view["capacity"]["running"] == JOBS


def test_sigterm_under_load_exits_zero_and_leaves_no_create_slot_held(
    serving_mock: ServingAMock,
) -> None:
    # Creates take long enough that one is provably in flight when the signal lands.
    with load_run(serving_mock, create_latency_ms=400) as run:
        record, mock, serve = run.record, run.mock, run.serve
        load = threading.Thread(target=run.send_jobs)
        load.start()
        mock.wait_for(lambda s: s.sandboxes_created >= 3 and s.creates_in_flight >= 1, timeout=300)
        signalled = time.monotonic()
        serve.process.send_signal(signal.SIGTERM)
        code = serve.process.wait(timeout=INVOCATION_DEADLINE_S + 30)
        drained_s = time.monotonic() - signalled
        load.join(300)
        assert code == 0
        # Seen once, in the sixth of a series of CI runs under load: 125.6 s, uvicorn's
        # graceful limit (DRAIN_SECONDS). The likely cause, now fixed: a connection set up
        # just after uvicorn asked the open ones to close stayed kept alive, and polls kept
        # it busy (test_serve_drain.py). If it comes back, the message says what ran.
        assert drained_s < INVOCATION_DEADLINE_S, drain_diagnosis(serve, signalled)
        assert set(record.statuses) <= {200, 503}, record.unexpected
        assert record.unexpected == [] and record.stopped  # the service went away mid-load
        stats = mock.stats()
        assert stats.creates_in_flight == 0
        assert stats.max_concurrent_creates <= CREATE_SLOTS
        view = status_json(run.serve.storage, *STATUS_CONFIG)
        assert view["create_slots"]["in_use"] == 0 and view["create_slots"]["leases"] == []
        # Every sandbox E2B made is recorded as held (none orphaned by the shutdown).
        held = {lease["sandbox_id"] for lease in view["capacity"]["leases"]}
        assert held == {s["sandbox_id"] for s in mock.running_sandboxes()}
        assert len(held) == stats.sandboxes_created
        print(f"drained in {drained_s:.2f} s; {len(held)} sandboxes, all recorded")
