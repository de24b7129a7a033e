"""Containment (issue 7): the guest reaches only the configured E2B API, never sees the API
key, and cannot reach another tenant's state; stored values are bounded.

Most rules are checked against the probe guest (tests/guests/probe), which tries what the
provisioner never would, and again through the provisioner itself where it can be steered.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import httpx
import pytest
from hypothesis import given
from hypothesis import strategies as st

from harness.multihost.redis_server import RedisServer
from host.runtime.loader import LoadedComponent
from host.services.http_gateway import AddressPolicy, HttpGateway
from host.services.namespaces import ScopedStorage, account_namespace, tenant_namespace
from host.storage import storage_from_uri
from host.storage.base import MAX_VALUE_BYTES, StorageBackend, StorageTooLarge
from host.storage.memory import MemoryBackend
from host.storage.sqlite import SqliteBackend
from provisioner.ports import HttpError, HttpErrorKind, HttpRequest, Scope
from tests.conftest import API_KEY, require_redis_server
from tests.host.runtime.test_end_to_end import invocation, make_host
from tests.system.hardening_support import (
    LoopbackServer,
    ProbeHost,
    Reply,
    SeenRequest,
    SnapshotBackend,
    make_probe_host,
    probe_component,
    serving,
)

pytestmark = pytest.mark.component
__all__ = ["probe_component"]  # the fixture, imported so pytest finds it here

FAST = {"create_rate_per_s": "1000", "create_slots": "16"}


@pytest.fixture
def decoy() -> Iterator[LoopbackServer]:
    """Where an escaping request would land: it must never see one."""
    yield from serving(lambda _: Reply(200, (), b"decoy"))


def escape_results(host: ProbeHost, urls: list[str]) -> list[dict[str, Any]]:
    outcome = host.call("http_escape", probe_urls=json.dumps(urls))
    assert outcome.action == "ProbeDone", outcome
    results: list[dict[str, Any]] = outcome.params["results"]
    return results


# -- the guest reaches only the configured E2B API ---------------------------------------


def test_the_guest_reaches_only_the_configured_scheme_host_port_and_path(
    probe_component: LoadedComponent, mock_e2b: Any, decoy: LoopbackServer
) -> None:
    """Breaks if the gateway lets a URL through on another scheme, host, port or path."""
    base = mock_e2b.url + "/v2"
    host = make_probe_host(probe_component, HttpGateway(base, API_KEY, allow_private_network=True))
    port = mock_e2b.port
    escapes = [
        f"https://127.0.0.1:{port}/v2/sandboxes",  # scheme
        f"http://localhost:{port}/v2/sandboxes",  # another name for the host
        decoy.url + "/v2/sandboxes",  # another port
        f"http://127.0.0.1:{port}/sandboxes",  # outside the path prefix
        f"http://127.0.0.1:{port}/v2x/sandboxes",  # a prefix look-alike
        f"http://127.0.0.1:{port}/v2/../sandboxes",
        f"http://127.0.0.1:{port}/v2/%2e%2e/sandboxes",  # encoded dot segments
        f"http://127.0.0.1:{port}/v2/.%2E/sandboxes",
        f"http://127.0.0.1:{port}/v2/..%2fsandboxes",
        f"http://127.0.0.1:{port}/v2\\..\\sandboxes",
        f"http://u:p@127.0.0.1:{port}/v2/sandboxes",  # credentials
        f"http://127.0.0.1:{port}@127.0.0.1:{decoy.url.rsplit(':', 1)[1]}/v2/sandboxes",
        f"http://127.0.0.1:{port}/v2/x\r\nHost: evil",  # request splitting
        "file:///etc/passwd",
        "gopher://127.0.0.1:70/",
        "",
    ]
    try:
        results = escape_results(host, [base + "/sandboxes", *escapes])
    finally:
        host.close()
    allowed, *refused = results
    assert allowed.get("status") == 200, allowed  # the host attached the key: the mock said 200
    for result in refused:
        assert "status" not in result, result
        assert result["error"].startswith(("HttpError_Denied", "HttpError_InvalidRequest")), result
    assert decoy.seen == []
    assert mock_e2b.stats().requests_total == 1


def test_redirects_are_handed_back_not_followed(
    probe_component: LoadedComponent, loaded_component: LoadedComponent, decoy: LoopbackServer
) -> None:
    """Breaks if the gateway follows a redirect (the decoy would see the request and key)."""
    redirect = Reply(307, (("Location", decoy.url + "/steal"),), b"")
    for redirector in serving(lambda _: redirect):
        gateway = HttpGateway(redirector.url, API_KEY, allow_private_network=True)
        probe = make_probe_host(probe_component, gateway)
        (result,) = escape_results(probe, [redirector.url + "/v2/sandboxes"])
        assert result["status"] == 307
        assert dict((k.lower(), v) for k, v in result["headers"])["location"].startswith(decoy.url)
        # The provisioner meets the same redirect on its create: a typed failure.
        provisioner = make_host(loaded_component, redirector.url)
        outcome = provisioner.run(**FAST)
        assert outcome.error is not None and outcome.error.code == "e2b_unexpected_status", outcome
        assert len(redirector.seen) >= 2
        probe.close()
        provisioner.runtime.close()
    assert decoy.seen == []


def test_loopback_is_refused_unless_the_host_allows_it(
    probe_component: LoadedComponent, loaded_component: LoadedComponent, mock_e2b: Any
) -> None:
    """Breaks if a loopback E2B URL is reachable without allow_private_network=True."""
    strict = HttpGateway(mock_e2b.url, API_KEY)
    probe = make_probe_host(probe_component, strict)
    (result,) = escape_results(probe, [mock_e2b.url + "/v2/sandboxes"])
    assert (
        result["error"].startswith("HttpError_Denied")
        and "allow_private_network" in result["error"]
    )
    provisioner = make_host(loaded_component, mock_e2b.url)
    provisioner.runtime.services.http = strict
    outcome = provisioner.run(**FAST)
    assert outcome.error is not None and outcome.error.code == "e2b_denied", outcome
    assert mock_e2b.stats().requests_total == 0

    relaxed = HttpGateway(mock_e2b.url, API_KEY, allow_private_network=True)
    probe.runtime.services.http = relaxed
    (result,) = escape_results(probe, [mock_e2b.url + "/v2/sandboxes"])
    assert result["status"] == 200
    probe.close()
    provisioner.runtime.close()
    relaxed.close()


@pytest.mark.parametrize(
    "address",
    [
        "127.0.0.1",
        "127.1.2.3",
        "2130706433",  # 127.0.0.1 as one decimal number
        "0x7f000001",
        "10.0.0.1",
        "172.16.5.4",
        "192.168.1.1",
        "100.64.0.1",  # carrier-grade NAT
        "169.254.169.254",  # cloud metadata
        "0.0.0.0",
        "::1",
        "::ffff:127.0.0.1",
        "::ffff:10.0.0.1",
        "fc00::1",
        "fe80::1",
        "224.0.0.1",
    ],
)
def test_non_public_addresses_are_refused_in_every_spelling(address: str) -> None:
    """Breaks if some spelling of a loopback/private address slips past the policy."""
    assert AddressPolicy(address, 443, allow_private_network=False).refusal() is not None
    assert AddressPolicy(address, 443, allow_private_network=True).refusal() is None


_URL_PIECES = st.sampled_from(
    [
        "https:",
        "http:",
        "//",
        "/",
        "\\",
        "@",
        ":",
        "api.e2b.test",
        "evil.test",
        "v1",
        "..",
        ".",
        "%2e",
        "%2E",
        "%2f",
        "%5c",
        "%00",
        "#",
        "?",
        "443",
        "8443",
        "\t",
        "\n",
        " ",
        "[::1]",
        "%40",
        "u",
        ";",
        "%",
        "a",
    ]
)
_URL_STARTS = st.sampled_from(
    ["", "https://", "https://api.e2b.test", "https://api.e2b.test/v1", "https://api.e2b.test/v1/"]
)


@given(st.tuples(_URL_STARTS, st.lists(_URL_PIECES, max_size=10).map("".join)).map("".join))
def test_whatever_the_gateway_sends_goes_to_the_allowed_base(url: str) -> None:
    """Breaks if the allow-list check and the HTTP client disagree about where a URL goes
    (a parser differential), or if a path leaves the prefix after decoding."""
    seen: list[httpx.Request] = []

    def record(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200)

    gateway = HttpGateway(
        "https://api.e2b.test/v1",
        API_KEY,
        transport=httpx.MockTransport(record),
        allow_private_network=True,
    )
    try:
        gateway.send(HttpRequest("GET", url, (), b"", 1000))
    except HttpError as error:
        assert error.kind in (HttpErrorKind.DENIED, HttpErrorKind.INVALID_REQUEST)
        assert seen == []
        return
    (sent,) = seen
    assert (sent.url.scheme, sent.url.host, sent.url.port or 443) == ("https", "api.e2b.test", 443)
    path = unquote(sent.url.raw_path.decode("ascii").split("?", 1)[0])
    assert path == "/v1" or path.startswith("/v1/")
    assert "/../" not in path + "/" and "/./" not in path + "/" and "\\" not in path


# -- the API key never enters the guest ---------------------------------------------------


def reflecting(request: SeenRequest) -> Reply:
    """An upstream that echoes everything it got, the key included, everywhere it can."""
    echoed = json.dumps({"path": request.path, "headers": request.headers}).encode()
    key = request.headers.get("X-API-Key", "")
    return Reply(
        200 if request.path.endswith("/echo") else 302,
        (
            ("Content-Type", "application/json"),
            ("X-Echo-Key", key),
            ("Location", f"http://127.0.0.1:9/?key={key}"),
            ("Set-Cookie", f"k={key}"),
        ),
        echoed,
    )


def test_the_api_key_never_reaches_the_guest_even_when_echoed(
    probe_component: LoadedComponent, mock_e2b: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Breaks if the key shows up in the guest's environment, config, HTTP answers (even an
    upstream that reflects it), storage or error messages."""
    monkeypatch.setenv("E2B_API_KEY", API_KEY)
    seen: list[str] = []
    for upstream in (mock_e2b.url, None):
        for echo in serving(reflecting):
            base = upstream or echo.url
            host = make_probe_host(
                probe_component, HttpGateway(base, API_KEY, allow_private_network=True)
            )
            outcome = host.call("key_hunt", e2b_api_url=base)
            host.close()
            assert outcome.action == "ProbeDone", outcome
            report = json.dumps(outcome.params)
            seen.append(report)
            seen += [repr(entry) for entry in host.telemetry.logs + host.telemetry.events]
            if upstream is None:
                # The echo did receive the key: only the host's scrubbing kept it out.
                assert any(r.headers.get("X-API-Key") == API_KEY for r in echo.seen)
                assert "[redacted]" in report
    assert all(API_KEY not in text for text in seen)


