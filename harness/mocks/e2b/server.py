"""Runs the mock on 127.0.0.1 in a background thread (uvicorn), for tests and simulations."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from starlette.types import ASGIApp

from harness.mocks.e2b.app import Runtime, build_app
from harness.mocks.e2b.config import MockE2BConfig
from harness.mocks.e2b.state import MockState
from harness.mocks.e2b.stats import MockE2BStats
from harness.mocks.shared.server import MockServer
from harness.mocks.shared.state import Clock


class MockE2BServer(MockServer[MockE2BConfig, MockE2BStats]):
    """A mock E2B API on a free loopback port.

    ``with MockE2BServer(MockE2BConfig(api_key="k")) as server: server.url`` — or call
    ``start()`` and ``stop()``. ``clock`` (seconds, monotonic) drives sandbox expiry, the kill
    lag and the rate limiter, so tests can move time instead of sleeping; latency and
    hangs always take real time. ``reset()`` forgets every sandbox, idempotency key and
    counter (the config stays).
    """

    _state: MockState

    def _new_state(self, config: MockE2BConfig | None, clock: Clock) -> MockState:
        return MockState(config or MockE2BConfig(), clock)

    def _new_app(self) -> tuple[ASGIApp, Callable[[], Runtime | None]]:
        # build_app is looked up here, in this module: tests/conftest.py wraps it.
        app, self._e2b_runtime = build_app(self._state, self._apply_changes)
        return app, self._e2b_runtime

    def configure(self, **changes: Any) -> MockE2BConfig:
        """Changes the config while running (faults may be rules, dicts or CLI strings)."""
        config = self._apply_changes(changes)
        runtime: Runtime | None = self._e2b_runtime()
        if runtime is not None:
            self.on_loop(runtime.config_changed)  # the concurrent-create cap may have grown
        return config

    def running_sandboxes(self) -> list[dict[str, Any]]:
        """Running sandboxes: sandbox_id, template_id, metadata, started_at, end_at,
        idempotency_key."""
        return self._state.running()

    def orphans(self, held_ids: set[str]) -> list[str]:
        """Running sandboxes that are not in ``held_ids`` (what the caller says it holds)."""
        return self._state.orphans(held_ids)
