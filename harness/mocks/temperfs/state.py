"""The mock TemperFS's records and the faults it injects, shared by its event loop and the
test threads that read its stats and reconfigure it."""

from __future__ import annotations

import time

from harness.mocks.e2b.config import FaultRule
from harness.mocks.e2b.faults import FaultPicker
from harness.mocks.shared.state import Clock, GuardedState
from harness.mocks.temperfs.config import ROUTE, TemperFSConfig
from harness.mocks.temperfs.stats import TemperFSStats
from harness.mocks.temperfs.store import Answer, TemperFSStore


class TemperFSState(GuardedState[TemperFSConfig, TemperFSStats]):
    name = "mock TemperFS"

    def __init__(self, config: TemperFSConfig, clock: Clock = time.monotonic) -> None:
        super().__init__(clock)
        self._config = config
        self.store = TemperFSStore(config.seed)
        self._clear()

    def _clear(self) -> None:
        self._ordinal = 0
        self._counters = TemperFSStats()
        self._faults = FaultPicker(self._config.seed)

    @property
    def config(self) -> TemperFSConfig:
        with self._lock:
            return self._config

    def configure(self, config: TemperFSConfig) -> None:
        with self._mutating():
            old, self._config = self._config, config
            if old.seed != config.seed:
                self._faults = FaultPicker(config.seed)

    def reset(self) -> None:
        """Forgets every record, request and counter; restarts the seeded streams."""
        with self._mutating():
            self._clear()
        self.store.reset()

    def handle(
        self, method: str, path: str, headers: dict[str, str], body: bytes
    ) -> Answer | FaultRule:
        """The store's answer to one request below /tdata/, or the fault that replaces it
        (before the request acts, or after a 2xx one acted: the caller never learns)."""
        with self._mutating():
            self._ordinal += 1
            ordinal = self._ordinal
            before = self._pick(ordinal, after_create=False)
        if before is not None:
            return before
        answer = self.store.handle(method, path, headers, body)
        with self._mutating():
            after = self._pick(ordinal, after_create=True) if 200 <= answer.status < 300 else None
        return answer if after is None else after

    def _pick(self, ordinal: int, after_create: bool) -> FaultRule | None:
        rule = self._faults.pick(self._config.faults, ROUTE, ordinal, after_create)
        if rule is not None:
            self._counters.faults_injected += 1
        return rule

    def stats(self) -> TemperFSStats:
        with self._lock:
            workspaces, files, requests = self.store.counts()
            return self._counters.snapshot(workspaces=workspaces, files=files, requests=requests)
