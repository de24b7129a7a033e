"""SIGTERM's drain asks every connection to close, also one set up after it began."""

from __future__ import annotations

import asyncio
from typing import Any, cast

from host.serve.cli import close_late_connections


class FakeConnection:
    def __init__(self, name: str) -> None:
        self.name = name
        self.shutdowns = 0

    def shutdown(self) -> None:
        self.shutdowns += 1


class FakeServerState:
    def __init__(self) -> None:
        self.connections: set[FakeConnection] = set()


def test_a_connection_made_after_the_drain_began_is_asked_to_close_once() -> None:
    # Catches: the drain asking only the connections open when it began, so one the loop
    # accepted just before the listener closed stays kept alive for the whole limit.
    state = FakeServerState()
    early, late = FakeConnection("early"), FakeConnection("late")
    state.connections.add(early)

    async def drain() -> None:
        asked: set[Any] = set(state.connections)  # uvicorn asks these itself
        closer = asyncio.create_task(close_late_connections(cast(Any, state), asked, 0.001))
        await asyncio.sleep(0)
        state.connections.add(late)  # set up a loop turn after the drain began
        for _ in range(1000):
            if late.shutdowns:
                break
            await asyncio.sleep(0.001)
        for _ in range(20):  # more rounds: no connection is asked twice
            await asyncio.sleep(0.001)
        closer.cancel()

    asyncio.run(drain())
    assert late.shutdowns == 1
    assert early.shutdowns == 0  # uvicorn's own shutdown asked it
