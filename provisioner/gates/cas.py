"""The compare-and-swap loop every decision runs in: a conflict means another invocation
decided first, so the step runs again from a fresh read, at most `cas_retries` times."""

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
    last: Exception | None = None
    for _ in range(max(1, attempts)):
        try:
            return step()
        except (StorageConflict, Again) as conflict:
            last = conflict
    raise Contended(f"still contended after {attempts} tries: {last}")


def storage_queued(ports: Ports, config: AdmissionConfig) -> Queued:
    """The answer when storage fails or stays contended: nothing granted, ask again after
    poll_min, jittered so the invocations that collided do not come back at once."""
    wait = config.poll_min_ms + int(ports.uniform() * 1000)
    return Queued(0, 0, 0, 0, REASON_STORAGE, wait, wait, 0)


def new_lease_id(ports: Ports, prefix: str) -> str:
    return f"{prefix}{ports.random.next_u64():016x}"
