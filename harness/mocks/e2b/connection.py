"""Resetting a client's TCP connection from inside an ASGI handler.

ASGI gives an application no handle on its connection, so the outermost wrapper keeps
uvicorn's own ``send`` in the scope; it is a bound method of uvicorn's request cycle,
whose ``transport`` is the connection. Closing that socket with ``SO_LINGER`` of zero
sends an RST, which the client sees as "connection reset by peer".
"""

from __future__ import annotations

import asyncio
import socket
import struct
from typing import Any

from starlette.types import ASGIApp, Receive, Scope, Send

RAW_SEND_KEY = "mock_e2b.raw_send"


class KeepRawSend:
    """Outermost ASGI wrapper: stores the server's ``send`` in the scope."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            scope[RAW_SEND_KEY] = send
        await self.app(scope, receive, send)


async def reset_connection(scope: Scope) -> bool:
    """Aborts the request's connection with an RST; False if the server hides its transport."""
    cycle: Any = getattr(scope.get(RAW_SEND_KEY), "__self__", None)
    transport: Any = getattr(cycle, "transport", None)
    if not isinstance(transport, asyncio.Transport):
        return False
    sock = transport.get_extra_info("socket")
    if sock is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.abort()
    # connection_lost runs on a later loop turn; after it, uvicorn drops what we send.
    for _ in range(3):
        await asyncio.sleep(0)
    return True
