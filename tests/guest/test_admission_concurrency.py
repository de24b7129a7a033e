"""Concurrent invokers on one shared backend: no interleaving may exceed a limit.

Each thread plays invocations with its own fresh controller, as separate hosts sharing
one storage backend would; the only coordination is the controller's compare-and-swap.
"""

from __future__ import annotations

import os
import random
import sys
import threading
from collections.abc import Callable, Iterator

import pytest

from host.storage.base import StorageBackend
from host.storage.memory import MemoryBackend
from provisioner.config import AdmissionConfig
from provisioner.gates.results import (
    CapacityExhausted,
    Created,
    CreateResult,
    Grant,
    RateLimited,
    Unavailable,
    Waiter,
)
from tests.doubles import InterposedBackend
from tests.guest.harness import Harness


@pytest.fixture(autouse=True)
def _switch_often() -> Iterator[None]:
    # Thread switches between storage calls are what expose a lost update.
    previous = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    yield
    sys.setswitchinterval(previous)


class Meter:
    """Counts what is really in use, as E2B would see it."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.creating = 0
        self.max_creating = 0
        self.running = 0
        self.max_running = 0
        self.per_tenant: dict[str, int] = {}
        self.max_per_tenant = 0
        self.grants = 0

    def start_create(self, tenant: str) -> None:
        with self.lock:
            self.grants += 1
            self.creating += 1
            self.max_creating = max(self.max_creating, self.creating)
            self._hold(tenant, +1)

    def end_create(self, tenant: str, created: bool) -> None:
        with self.lock:
            self.creating -= 1
            if created:
                self.running += 1
                self.max_running = max(self.max_running, self.running)
            else:
                self._hold(tenant, -1)

    def released(self, tenant: str) -> None:
        with self.lock:
            self.running -= 1
            self._hold(tenant, -1)

    def _hold(self, tenant: str, delta: int) -> None:
        self.per_tenant[tenant] = self.per_tenant.get(tenant, 0) + delta
        self.max_per_tenant = max(self.max_per_tenant, self.per_tenant[tenant])


def invoke(harness: Harness, meter: Meter, rng: random.Random, waiter: Waiter) -> bool:
    """One Provision invocation; True when it ends holding a sandbox."""
    decision = harness.admit(waiter)
    if not isinstance(decision, Grant):
        return False
    meter.start_create(waiter.tenant)
    for _ in range(3):
        os.sched_yield()  # the create is in flight: let other invokers run
    roll = rng.random()
    result: CreateResult
    if roll < 0.7:
        result = Created(f"sbx-{waiter.entity}", 600_000)
    elif roll < 0.8:
        result = RateLimited(rng.choice([None, 10]))
    elif roll < 0.97:
        result = Unavailable(503)
    else:
        result = CapacityExhausted(None)
    meter.end_create(waiter.tenant, isinstance(result, Created))
    settled = harness.settle(waiter, decision, result)
    if isinstance(result, Created):
        assert settled is None
        return True
    return False


def play(
    harness: Harness, meter: Meter, thread: int, rounds: int, errors: list[BaseException]
) -> None:
    rng = random.Random(thread)
    tenants = ["tenant-a", "tenant-b", "tenant-c"]
    try:
        mine = [Waiter(tenants[i % 3], f"Job/{thread}-{i}") for i in range(6)]
        holding: list[Waiter] = []
        for _ in range(rounds):
            if holding and (rng.random() < 0.5 or len(holding) == len(mine)):
                waiter = holding.pop(rng.randrange(len(holding)))
                meter.released(waiter.tenant)
                harness.release(waiter)
            for waiter in [w for w in mine if w not in holding]:
                if invoke(harness, meter, rng, waiter):
                    holding.append(waiter)
            harness.clock.advance(rng.randrange(1, 30))
        for waiter in holding:
            meter.released(waiter.tenant)
        # Leave nothing queued: a waiter nobody polls would hold the front until its TTL.
        for waiter in mine:
            harness.release(waiter)
    except BaseException as error:  # surfaced by the test thread
        errors.append(error)


def test_threads_never_exceed_any_limit() -> None:
    # Catches: a lost update (two invokers both taking the last permit) in any gate.
    config = AdmissionConfig(
        create_slots=3,
        create_rate_per_s=1000,
        create_burst=50,
        max_sandboxes=7,
        max_sandboxes_per_tenant=3,
        backoff_cap_ms=20,
        backoff_base_ms=1,
        max_create_attempts=1000,
        retry_budget=1000,
        cas_retries=64,
        capacity_grow_after=1,
    )
    harness = Harness(config)
    meter = Meter()
    errors: list[BaseException] = []
    threads = [
        threading.Thread(target=play, args=(harness, meter, t, 100, errors)) for t in range(6)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert meter.grants > 30, "the run must actually contend"
    assert meter.max_creating <= 3
    assert meter.max_running <= 7
    assert meter.max_per_tenant <= 3
    status = harness.status()["account"]
    assert status["create_slots"]["in_use"] == 0
    assert status["capacity"]["running"] == 0


class InterleavingBackend(InterposedBackend):
    """Runs `interloper` once, just before the first gate write, as if another invocation
    had decided between this one's read and its write."""

    def __init__(self, inner: StorageBackend, interloper: Callable[[], object]) -> None:
        super().__init__(inner)
        self.interloper: Callable[[], object] | None = interloper

    def before(self, operation: str, key: str) -> None:
        if operation == "compare_and_swap" and key == "adm/gate" and self.interloper is not None:
            interloper, self.interloper = self.interloper, None
            interloper()


@pytest.mark.parametrize("contended", ["create_slots", "max_sandboxes"])
def test_an_invocation_deciding_between_read_and_write_cannot_share_the_last_permit(
    contended: str,
) -> None:
    # Catches: a blind write (no compare-and-swap) letting two invokers take one permit.
    config = AdmissionConfig(create_rate_per_s=1000, create_burst=10, **{contended: 1})
    harness = Harness(config)
    first, second = Waiter("tenant-a", "Job/1"), Waiter("tenant-b", "Job/2")
    decisions: list[object] = []
    harness.backend = InterleavingBackend(
        MemoryBackend(harness.clock.now_ms), lambda: decisions.append(harness.admit(second))
    )
    decisions.append(harness.admit(first))
    assert len(decisions) == 2, "the precondition: the interloper decided in between"
    assert sum(isinstance(d, Grant) for d in decisions) == 1
    assert isinstance(decisions[0], Grant), "the interloper decided first"
    assert harness.status()["account"]["create_slots"]["in_use"] == 1
