"""One epoch ticker per engine, shared by every runtime that uses the engine.

Deadlines are counted in ticks, so two tickers on one engine would halve every deadline.
"""

from __future__ import annotations

import threading
from typing import ClassVar, Self

import wasmtime


class EpochTicker:
    _lock: ClassVar[threading.Lock] = threading.Lock()
    _tickers: ClassVar[dict[int, EpochTicker]] = {}

    def __init__(self, engine: wasmtime.Engine, tick_ms: int) -> None:
        self._engine = engine
        self._tick = tick_ms / 1000
        self._users = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="epoch-ticker", daemon=True)

    @classmethod
    def acquire(cls, engine: wasmtime.Engine, tick_ms: int) -> EpochTicker:
        with cls._lock:
            ticker = cls._tickers.get(id(engine))
            if ticker is None:
                ticker = cls(engine, tick_ms)
                cls._tickers[id(engine)] = ticker
                ticker._thread.start()
            ticker._users += 1
            return ticker

    def release(self) -> None:
        with EpochTicker._lock:
            self._users -= 1
            if self._users > 0:
                return
            EpochTicker._tickers.pop(id(self._engine), None)
        self._stop.set()
        self._thread.join(timeout=1)

    def _run(self) -> None:
        while not self._stop.wait(self._tick):
            self._engine.increment_epoch()


class TickedByEpochs:
    """Holds its engine's epoch ticker from construction until `close` (a context
    manager): what every host running guests under an epoch deadline shares."""

    def __init__(self, engine: wasmtime.Engine, tick_ms: int) -> None:
        self._ticker = EpochTicker.acquire(engine, tick_ms)
        self._closed = False

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._before_release()
            self._ticker.release()

    def _before_release(self) -> None:
        """What a subclass finishes before the ticker goes (close waits for it)."""

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
