"""A name that does not resolve is E2B being unavailable (retryable, queued with backoff),
whatever the private-network setting; only a non-public address is a refusal (issue 26,
point 6: with the production default a DNS blip answered SandboxFailed e2b_denied,
retryable false, and ended the session)."""

from __future__ import annotations

import socket
from typing import Any

import pytest

from host.runtime.component_runtime import HostServices
from host.runtime.native import NativeRuntime
from host.services.http_gateway import HttpGateway
from host.storage.memory import MemoryBackend
from provisioner.ports import HttpError, HttpErrorKind, HttpRequest
from tests.builders import invocation
from tests.doubles import RecordingTelemetrySink

E2B = "https://api.e2b.example"


def unresolvable(*_: Any, **__: Any) -> Any:
    raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")


def loopback(*_: Any, **__: Any) -> Any:
    return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", 443))]


def test_a_name_that_does_not_resolve_is_a_connection_failure(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(socket, "getaddrinfo", unresolvable)
    gateway = HttpGateway(E2B, "key")
    with pytest.raises(HttpError) as raised:
        gateway.send(HttpRequest("GET", f"{E2B}/sandboxes", (), b"", 1000))
    assert raised.value.kind is HttpErrorKind.CONNECTION
    # Not remembered: the next call resolves again and is refused for what it finds.
    monkeypatch.setattr(socket, "getaddrinfo", loopback)
    with pytest.raises(HttpError) as refused:
        gateway.send(HttpRequest("GET", f"{E2B}/sandboxes", (), b"", 1000))
    assert refused.value.kind is HttpErrorKind.DENIED
    gateway.close()


@pytest.mark.parametrize("allow_private_network", [False, True])
def test_a_dns_blip_queues_the_provision_with_backoff_either_way(
    monkeypatch: pytest.MonkeyPatch, allow_private_network: bool
) -> None:
    monkeypatch.setattr(socket, "getaddrinfo", unresolvable)
    gateway = HttpGateway(E2B, "key", allow_private_network=allow_private_network)
    runtime = NativeRuntime(HostServices(MemoryBackend(), gateway, RecordingTelemetrySink()))
    outcome = runtime.invoke(invocation({"e2b_api_url": E2B, "template_id": "base"}))
    gateway.close()
    assert outcome.action == "SandboxQueued", outcome
    assert outcome.params["reason"] == "backoff"
