"""Reading a raw socket to a server that is expected to close it (the slow-sender tests)."""

from __future__ import annotations

import socket
import time


def read_until_closed(sock: socket.socket, limit_s: float) -> tuple[bytes, float]:
    """Everything the server sends until it closes the connection; and when it closed."""
    sock.settimeout(limit_s)
    started, received = time.monotonic(), b""
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            return received, time.monotonic() - started
        received += chunk
