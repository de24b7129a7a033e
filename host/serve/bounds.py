"""Bounds on what a caller can make `serve` hold: body size, read time, refused attempts.

- `BodyBounds` (ASGI middleware): a body larger than Temper's 1 MiB is answered 413 before
  it is read whole (a `Content-Length` over the cap: before a byte of it; a chunked one: as
  soon as it passes the cap), and a body that has not arrived within `body_timeout_s` is
  answered 408; both close the connection. The app then reads the buffered body.
- `HeaderDeadlineProtocol` (uvicorn's h11 protocol): a connection whose request head has
  not arrived `header_timeout_s` after it opened, or after its previous response, is
  closed. uvicorn's own keep-alive timer stops at the first byte, so a client that sends
  one byte at a time would otherwise hold a connection for ever.
- `RefusalLimiter`: 401s and 403s per remote address, on a token bucket; past the burst a
  refusal is answered 429 with `Retry-After` instead. Only refusals are counted, and a
  request with a good token for its tenant is never limited: Temper calls from one address
  for all its tenants, so one tenant's bad token must not shut the others out.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable
from dataclasses import KW_ONLY, dataclass, field
from typing import Any

import h11
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.protocols.http.h11_impl import H11Protocol

from host.runtime.temper_context import MAX_CONTEXT_BYTES
from host.serve.errors import error_response

HEADER_TIMEOUT_S = 10.0
BODY_TIMEOUT_S = 10.0
_BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})


def _ignore_refusal(_scope: Scope, _code: str) -> None:
    return None


@dataclass
class BodyBounds:
    app: ASGIApp
    _: KW_ONLY
    max_bytes: int = MAX_CONTEXT_BYTES
    body_timeout_s: float = BODY_TIMEOUT_S
    on_refusal: Callable[[Scope, str], None] = _ignore_refusal

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in _BODY_METHODS:
            await self.app(scope, receive, send)
            return
        declared = _content_length(scope)
        if declared is not None and declared > self.max_bytes:
            await self._refuse(scope, receive, send, 413, "too_large", self._too_large())
            return
        chunks: list[bytes] = []
        size = 0
        try:
            async with asyncio.timeout(self.body_timeout_s):
                while True:
                    message = await receive()
                    if message["type"] == "http.disconnect":
                        return  # nobody to answer
                    chunk = message.get("body", b"")
                    size += len(chunk)
                    if size > self.max_bytes:
                        await self._refuse(
                            scope, receive, send, 413, "too_large", self._too_large()
                        )
                        return
                    chunks.append(chunk)
                    if not message.get("more_body", False):
                        break
        except TimeoutError:
            await self._refuse(
                scope,
                receive,
                send,
                408,
                "body_timeout",
                f"the request body did not arrive within {self.body_timeout_s:g} s",
            )
            return
        await self.app(scope, _replay(b"".join(chunks), receive), send)

    def _too_large(self) -> str:
        return f"the request body is larger than {self.max_bytes} bytes"

    async def _refuse(
        self, scope: Scope, receive: Receive, send: Send, status: int, code: str, message: str
    ) -> None:
        self.on_refusal(scope, code)
        # Connection: close, so the server drops the rest of the body instead of reading it.
        await error_response(status, code, message, Connection="close")(scope, receive, send)


def _content_length(scope: Scope) -> int | None:
    for key, value in scope["headers"]:
        if key == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


def _replay(body: bytes, receive: Receive) -> Receive:
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()  # the disconnect, when it comes

    return replay


class HeaderDeadlineProtocol(H11Protocol):
    """uvicorn's h11 protocol with a deadline on each request head (`http=` of its Config)."""

    header_timeout_s = HEADER_TIMEOUT_S

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._head_deadline: asyncio.TimerHandle | None = None

    @classmethod
    def with_timeout(cls, header_timeout_s: float) -> type[HeaderDeadlineProtocol]:
        return type(cls.__name__, (cls,), {"header_timeout_s": header_timeout_s})

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_head_deadline()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            self._arm_head_deadline()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_head_deadline()
        super().connection_lost(exc)

    def _arm_head_deadline(self) -> None:
        self._disarm_head_deadline()
        waiting_after = self.cycle  # a new request head makes a new cycle
        self._head_deadline = self.loop.call_later(
            self.header_timeout_s, self._head_overdue, waiting_after
        )

    def _disarm_head_deadline(self) -> None:
        if self._head_deadline is not None:
            self._head_deadline.cancel()
            self._head_deadline = None

    def _head_overdue(self, waiting_after: object) -> None:
        self._head_deadline = None
        # A request under way (one pipelined behind the last answer) is not late: its
        # body has its own deadline, and its answer re-arms this one.
        idle = self.cycle is None or self.cycle.response_complete
        if self.cycle is waiting_after and idle and not self.transport.is_closing():
            if self.conn.our_state != h11.ERROR:
                self.conn.send(h11.ConnectionClosed())
            self.transport.close()


@dataclass(kw_only=True)
class RefusalLimiter:
    """Refusals per remote address: `burst` at once, then one per `interval_s` (GCRA: one
    number per address, the time its bucket is full again)."""

    burst: int = 20
    interval_s: float = 1.0
    clock: Callable[[], float] = time.monotonic
    max_addresses: int = 10_000
    _full_at: dict[str, float] = field(default_factory=dict, init=False)

    def refuse(self, address: str) -> int | None:
        """Counts one refusal for `address`: None when it is within the bucket (answer the
        401 or 403), else the seconds to put in `Retry-After` (answer 429)."""
        now = self.clock()
        full_at = max(self._full_at.get(address, now), now)
        # Room for one more refusal while what is banked ahead stays within the burst.
        wait_s = full_at - now - (self.burst - 1) * self.interval_s
        if wait_s > 1e-9:
            return max(1, math.ceil(wait_s))
        if len(self._full_at) >= self.max_addresses:
            self._forget_full_buckets(now)
        self._full_at[address] = full_at + self.interval_s
        return None

    def _forget_full_buckets(self, now: float) -> None:
        for address in [a for a, full_at in self._full_at.items() if full_at <= now]:
            del self._full_at[address]


def remote_address(scope: Scope) -> str:
    client = scope.get("client")
    return str(client[0]) if client else "unknown"


__all__ = [
    "BODY_TIMEOUT_S",
    "HEADER_TIMEOUT_S",
    "BodyBounds",
    "HeaderDeadlineProtocol",
    "RefusalLimiter",
    "remote_address",
]
