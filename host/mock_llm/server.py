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

from host.mock_llm.app import build_app
from host.mock_llm.config import MockLLMConfig
from host.mock_llm.state import Clock, MockLLMState
from host.mock_llm.stats import MockLLMStats, RequestRecord

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


class MockLLMServer:
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
        self._host = host
        self._port = port
        self._config_lock = threading.Lock()
        self._app, self._runtime = build_app(self._state, self._apply_changes)
        self._server: _Uvicorn | None = None
        self._thread: threading.Thread | None = None
        self._socket: socket.socket | None = None

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> MockLLMServer:
        if self._thread is not None:
            raise RuntimeError("the mock LLM server is already running")
        # IPPROTO_TCP explicitly: asyncio sets TCP_NODELAY on accepted sockets only when the
        # listener says TCP, and without it every answer waits ~40 ms for a delayed ACK.
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((self._host, self._port))
            sock.listen(1024)
        except OSError:
            sock.close()
            raise
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
            target=server.run, kwargs={"sockets": [sock]}, name="mock-llm", daemon=True
        )
        self._thread.start()
        if not server.ready.wait(_START_TIMEOUT_S) or not server.started:
            self.stop()
            raise RuntimeError("the mock LLM server did not start")
        return self

    def stop(self) -> None:
        server, thread = self._server, self._thread
        if server is None or thread is None:
            return
        runtime = self._runtime()
        if server.loop is not None and runtime is not None and not server.loop.is_closed():
            # End pending latencies first, or the graceful shutdown waits for them.
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

    def __enter__(self) -> MockLLMServer:
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
            raise RuntimeError("the mock LLM server is not running")
        host, port = self._socket.getsockname()[:2]
        return f"http://{host}:{port}"

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1])

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
