"""Figure 3: how admission scales: decision cost and stored bytes as the queue grows,
compare-and-swap conflicts with 8 concurrent invokers, and the storage backends.

- Decision cost and stored bytes at 10/100/1,000 waiters come from
  benchmarks/decision_cost.py (`measure`), run here with the same repetitions.
- CAS conflicts: 8 threads invoke the component at once on one shared backend (memory,
  SQLite, and Redis when a redis-server is installed), each provisioning its own entities
  through a 4-slot gate until granted, then releasing; every compare-and-swap that loses
  to another invocation is counted. A decision is one invocation.
- Backends: the raw cost of one get + compare-and-swap per backend, from
  benchmarks/storage_ops.py (`per_decision_us`), 1 thread and 4 threads on one key; then
  a whole queued provision decision through the component on each backend, from
  benchmarks/storage_decision.py (`bench_rows`), when that module is present.

Run alone: .venv/bin/python -m benchmarks.scaling [--quick]
"""

from __future__ import annotations

import argparse
import importlib
import tempfile
import threading
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any

from benchmarks import decision_cost, storage_ops
from benchmarks.counting import CountingBackend
from benchmarks.support import invocation, mock_e2b, open_hosts
from benchmarks.table import Row, times
from harness.multihost.redis_server import RedisServer, find_redis_server
from host.runtime.loader import LoadedComponent, load_component
from host.storage import storage_from_uri
from host.storage.base import StorageBackend
from provisioner.model import SANDBOX_QUEUED, SANDBOX_READY, SANDBOX_RELEASED

DECISION_TARGET = 2.0
WAITERS = (10, 100, 1000)
INVOKERS = 8
GATED = (
    ("create_rate_per_s", "1000"),
    ("create_burst", "1000"),
    ("create_slots", "4"),
    ("max_sandboxes", "100000"),
)


def decision_rows(repeat: int) -> list[Row]:
    results = {size: decision_cost.measure(size, repeat) for size in WAITERS}
    base = results[WAITERS[0]]
    rows: list[Row] = []
    for size in WAITERS:
        result = results[size]
        poll, grant = result["poll"], result["grant"]
        poll_x = poll.micros / base["poll"].micros
        grant_x = grant.micros / base["grant"].micros
        last = size == WAITERS[-1]
        rows.append(
            Row(
                "3",
                f"decision cost, {size} waiters",
                f"poll {poll.micros:.0f} us ({poll.ops:.0f} ops, {poll.bytes:.0f} B moved); "
                f"grant {grant.micros:.0f} us ({grant.ops:.0f} ops, {grant.bytes:.0f} B moved)",
                f"poll {times(poll_x)}, grant {times(grant_x)}",
                "10 waiters",
                f"<= {DECISION_TARGET}x at 1,000" if last else "",
                (max(poll_x, grant_x) <= DECISION_TARGET) if last else None,
            )
        )
    for size in WAITERS:
        stored, gate = results[size]["stored_bytes"], results[size]["gate_bytes"]
        rows.append(
            Row(
                "3",
                f"stored bytes, {size} waiters",
                f"gate doc {gate} B; all keys {stored} B ({stored / size:.0f} B per waiter)",
                times(gate / base["gate_bytes"]),
                "gate doc at 10 waiters",
            )
        )
    return rows


@dataclass(frozen=True)
class ConflictFigures:
    backend: str
    decisions: int
    swaps: int
    conflicts: int


