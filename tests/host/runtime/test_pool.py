"""The process pool: invocations in worker processes, a dead worker replaced."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from host.runtime.component_runtime import Budgets
from host.runtime.loader import Pooling, load_component
from host.runtime.pool import ProcessPoolRuntime, WorkerSpec
from tests.conftest import API_KEY
from tests.guests.build import build_probe_component
from tests.host.runtime.test_hardening_budgets import allocated_mib
from tests.system.hardening_support import make_probe_host, probe_invocation


@pytest.fixture
def pool(tmp_path: Path) -> Iterator[ProcessPoolRuntime]:
    spec = WorkerSpec(
        e2b_url="http://127.0.0.1:9",
        api_key=API_KEY,
        storage_url=f"sqlite:///{tmp_path / 'state.db'}",
        component=build_probe_component(),
        allow_private_network=True,
        pooling=Pooling(instance_slots=2, max_memory_bytes=128 << 20),
    )
    with ProcessPoolRuntime(spec, workers=2, threads_per_worker=2) as running:
        yield running


def test_invocations_run_in_the_worker_processes(pool: ProcessPoolRuntime) -> None:
    pids = pool.worker_pids()
    assert len(pids) == 2 and os.getpid() not in pids
    outcomes: list[str] = []

    def caller() -> None:
        for _ in range(5):
            outcomes.append(pool.invoke(probe_invocation("noop")).action)

    threads = [threading.Thread(target=caller) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert outcomes == ["ProbeDone"] * 20


def test_the_guests_budgets_hold_in_a_worker(pool: ProcessPoolRuntime) -> None:
    # As on the default engine (tests/host/runtime/test_hardening_budgets.py): the guest
    # dies of the refused growth, one way or the other; the worker serves on.
    outcome = pool.invoke(probe_invocation("alloc"))
    assert outcome.error is not None, outcome
    assert outcome.error.code in ("memory_exhausted", "guest_trap"), outcome
    assert pool.invoke(probe_invocation("noop")).action == "ProbeDone"


@pytest.mark.parametrize("max_memory_mib", [64, 256])
def test_the_memory_budget_stops_a_guest_on_a_pooled_engine(max_memory_mib: int) -> None:
    """Breaks if the budget is not applied under the pool: the probe would log allocations
    past the 32 MiB cap (up to the slot's size)."""
    loaded = load_component(
        build_probe_component(),
        pooling=Pooling(instance_slots=1, max_memory_bytes=max_memory_mib << 20),
    )
    host = make_probe_host(loaded, budgets=Budgets(memory_bytes=32 << 20))
    try:
        outcome = host.call("alloc")
        assert outcome.error is not None, outcome
        assert outcome.error.code in ("memory_exhausted", "guest_trap"), outcome
        assert 0 < allocated_mib(host) < 32
        assert host.call("noop").action == "ProbeDone"
    finally:
        host.close()


def test_a_killed_worker_is_replaced(pool: ProcessPoolRuntime) -> None:
    victim = pool.worker_pids()[0]
    os.kill(victim, signal.SIGKILL)
    deadline = time.monotonic() + 120  # a replacement starts a fresh interpreter
    while time.monotonic() < deadline:
        pids = pool.worker_pids()
        if victim not in pids and len(pids) == 2:
            break
        time.sleep(0.1)
    else:
        pytest.fail(f"worker {victim} was not replaced: {pool.worker_pids()}")
    assert [pool.invoke(probe_invocation("noop")).action for _ in range(4)] == ["ProbeDone"] * 4