# -- tenant namespaces ---------------------------------------------------------------------


@pytest.fixture
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[StorageBackend]:
    """Each backend composes namespace and key its own way (Redis: into one string)."""
    name = request.param
    if name == "memory":
        yield MemoryBackend()
    elif name == "sqlite":
        sqlite = SqliteBackend(str(tmp_path / "state.db"))
        yield sqlite
        sqlite.close()
    else:
        require_redis_server()
        with RedisServer(persistent=False) as server:
            redis_backend = storage_from_uri(server.url)
            yield redis_backend
            redis_backend.close()


BACKENDS = ["memory", "sqlite", "redis"]


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_crafted_keys_and_scopes_stay_in_the_tenants_namespace(
    probe_component: LoadedComponent, backend: StorageBackend
) -> None:
    """Breaks if a crafted key reads or writes outside the invoking tenant's namespace, if a
    forbidden key is accepted, or if a value over the size limit is stored."""
    victim = tenant_namespace("victim")
    planted = ["secret", "victim:secret", "../attacker/secret", "tenant/attacker/secret"]
    for key in planted:
        backend.compare_and_swap(victim, key, None, b"victim-secret", None)
    before = {key: backend.get(victim, key) for key in planted}
    host = make_probe_host(probe_component, storage=backend)  # type: ignore[arg-type]
    outcome = host.call("storage_escape", tenant="attacker")
    host.close()
    assert outcome.action == "ProbeDone", outcome
    report = outcome.params
    assert "victim-secret" not in json.dumps(report)
    for read in report["reads"]:
        assert read.get("value") is None, read  # the attacker's namespaces start empty
    forbidden = {"", "\x00secret", "secret\x00", "sec\nret", "k" * 600}
    for attempt in report["reads"] + report["writes"]:
        if attempt["key"] in forbidden:
            assert attempt["error"].startswith("StorageError_InvalidKey"), attempt
        else:
            assert "error" not in attempt, attempt
    assert report["oversized"] == f"StorageError_TooLarge:{MAX_VALUE_BYTES}"
    assert {key: backend.get(victim, key) for key in planted} == before
    own = ScopedStorage(backend, tenant="attacker", account="default")
    written = {w["key"] for w in report["writes"] if w["scope"] == "tenant" and "error" not in w}
    for key in written:
        entry = own.get(Scope.TENANT, key)
        assert entry is not None and entry.value == b"written-by-probe", key
    assert own.get(Scope.TENANT, "oversized") is None


