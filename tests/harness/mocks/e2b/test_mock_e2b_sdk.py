"""The official ``e2b`` SDK against the mock: its API-level calls, and its own retries.

The SDK is pointed at the mock with ``api_url`` and ``api_key``. None of these calls
reach envd (the in-sandbox daemon): ``Sandbox.create`` only builds clients for it.
``debug=True`` is not used, because in debug mode the SDK skips kill and set_timeout.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from e2b import Sandbox, SandboxQuery, SandboxState
from e2b.exceptions import (
    RateLimitException,
    SandboxException,
    SandboxNotFoundException,
    ServiceBusyException,
)

from harness.mocks.e2b import MockE2BConfig, MockE2BServer
from tests.harness.mocks.e2b.fixtures import API_KEY


@pytest.fixture(scope="module")
def shared_server() -> Iterator[MockE2BServer]:
    with MockE2BServer(MockE2BConfig(api_key=API_KEY)) as server:
        yield server


@pytest.fixture
def server(shared_server: MockE2BServer) -> Iterator[MockE2BServer]:
    shared_server.configure(**MockE2BConfig(api_key=API_KEY).to_json())
    shared_server.reset()
    yield shared_server


def sdk(server: MockE2BServer, **extra: Any) -> dict[str, Any]:
    return {"api_key": API_KEY, "api_url": server.url, "request_timeout": 10, **extra}


def test_sdk_creates_lists_inspects_times_out_and_kills(server: MockE2BServer) -> None:
    # Catches any drift between the mock's wire format and what the SDK parses.
    opts = sdk(server)
    sandbox = Sandbox.create(
        template="base",
        timeout=120,
        metadata={"job": "cj-1", "tenant": "t 1"},
        envs={"A": "1"},
        idempotency_key="cj-1-attempt",
        **opts,
    )
    running = server.running_sandboxes()
    assert [s["sandbox_id"] for s in running] == [sandbox.sandbox_id]
    # The SDK used v2: only v2 reads Idempotency-Key.
    assert running[0]["idempotency_key"] == "cj-1-attempt"

    listed = Sandbox.list(query=SandboxQuery(metadata={"tenant": "t 1"}), **opts).next_items()
    assert [info.sandbox_id for info in listed] == [sandbox.sandbox_id]
    assert listed[0].metadata == {"job": "cj-1", "tenant": "t 1"}
    assert Sandbox.list(query=SandboxQuery(metadata={"tenant": "t 2"}), **opts).next_items() == []
    paused = SandboxQuery(state=[SandboxState.PAUSED])
    assert Sandbox.list(query=paused, **opts).next_items() == []

    info = sandbox.get_info()
    assert (info.sandbox_id, info.template_id, info.state) == (
        sandbox.sandbox_id,
        "base",
        SandboxState.RUNNING,
    )
    assert Sandbox.get_info(sandbox.sandbox_id, **opts).end_at == info.end_at

    sandbox.set_timeout(3600)
    assert Sandbox.get_info(sandbox.sandbox_id, **opts).end_at > info.end_at
    Sandbox.set_timeout(sandbox.sandbox_id, 1800, **opts)

    assert sandbox.kill() is True
    assert Sandbox.kill(sandbox.sandbox_id, **opts) is False
    with pytest.raises(SandboxNotFoundException):
        Sandbox.get_info(sandbox.sandbox_id, **opts)
    stats = server.stats()
    assert (stats.sandboxes_created, stats.sandboxes_killed, stats.running_sandboxes) == (1, 1, 0)


def test_sdk_idempotency_key_returns_the_same_sandbox(server: MockE2BServer) -> None:
    # Catches a mock that ignores the SDK's Idempotency-Key header.
    first = Sandbox.create(template="base", idempotency_key="job-7", **sdk(server))
    again = Sandbox.create(template="base", idempotency_key="job-7", **sdk(server))
    assert again.sandbox_id == first.sandbox_id
    assert (server.stats().sandboxes_created, server.stats().duplicates) == (1, 0)


def test_sdk_pages_through_the_v2_list(server: MockE2BServer) -> None:
    # Catches an x-next-token the SDK's paginator does not follow.
    created = {Sandbox.create(template="base", **sdk(server)).sandbox_id for _ in range(5)}
    paginator = Sandbox.list(limit=2, **sdk(server))
    seen: list[str] = []
    while paginator.has_next:
        seen += [info.sandbox_id for info in paginator.next_items()]
    assert sorted(seen) == sorted(created)


def test_sdk_retries_the_rate_limit_429_after_retry_after(server: MockE2BServer) -> None:
    # Catches a rate-limit 429 without Retry-After, or one the SDK does not retry.
    server.configure(create_rate_per_s=1.0, create_burst=1)
    Sandbox.create(template="base", **sdk(server))
    second = Sandbox.create(template="base", **sdk(server))  # 429, Retry-After: 1, retried
    stats = server.stats()
    assert (stats.creates_attempted, stats.rate_limited, stats.sandboxes_created) == (3, 1, 2)
    assert second.sandbox_id in {s["sandbox_id"] for s in server.running_sandboxes()}


def test_sdk_does_not_retry_the_sandbox_cap_429(server: MockE2BServer) -> None:
    # Catches a cap 429 the SDK would retry (it must surface at once, as in the incident).
    server.configure(max_sandboxes=1)
    Sandbox.create(template="base", **sdk(server))
    with pytest.raises(RateLimitException, match=r"concurrent E2B sandboxes \(1\)"):
        Sandbox.create(template="base", **sdk(server))
    stats = server.stats()
    assert (stats.creates_attempted, stats.capacity_limited) == (2, 1)


def test_sdk_retries_a_429_that_says_nothing_about_retrying(server: MockE2BServer) -> None:
    # Documents why the cap's 429 says "Should-Retry: false": this SDK (2.x) retries a 429
    # that has neither Retry-After nor Should-Retry, 3 times with backoff.
    server.configure(max_sandboxes=1, capacity_should_retry=None)
    Sandbox.create(template="base", **sdk(server))
    with pytest.raises(RateLimitException):
        Sandbox.create(template="base", **sdk(server))
    assert server.stats().capacity_limited == 4


@pytest.mark.parametrize(
    ("fault", "retried"),
    [
        ("503+retry:n=1", True),
        ("500+retry:n=1", True),
        ("502:n=1", True),
        ("503-noretry:n=1", False),
        ("500:n=1", False),
    ],
)
def test_sdk_retry_follows_should_retry_and_status(
    server: MockE2BServer, fault: str, retried: bool
) -> None:
    # Catches fault answers whose Should-Retry header the SDK does not see as sent.
    server.configure(faults=[fault])
    if retried:
        Sandbox.create(template="base", **sdk(server))
        assert server.stats().sandboxes_created == 1
    else:
        with pytest.raises((SandboxException, ServiceBusyException)):
            Sandbox.create(template="base", **sdk(server))
        assert server.stats().sandboxes_created == 0
    assert server.stats().creates_attempted == (2 if retried else 1)
