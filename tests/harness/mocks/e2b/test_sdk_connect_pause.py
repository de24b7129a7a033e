"""The official ``e2b`` SDK's connect, pause and resume against the mock.

The SDK pauses with ``POST /sandboxes/{id}/pause`` and resumes through connect
(``POST /v2/sandboxes/{id}/connect``): a running sandbox answers 200 and only has its
lifetime extended; a paused one is resumed (201), which counts it against the cap again.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from e2b import Sandbox, SandboxQuery, SandboxState
from e2b.exceptions import RateLimitException, SandboxNotFoundException

from harness.mocks.e2b import MockE2BConfig, MockE2BServer
from tests.harness.mocks.e2b.fixtures import API_KEY


@pytest.fixture
def server() -> Iterator[MockE2BServer]:
    with MockE2BServer(MockE2BConfig(api_key=API_KEY)) as mock:
        yield mock


def sdk(server: MockE2BServer) -> dict[str, Any]:
    return {"api_key": API_KEY, "api_url": server.url, "request_timeout": 10}


def test_sdk_pauses_lists_and_resumes_through_connect(server: MockE2BServer) -> None:
    # Catches a mock without pause/connect (the SDK then crashed on a text/plain 404).
    sandbox = Sandbox.create(template="base", timeout=120, metadata={"job": "j1"}, **sdk(server))
    assert sandbox.pause() is True
    assert Sandbox.pause(sandbox.sandbox_id, **sdk(server)) is False  # 409: already paused
    stats = server.stats()
    assert (stats.running_sandboxes, stats.paused_sandboxes, stats.capacity_in_use) == (0, 1, 0)
    paused = SandboxQuery(state=[SandboxState.PAUSED])
    listed = Sandbox.list(query=paused, **sdk(server)).next_items()
    assert [(i.sandbox_id, i.state) for i in listed] == [(sandbox.sandbox_id, SandboxState.PAUSED)]
    assert Sandbox.get_info(sandbox.sandbox_id, **sdk(server)).state == SandboxState.PAUSED

    resumed = Sandbox.connect(sandbox.sandbox_id, timeout=60, **sdk(server))
    assert resumed.sandbox_id == sandbox.sandbox_id
    assert resumed.get_info().state == SandboxState.RUNNING
    stats = server.stats()
    assert (stats.running_sandboxes, stats.paused_sandboxes, stats.sandboxes_resumed) == (1, 0, 1)

    # Connecting to a running sandbox extends its lifetime only, and answers the same id.
    end = Sandbox.get_info(sandbox.sandbox_id, **sdk(server)).end_at
    again = Sandbox.connect(sandbox.sandbox_id, timeout=3600, **sdk(server))
    assert again.sandbox_id == sandbox.sandbox_id
    assert Sandbox.get_info(sandbox.sandbox_id, **sdk(server)).end_at > end
    assert server.stats().sandboxes_resumed == 1


def test_a_paused_sandbox_frees_its_slot_and_resuming_can_draw_the_cap_429(
    server: MockE2BServer,
) -> None:
    # Catches a paused sandbox still counted against the cap, or a resume that ignores it.
    server.configure(max_sandboxes=1)
    first = Sandbox.create(template="base", timeout=120, **sdk(server))
    first.pause()
    second = Sandbox.create(template="base", timeout=120, **sdk(server))  # the freed slot
    with pytest.raises(RateLimitException, match=r"concurrent E2B sandboxes \(1\)"):
        Sandbox.connect(first.sandbox_id, **sdk(server))
    assert server.stats().paused_sandboxes == 1  # the refused resume left it paused
    second.kill()
    assert Sandbox.connect(first.sandbox_id, **sdk(server)).sandbox_id == first.sandbox_id
    stats = server.stats()
    assert (stats.running_sandboxes, stats.capacity_limited, stats.max_running_sandboxes) == (
        1,
        1,
        1,
    )


def test_sdk_connect_and_pause_of_an_unknown_sandbox_raise_e2b_exceptions(
    server: MockE2BServer,
) -> None:
    # Catches answers the SDK cannot parse (it raised a raw json.JSONDecodeError).
    with pytest.raises(SandboxNotFoundException):
        Sandbox.connect("nosuchsandbox", **sdk(server))
    with pytest.raises(SandboxNotFoundException):
        Sandbox.pause("nosuchsandbox", **sdk(server))


def test_sdk_accepts_the_id_with_its_client_id_suffix(server: MockE2BServer) -> None:
    # Catches a mock that refuses the legacy "<sandboxID>-<clientID>" form E2B accepts.
    sandbox = Sandbox.create(template="base", timeout=120, **sdk(server))
    legacy = f"{sandbox.sandbox_id}-6532622b"
    assert Sandbox.get_info(legacy, **sdk(server)).sandbox_id == sandbox.sandbox_id
    assert Sandbox.pause(legacy, **sdk(server)) is True
    assert Sandbox.connect(legacy, **sdk(server)).sandbox_id == sandbox.sandbox_id
    assert Sandbox.kill(legacy, **sdk(server)) is True
    assert server.stats().sandboxes_killed == 1