CRAFTED_TENANTS = ["a/b", "a%2Fb", "a", "a%252Fb", "../a", "tenant/a", "%", "ünï/😀", "a b"]


def test_crafted_tenant_names_never_share_state_through_the_provisioner(
    loaded_component: LoadedComponent, mock_e2b: Any
) -> None:
    """Breaks if two tenant names map to one namespace: the second would find the first's
    ready record and be handed its sandbox."""
    host = make_host(loaded_component, mock_e2b.url)
    sandboxes: dict[str, str] = {}
    for tenant in CRAFTED_TENANTS:
        outcome = host.runtime.invoke(invocation(mock_e2b.url, "job-1", tenant=tenant, **FAST))
        assert outcome.action == "SandboxReady", (tenant, outcome)
        sandboxes[tenant] = outcome.params["sandbox_id"]
    assert len(set(sandboxes.values())) == len(CRAFTED_TENANTS)
    # Another tenant's status and release see nothing of the first tenant's entity.
    status = host.runtime.invoke(invocation(mock_e2b.url, "job-1", "status", tenant="intruder"))
    assert status.params["entity"] is None
    released = host.runtime.invoke(invocation(mock_e2b.url, "job-1", "release", tenant="intruder"))
    assert released.action == "SandboxReleased" and released.params["released"] is False
    assert len(mock_e2b.running_sandboxes()) == len(CRAFTED_TENANTS)
    host.runtime.close()


