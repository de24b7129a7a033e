"""What one provision decision costs through the component on Redis against SQLite.

A decision here is one whole invocation of the component (fresh instance, Temper's
budgets) that answers SandboxQueued: the common case of a waiting session polling. The
account is full (one sandbox held, `max_sandboxes = 1`), N waiters over five tenants are
queued, and the waiters poll in turn. For each backend and N the benchmark prints the
median wall time per decision, the storage operations per decision, and the ratio against
SQLite (a file on local disk: the single-host default). The backends take turns, one
decision each per round, and the ratio is the median over rounds of the two decisions'
times, so load from elsewhere on the machine falls on both alike. memory:// is the floor: what the
component costs with free storage. Redis runs on loopback, so its round trips are the
cheapest a network store can offer; a real network adds its RTT per operation.

Run: .venv/bin/python -m benchmarks.storage_decision [--ops 200] [--waiters 10 100]
Figures, not assertions: they depend on the machine (and on what else runs on it).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass

from benchmarks.counting import CountingBackend
from benchmarks.support import invocation, load, mock_e2b, open_hosts
from benchmarks.table import Row, format_text, times
from harness.multihost.redis_server import RedisServer, find_redis_server
from host.runtime.loader import LoadedComponent
from host.storage import storage_from_uri
from host.storage.base import StorageBackend
from provisioner.model import SANDBOX_QUEUED, SANDBOX_READY

TENANTS = 5
WAITERS = (10, 100)
# The account holds one sandbox and admits no other, so every waiter stays queued.
FULL_ACCOUNT = (
    ("create_slots", "4"),
    ("create_rate_per_s", "1000"),
    ("create_burst", "1000"),
    ("max_sandboxes", "1"),
    ("waiter_ttl_s", "3600"),
    ("queue_timeout_s", "3600"),
    ("sandbox_timeout_s", "3600"),
)


@dataclass(frozen=True)
class DecisionCost:
    backend: str
    waiters: int
    median_ms: float
    mean_ms: float
    ops_per_decision: float
    # Median over rounds of this backend's time / SQLite's time in the same round.
    paired_ratio: float


class _Queue:
    """One backend with its account full and `waiters` sessions queued."""

    def __init__(
        self,
        loaded: LoadedComponent,
        name: str,
        storage: StorageBackend,
        e2b_url: str,
        waiters: int,
    ) -> None:
        self.name = name
        self.counting = CountingBackend(storage)
        self.e2b_url = e2b_url
        self.hosts = open_hosts(loaded, e2b_url, storage=self.counting)
        self.samples: list[float] = []
        self.decisions = 0
        if self._poll("holder", "tenant-0") != SANDBOX_READY:
            raise RuntimeError(f"{name}: the holder got no sandbox")
        self.entities = [(f"waiter-{i}", f"tenant-{i % TENANTS}") for i in range(waiters)]
        for entity, tenant in self.entities:
            if self._poll(entity, tenant) != SANDBOX_QUEUED:
                raise RuntimeError(f"{name}: {entity} was not queued")
        self.counting.ops = 0

    def _poll(self, entity: str, tenant: str) -> str:
        return self.hosts.component.invoke(
            invocation(self.e2b_url, entity, tenant=tenant, config=FULL_ACCOUNT)
        ).action

    def timed_poll(self, index: int) -> float:
        entity, tenant = self.entities[index % len(self.entities)]
        started = time.perf_counter()
        action = self._poll(entity, tenant)
        elapsed = (time.perf_counter() - started) * 1000
        if action != SANDBOX_QUEUED:
            raise RuntimeError(f"{self.name}: {entity} answered {action}")
        self.samples.append(elapsed)
        self.decisions += 1
        return elapsed

    def close(self) -> None:
        self.hosts.close()


def measure(
    loaded: LoadedComponent,
    stores: dict[str, StorageBackend],
    waiters: int,
    ops: int,
) -> list[DecisionCost]:
    """Fills each store's queue with `waiters`, then times `ops` rounds of one queued poll
    per store, interleaved so that whatever else loads the machine loads every store alike."""
    with mock_e2b() as mock:
        queues = [_Queue(loaded, name, store, mock.url, waiters) for name, store in stores.items()]
        try:
            ratios: dict[str, list[float]] = {q.name: [] for q in queues}
            for index in range(ops):
                round_ms = {q.name: q.timed_poll(index) for q in queues}
                for name, elapsed in round_ms.items():
                    ratios[name].append(elapsed / round_ms["sqlite"])
            return [
                DecisionCost(
                    q.name,
                    waiters,
                    statistics.median(q.samples),
                    statistics.fmean(q.samples),
                    q.counting.ops / q.decisions,
                    statistics.median(ratios[q.name]),
                )
                for q in queues
            ]
        finally:
            for queue in queues:
                queue.close()


@contextmanager
def backends() -> Iterator[dict[str, Callable[[], StorageBackend]]]:
    """Fresh-store factories: memory, SQLite on local disk, and Redis when installed."""
    with ExitStack() as stack:
        state_dir = stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-decision-"))
        made = iter(range(1_000_000))
        factories: dict[str, Callable[[], StorageBackend]] = {
            "memory": lambda: storage_from_uri("memory://"),
            "sqlite": lambda: storage_from_uri(f"sqlite://{state_dir}/{next(made)}.db"),
        }
        if find_redis_server() is not None:
            server = stack.enter_context(RedisServer())
            # A fresh key prefix per store keeps runs apart on one server.
            factories["redis"] = lambda: storage_from_uri(
                f"{server.url}?key_prefix=bench{next(made)}:"
            )
        yield factories


def run(loaded: LoadedComponent, ops: int, waiter_counts: tuple[int, ...]) -> list[DecisionCost]:
    results = []
    with backends() as factories:
        for waiters in waiter_counts:
            # Closed by the hosts that use them.
            stores = {name: factory() for name, factory in factories.items()}
            results.extend(measure(loaded, stores, waiters, ops))
    return results


def rows(results: list[DecisionCost]) -> list[Row]:
    return [
        Row(
            "3",
            f"queued provision decision on {r.backend}, {r.waiters} waiters",
            f"{r.median_ms:.2f} ms median ({r.mean_ms:.2f} mean), "
            f"{r.ops_per_decision:.1f} storage ops",
            times(r.paired_ratio),
            "sqlite",
        )
        for r in results
    ]


def bench_rows(ops: int) -> list[Row]:
    """The rows benchmarks/scaling.py shows for the storage backends."""
    return rows(run(load(), ops, WAITERS))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.storage_decision")
    parser.add_argument("--ops", type=int, default=200, help="timed decisions per case")
    parser.add_argument("--waiters", type=int, nargs="+", default=list(WAITERS))
    args = parser.parse_args(argv)
    if find_redis_server() is None:
        print("redis-server not installed: Redis is left out")
    results = run(load(), args.ops, tuple(args.waiters))
    print(format_text(rows(results)))
    for waiters in args.waiters:
        by_name = {r.backend: r for r in results if r.waiters == waiters}
        if "redis" in by_name:
            print(
                f"{waiters} waiters: Redis / SQLite = {by_name['redis'].paired_ratio:.2f}x "
                "per decision (median of paired rounds)"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
