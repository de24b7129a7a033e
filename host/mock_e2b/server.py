"""Runs the mock on 127.0.0.1 in a background thread (uvicorn), for tests and simulations."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import time
from collections.abc import Callable
from types import TracebackType
from typing import Any

import uvicorn

from host.mock_e2b.app import build_app
from host.mock_e2b.config import MockE2BConfig
from host.mock_e2b.state import Clock, MockState
from host.mock_e2b.stats import MockE2BStats
from host.mock_e2b.temperfs import TemperFSStore

_START_TIMEOUT_S = 10.0
_STOP_TIMEOUT_S = 10.0


class _Uvicorn(uvicorn.Server):
    """A uvicorn server that reports when it is listening (or failed to start)."""

    def __init__(self, config: uvicorn.Config) -> None:
        super().__init__(config)
        self.ready = threading.Event()
        self.loop: asyncio.AbstractEventLoop | None = None

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        self.loop = asyncio.get_running_loop()
        try:
            await super().startup(sockets=sockets)
        finally:
            self.ready.set()


class MockE2BServer:
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
        self._host = host
        self._port = port
        self._config_lock = threading.Lock()
        self._app, self._runtime = build_app(self._state, self._apply_changes)
        self._server: _Uvicorn | None = None
        self._thread: threading.Thread | None = None
        self._socket: socket.socket | None = None

    # -- lifecycle -----------------------------------------------------------------------

    def start(self) -> MockE2BServer:
        if self._thread is not None:
            raise RuntimeError("the mock E2B server is already running")
        # IPPROTO_TCP explicitly: asyncio sets TCP_NODELAY on accepted sockets only when the
        # listener says TCP, and without it every answer waits ~40 ms for a delayed ACK.
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self._host, self._port))
        sock.listen(1024)
        self._socket = sock
        server = _Uvicorn(
            uvicorn.Config(
                self._app,
                log_level="warning",
                access_log=False,
                lifespan="on",
                http="h11",
                timeout_graceful_shutdown=2,
                backlog=1024,
            )
        )
        self._server = server
        self._thread = threading.Thread(
            target=server.run, kwargs={"sockets": [sock]}, name="mock-e2b", daemon=True
        )
        self._thread.start()
        if not server.ready.wait(_START_TIMEOUT_S) or not server.started:
            self.stop()
            raise RuntimeError("the mock E2B server did not start")
        return self

    def stop(self) -> None:
        server, thread = self._server, self._thread
        if server is None or thread is None:
            return
        runtime = self._runtime()
        if server.loop is not None and runtime is not None and not server.loop.is_closed():
            # Release hanging requests first, or the graceful shutdown waits for them.
            future = asyncio.run_coroutine_threadsafe(runtime.close(), server.loop)
            with contextlib.suppress(Exception):  # the loop may be gone; stopping goes on
                future.result(_STOP_TIMEOUT_S)
        server.should_exit = True
        thread.join(_STOP_TIMEOUT_S)
        if thread.is_alive():
            server.force_exit = True
            thread.join(_STOP_TIMEOUT_S)
        if self._socket is not None:
            self._socket.close()
        self._server = self._thread = self._socket = None

    def __enter__(self) -> MockE2BServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    @property
    def url(self) -> str:
        if self._socket is None:
            raise RuntimeError("the mock E2B server is not running")
        host, port = self._socket.getsockname()[:2]
        return f"http://{host}:{port}"

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1])

    # -- control -------------------------------------------------------------------------

    @property
    def config(self) -> MockE2BConfig:
        return self._state.config

    def configure(self, **changes: Any) -> MockE2BConfig:
        """Changes the config while running (faults may be rules, dicts or CLI strings)."""
        config = self._apply_changes(changes)
        runtime, server = self._runtime(), self._server
        if runtime is not None and server is not None and server.loop is not None:
            asyncio.run_coroutine_threadsafe(runtime.config_changed(), server.loop).result(
                _STOP_TIMEOUT_S
            )
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
