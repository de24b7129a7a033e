"""The lock, change signal and clock a mock's state shares between the server's event loop
and the test threads that read its stats and reconfigure it.

Every read and change goes through one lock, held only for bookkeeping (never across an
await). ``wait_for`` waits on a separate condition, signalled after every change, so a
waiter can read stats while holding it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Generic, TypeVar

from harness.waiting import wait_until

Clock = Callable[[], float]
ConfigT = TypeVar("ConfigT")
StatsT = TypeVar("StatsT")
_RECHECK_S = 0.05


class GuardedState(Generic[ConfigT, StatsT]):
    """The shared part of a mock's state; subclasses say what ``config``, ``configure``,
    ``reset`` and ``stats`` do, and what ``name`` the timeout message gives ("mock E2B")."""

    name = "mock"

    def __init__(self, clock: Clock = time.monotonic) -> None:
        self._lock = threading.Lock()
        self._changed = threading.Condition()
        self._clock = clock
        self._anchor_wall_time()

    def _anchor_wall_time(self) -> None:
        """Pins clock time to wall time now, for ``wall_time``."""
        self._wall_origin = time.time()
        self._clock_origin = self._clock()

    def wall_time(self, clock_time: float) -> datetime:
        return datetime.fromtimestamp(self._wall_origin + clock_time - self._clock_origin, UTC)

    @property
    def config(self) -> ConfigT:
        raise NotImplementedError

    def configure(self, config: ConfigT) -> None:
        raise NotImplementedError

    def reset(self) -> None:
        raise NotImplementedError

    def stats(self) -> StatsT:
        raise NotImplementedError

    def wait_for(self, predicate: Callable[[StatsT], bool], timeout: float) -> StatsT:
        """Waits until ``predicate(stats)`` holds; raises TimeoutError after ``timeout`` s.

        Wakes on every change a request makes; changes that only the clock makes are seen
        within a short re-check period."""
        with self._changed:
            return wait_until(
                self.stats,
                predicate,
                timeout,
                lambda left: self._changed.wait(min(left, _RECHECK_S)),
                lambda stats: TimeoutError(f"{self.name} stats never matched; last: {stats}"),
            )

    def notify_changed(self) -> None:
        """Wakes ``wait_for``: something it may read changed outside ``_mutating``."""
        with self._changed:
            self._changed.notify_all()

    @contextmanager
    def _mutating(self) -> Iterator[None]:
        with self._lock:
            yield
        self.notify_changed()