def test_an_empty_tenant_is_refused_and_stores_nothing(
    loaded_component: LoadedComponent, mock_e2b: Any
) -> None:
    storage = SnapshotBackend()
    host = make_host(loaded_component, mock_e2b.url, storage=storage)
    outcome = host.runtime.invoke(invocation(mock_e2b.url, tenant="", **FAST))
    assert outcome.error is not None and outcome.error.code == "invalid_invocation"
    assert "tenant" in outcome.error.message
    assert storage.snapshot() == {}
    assert mock_e2b.stats().requests_total == 0
    host.runtime.close()


@given(st.text(), st.text())
def test_distinct_tenant_names_get_distinct_namespaces(first: str, second: str) -> None:
    """Breaks if the scope-to-namespace mapping is not injective (including lone surrogates,
    '/', '%' and the empty name), or if a tenant namespace can equal an account's."""
    if first != second:
        assert tenant_namespace(first) != tenant_namespace(second)
    assert tenant_namespace(first) != account_namespace(second)


def test_one_tenant_cannot_read_or_write_anothers_keys() -> None:
    backend = MemoryBackend()
    alice = ScopedStorage(backend, tenant="alice", account="shared")
    mallory = ScopedStorage(backend, tenant="alice/../mallory", account="shared")
    alice.compare_and_swap(Scope.TENANT, "entity/x", None, b"alice", None)
    assert mallory.get(Scope.TENANT, "entity/x") is None
    mallory.compare_and_swap(Scope.TENANT, "entity/x", None, b"mallory", None)
    entry = alice.get(Scope.TENANT, "entity/x")
    assert entry is not None and entry.value == b"alice"
    # The account scope is shared by design (admission state of one E2B account).
    alice.compare_and_swap(Scope.ACCOUNT, "gate", None, b"g", None)
    assert mallory.get(Scope.ACCOUNT, "gate") is not None


# -- stored values are bounded ---------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_stored_values_have_a_size_limit(backend: StorageBackend) -> None:
    """Breaks if a backend stores a value over MAX_VALUE_BYTES (or refuses one at it)."""
    namespace = tenant_namespace("acme")
    with pytest.raises(StorageTooLarge) as refused:
        backend.compare_and_swap(namespace, "big", None, b"x" * (MAX_VALUE_BYTES + 1), None)
    assert refused.value.limit == MAX_VALUE_BYTES
    assert backend.get(namespace, "big") is None
    version = backend.compare_and_swap(namespace, "big", None, b"x" * MAX_VALUE_BYTES, None)
    with pytest.raises(StorageTooLarge):
        backend.compare_and_swap(namespace, "big", version, b"x" * (MAX_VALUE_BYTES + 1), None)
    entry = backend.get(namespace, "big")
    assert entry is not None and len(entry.value) == MAX_VALUE_BYTES
