"""The pace work's hook in `serve`: after the component answers, hold the request
(`hold.py`) and, with push on, store a wake-up for a turn past the window (`wakeups.py`).
The shared rule is `pace.py`; docs/pace.md describes the three modes."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field

import httpx

from host.serve.hold import (
    HeldAnswer,
    Holds,
    answer_held,
    frees_a_permit,
    hold_until_ms,
    hold_window_ms,
)
from host.serve.pace import AnswerAndWake, PaceSettings
from host.serve.wakeups import NOT_STORED, WakeupSender, WakeupStore, new_wakeup
from host.storage.base import StorageError
from provisioner.model import Invocation, Outcome

LOG = logging.getLogger("sandbox_provisioner.serve.pace")
# A wake-up is sent at least this long after its answer: one sent sooner could reach
# Temper before the answer put the entity in its queued state, and be refused (409).
WAKE_AFTER_ANSWER_MS = 250


class OffsetClock:
    """The storage's clock (the component's: its `retry_at_ms` are on it) read without a
    round trip: the offset to this host's clock is measured once."""

    def __init__(self, storage_now_ms: Callable[[], int]) -> None:
        self.offset_ms = storage_now_ms() - int(time.time() * 1000)

    def __call__(self) -> int:
        return int(time.time() * 1000) + self.offset_ms


@dataclass
class ServePace:
    settings: PaceSettings
    now_ms: Callable[[], int]
    holds: Holds = field(init=False)
    # Push: where wake-ups are stored and who sends them (None: push off).
    wakeups: WakeupStore | None = None
    sender: WakeupSender | None = None
    # How many held requests one freed permit wakes (the pool's size: more could not run).
    wake_count: int = 4
    observe_hold: Callable[[HeldAnswer], None] = lambda answer: None
    observe_wakeup: Callable[[str], None] = lambda result: None

    def __post_init__(self) -> None:
        self.holds = Holds(self.settings.max_held)

    def hold_until_ms(self, config: Mapping[str, str]) -> int:
        """For a request arriving now with this integration config: the latest turn it may
        be held for. Raises InvalidHoldConfig for a malformed `hold_ms`."""
        return hold_until_ms(self.now_ms(), hold_window_ms(config, self.settings.hold_ms))

    async def settle(
        self,
        invocation: Invocation,
        first: Outcome,
        ask_again: Callable[[], Awaitable[Outcome | None]],
        hold_until: int,
        client_gone: Callable[[], Awaitable[bool]] | None = None,
    ) -> HeldAnswer:
        """The answer to one invocation whose component answered `first`."""
        if frees_a_permit(first):
            self.holds.wake_nearest(self.wake_count)
        answer = await answer_held(
            first,
            ask_again,
            holds=self.holds,
            hold_until=hold_until,
            push=self.settings.push and self.wakeups is not None,
            now_ms=self.now_ms,
            client_gone=client_gone,
        )
        if answer.calls > 1 and frees_a_permit(answer.outcome):
            self.holds.wake_nearest(self.wake_count)
        if answer.calls > 1 or answer.held_s > 0:
            self.observe_hold(answer)
        if isinstance(answer.step, AnswerAndWake):
            await self._store_wakeup(invocation, answer.step)
        return answer

    async def _store_wakeup(self, invocation: Invocation, step: AnswerAndWake) -> None:
        store = self.wakeups
        if store is None:
            return
        wakeup = new_wakeup(
            invocation.tenant,
            invocation.entity_type,
            invocation.entity_id,
            max(step.at_ms, self.now_ms() + WAKE_AFTER_ANSWER_MS),
            step.reservation,
        )
        try:
            stored = await asyncio.to_thread(store.schedule, wakeup)
        except StorageError as error:
            LOG.warning(json.dumps({"event": "wakeup_storage", "error": str(error)[:200]}))
            stored = False
        if not stored:
            self.observe_wakeup(NOT_STORED)  # the spec's poll timer still comes
        elif self.sender is not None:
            self.sender.kick.set()

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[None]:
        """The wake-up sender, for the app's lifespan."""
        if self.sender is None:
            yield
            return
        async with httpx.AsyncClient() as client:
            task = asyncio.create_task(self.sender.run(client))
            try:
                yield
            finally:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task


__all__ = ["WAKE_AFTER_ANSWER_MS", "OffsetClock", "ServePace"]
