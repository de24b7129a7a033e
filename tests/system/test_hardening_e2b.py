"""E2B misbehaving (issue 7): malformed JSON, unexpected statuses, a huge body, a slow
trickle, hangs and resets. Each first answer is a well-formed outcome with a typed code or a
queued retry; no create slot leaks; and once E2B behaves again the entity gets exactly one
sandbox (a create whose answer was lost is adopted, not duplicated)."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from harness.mocks.e2b import MockE2BConfig, MockE2BServer
from harness.mocks.e2b.config import parse_fault
from host.runtime.loader import LoadedComponent
from host.storage.memory import MemoryBackend
from provisioner.model import Outcome
from tests.conftest import API_KEY
from tests.host.runtime.test_end_to_end import Host, make_host
from tests.system.hardening_support import (
    ACTIONS,
    DOCUMENTED_CODES,
    Reply,
    SeenRequest,
    serving,
)

pytestmark = pytest.mark.component

SETTINGS = {"create_rate_per_s": "1000", "create_slots": "4", "create_timeout_ms": "1000"}


class SteppedClock:
    """The storage clock (and so the guest's): moved by the test instead of sleeping."""

    def __init__(self) -> None:
        self.now = time.time_ns() // 1_000_000

    def __call__(self) -> int:
        return self.now


def check_outcome(outcome: Outcome) -> None:
    assert outcome.action in ACTIONS, outcome
    if outcome.action == "SandboxFailed":
        assert outcome.error is not None and outcome.error.code in DOCUMENTED_CODES, outcome
        assert outcome.error.message
    else:
        assert outcome.error is None and outcome.success


def gates(host: Host) -> dict[str, Any]:
    status = host.run(operation="status", **SETTINGS)
    assert status.action == "SandboxStatus", status
    account: dict[str, Any] = status.params["gates"]["account"]
    return account


def until_ready(host: Host, clock: SteppedClock) -> Outcome:
    """Polls as a runtime would, moving the clock by each retry_after_ms."""
    for _ in range(20):
        outcome = host.run(**SETTINGS)
        check_outcome(outcome)
        if outcome.action != "SandboxQueued":
            return outcome
        clock.now += int(outcome.params["retry_after_ms"]) + 1
    raise AssertionError("never became ready")


def first_and_recovery(
    loaded: LoadedComponent, url: str, running: Callable[[], list[dict[str, Any]]]
) -> tuple[Outcome, Outcome]:
    clock = SteppedClock()
    host = make_host(loaded, url, storage=MemoryBackend(clock))
    first = host.run(**SETTINGS)
    check_outcome(first)
    assert gates(host)["create_slots"]["in_use"] == 0, "a create slot leaked"
    if first.action == "SandboxFailed":
        clock.now += 1
    final = until_ready(host, clock)
    assert final.action == "SandboxReady", final
    assert [s["sandbox_id"] for s in running()] == [final.params["sandbox_id"]]
    account = gates(host)
    assert account["capacity"]["in_use"] <= account["capacity"]["limit"]
    host.runtime.close()
    return first, final


FAULTS = [
    # (mock fault, what the first answer must be: an action or a failure code)
    ("malformed:n=1", "SandboxQueued"),
    ("malformed:n=1:after-create", "SandboxQueued"),
    ("slow-body:n=1", "SandboxQueued"),
    ("slow-body:n=1:after-create", "SandboxQueued"),
    ("hang:n=1", "SandboxQueued"),
    # One reset before any answer is absorbed by the gateway's single resend (safe: the
    # create carries an Idempotency-Key); the no-duplicate check below still applies.
    ("reset:n=1", "SandboxReady"),
    ("500:n=1", "SandboxQueued"),
    ("503:n=1:after-create", "SandboxQueued"),
    ("418:n=1", "e2b_unexpected_status"),
    ("409:n=1", "e2b_unexpected_status"),
    ("400:n=1", "e2b_bad_request"),
    ("401:n=1", "e2b_unauthorized"),
    ("404:n=1", "e2b_template_not_found"),
]


@pytest.mark.parametrize(("fault", "expected"), FAULTS, ids=[f[0] for f in FAULTS])
def test_a_misbehaving_e2b_gets_a_typed_answer_and_no_duplicate(
    loaded_component: LoadedComponent, fault: str, expected: str
) -> None:
    """Breaks if a garbled, slow, hung or odd answer escapes as an untyped failure, leaks a
    create slot, or leaves a second sandbox behind once E2B recovers."""
    config = MockE2BConfig(
        api_key=API_KEY, faults=(parse_fault(fault),), hang_s=5.0, slow_body_ms=4000.0
    )
    with MockE2BServer(config) as mock:
        first, _ = first_and_recovery(loaded_component, mock.url, mock.running_sandboxes)
        assert mock.stats().faults_injected == 1
    if expected.startswith("Sandbox"):
        assert first.action == expected, first
    else:
        assert first.error is not None and first.error.code == expected, first
        assert first.error.message.startswith("E2B answered"), first.error.message


@pytest.fixture
def one_bad_create() -> Iterator[Callable[[Reply], str]]:
    """A loopback E2B whose first create gets `reply`, then behaves like a tiny E2B."""
    sandboxes: list[str] = []
    state: dict[str, Reply | None] = {"first": None}

    def answer(request: SeenRequest) -> Reply:
        if request.method == "POST" and state["first"] is not None:
            reply, state["first"] = state["first"], None
            return reply
        if request.method == "POST":
            sandboxes.append(f"sbx-{len(sandboxes)}")
            body = f'{{"sandboxID": "{sandboxes[-1]}", "templateID": "base"}}'.encode()
            return Reply(201, (("Content-Type", "application/json"),), body)
        return Reply(200, (("Content-Type", "application/json"),), b"[]")

    servers = serving(answer)
    server = next(servers)

    def arm(reply: Reply) -> str:
        state["first"] = reply
        return server.url

    yield arm
    servers.close()


def test_an_error_message_that_cannot_cross_the_boundary_is_cleaned(
    loaded_component: LoadedComponent, one_bad_create: Callable[[Reply], str]
) -> None:
    """Breaks if E2B's error text reaches the outcome raw: a JSON-escaped lone surrogate
    cannot be lowered to a WIT string (the guest would trap) and control characters would
    garble the runtime's logs."""
    url = one_bad_create(Reply(418, (), b'{"message": "teapot \\ud800 \\u001b[2J"}'))
    host = make_host(loaded_component, url, storage=MemoryBackend())
    outcome = host.run(**SETTINGS)
    check_outcome(outcome)
    assert outcome.error is not None and outcome.error.code == "e2b_unexpected_status", outcome
    assert outcome.error.message.startswith("E2B answered 418: teapot")
    assert all(ch.isprintable() for ch in outcome.error.message)
    host.runtime.close()


@pytest.mark.parametrize(
    "reply",
    [
        Reply(201, (("Content-Type", "application/json"),), b"{" + b" " * (2 << 20) + b"}"),
        Reply(200, (("Content-Type", "text/html"),), b"<html>maintenance</html>"),
        Reply(201, (), b'{"sandboxID": 12345}'),
        Reply(201, (), b'{"sandboxID": "' + b"x" * 500 + b'"}'),
        Reply(201, (), b"[]"),
        Reply(201, (), b'{"sandboxID": "\\ud800"}'),
        Reply(429, (("Retry-After", "soon"),), b"{}"),
        Reply(429, (("Retry-After", "-5"),), b"not json"),
    ],
    ids=[
        "huge body",
        "html",
        "id not text",
        "id too long",
        "not an object",
        "lone surrogate id",
        "bad retry-after",
        "negative retry-after",
    ],
)
def test_an_odd_create_answer_is_retried_not_trusted(
    loaded_component: LoadedComponent, one_bad_create: Callable[[Reply], str], reply: Reply
) -> None:
    url = one_bad_create(reply)
    clock = SteppedClock()
    host = make_host(loaded_component, url, storage=MemoryBackend(clock))
    first = host.run(**SETTINGS)
    check_outcome(first)
    assert first.action == "SandboxQueued", first
    assert gates(host)["create_slots"]["in_use"] == 0
    assert until_ready(host, clock).action == "SandboxReady"
    host.runtime.close()


class TrickleServer:
    """Answers the first request's headers at once, then its body a byte every 50 ms."""

    def __init__(self, body_bytes: int = 100) -> None:
        self.body = b'{"sandboxID": "sbx-trickle"}'.ljust(body_bytes)
        self.sent = 0
        self.done = threading.Event()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self._listener.getsockname()[1]}"
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        connection, _ = self._listener.accept()
        with connection:
            connection.recv(65536)
            connection.sendall(
                b"HTTP/1.1 201 Created\r\nContent-Type: application/json\r\n"
                b"Content-Length: %d\r\n\r\n" % len(self.body)
            )
            try:
                for byte in self.body:
                    connection.sendall(bytes([byte]))
                    self.sent += 1
                    time.sleep(0.05)  # the trickle itself, not a synchronisation
            except OSError:
                pass
        self.done.set()

    def close(self) -> None:
        self._listener.close()


def test_a_trickled_body_is_cut_at_the_request_timeout(
    loaded_component: LoadedComponent,
) -> None:
    """Breaks if the gateway waits for a trickle past the create timeout: the whole 100-byte
    body (5 s at 20 bytes/s) would be delivered instead of about a second of it."""
    trickle = TrickleServer()
    host = make_host(loaded_component, trickle.url, storage=MemoryBackend())
    outcome = host.run(**SETTINGS)
    check_outcome(outcome)
    assert outcome.action == "SandboxQueued", outcome
    assert trickle.done.wait(30)
    assert trickle.sent < len(trickle.body)
    host.runtime.close()
    trickle.close()
