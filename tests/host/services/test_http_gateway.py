"""The host's HTTP gateway: allow-list, key handling, size cap."""

from __future__ import annotations

import httpx
import pytest

from host.services.http_gateway import HttpGateway
from provisioner.ports import HttpError, HttpErrorKind, HttpRequest

KEY = "e2b_secret_key_42"


def request(url: str, *headers: tuple[str, str], method: str = "GET") -> HttpRequest:
    return HttpRequest(method=method, url=url, headers=headers, body=b"", timeout_ms=1000)


def gateway(handler: httpx.MockTransport, base: str = "https://api.e2b.test/v1") -> HttpGateway:
    return HttpGateway(
        base, KEY, max_response_bytes=1000, transport=handler, allow_private_network=True
    )


def echo_transport(seen: list[httpx.Request]) -> httpx.MockTransport:
    def handle(req: httpx.Request) -> httpx.Response:
        seen.append(req)
        return httpx.Response(200, json={"ok": True})

    return httpx.MockTransport(handle)


@pytest.mark.parametrize(
    "url",
    [
        "http://api.e2b.test/v1/sandboxes",  # scheme downgrade
        "https://evil.test/v1/sandboxes",  # other host
        "https://api.e2b.test:8443/v1/sandboxes",  # other port
        "https://api.e2b.test/v2/sandboxes",  # outside the path prefix
        "https://api.e2b.test/v1x/sandboxes",  # prefix look-alike
        "https://user:pw@api.e2b.test/v1/sandboxes",  # credentials
        "https://api.e2b.test/v1/../admin",  # dot segments
        "not a url",
    ],
)
def test_urls_outside_the_allow_list_are_denied_without_a_request(url: str) -> None:
    seen: list[httpx.Request] = []
    with pytest.raises(HttpError) as denied:
        gateway(echo_transport(seen)).send(request(url))
    assert denied.value.kind is HttpErrorKind.DENIED
    assert seen == []


def test_the_host_attaches_the_key_and_drops_the_guests_credentials() -> None:
    seen: list[httpx.Request] = []
    gw = gateway(echo_transport(seen))
    gw.send(
        request(
            "https://api.e2b.test/v1/sandboxes",
            ("X-API-Key", "guess"),
            ("Authorization", "Bearer x"),
        )
    )
    sent = seen[0]
    assert sent.headers.get_list("x-api-key") == [KEY]
    assert "authorization" not in sent.headers


def test_the_key_is_scrubbed_from_what_flows_back() -> None:
    def handle(req: httpx.Request) -> httpx.Response:
        return httpx.Response(400, headers={"X-Echo": KEY}, content=f"bad key {KEY}".encode())

    response = gateway(httpx.MockTransport(handle)).send(
        request("https://api.e2b.test/v1/sandboxes")
    )
    assert KEY.encode() not in response.body
    assert all(KEY not in value for _, value in response.headers)


def test_bodies_over_the_cap_are_refused() -> None:
    def handle(req: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=b"x" * 1001)

    with pytest.raises(HttpError) as too_large:
        gateway(httpx.MockTransport(handle)).send(request("https://api.e2b.test/v1/sandboxes"))
    assert too_large.value.kind is HttpErrorKind.TOO_LARGE


def test_redirects_are_not_followed() -> None:
    seen: list[httpx.Request] = []

    def handle(req: httpx.Request) -> httpx.Response:
        seen.append(req)
        return httpx.Response(307, headers={"Location": "https://evil.test/steal"})

    response = gateway(httpx.MockTransport(handle)).send(
        request("https://api.e2b.test/v1/sandboxes")
    )
    assert response.status == 307
    assert len(seen) == 1


def test_timeouts_and_connection_failures_are_typed() -> None:
    def slow(req: httpx.Request) -> httpx.Response:
        raise httpx.ReadTimeout("slow", request=req)

    def refused(req: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError(f"refused {KEY}", request=req)

    with pytest.raises(HttpError) as timed_out:
        gateway(httpx.MockTransport(slow)).send(request("https://api.e2b.test/v1/x"))
    assert timed_out.value.kind is HttpErrorKind.TIMEOUT
    with pytest.raises(HttpError) as failed:
        gateway(httpx.MockTransport(refused)).send(request("https://api.e2b.test/v1/x"))
    assert failed.value.kind is HttpErrorKind.CONNECTION
    assert KEY not in failed.value.detail


def test_unknown_methods_are_invalid_requests() -> None:
    with pytest.raises(HttpError) as invalid:
        gateway(echo_transport([])).send(request("https://api.e2b.test/v1/x", method="TRACE"))
    assert invalid.value.kind is HttpErrorKind.INVALID_REQUEST


@pytest.mark.parametrize(
    "base",
    [
        "http://127.0.0.1:3000",
        "http://10.1.2.3",
        "http://192.168.0.10",
        "http://[::1]:80",
        "http://169.254.169.254",
        "http://localhost:8080",
        "http://0.0.0.0:80",
    ],
)
def test_private_and_loopback_addresses_are_refused_unless_allowed(base: str) -> None:
    seen: list[httpx.Request] = []
    strict = HttpGateway(base, KEY, transport=echo_transport(seen))
    with pytest.raises(HttpError) as denied:
        strict.send(request(base + "/sandboxes"))
    assert denied.value.kind is HttpErrorKind.DENIED
    assert "allow_private_network" in denied.value.detail
    assert seen == []
    relaxed = HttpGateway(base, KEY, transport=echo_transport(seen), allow_private_network=True)
    assert relaxed.send(request(base + "/sandboxes")).status == 200


def test_a_public_address_is_allowed_by_default() -> None:
    # The transport is a mock: nothing leaves this process.
    seen: list[httpx.Request] = []
    globally = HttpGateway("https://8.8.8.8", KEY, transport=echo_transport(seen))
    assert globally.send(request("https://8.8.8.8/sandboxes")).status == 200
    assert len(seen) == 1


def test_a_stale_keep_alive_connection_is_retried_once() -> None:
    """uvicorn closes idle connections after 5 s; a request sent on one as it closes fails
    before any answer. Without the retry a release would fail for no reason."""
    attempts: list[httpx.Request] = []

    def flaky(req: httpx.Request) -> httpx.Response:
        attempts.append(req)
        if len(attempts) == 1:
            raise httpx.RemoteProtocolError("Server disconnected without sending a response.")
        return httpx.Response(204)

    response = gateway(httpx.MockTransport(flaky)).send(
        request("https://api.e2b.test/v1/sandboxes/x", method="DELETE")
    )
    assert response.status == 204
    assert len(attempts) == 2


def test_a_connection_that_keeps_failing_is_reported_after_one_retry() -> None:
    attempts: list[httpx.Request] = []

    def dead(req: httpx.Request) -> httpx.Response:
        attempts.append(req)
        raise httpx.ReadError("connection reset by peer")

    with pytest.raises(HttpError) as failed:
        gateway(httpx.MockTransport(dead)).send(request("https://api.e2b.test/v1/x"))
    assert failed.value.kind is HttpErrorKind.CONNECTION
    assert len(attempts) == 2