def measure_conflicts(
    loaded: LoadedComponent, backend_name: str, backend: StorageBackend, grants_each: int
) -> ConflictFigures:
    counter = CountingBackend(backend)
    errors: list[str] = []
    decisions = [0] * INVOKERS
    with mock_e2b() as mock:
        hosts = open_hosts(loaded, mock.url, storage=counter)
        start = threading.Barrier(INVOKERS)

        def invoker(index: int) -> None:
            start.wait()
            for round_ in range(grants_each):
                entity = f"{backend_name}-{index}-{round_}"
                for _ in range(10_000):  # bounded: a gate that never grants ends the run
                    decisions[index] += 1
                    outcome = hosts.component.invoke(invocation(mock.url, entity, config=GATED))
                    if outcome.action == SANDBOX_READY:
                        break
                    if outcome.action != SANDBOX_QUEUED:
                        errors.append(repr(outcome))
                        return
                decisions[index] += 1
                released = hosts.component.invoke(
                    invocation(mock.url, entity, operation="release", config=GATED)
                )
                if released.action != SANDBOX_RELEASED:
                    errors.append(repr(released))
                    return

        threads = [threading.Thread(target=invoker, args=(i,)) for i in range(INVOKERS)]
        try:
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
        finally:
            hosts.close()
    if errors:
        raise RuntimeError(f"{backend_name}: {errors[0]}")
    return ConflictFigures(backend_name, sum(decisions), counter.swaps, counter.conflicts)


@contextmanager
def backends(state_dir: str) -> Iterator[dict[str, Callable[[], StorageBackend]]]:
    """Fresh-backend factories: memory, SQLite, and Redis when redis-server is installed."""
    factories: dict[str, Callable[[], StorageBackend]] = {
        "memory": lambda: storage_from_uri("memory://"),
    }
    counter = iter(range(1_000_000))
    factories["sqlite"] = lambda: storage_from_uri(f"sqlite://{state_dir}/{next(counter)}.db")
    with ExitStack() as stack:
        if find_redis_server():
            server = RedisServer(persistent=True)
            server.start()
            stack.callback(server.close)
            factories["redis"] = lambda: storage_from_uri(server.url)
        yield factories


def conflict_rows(loaded: LoadedComponent, grants_each: int) -> list[Row]:
    rows: list[Row] = []
    with (
        tempfile.TemporaryDirectory(prefix="bench-state-") as state_dir,
        backends(state_dir) as factories,
    ):
        for name, factory in factories.items():
            figures = measure_conflicts(loaded, name, factory(), grants_each)
            rows.append(
                Row(
                    "3",
                    f"CAS conflicts, {INVOKERS} concurrent invokers, {name}",
                    f"{figures.conflicts} of {figures.swaps} swaps lost over "
                    f"{figures.decisions} decisions",
                    f"{figures.conflicts / figures.decisions:.3f} per decision",
                )
            )
    return rows


def decision_on_backend_rows(ops: int) -> list[Row]:
    try:
        storage_decision: Any = importlib.import_module("benchmarks.storage_decision")
    except ImportError:
        return []
    rows: list[Row] = storage_decision.bench_rows(ops)
    return rows


def backend_rows(ops: int) -> list[Row]:
    results: dict[str, tuple[float, float]] = {}
    with (
        tempfile.TemporaryDirectory(prefix="bench-ops-") as state_dir,
        backends(state_dir) as factories,
    ):
        for name, factory in factories.items():
            backend = factory()
            try:
                results[name] = (
                    storage_ops.per_decision_us(backend, ops, 1),
                    storage_ops.per_decision_us(backend, ops, storage_ops.THREADS),
                )
            finally:
                backend.close()
    single_sqlite, threaded_sqlite = results["sqlite"]
    return [
        Row(
            "3",
            f"get+CAS decision on {name} ({ops} decisions)",
            f"1 thread {single:.0f} us; {storage_ops.THREADS} threads on 1 key {threaded:.0f} us",
            f"{times(single / single_sqlite)}, {times(threaded / threaded_sqlite)}",
            "sqlite",
        )
        for name, (single, threaded) in results.items()
    ]


def measure(loaded: LoadedComponent, quick: bool) -> list[Row]:
    return (
        decision_rows(60 if quick else 300)
        + conflict_rows(loaded, 4 if quick else 15)
        + backend_rows(300 if quick else 2000)
        + decision_on_backend_rows(30 if quick else 150)
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    from benchmarks.table import format_text

    print(format_text(measure(load_component(), args.quick)))


if __name__ == "__main__":
    main()
