"""Cost of one get + compare-and-swap (one guest "decision") on each storage backend.

    .venv/bin/python benchmarks/storage_ops.py [--ops N]

Prints microseconds per get+CAS pair, single-threaded and with 4 threads on one key (CAS
retries included), the ratios against memory://, and the cost of `now_ms()` on Redis with
and without the cached clock offset. Starts its own redis-server (skipped when missing).
Figures, not assertions: they depend on the machine.
"""

from __future__ import annotations

import argparse
import tempfile
import threading
import time
from collections.abc import Callable

from harness.multihost.redis_server import RedisServer, find_redis_server
from host.storage import storage_from_uri
from host.storage.base import StorageBackend
from host.storage.redis import RedisBackend
from provisioner.ports import StorageConflict

NS = "account/bench"
THREADS = 4


def decide(backend: StorageBackend, key: str) -> None:
    """One guest-like decision: read a record, write it back at the version read."""
    while True:
        found = backend.get(NS, key)
        count = 0 if found is None else int(found.value)
        try:
            backend.compare_and_swap(
                NS, key, None if found is None else found.version, str(count + 1).encode(), 60_000
            )
            return
        except StorageConflict:
            continue


def per_decision_us(backend: StorageBackend, ops: int, threads: int) -> float:
    key = f"counter-{threads}"
    decide(backend, key)  # warm up: connection, schema, script cache
    per_thread = ops // threads

    def run() -> None:
        for _ in range(per_thread):
            decide(backend, key)

    pool = [threading.Thread(target=run) for _ in range(threads)]
    started = time.perf_counter()
    for thread in pool:
        thread.start()
    for thread in pool:
        thread.join()
    return (time.perf_counter() - started) / (per_thread * threads) * 1e6


def per_call_us(call: Callable[[], object], calls: int) -> float:
    call()
    started = time.perf_counter()
    for _ in range(calls):
        call()
    return (time.perf_counter() - started) / calls * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ops", type=int, default=2000, help="decisions per measurement")
    ops = parser.parse_args().ops

    results: dict[str, tuple[float, float]] = {}
    with tempfile.TemporaryDirectory() as state_dir:
        backends: dict[str, StorageBackend] = {
            "memory": storage_from_uri("memory://"),
            "sqlite": storage_from_uri(f"sqlite://{state_dir}/bench.db"),
        }
        server = RedisServer(persistent=True) if find_redis_server() else None
        if server is not None:
            server.start()
            backends["redis"] = storage_from_uri(server.url)
        else:
            print("redis-server not found: Redis skipped")
        try:
            for name, backend in backends.items():
                results[name] = (
                    per_decision_us(backend, ops, 1),
                    per_decision_us(backend, ops, THREADS),
                )
            redis_backend = backends.get("redis")
            clock_costs = None
            if isinstance(redis_backend, RedisBackend) and server is not None:
                uncached = RedisBackend.from_url(f"{server.url}?clock_refresh_ms=0")
                clock_costs = (
                    per_call_us(redis_backend.now_ms, ops),
                    per_call_us(uncached.now_ms, ops),
                )
                uncached.close()
        finally:
            for backend in backends.values():
                backend.close()
            if server is not None:
                server.close()

    base_single, base_threaded = results["memory"]
    print(f"get+CAS per decision, {ops} decisions (us; ratio to memory)")
    print(f"{'backend':8} {'1 thread':>18} {f'{THREADS} threads, 1 key':>24}")
    for name, (single, threaded) in results.items():
        print(
            f"{name:8} {single:10.1f} ({single / base_single:5.1f}x)"
            f" {threaded:15.1f} ({threaded / base_threaded:5.1f}x)"
        )
    if clock_costs is not None:
        cached, uncached_cost = clock_costs
        print(
            f"redis now_ms: cached offset {cached:.2f} us, TIME per call {uncached_cost:.1f} us"
            f" ({uncached_cost / cached:.0f}x)"
        )


if __name__ == "__main__":
    main()
