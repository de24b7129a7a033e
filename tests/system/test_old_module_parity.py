"""Parity with the old `sandbox_provisioner` (`os-apps/temper-agent/wasm/sandbox_provisioner/
src/lib.rs` in `nerdsane/temper`): one test per behaviour of that module, each through the
built component, checking the answer and what reached the mock E2B and the mock TemperFS
(`harness/mocks/temperfs/TEMPERFS.md` lists the old module's TemperFS requests with their lines).

Every answer is also checked the way Temper decodes it (`harness/temper_abi`): exactly a
success, dispatched under the upstream trigger (`on_failure = "Fail"`, no `on_success`).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import closing, contextmanager
from dataclasses import dataclass
from typing import Any

import pytest

from harness.mocks.e2b import MockE2BConfig, MockE2BServer
from harness.mocks.temperfs import MockTemperFSServer
from harness.temper_abi import Trigger, decode_terminal_result, dispatch_for
from host.runtime.component_runtime import ComponentRuntime, HostServices
from host.runtime.loader import LoadedComponent
from host.runtime.temper_context import outcome_to_json
from host.services.http_gateway import HttpGateway
from host.services.namespaces import account_namespace, tenant_namespace
from host.storage.memory import MemoryBackend
from provisioner.model import Outcome
from provisioner.ports import LogLevel
from provisioner.temperfs import conversation_key
from tests.builders import invocation
from tests.conftest import API_KEY
from tests.doubles import RecordingTelemetrySink
from tests.system.hardening_support import (
    LoopbackServer,
    Reply,
    json_reply,
    make_probe_host,
    probe_component,
)

TENANT = "acme"
AGENT = "agent-7"
MESSAGE = "Summarise the repository, then open a PR ✓"
UPSTREAM_TRIGGER = Trigger("provision_sandbox", on_failure="Fail")
TEMPERFS_IDS = (
    "workspace_id",
    "conversation_file_id",
    "file_manifest_id",
    "session_file_id",
    "session_leaf_id",
)
__all__ = ["probe_component"]  # the probe guest's fixture, used below

HEADERS = {
    "content-type": "application/json",
    "x-tenant-id": TENANT,
    "x-temper-principal-kind": "admin",
}


@dataclass
class Host:
    runtime: ComponentRuntime
    storage: MemoryBackend
    telemetry: RecordingTelemetrySink
    e2b_url: str
    temperfs_url: str | None

    def provision(
        self,
        *,
        fields: dict[str, Any] | None = None,
        trigger_params: dict[str, Any] | None = None,
        with_temperfs: bool | None = True,
        **config: str,
    ) -> Outcome:
        """`with_temperfs`: True names the host's TemperFS, False says `temperfs = off`,
        None says nothing (the host fills its base in when it has one)."""
        pairs = {"e2b_api_url": self.e2b_url, "create_rate_per_s": "1000"}
        if with_temperfs and self.temperfs_url is not None:
            pairs["temper_api_url"] = self.temperfs_url
        elif with_temperfs is False:
            pairs["temperfs"] = "off"
        pairs.update(config)
        state = {
            "entity_id": AGENT,
            "status": "Provisioning",
            "fields": {"user_message": MESSAGE} if fields is None else fields,
        }
        outcome = self.runtime.invoke(
            invocation(
                pairs,
                tenant=TENANT,
                entity_type="TemperAgent",
                entity_id=AGENT,
                trigger_params=trigger_params,
                entity_state=state,
                trace_id="trace-1",
            )
        )
        # What Temper makes of it: exactly a success (no `error` key), action kept.
        decoded = decode_terminal_result(json.dumps(outcome_to_json(outcome)))
        assert decoded.success, outcome
        assert dispatch_for(UPSTREAM_TRIGGER, decoded).action == outcome.action
        return outcome

    def stored(self) -> dict[str, bytes]:
        """Every key the guest stored, in the tenant's and the account's namespace."""
        found: dict[str, bytes] = {}
        for namespace in (tenant_namespace(TENANT), account_namespace("default")):
            for key in self.storage.keys(namespace):
                entry = self.storage.get(namespace, key)
                if entry is not None:
                    found[f"{namespace}:{key}"] = entry.value
        return found

    def warnings(self) -> list[str]:
        return [m for _, level, m in self.telemetry.logs if level is LogLevel.WARN]


@contextmanager
def opened_host(
    loaded: LoadedComponent, e2b_url: str, host_key: str, temperfs_url: str | None
) -> Iterator[Host]:
    """A host on fresh memory storage; its runtime and gateway are closed on the way out."""
    storage = MemoryBackend()
    gateway = HttpGateway(e2b_url, host_key, temperfs_url=temperfs_url, allow_private_network=True)
    telemetry = RecordingTelemetrySink()
    runtime = ComponentRuntime(loaded, HostServices(storage, gateway, telemetry))
    try:
        yield Host(runtime, storage, telemetry, e2b_url, temperfs_url)
    finally:
        runtime.close()
        gateway.close()


@pytest.fixture
def mock() -> Iterator[MockE2BServer]:
    with MockE2BServer(MockE2BConfig(api_key=API_KEY)) as server:
        yield server


@pytest.fixture
def temperfs() -> Iterator[MockTemperFSServer]:
    with MockTemperFSServer() as server:
        yield server


@pytest.fixture
def host(
    loaded_component: LoadedComponent, mock: MockE2BServer, temperfs: MockTemperFSServer
) -> Iterator[Host]:
    with opened_host(loaded_component, mock.url, API_KEY, temperfs.url) as built:
        yield built


@pytest.fixture
def keyless_host(
    loaded_component: LoadedComponent, mock: MockE2BServer, temperfs: MockTemperFSServer
) -> Iterator[Host]:
    """A host without E2B_API_KEY of its own."""
    with opened_host(loaded_component, mock.url, "", temperfs.url) as built:
        yield built


def tdata(temperfs: MockTemperFSServer) -> list[tuple[str, str]]:
    return [(r.method, r.path) for r in temperfs.store.requests()]


def creates(mock: MockE2BServer) -> int:
    return mock.stats().creates_attempted


# -- static mode (`provision_sandbox`, priority 1) ------------------------------------------


@pytest.mark.parametrize(
    ("fields", "config", "params", "expected"),
    [
        ({"sandbox_url": "http://fields:1"}, {}, {}, "http://fields:1"),
        ({}, {"sandbox_url": "http://config:2"}, {}, "http://config:2"),
        ({}, {}, {"sandbox_url": "http://param:3"}, "http://param:3"),
        (
            {"sandbox_url": "http://fields:1"},
            {"sandbox_url": "http://config:2"},
            {"sandbox_url": "http://param:3"},
            "http://fields:1",
        ),
        ({"sandbox_url": ""}, {"sandbox_url": "http://config:2"}, {}, "http://config:2"),
    ],
    ids=["fields", "config", "trigger-params", "fields-first", "empty-field-skipped"],
)
def test_a_static_sandbox_url_answers_ready_without_e2b_or_admission(
    host: Host,
    mock: MockE2BServer,
    fields: dict[str, str],
    config: dict[str, str],
    params: dict[str, str],
    expected: str,
) -> None:
    # Catches: the wrong precedence, an E2B call or a gate touched in static mode.
    outcome = host.provision(
        fields={"user_message": MESSAGE, **fields},
        trigger_params=params,
        with_temperfs=False,
        **config,
    )
    assert outcome.action == "SandboxReady", outcome
    assert outcome.params["sandbox_url"] == expected
    assert outcome.params["sandbox_id"] == "static-sandbox"
    assert creates(mock) == 0 and mock.stats().requests_total == 0
    assert all(outcome.params[name] == "" for name in TEMPERFS_IDS)
    assert host.stored() == {}  # no gate, no entity record


def test_static_mode_still_sets_up_the_conversation_storage(
    host: Host, mock: MockE2BServer, temperfs: MockTemperFSServer
) -> None:
    # Catches: TemperFS skipped on the static path (the old module ran it after either).
    outcome = host.provision(fields={"user_message": MESSAGE, "sandbox_url": "http://s:1"})
    assert outcome.params["sandbox_id"] == "static-sandbox"
    assert outcome.params["workspace_id"] == f"agent-{AGENT}"
    assert creates(mock) == 0 and len(tdata(temperfs)) == 7


# -- the key (`provision_sandbox`, priority 2) ----------------------------------------------


@pytest.mark.parametrize("config_key", [None, "", "{secret:e2b_api_key}"])
def test_no_usable_key_fails_as_the_old_module_before_any_request(
    keyless_host: Host, mock: MockE2BServer, temperfs: MockTemperFSServer, config_key: str | None
) -> None:
    # Catches: a keyless create sent, an unresolved template used as a key, admission
    # entered for a provision that cannot happen.
    if config_key is None:
        outcome = keyless_host.provision()
    else:
        outcome = keyless_host.provision(e2b_api_key=config_key)
    assert outcome.action == "SandboxFailed" and outcome.success
    assert outcome.params["code"] == "e2b_api_key_missing"
    assert outcome.params["message"].startswith("no sandbox_url configured and no e2b_api_key")
    assert outcome.params["error_message"] == outcome.params["message"]
    assert mock.stats().requests_total == 0 and mock.stats().unauthorized == 0
    assert tdata(temperfs) == []


def test_the_config_key_is_sent_to_e2b_only_and_wins_over_the_hosts(
    loaded_component: LoadedComponent, mock: MockE2BServer, temperfs: MockTemperFSServer
) -> None:
    # Catches: the config's key ignored (the host's wrong one used), or sent to TemperFS.
    with opened_host(loaded_component, mock.url, "host-key-E2B-refuses", temperfs.url) as built:
        outcome = built.provision(e2b_api_key=API_KEY)
    assert outcome.action == "SandboxReady", outcome
    assert mock.stats().unauthorized == 0 and creates(mock) == 1
    assert len(tdata(temperfs)) == 7
    assert all("x-api-key" not in r.headers for r in temperfs.store.requests())
    assert API_KEY not in json.dumps(outcome.params)


def test_the_guest_never_sees_the_key_and_temperfs_never_receives_it(
    probe_component: LoadedComponent,
) -> None:
    # Catches: `e2b_api_key` left in the guest's config, the key attached to a TemperFS
    # request (same origin as E2B here, as with the mock), or the host's key used instead
    # of the config's. The probe guest reports the config it was given and sends the URLs.
    secret = "config-key-0123456789"
    server = LoopbackServer(lambda _: Reply(200, (), b"{}"))
    gateway = HttpGateway(
        server.url, "host-key-abcdef", temperfs_url=server.url, allow_private_network=True
    )
    probe = make_probe_host(probe_component, gateway)
    try:
        outcome = probe.call(
            "http_escape",
            e2b_api_key=secret,
            probe_urls=json.dumps([f"{server.url}/v2/sandboxes", f"{server.url}/tdata/Files"]),
        )
        seen = probe.call("key_hunt", e2b_api_key=secret, e2b_api_url=server.url)
    finally:
        probe.close()
        server.close()
    assert outcome.action == "ProbeDone", outcome
    config = dict(map(tuple, seen.params["seen"]["invocation"]["config"]))
    assert "e2b_api_key" not in config and config["e2b_api_key_source"] == "config"
    assert secret not in json.dumps(seen.params) + json.dumps(outcome.params)
    by_path = {request.path: request.headers for request in server.seen[:2]}
    e2b_headers = {k.lower(): v for k, v in by_path["/v2/sandboxes"].items()}
    temperfs_headers = {k.lower(): v for k, v in by_path["/tdata/Files"].items()}
    assert e2b_headers["x-api-key"] == secret
    assert "x-api-key" not in temperfs_headers


def test_a_failed_create_is_sandbox_failed_with_its_code(
    keyless_host: Host, mock: MockE2BServer, temperfs: MockTemperFSServer
) -> None:
    # Catches: a refused create reported as ready, as a Temper failure (losing the code),
    # or followed by TemperFS requests.
    outcome = keyless_host.provision(e2b_api_key="not-the-key")
    assert outcome.action == "SandboxFailed" and outcome.success
    assert outcome.params["code"] == "e2b_unauthorized" and not outcome.params["retryable"]
    assert mock.stats().unauthorized == 1 and tdata(temperfs) == []


# -- the create answer ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("answer", "sandbox_id", "sandbox_url"),
    [
        ({"sandboxID": "ia1"}, "ia1", "https://49983-ia1.e2b.app"),
        ({"sandbox_id": "ib2"}, "ib2", "https://49983-ib2.e2b.app"),
        ({"sandboxID": "ic3", "sandbox_id": "other"}, "ic3", "https://49983-ic3.e2b.app"),
        ({"sandboxID": "id4", "url": "https://u.example/x"}, "id4", "https://u.example/x"),
        (
            {"sandboxID": "ie5", "url": "https://u.example", "sandbox_url": "https://s.example"},
            "ie5",
            "https://s.example",
        ),
        (
            {"sandboxID": "if6", "sandboxDomain": "eu.e2b.dev"},
            "if6",
            "https://49983-if6.eu.e2b.dev",
        ),
        ({"sandboxID": "ig7", "domain": "own.example"}, "ig7", "https://49983-ig7.own.example"),
    ],
    ids=[
        "sandboxID",
        "sandbox_id",
        "sandboxID-first",
        "url",
        "sandbox_url-first",
        "sandboxDomain",
        "domain",
    ],
)
def test_the_create_answer_is_read_as_the_old_module_reads_it(
    loaded_component: LoadedComponent,
    answer: dict[str, Any],
    sandbox_id: str,
    sandbox_url: str,
) -> None:
    # Catches: an id or URL taken from the wrong field, or the URL derived wrongly.
    with (
        closing(LoopbackServer(lambda _: json_reply(201, answer))) as e2b,
        opened_host(loaded_component, e2b.url, API_KEY, None) as built,
    ):
        outcome = built.provision(with_temperfs=False)
    assert outcome.action == "SandboxReady", outcome
    assert (outcome.params["sandbox_id"], outcome.params["sandbox_url"]) == (
        sandbox_id,
        sandbox_url,
    )
    [request] = e2b.seen
    headers = {name.lower(): value for name, value in request.headers.items()}
    assert (request.method, request.path, headers["x-api-key"]) == (
        "POST",
        "/v2/sandboxes",
        API_KEY,
    )


def test_the_derived_url_uses_the_domain_e2b_answers(
    loaded_component: LoadedComponent,
) -> None:
    # Catches: the domain of the real create answer (the mock's `domain`) ignored.
    with (
        MockE2BServer(MockE2BConfig(api_key=API_KEY, domain="sbx.example")) as server,
        opened_host(loaded_component, server.url, API_KEY, None) as built,
    ):
        outcome = built.provision(with_temperfs=False)
    sandbox_id = outcome.params["sandbox_id"]
    assert outcome.params["sandbox_url"] == f"https://49983-{sandbox_id}.sbx.example"


# -- TemperFS (`create_conversation_storage`, `create_session_tree`) ------------------------


def expected_session(agent: str, message: str) -> bytes:
    header = {"id": f"h-{agent}", "parentId": None, "tokens": 0, "type": "header", "version": 1}
    user = {
        "content": message,
        "id": f"u-{agent}-0",
        "parentId": f"h-{agent}",
        "role": "user",
        "tokens": len(message.encode()) // 4,
        "type": "message",
    }

    def line(value: dict[str, Any]) -> str:
        return json.dumps(value, separators=(",", ":"), ensure_ascii=False)

    return f"{line(header)}\n{line(user)}".encode()


def test_the_conversation_storage_is_made_with_the_old_requests(
    host: Host, mock: MockE2BServer, temperfs: MockTemperFSServer
) -> None:
    # Catches: a step missing or out of order, a changed body, header or initial content.
    outcome = host.provision()
    assert outcome.action == "SandboxReady", outcome
    requests = temperfs.store.requests()
    assert [(r.method, r.path) for r in requests] == [
        ("POST", "/tdata/Workspaces"),
        ("POST", "/tdata/Files"),
        ("PUT", f"/tdata/Files('conv-{AGENT}')/$value"),
        ("POST", "/tdata/Files"),
        ("PUT", f"/tdata/Files('manifest-{AGENT}')/$value"),
        ("POST", "/tdata/Files"),
        ("PUT", f"/tdata/Files('session-{AGENT}')/$value"),
    ]
    assert all(r.status in (201, 204) for r in requests)
    for request in requests:
        expected = dict(HEADERS)
        if request.path.endswith(f"session-{AGENT}')/$value"):
            expected["content-type"] = "text/plain"
        assert request.headers == expected, request
    bodies = [json.loads(r.body) for r in requests if r.method == "POST"]
    assert bodies[0] == {
        "Id": f"agent-{AGENT}",
        "WorkspaceId": f"agent-{AGENT}",
        "name": f"Agent {AGENT} Workspace",
        "owner_id": AGENT,
        "quota_bytes": "104857600",
    }
    files = [
        ("conv", "conversation.json", "application/json"),
        ("manifest", "file_manifest.json", "application/json"),
        ("session", "session.jsonl", "text/plain"),
    ]
    for body, (prefix, name, mime) in zip(bodies[1:], files, strict=True):
        assert body == {
            "Id": f"{prefix}-{AGENT}",
            "FileId": f"{prefix}-{AGENT}",
            "workspace_id": f"agent-{AGENT}",
            "name": name,
            "mime_type": mime,
            "path": f"/{name}",
        }
    assert temperfs.store.content(f"conv-{AGENT}", TENANT) == b'{"messages":[]}'
    assert temperfs.store.content(f"manifest-{AGENT}", TENANT) == (
        b'{"files":{},"synced_at_turn":0}'
    )
    assert temperfs.store.content(f"session-{AGENT}", TENANT) == expected_session(AGENT, MESSAGE)
    assert {name: outcome.params[name] for name in TEMPERFS_IDS} == {
        "workspace_id": f"agent-{AGENT}",
        "conversation_file_id": f"conv-{AGENT}",
        "file_manifest_id": f"manifest-{AGENT}",
        "session_file_id": f"session-{AGENT}",
        "session_leaf_id": f"u-{AGENT}-0",
    }


# The tdata request each step is (1-based), and which ids survive its failure.
ALL_EMPTY = dict.fromkeys(TEMPERFS_IDS, False)
ALL_KEPT = dict.fromkeys(TEMPERFS_IDS, True)
SESSION_EMPTY = {**ALL_KEPT, "session_file_id": False, "session_leaf_id": False}


@pytest.mark.parametrize(
    ("step", "kept"),
    [
        (1, ALL_EMPTY),  # workspace
        (2, ALL_EMPTY),  # conversation file
        (3, ALL_KEPT),  # conversation $value: a warning only
        (4, ALL_EMPTY),  # manifest file
        (5, ALL_KEPT),  # manifest $value
        (6, SESSION_EMPTY),  # session file
        (7, ALL_KEPT),  # session $value
    ],
    ids=[
        "workspace",
        "conversation",
        "conversation-value",
        "manifest",
        "manifest-value",
        "session",
        "session-value",
    ],
)
def test_a_failed_temperfs_step_is_not_fatal_and_empties_what_the_old_module_did(
    host: Host, mock: MockE2BServer, temperfs: MockTemperFSServer, step: int, kept: dict[str, bool]
) -> None:
    # Catches: a TemperFS failure failing the provision, or ids kept/emptied unlike lib.rs.
    temperfs.configure(faults=(f"503:n={step}:route=tdata",))
    outcome = host.provision()
    assert outcome.action == "SandboxReady", outcome
    assert outcome.params["sandbox_id"] != "static-sandbox"
    assert {name: bool(outcome.params[name]) for name in TEMPERFS_IDS} == kept
    assert host.warnings(), "the failure was not logged as a warning"
    # Nothing half-made is remembered: the next Provision completes the setup.
    temperfs.configure(faults=())
    again = host.provision()
    assert all(again.params[name] for name in TEMPERFS_IDS), again
    assert again.params["sandbox_id"] == outcome.params["sandbox_id"]
    assert len(temperfs.store.entities("Workspace", TENANT)) == 1


def test_an_empty_user_message_fails_as_the_old_module_when_temperfs_is_on(
    host: Host, mock: MockE2BServer, temperfs: MockTemperFSServer
) -> None:
    # Catches: the guard missing (an agent without a message provisioned), or applied when
    # the conversation storage is off.
    outcome = host.provision(fields={"user_message": ""})
    assert outcome.action == "SandboxFailed" and outcome.success
    assert outcome.params["code"] == "agent_not_configured"
    assert outcome.params["message"] == "agent not configured — user_message is empty"
    assert mock.stats().requests_total == 0 and tdata(temperfs) == []
    off = host.provision(fields={}, with_temperfs=False)
    assert off.action == "SandboxReady", off


def test_temperfs_is_on_when_named_and_off_when_told(
    loaded_component: LoadedComponent, host: Host, mock: MockE2BServer, temperfs: MockTemperFSServer
) -> None:
    # Catches: the storage set up when nothing names a TemperFS, not set up when the host
    # has one, or `temperfs = off` ignored.
    with opened_host(loaded_component, mock.url, API_KEY, None) as bare:
        assert bare.provision(with_temperfs=None).params["workspace_id"] == ""
    assert tdata(temperfs) == []
    host.provision(with_temperfs=False)
    assert tdata(temperfs) == []
    assert host.provision(with_temperfs=None).params["workspace_id"] == f"agent-{AGENT}"


def test_an_unresolved_temper_api_url_takes_the_hosts_base(
    host: Host, mock: MockE2BServer, temperfs: MockTemperFSServer
) -> None:
    # Catches: `{secret:temper_api_url}` sent verbatim or to 127.0.0.1:3000 although the
    # host knows its TemperFS.
    outcome = host.provision(with_temperfs=None, temper_api_url="{secret:temper_api_url}")
    assert outcome.params["workspace_id"] == f"agent-{AGENT}"
    assert len(tdata(temperfs)) == 7


def test_a_temperfs_the_host_does_not_allow_is_refused_and_not_fatal(
    host: Host, mock: MockE2BServer
) -> None:
    # Catches: the gateway reaching a TemperFS other than the host's (the allow-list).
    outcome = host.provision(with_temperfs=None, temper_api_url="http://127.0.0.1:9")
    assert outcome.action == "SandboxReady" and outcome.params["workspace_id"] == ""
    assert any("not the configured" in w for w in host.warnings()), host.warnings()


# -- idempotency ----------------------------------------------------------------------------


def test_a_repeated_provision_returns_the_same_sandbox_and_ids_and_sends_nothing(
    host: Host, mock: MockE2BServer, temperfs: MockTemperFSServer
) -> None:
    # Catches: a second sandbox, a second workspace, or TemperFS requests on a repeat.
    first = host.provision()
    sent = len(tdata(temperfs))
    second = host.provision()
    assert second.params == first.params
    assert creates(mock) == 1 and len(tdata(temperfs)) == sent
    assert len(temperfs.store.entities("Workspace", TENANT)) == 1
    assert len(temperfs.store.entities("File", TENANT)) == 3


def test_a_provision_retried_after_a_crash_makes_nothing_twice(
    host: Host, mock: MockE2BServer, temperfs: MockTemperFSServer
) -> None:
    # Catches: a retry (the stored ids lost, as after a crash before they were written)
    # making a new workspace or files, or overwriting content already uploaded.
    first = host.provision()
    assert host.storage.delete(
        tenant_namespace(TENANT), conversation_key(f"TemperAgent/{AGENT}"), None
    )
    again = host.provision()
    assert again.params == first.params
    assert len(temperfs.store.entities("Workspace", TENANT)) == 1
    assert len(temperfs.store.entities("File", TENANT)) == 3
    assert all(f.version_count == 1 for f in temperfs.store.entities("File", TENANT))
    assert [m for m, _ in tdata(temperfs)].count("PUT") == 3


def test_a_conflict_answer_is_resolved_by_looking_up_the_holder(
    host: Host, mock: MockE2BServer, temperfs: MockTemperFSServer
) -> None:
    # Catches: a 409 DeclaredKeyConflict treated as a failure (empty ids) or ignored.
    workspace = f"agent-{AGENT}"
    temperfs.store.handle(
        "POST",
        "Files",
        {"x-tenant-id": TENANT},
        json.dumps(
            {"Id": "fl-earlier", "workspace_id": workspace, "path": "/conversation.json"}
        ).encode(),
    )
    outcome = host.provision()
    assert outcome.params["conversation_file_id"] == "fl-earlier"
    assert ("GET", "/tdata/Files('fl-earlier')") in tdata(temperfs)
    assert len(temperfs.store.entities("File", TENANT)) == 3
