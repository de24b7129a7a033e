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
from host.serve.pace import AnswerAndWake, PaceSettings, Promised, promised, without_promises
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
        """The answer to one invocation whose component answered `first`. Every answer's
        promises (permits the component promised to other waiters) are taken out of what
        Temper sees: a waiter held here is woken to claim its permit, and with push any
        other is woken through Temper."""
        promises: list[Promised] = []
        config = dict(invocation.config)

        def taken(outcome: Outcome) -> Outcome:
            for promise in promised(outcome):
                if not self.holds.wake_entity((promise.tenant, promise.entity_id)):
                    promises.append(promise)
            return without_promises(outcome)

        async def asking() -> Outcome | None:
            fresh = await ask_again()
            return None if fresh is None else taken(fresh)

        first = taken(first)
        if frees_a_permit(first, config):
            self.holds.wake_nearest(self.wake_count)
        answer = await answer_held(
            first,
            asking,
            holds=self.holds,
            hold_until=hold_until,
            push=self.push,
            now_ms=self.now_ms,
            client_gone=client_gone,
            entity=(invocation.tenant, invocation.entity_id),
        )
        if answer.calls > 1 and frees_a_permit(answer.outcome, config):
            self.holds.wake_nearest(self.wake_count)
        if answer.calls > 1 or answer.held_s > 0:
            self.observe_hold(answer)
        if isinstance(answer.step, AnswerAndWake):
            await self._store_wakeup(
                invocation.tenant,
                invocation.entity_type,
                invocation.entity_id,
                max(answer.step.at_ms, self.now_ms() + WAKE_AFTER_ANSWER_MS),
                answer.step.reservation,
            )
        if self.push:
            for promise in promises:
                await self._store_wakeup(
                    promise.tenant,
                    promise.entity_type,
                    promise.entity_id,
                    promise.at_ms,
                    promise.reservation,
                )
        return answer

    @property
    def push(self) -> bool:
        return self.settings.push and self.wakeups is not None

    async def _store_wakeup(
        self, tenant: str, entity_type: str, entity_id: str, at_ms: int, reservation: str
    ) -> None:
        store = self.wakeups
        if store is None:
            return
        wakeup = new_wakeup(tenant, entity_type, entity_id, at_ms, reservation)
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
