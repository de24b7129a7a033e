"""Runs the mock on 127.0.0.1 in a background thread (uvicorn), for tests and simulations."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

from host.mock_e2b.app import Runtime, build_app
from host.mock_e2b.config import MockE2BConfig
from host.mock_e2b.state import MockState
from host.mock_e2b.stats import MockE2BStats
from host.mock_e2b.temperfs import TemperFSStore
from host.mock_server.server import LoopbackServer
from host.mock_server.state import Clock


class MockE2BServer(LoopbackServer):
    """A mock E2B API on a free loopback port.

    ``with MockE2BServer(MockE2BConfig(api_key="k")) as server: server.url`` — or call
    ``start()`` and ``stop()``. ``clock`` (seconds, monotonic) drives sandbox expiry, the kill
    lag and the rate limiter, so tests can move time instead of sleeping; latency and
    hangs always take real time.
    """

    def __init__(
        self,
        config: MockE2BConfig | None = None,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        clock: Clock = time.monotonic,
    ) -> None:
        self._state = MockState(config or MockE2BConfig(), clock)
        self._config_lock = threading.Lock()
        # build_app is looked up here, in this module: tests/conftest.py wraps it.
        app, self._e2b_runtime = build_app(self._state, self._apply_changes)
        super().__init__(app, self._e2b_runtime, name="mock E2B", host=host, port=port)

    # -- control -------------------------------------------------------------------------

    @property
    def config(self) -> MockE2BConfig:
        return self._state.config

    def configure(self, **changes: Any) -> MockE2BConfig:
        """Changes the config while running (faults may be rules, dicts or CLI strings)."""
        config = self._apply_changes(changes)
        runtime: Runtime | None = self._e2b_runtime()
        if runtime is not None:
            self.on_loop(runtime.config_changed)
        return config

    def _apply_changes(self, changes: dict[str, Any]) -> MockE2BConfig:
        with self._config_lock:
            config = self._state.config.replace(**changes)
            self._state.configure(config)
            return config

    def reset(self) -> None:
        """Forgets every sandbox, idempotency key and counter (the config stays)."""
        self._state.reset()

    def stats(self) -> MockE2BStats:
        return self._state.stats()

    def wait_for(
        self, predicate: Callable[[MockE2BStats], bool], timeout: float = 10.0
    ) -> MockE2BStats:
        """Blocks until ``predicate(stats)`` holds and returns those stats, e.g.
        ``server.wait_for(lambda s: s.creates_in_flight == 4)``; TimeoutError otherwise."""
        return self._state.wait_for(predicate, timeout)

    def running_sandboxes(self) -> list[dict[str, Any]]:
        """Running sandboxes: sandbox_id, template_id, metadata, started_at, end_at,
        idempotency_key."""
        return self._state.running()

    @property
    def temperfs(self) -> TemperFSStore:
        """The TemperFS records (served under /tdata when ``config.temperfs``): workspaces,
        files with their content, and every request sent there."""
        return self._state.temperfs

    @property
    def temperfs_url(self) -> str:
        """The base a client puts in ``temper_api_url``: requests go to ``{url}/tdata/...``."""
        return self.url

    def orphans(self, held_ids: set[str]) -> list[str]:
        """Running sandboxes that are not in ``held_ids`` (what the caller says it holds)."""
        return self._state.orphans(held_ids)
