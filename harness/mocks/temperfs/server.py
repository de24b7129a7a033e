"""Runs the mock TemperFS on 127.0.0.1 in a background thread (uvicorn), for tests."""

from __future__ import annotations

from collections.abc import Callable

from starlette.types import ASGIApp

from harness.mocks.shared.server import MockServer, Runtime
from harness.mocks.shared.state import Clock
from harness.mocks.temperfs.app import build_app
from harness.mocks.temperfs.config import TemperFSConfig
from harness.mocks.temperfs.state import TemperFSState
from harness.mocks.temperfs.stats import TemperFSStats
from harness.mocks.temperfs.store import TemperFSStore


class MockTemperFSServer(MockServer[TemperFSConfig, TemperFSStats]):
    """A mock TemperFS on a free loopback port: a client's ``temper_api_url`` is ``url``
    (requests go to ``{url}/tdata/...``).

    ``with MockTemperFSServer() as fs: fs.url, fs.store.entities("File"), fs.stats()``;
    ``configure(faults=["503:n=1:route=tdata"])``; ``reset()`` forgets every record."""

    _state: TemperFSState

    def _new_state(self, config: TemperFSConfig | None, clock: Clock) -> TemperFSState:
        return TemperFSState(config or TemperFSConfig(), clock)

    def _new_app(self) -> tuple[ASGIApp, Callable[[], Runtime | None]]:
        return build_app(self._state, self._apply_changes)

    @property
    def store(self) -> TemperFSStore:
        """The records: workspaces, files with their content, and every request sent."""
        return self._state.store
