"""Runs the mock on 127.0.0.1 in a background thread (uvicorn), for tests and simulations."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

from host.mock_llm.app import build_app
from host.mock_llm.config import MockLLMConfig
from host.mock_llm.state import MockLLMState
from host.mock_llm.stats import MockLLMStats, RequestRecord
from host.mock_server.server import LoopbackServer
from host.mock_server.state import Clock


class MockLLMServer(LoopbackServer):
    """A mock Anthropic Messages API on a free loopback port.

    ``with MockLLMServer(MockLLMConfig(api_keys=("k",), rpm=50)) as server: server.url`` —
    the ``base_url`` of ``anthropic.Anthropic`` — or call ``start()`` and ``stop()``.
    ``clock`` (seconds, monotonic) drives the buckets and the request log, so tests can move
    time instead of sleeping; latency always takes real time.
    """

    def __init__(
        self,
        config: MockLLMConfig | None = None,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        clock: Clock = time.monotonic,
    ) -> None:
        self._state = MockLLMState(config or MockLLMConfig(), clock)
        self._config_lock = threading.Lock()
        app, runtime = build_app(self._state, self._apply_changes)
        super().__init__(app, runtime, name="mock LLM", host=host, port=port)

    # -- control -----------------------------------------------------------------------------

    @property
    def config(self) -> MockLLMConfig:
        return self._state.config

    def configure(self, **changes: Any) -> MockLLMConfig:
        """Changes the config while running; changed limits start from full buckets."""
        return self._apply_changes(changes)

    def _apply_changes(self, changes: dict[str, Any]) -> MockLLMConfig:
        with self._config_lock:
            config = self._state.config.replace(**changes)
            self._state.configure(config)
            return config

    def reset(self) -> None:
        """Forgets every bucket, counter and logged request (the config stays)."""
        self._state.reset()

    def stats(self) -> MockLLMStats:
        return self._state.stats()

    def requests(self) -> list[RequestRecord]:
        """The answered Messages requests, oldest first, with their times on ``clock``."""
        return self._state.requests()

    def levels(self, api_key: str) -> dict[str, float]:
        """``api_key``'s bucket levels now: "requests", "input_tokens", "output_tokens"
        (for the limits that are set; negative while in debt)."""
        return self._state.levels(api_key)

    def wait_for(
        self, predicate: Callable[[MockLLMStats], bool], timeout: float = 10.0
    ) -> MockLLMStats:
        """Blocks until ``predicate(stats)`` holds and returns those stats, e.g.
        ``server.wait_for(lambda s: s.in_flight == 4)``; TimeoutError otherwise."""
        return self._state.wait_for(predicate, timeout)
