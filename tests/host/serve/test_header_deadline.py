"""The request-head deadline of `serve` (bounds.HeaderDeadlineProtocol) on a real uvicorn
server in this process, with a fake component: a late head is cut off, a slow answer and
a request pipelined behind another are not."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator

import pytest
import uvicorn

from host.serve import InvocationPool, ServeState, create_app
from host.serve.bounds import HeaderDeadlineProtocol
from provisioner.model import Invocation, Outcome
from tests.host.serve.raw_socket import read_until_closed

TOKEN = "deadline-token"
HEAD_TIMEOUT_S = 0.5
ANSWER_S = HEAD_TIMEOUT_S * 3


def slow_component(invocation: Invocation) -> Outcome:
    time.sleep(ANSWER_S)  # longer than the head deadline
    return Outcome("SandboxReady", {"sandbox_id": f"sb-{invocation.entity_id}"})


@pytest.fixture
def address() -> Iterator[tuple[str, int]]:
    state = ServeState(
        token=TOKEN,
        pool=InvocationPool(2),
        invoke=slow_component,
        e2b_url="http://e2b.local",
        storage_probe=lambda: None,
        log=lambda _line: None,
    )
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.bind(("127.0.0.1", 0))
    config = uvicorn.Config(
        create_app(state),
        log_level="warning",
        lifespan="off",
        http=HeaderDeadlineProtocol.with_timeout(HEAD_TIMEOUT_S),
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.01)
    try:
        yield sock.getsockname()[:2]
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


def invocation_request(entity: str) -> bytes:
    body = json.dumps(
        {"tenant": "t", "entity_type": "E", "entity_id": entity, "integration_config": {}}
    ).encode()
    head = (
        f"POST /v1/invocations HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


def test_a_head_that_does_not_arrive_in_time_closes_the_connection(
    address: tuple[str, int],
) -> None:
    with socket.create_connection(address) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHo")  # and nothing more
        received, seconds = read_until_closed(sock, HEAD_TIMEOUT_S * 20)
    assert received == b""
    assert HEAD_TIMEOUT_S * 0.9 <= seconds < HEAD_TIMEOUT_S * 20


def test_a_slow_answer_and_a_request_pipelined_behind_one_are_not_cut_off(
    address: tuple[str, int],
) -> None:
    with socket.create_connection(address) as sock:
        sock.sendall(
            invocation_request("first")
            + invocation_request("second")
            + b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        received, _ = read_until_closed(sock, ANSWER_S * 20)
    assert received.count(b"HTTP/1.1 200 OK") == 3, received
    assert b"sb-first" in received and b"sb-second" in received
