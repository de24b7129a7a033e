"""Runs an ASGI app on 127.0.0.1 in a background thread (uvicorn), for tests and simulations."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Coroutine
from typing import Any, Generic, Protocol, Self, TypeVar

import uvicorn
from starlette.types import ASGIApp

from harness.mocks.shared.config import MockConfig
from harness.mocks.shared.state import Clock, GuardedState
from harness.mocks.shared.stats import MockStats

_START_TIMEOUT_S = 10.0
_STOP_TIMEOUT_S = 10.0


class Runtime(Protocol):
    """What a mock's app keeps on the server's event loop; ``close`` releases whatever is
    waiting there (hangs, latencies), or the graceful shutdown waits for it."""

    async def close(self) -> None: ...


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


class LoopbackServer:
    """Serves ``app`` on ``host:port`` (port 0: a free one) from a daemon thread.

    ``runtime`` returns the app's :class:`Runtime` once its lifespan has started (None
    before); ``name`` is what errors and the thread call the server ("mock E2B").
    """

    def __init__(
        self,
        app: ASGIApp,
        runtime: Callable[[], Runtime | None],
        *,
        name: str,
        host: str = "127.0.0.1",
        port: int = 0,
    ) -> None:
        self._app = app
        self._runtime = runtime
        self._name = name
        self._host = host
        self._port = port
        self._server: _Uvicorn | None = None
        self._thread: threading.Thread | None = None
        self._socket: socket.socket | None = None

    def start(self) -> Self:
        if self._thread is not None:
            raise RuntimeError(f"the {self._name} server is already running")
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
            target=server.run,
            kwargs={"sockets": [sock]},
            name=self._name.replace(" ", "-").lower(),
            daemon=True,
        )
        self._thread.start()
        if not server.ready.wait(_START_TIMEOUT_S) or not server.started:
            self.stop()
            raise RuntimeError(f"the {self._name} server did not start")
        return self

    def stop(self) -> None:
        server, thread = self._server, self._thread
        if server is None or thread is None:
            return
        runtime = self._runtime()
        if server.loop is not None and runtime is not None and not server.loop.is_closed():
            # Release what waits on the loop first, or the graceful shutdown waits for it.
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

    def on_loop(self, coroutine: Callable[[], Coroutine[Any, Any, None]]) -> None:
        """Runs ``coroutine()`` on the server's event loop and waits for it (nothing when
        the server is not running)."""
        server = self._server
        if server is not None and server.loop is not None and self._runtime() is not None:
            asyncio.run_coroutine_threadsafe(coroutine(), server.loop).result(_STOP_TIMEOUT_S)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def url(self) -> str:
        if self._socket is None:
            raise RuntimeError(f"the {self._name} server is not running")
        host, port = self._socket.getsockname()[:2]
        return f"http://{host}:{port}"

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1])


ConfigT = TypeVar("ConfigT", bound=MockConfig)
StatsT = TypeVar("StatsT", bound=MockStats)


class MockServer(LoopbackServer, ABC, Generic[ConfigT, StatsT]):
    """A :class:`LoopbackServer` over a mock's :class:`GuardedState`, with the control
    methods every mock offers: read and change the config, read and wait for stats,
    reset.

    Made from a config (None: the mock's defaults), the address to listen on and the
    clock its state runs on; a subclass says how its state and its app are made."""

    def __init__(
        self,
        config: ConfigT | None = None,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        clock: Clock = time.monotonic,
    ) -> None:
        self._state = self._new_state(config, clock)
        self._config_lock = threading.Lock()
        app, runtime = self._new_app()
        super().__init__(app, runtime, name=self._state.name, host=host, port=port)

    @abstractmethod
    def _new_state(self, config: ConfigT | None, clock: Clock) -> GuardedState[ConfigT, StatsT]:
        """The mock's state, with ``config`` or the default one."""

    @abstractmethod
    def _new_app(self) -> tuple[ASGIApp, Callable[[], Runtime | None]]:
        """The app over ``self._state`` and a getter for its runtime; the app calls
        ``self._apply_changes`` for POST /_mock/config."""

    @property
    def config(self) -> ConfigT:
        return self._state.config

    def configure(self, **changes: Any) -> ConfigT:
        """Changes the config while running (ValueError or TypeError on a bad change)."""
        return self._apply_changes(changes)

    def _apply_changes(self, changes: dict[str, Any]) -> ConfigT:
        with self._config_lock:
            config = self._state.config.replace(**changes)
            self._state.configure(config)
            return config

    def reset(self) -> None:
        """Forgets every record and counter the mock keeps (the config stays)."""
        self._state.reset()

    def stats(self) -> StatsT:
        return self._state.stats()

    def wait_for(self, predicate: Callable[[StatsT], bool], timeout: float = 10.0) -> StatsT:
        """Blocks until ``predicate(stats)`` holds and returns those stats, e.g.
        ``server.wait_for(lambda s: s.requests_total == 4)``; TimeoutError otherwise."""
        return self._state.wait_for(predicate, timeout)
