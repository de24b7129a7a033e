"""What one admission decision costs as the queue grows: 10, 100 and 1,000 waiters.

For each queue length the benchmark fills the queue (waiters spread over a few tenants),
then measures, over many repetitions, the two decisions a waiting session causes:
a poll that stays queued (the common case) and a poll that is granted after a create
slot frees (the head of the queue). It reports storage operations, bytes moved and CPU
time per decision, and the bytes stored, each as a ratio against the 10-waiter queue.
Issue 3 asks for at most 2x from 10 to 1,000 waiters.

Run: .venv/bin/python -m benchmarks.decision_cost [--repeat 300]
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import dataclass
from typing import Any

from benchmarks.counting import CountingBackend
from host.services.namespaces import ScopedStorage, account_namespace
from host.storage.memory import MemoryBackend
from provisioner.config import AdmissionConfig
from provisioner.gates.results import Created, Grant, Queued, Waiter
from provisioner.gates.view import inspect_gates
from tests.guest.harness import ACCOUNT, Harness

TENANTS = 5


@dataclass
class Cost:
    ops: float
    bytes: float
    micros: float


def stored_bytes(backend: MemoryBackend) -> tuple[int, int]:
    namespace = account_namespace(ACCOUNT)
    total = 0
    gate = 0
    for key in backend.keys(namespace):
        entry = backend.get(namespace, key)
        size = len(key) + (0 if entry is None else len(entry.value))
        total += size
        if key == "adm/gate":
            gate = size
    return total, gate


def measure(waiters: int, repeat: int) -> dict[str, Any]:
    config = AdmissionConfig(create_slots=4, create_rate_per_s=1000.0, create_burst=1000)
    harness = Harness(config)
    memory = MemoryBackend(harness.clock.now_ms)
    counting = CountingBackend(memory)
    harness.backend = counting
    holders = [Waiter("holder", f"Job/holder-{i}") for i in range(config.create_slots)]
    grants = [harness.admit(w) for w in holders]
    assert all(isinstance(g, Grant) for g in grants)
    queue = [Waiter(f"tenant-{i % TENANTS}", f"Job/{i}") for i in range(waiters)]
    for waiter in queue:
        assert isinstance(harness.admit(waiter), Queued)

    def timed(action: Any) -> tuple[int, int, float]:
        ops, moved = counting.ops, counting.bytes
        started = time.perf_counter_ns()
        action()
        elapsed = time.perf_counter_ns() - started
        return counting.ops - ops, counting.bytes - moved, elapsed / 1000

    # A queued poll: the waiter in the middle of the queue asks again.
    middle = queue[len(queue) // 2]
    polls = [timed(lambda: harness.admit(middle)) for _ in range(repeat)]

    # A grant: a holder settles (freeing a slot), then the queue's front asks and is
    # granted; the next front then takes the role of the holder.
    grant_costs: list[tuple[int, int, float]] = []
    holder, grant = holders[0], grants[0]
    for _ in range(min(repeat, waiters // 2)):
        assert isinstance(grant, Grant)
        harness.settle(holder, grant, Created("sbx", 600_000))
        harness.release(holder)
        front = next(w for w in queue if _is_front(harness, w))
        decision: Any = None

        def admit_front(front: Waiter = front) -> None:
            nonlocal decision
            decision = harness.admit(front)

        grant_costs.append(timed(admit_front))
        assert isinstance(decision, Grant), decision
        queue.remove(front)
        queue.append(Waiter(front.tenant, front.entity + "-again"))
        assert isinstance(harness.admit(queue[-1]), Queued)
        holder, grant = front, decision
    total, gate = stored_bytes(memory)

    def summary(costs: list[tuple[int, int, float]]) -> Cost:
        return Cost(
            ops=statistics.mean(c[0] for c in costs),
            bytes=statistics.mean(c[1] for c in costs),
            micros=statistics.median(c[2] for c in costs),
        )

    return {
        "poll": summary(polls),
        "grant": summary(grant_costs),
        "stored_bytes": total,
        "gate_bytes": gate,
    }


def _is_front(harness: Harness, waiter: Waiter) -> bool:
    status = harness.controller(waiter.tenant).status(waiter.tenant)
    return bool(status["tenant"]["queued"]) and _position(harness, waiter) == 1


def _position(harness: Harness, waiter: Waiter) -> int:
    # Peek without changing anything, through the guest's public inspection view.
    storage = ScopedStorage(harness.backend, tenant=waiter.tenant, account=ACCOUNT)
    view = inspect_gates(storage, harness.clock.now_ms(), harness.config)
    found = view.waiter(waiter.tenant, waiter.entity)
    return 0 if found is None else found.position


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=300)
    args = parser.parse_args()
    sizes = (10, 100, 1000)
    results = {size: measure(size, args.repeat) for size in sizes}
    base = results[sizes[0]]
    print(
        f"{'waiters':>8} {'decision':>8} {'ops':>6} {'bytes':>8} {'us':>8}"
        f" {'ops x':>6} {'bytes x':>8} {'time x':>7}"
    )
    for size in sizes:
        for kind in ("poll", "grant"):
            cost: Cost = results[size][kind]
            ref: Cost = base[kind]
            print(
                f"{size:>8} {kind:>8} {cost.ops:>6.1f} {cost.bytes:>8.0f} {cost.micros:>8.1f}"
                f" {cost.ops / ref.ops:>6.2f} {cost.bytes / ref.bytes:>8.2f}"
                f" {cost.micros / ref.micros:>7.2f}"
            )
    print()
    print(f"{'waiters':>8} {'stored':>9} {'per waiter':>10} {'gate doc':>9} {'gate x':>7}")
    for size in sizes:
        stored, gate = results[size]["stored_bytes"], results[size]["gate_bytes"]
        print(
            f"{size:>8} {stored:>9} {stored / size:>10.1f} {gate:>9}"
            f" {gate / base['gate_bytes']:>7.2f}"
        )


if __name__ == "__main__":
    main()
