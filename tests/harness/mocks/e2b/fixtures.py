"""Shared helpers for the mock E2B server's tests (import them explicitly)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import httpx

from harness.mocks.e2b import MockE2BConfig, MockE2BServer
from tests.harness.mocks.shared.fixtures import FrozenClock, running_server

__all__ = [
    "API_KEY",
    "FrozenClock",
    "SteerableClock",
    "client",
    "create",
    "in_thread",
    "running_mock",
]

API_KEY = "e2b_test"


class SteerableClock:
    """Real monotonic time plus an offset tests can move forward, so expiry, the kill lag
    and the rate limiter can be stepped over without sleeping."""

    def __init__(self) -> None:
        self._offset = 0.0
        self._lock = threading.Lock()

    def __call__(self) -> float:
        with self._lock:
            return time.monotonic() + self._offset

    def advance(self, seconds: float) -> None:
        with self._lock:
            self._offset += seconds


@contextmanager
def running_mock(
    clock: Callable[[], float] | None = None, **config: Any
) -> Iterator[MockE2BServer]:
    config.setdefault("api_key", API_KEY)
    with running_server(MockE2BServer, MockE2BConfig(**config), clock) as server:
        yield server


def client(server: MockE2BServer, timeout: float = 10.0) -> httpx.Client:
    return httpx.Client(base_url=server.url, headers={"X-API-Key": API_KEY}, timeout=timeout)


def create(http: httpx.Client, key: str | None = None, **body: Any) -> httpx.Response:
    body.setdefault("templateID", "base")
    headers = {} if key is None else {"Idempotency-Key": key}
    return http.post("/v2/sandboxes", json=body, headers=headers)


def in_thread(fn: Callable[[], Any]) -> tuple[threading.Thread, list[Any]]:
    """Runs ``fn`` in a thread; the list receives its result or exception."""
    out: list[Any] = []

    def run() -> None:
        try:
            out.append(fn())
        except Exception as exc:
            out.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    return thread, out
