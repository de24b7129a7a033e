"""Helpers both mocks' tests share (``tests/harness/mocks/e2b`` and ``tests/harness/mocks/llm``)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

from harness.mocks.shared.server import LoopbackServer

ServerT = TypeVar("ServerT", bound=LoopbackServer)


class FrozenClock:
    """A clock that moves only when told to (exact limiter arithmetic in tests)."""

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@contextmanager
def running_server(
    make: Callable[..., ServerT], config: Any, clock: Callable[[], float] | None = None
) -> Iterator[ServerT]:
    """``make(config)`` (with ``clock=`` when given), started, stopped on the way out."""
    kwargs: dict[str, Any] = {} if clock is None else {"clock": clock}
    with make(config, **kwargs) as server:
        yield server
