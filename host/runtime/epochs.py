"""One epoch ticker per engine, shared by every runtime that uses the engine.

Deadlines are counted in ticks, so two tickers on one engine would halve every deadline.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
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
        run_ticks(self._engine, self._tick, self._stop.wait, time.monotonic)


def run_ticks(
    engine: wasmtime.Engine,
    tick_s: float,
    wait: Callable[[float], bool],
    clock: Callable[[], float],
) -> None:
    """Advance `engine`'s epoch once per `tick_s` of `clock` until `wait` returns True.

    A deadline is a count of ticks, and a loaded machine wakes a sleeping thread late: one
    increment per wake-up would stretch Temper's 120 s deadline by every late wake-up
    (at 12 ms a wake-up instead of 10, to 144 s). So each wake-up adds the ticks that
    elapsed since the start, not one."""
    started = clock()
    ticks = 0
    while not wait(max(0.0, started + (ticks + 1) * tick_s - clock())):
        # (A millionth of a tick of slack: a wake-up exactly on time is not a tick short.)
        due = int((clock() - started) / tick_s + 1e-6)
        while ticks < due:
            engine.increment_epoch()
            ticks += 1


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
