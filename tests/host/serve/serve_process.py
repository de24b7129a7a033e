"""A real `sandbox-provisioner serve` process on a loopback port, for tests."""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, suppress
from pathlib import Path
from typing import Any, Protocol

import httpx

from harness.mocks.e2b import MockE2BServer
from harness.waiting import wait_until
from tests.conftest import API_KEY, ROOT
from tests.harness.mocks.e2b.fixtures import running_mock

TOKEN = "serve-test-token-0123456789"
STARTUP_TIMEOUT_S = 300


def invocation_events(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The log events of answered invocations (one per request the serve answered)."""
    return [e for e in events if e.get("event") == "invocation"]


class ServeProcess:
    def __init__(
        self, process: subprocess.Popen[str], port: int, lines: queue.Queue[str], storage: str
    ) -> None:
        self.process = process
        self.port = port
        self.storage = storage
        self.url = f"http://127.0.0.1:{port}"
        self.lines = lines
        self.seen: list[str] = []

    def client(self, token: str | None = TOKEN, timeout: float = 60.0) -> httpx.Client:
        headers = {} if token is None else {"Authorization": f"Bearer {token}"}
        return httpx.Client(base_url=self.url, headers=headers, timeout=timeout)

    def log_events(self) -> list[dict[str, Any]]:
        while True:
            try:
                self.seen.append(self.lines.get_nowait())
            except queue.Empty:
                break
        events = []
        for line in self.seen:
            try:
                event = json.loads(line)
            except ValueError:
                continue
            if isinstance(event, dict):
                events.append(event)
        return events

    def wait_for_events(
        self, holds: Callable[[list[dict[str, Any]]], bool], timeout: float = 60.0
    ) -> list[dict[str, Any]]:
        """The log's events once `holds(events)`. The serve writes an invocation's log line
        after its answer has gone out, and the pump thread reads it later still, so a test
        that has its answer must wait for the line (a CI run under load once read the log
        one line short)."""

        def read_a_line(left: float) -> None:
            with suppress(queue.Empty):
                self.seen.append(self.lines.get(timeout=min(left, 0.5)))

        return wait_until(
            self.log_events,
            holds,
            timeout,
            read_a_line,
            lambda events: AssertionError(
                f"not in the serve's log after {timeout}s: {events[-10:]}"
            ),
        )

    def terminate(self) -> int:
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=150)


@contextmanager
def serve_process(
    *,
    e2b_url: str,
    storage: str,
    cache_dir: Path,
    workers: int = 2,
    extra: list[str] | None = None,
) -> Iterator[ServeProcess]:
    env = {
        **os.environ,
        "E2B_API_KEY": API_KEY,
        "SANDBOX_PROVISIONER_TOKEN": TOKEN,
        "SANDBOX_PROVISIONER_CACHE": str(cache_dir),
    }
    args = [
        sys.executable,
        "-m",
        "host.cli",
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--workers",
        str(workers),
        "--e2b-url",
        e2b_url,
        "--storage",
        storage,
        "--allow-private-network",
        *(extra or []),
    ]
    process = subprocess.Popen(
        args, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    lines: queue.Queue[str] = queue.Queue()

    def pump() -> None:
        assert process.stderr is not None
        for line in process.stderr:
            lines.put(line.rstrip("\n"))

    threading.Thread(target=pump, daemon=True).start()
    seen: list[str] = []
    port = None
    while port is None:
        try:
            # A hang detector, not a speed limit: loading the component takes a minute or
            # more on a loaded 2-core machine.
            line = lines.get(timeout=STARTUP_TIMEOUT_S)
        except queue.Empty:
            process.kill()
            raise RuntimeError(f"serve did not start: {seen}") from None
        seen.append(line)
        try:
            event = json.loads(line)
        except ValueError:
            continue
        if isinstance(event, dict) and event.get("event") == "listening":
            port = int(event["port"])
    served = ServeProcess(process, port, lines, storage)
    served.seen = seen
    try:
        yield served
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=10)


def serve_storage(tmp_path: Path) -> str:
    """The SQLite storage `serving_a_mock` gives its serve in `tmp_path`."""
    return f"sqlite:///{tmp_path / 's.db'}"


@contextmanager
def serving_a_mock(
    tmp_path: Path,
    cache_dir: Path,
    *,
    workers: int = 2,
    extra: list[str] | None = None,
    **mock_config: Any,
) -> Iterator[tuple[MockE2BServer, ServeProcess]]:
    """A mock E2B (`mock_config`) and a serve process in front of it on `serve_storage`."""
    with (
        running_mock(api_key=API_KEY, **mock_config) as mock,
        serve_process(
            e2b_url=mock.url,
            storage=serve_storage(tmp_path),
            cache_dir=cache_dir,
            workers=workers,
            extra=extra,
        ) as serve,
    ):
        yield mock, serve


class ServingAMock(Protocol):
    """`serving_a_mock` bound to a test's `tmp_path` and the session's compile cache (the
    `serving_mock` fixture)."""

    def __call__(
        self, *, workers: int = ..., extra: list[str] | None = ..., **mock_config: Any
    ) -> AbstractContextManager[tuple[MockE2BServer, ServeProcess]]: ...
