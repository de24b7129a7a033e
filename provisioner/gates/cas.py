"""The compare-and-swap retry loop every admission decision runs in.

A decision reads, decides and writes with compare-and-swap; a conflict means another
invocation decided first, so the step runs again from a fresh read. The loop is bounded
(`cas_retries`); when it runs out, the caller answers "come back later" with a wait drawn
from the host's randomness (`come_back_ms`), so invocations that collided do not all come
back at the same instant. The guest cannot sleep: the jitter is in when it is invoked next.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from provisioner.config import AdmissionConfig
from provisioner.gates.results import REASON_STORAGE, Queued
from provisioner.ports import Ports, StorageConflict

_T = TypeVar("_T")


class Again(Exception):
    """Something this decision read moved before its write: decide again."""


class Contended(StorageConflict):
    """Every try met a conflict."""


def until_settled(step: Callable[[], _T], attempts: int) -> _T:
    """Run `step` until it returns without a conflict, at most `attempts` times."""
    last: Exception | None = None
    for _ in range(max(1, attempts)):
        try:
            return step()
        except (StorageConflict, Again) as conflict:
            last = conflict
    raise Contended(f"still contended after {attempts} tries: {last}")


def come_back_ms(ports: Ports, floor_ms: int, spread_ms: int = 1000) -> int:
    """When a waiter turned away by contention (or a storage fault) should ask again."""
    return floor_ms + int(ports.uniform() * spread_ms)


def storage_queued(ports: Ports, config: AdmissionConfig) -> Queued:
    """The answer when storage fails: nothing granted, ask again after poll_min (jittered)."""
    wait = come_back_ms(ports, config.poll_min_ms)
    return Queued(0, 0, 0, 0, REASON_STORAGE, wait, wait, 0)


def new_lease_id(ports: Ports, prefix: str) -> str:
    return f"{prefix}{ports.random.next_u64():016x}"
