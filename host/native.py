"""Native bindings of the guest's ports: the same guest code, run in this process.

Used by unit tests, the deterministic simulation and the benchmarks that compare the
component against the same logic run natively.
"""

from __future__ import annotations

import random
import threading
from dataclasses import dataclass, field
from typing import Any

from host.namespaces import ScopedStorage
from host.storage.base import StorageBackend
from provisioner.ports import Clock, Http, LogLevel, Ports, Random, Telemetry


class ManualClock:
    """A clock that moves only when told to."""

    def __init__(self, start_ms: int = 1_700_000_000_000) -> None:
        self._now = start_ms
        self._lock = threading.Lock()

    def now_ms(self) -> int:
        with self._lock:
            return self._now

    def advance(self, ms: int) -> None:
        if ms < 0:
            raise ValueError("a clock does not go back")
        with self._lock:
            self._now += ms

    def set(self, now_ms: int) -> None:
        with self._lock:
            self._now = max(self._now, now_ms)


class SeededRandom:
    def __init__(self, seed: int) -> None:
        self._rng = random.Random(seed)
        self._lock = threading.Lock()

    def next_u64(self) -> int:
        with self._lock:
            return self._rng.getrandbits(64)


@dataclass
class RecordingTelemetry:
    logs: list[tuple[LogLevel, str]] = field(default_factory=list)
    events: list[dict[str, Any]] = field(default_factory=list)

    def log(self, level: LogLevel, message: str) -> None:
        self.logs.append((level, message))

    def progress(self, event: dict[str, Any]) -> None:
        self.events.append(event)


def native_ports(
    backend: StorageBackend,
    *,
    tenant: str,
    account: str,
    http: Http,
    clock: Clock,
    random: Random,
    telemetry: Telemetry,
) -> Ports:
    return Ports(
        storage=ScopedStorage(backend, tenant=tenant, account=account),
        http=http,
        clock=clock,
        random=random,
        telemetry=telemetry,
    )
