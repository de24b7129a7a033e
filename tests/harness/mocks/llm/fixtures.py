"""Shared helpers for the mock LLM API's tests (import them explicitly)."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any

import httpx

from harness.mocks.llm import MockLLMConfig, MockLLMServer
from tests.harness.mocks.shared.fixtures import FrozenClock, running_server

__all__ = [
    "API_KEY",
    "VERSION",
    "FrozenClock",
    "client",
    "in_threads",
    "reset_in_s",
    "running_mock",
    "send",
    "text_of_tokens",
]

API_KEY = "sk-ant-test"
VERSION = "2023-06-01"


@contextmanager
def running_mock(
    clock: Callable[[], float] | None = None, **config: Any
) -> Iterator[MockLLMServer]:
    config.setdefault("api_keys", (API_KEY,))
    with running_server(MockLLMServer, MockLLMConfig(**config), clock) as server:
        yield server


def client(server: MockLLMServer, key: str = API_KEY, timeout: float = 30.0) -> httpx.Client:
    return httpx.Client(
        base_url=server.url,
        headers={"x-api-key": key, "anthropic-version": VERSION},
        timeout=timeout,
    )


def text_of_tokens(tokens: int) -> str:
    """A prompt the mock estimates at exactly ``tokens`` input tokens (4 chars each)."""
    return "abcd" * tokens


def send(
    http: httpx.Client, tokens: int = 1, max_tokens: int = 1024, **body: Any
) -> httpx.Response:
    """POST /v1/messages with one user message of ``tokens`` estimated input tokens."""
    body.setdefault("model", "claude-test")
    body.setdefault("max_tokens", max_tokens)
    body.setdefault("messages", [{"role": "user", "content": text_of_tokens(tokens)}])
    return http.post("/v1/messages", json=body)


def reset_in_s(response: httpx.Response, header: str) -> float:
    """Seconds from now (wall clock) to the RFC 3339 time in ``header``."""
    moment = datetime.strptime(response.headers[header], "%Y-%m-%dT%H:%M:%SZ")
    return moment.replace(tzinfo=UTC).timestamp() - datetime.now(UTC).timestamp()


def in_threads(fn: Callable[[], Any], count: int) -> list[Any]:
    """Runs ``fn`` in ``count`` threads at once; returns their results (or exceptions)."""
    results: list[Any] = [None] * count
    barrier = threading.Barrier(count)

    def run(index: int) -> None:
        barrier.wait()
        try:
            results[index] = fn()
        except Exception as exc:
            results[index] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results
