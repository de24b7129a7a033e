"""Runs the mock on 127.0.0.1 in a background thread (uvicorn), for tests and simulations."""

from __future__ import annotations

from collections.abc import Callable

from starlette.types import ASGIApp

from harness.mocks.llm.app import Runtime, build_app
from harness.mocks.llm.config import MockLLMConfig
from harness.mocks.llm.state import MockLLMState
from harness.mocks.llm.stats import MockLLMStats, RequestRecord
from harness.mocks.shared.server import MockServer
from harness.mocks.shared.state import Clock


class MockLLMServer(MockServer[MockLLMConfig, MockLLMStats]):
    """A mock Anthropic Messages API on a free loopback port.

    ``with MockLLMServer(MockLLMConfig(api_keys=("k",), rpm=50)) as server: server.url`` —
    the ``base_url`` of ``anthropic.Anthropic`` — or call ``start()`` and ``stop()``.
    ``clock`` (seconds, monotonic) drives the buckets and the request log, so tests can move
    time instead of sleeping; latency always takes real time. ``configure()``: changed
    limits start from full buckets; ``reset()`` forgets every bucket, counter and logged
    request (the config stays).
    """

    _state: MockLLMState

    def _new_state(self, config: MockLLMConfig | None, clock: Clock) -> MockLLMState:
        return MockLLMState(config or MockLLMConfig(), clock)

    def _new_app(self) -> tuple[ASGIApp, Callable[[], Runtime | None]]:
        return build_app(self._state, self._apply_changes)

    def requests(self) -> list[RequestRecord]:
        """The answered Messages requests, oldest first, with their times on ``clock``."""
        return self._state.requests()

    def levels(self, api_key: str) -> dict[str, float]:
        """``api_key``'s bucket levels now: "requests", "input_tokens", "output_tokens"
        (for the limits that are set; negative while in debt)."""
        return self._state.levels(api_key)
