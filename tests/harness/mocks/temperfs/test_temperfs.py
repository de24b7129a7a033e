"""The mock TemperFS (/tdata) against the requests the old sandbox_provisioner sends.

``send_as_old_module`` replays, over HTTP, exactly the TemperFS requests of
``os-apps/temper-agent/wasm/sandbox_provisioner/src/lib.rs`` in nerdsane/temper (listed in
harness/mocks/temperfs/TEMPERFS.md), reading ids from the answers as that module does."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from harness.mocks.temperfs import MockTemperFSServer
from tests.harness.mocks.e2b.fixtures import running_mock

TENANT = "acme"


@pytest.fixture
def server() -> Iterator[MockTemperFSServer]:
    with MockTemperFSServer() as mock:
        yield mock


def headers(content_type: str = "application/json") -> dict[str, str]:
    return {"content-type": content_type, "x-tenant-id": TENANT, "x-temper-principal-kind": "admin"}


def entity_id(response: httpx.Response) -> str:
    assert 200 <= response.status_code < 300, response.text
    value = response.json().get("entity_id", "")
    assert isinstance(value, str)
    return value


def send_as_old_module(
    base: str, agent_id: str, user_message: str, with_ids: bool = False
) -> dict[str, str]:
    """The old module's TemperFS requests; ``with_ids`` adds an ``Id`` to each create (what
    makes a repeat idempotent in Temper: write.rs takes the entity id from id/Id)."""

    def extra(value: str) -> dict[str, str]:
        return {"Id": value} if with_ids else {}

    def create(collection: str, body: dict[str, str], key: str) -> str:
        content = json.dumps({**body, **extra(key)})
        return entity_id(http.post(f"/tdata/{collection}", headers=headers(), content=content))

    def write_file(kind: str, name: str, mime_type: str, content: str) -> str:
        """A File in the workspace, then its content, as the old module writes each one."""
        file_id = create(
            "Files",
            {
                "FileId": f"{kind}-{agent_id}",
                "workspace_id": ws,
                "name": name,
                "mime_type": mime_type,
                "path": f"/{name}",
            },
            f"{kind}-{agent_id}",
        )
        put = http.put(
            f"/tdata/Files('{file_id}')/$value", headers=headers(mime_type), content=content
        )
        assert put.status_code == 204
        return file_id

    with httpx.Client(base_url=base, timeout=10) as http:
        ws = create(
            "Workspaces",
            {
                "WorkspaceId": f"agent-{agent_id}",
                "name": f"Agent {agent_id} Workspace",
                "owner_id": agent_id,
                "quota_bytes": "104857600",
            },
            f"agent-{agent_id}",
        )
        conv = write_file(
            "conv", "conversation.json", "application/json", json.dumps({"messages": []})
        )
        manifest = write_file(
            "manifest",
            "file_manifest.json",
            "application/json",
            json.dumps({"files": {}, "synced_at_turn": 0}),
        )
        header_line = json.dumps(
            {"id": f"h-{agent_id}", "parentId": None, "type": "header", "version": 1, "tokens": 0}
        )
        user_line = json.dumps(
            {
                "id": f"u-{agent_id}-0",
                "parentId": f"h-{agent_id}",
                "type": "message",
                "role": "user",
                "content": user_message,
                "tokens": len(user_message) // 4,
            }
        )
        session = write_file(
            "session", "session.jsonl", "text/plain", f"{header_line}\n{user_line}"
        )
    return {
        "workspace_id": ws,
        "conversation_file_id": conv,
        "file_manifest_id": manifest,
        "session_file_id": session,
        "session_leaf_id": f"u-{agent_id}-0",
    }


def test_the_old_modules_requests_make_one_workspace_three_files_and_their_contents(
    server: MockTemperFSServer,
) -> None:
    ids = send_as_old_module(server.url, "agent-7", "summarise the incident")
    fs = server.store
    [workspace] = fs.entities("Workspace", TENANT)
    assert workspace.entity_id == ids["workspace_id"] and workspace.entity_id.startswith("ws-")
    assert workspace.fields["owner_id"] == "agent-7"
    files = {f.entity_id: f for f in fs.entities("File", TENANT)}
    assert set(files) == {
        ids["conversation_file_id"],
        ids["file_manifest_id"],
        ids["session_file_id"],
    }
    assert all(f.fields["workspace_id"] == ids["workspace_id"] for f in files.values())
    assert json.loads(fs.content(ids["conversation_file_id"], TENANT) or b"") == {"messages": []}
    assert json.loads(fs.content(ids["file_manifest_id"], TENANT) or b"") == {
        "files": {},
        "synced_at_turn": 0,
    }
    session = (fs.content(ids["session_file_id"], TENANT) or b"").decode().split("\n")
    assert [json.loads(line)["id"] for line in session] == ["h-agent-7", "u-agent-7-0"]
    assert files[ids["session_file_id"]].content_type == "text/plain"
    assert {f.status for f in files.values()} == {"Ready"}
    stats = server.stats()
    assert (stats.workspaces, stats.files, stats.requests) == (1, 3, 7)
    # Every request is on record with the headers the old module sends.
    sent = fs.requests()
    assert [(r.method, r.path) for r in sent][:3] == [
        ("POST", "/tdata/Workspaces"),
        ("POST", "/tdata/Files"),
        ("PUT", f"/tdata/Files('{ids['conversation_file_id']}')/$value"),
    ]
    assert all(
        r.headers["x-tenant-id"] == TENANT and r.headers["x-temper-principal-kind"] == "admin"
        for r in sent
    )


def test_a_repeat_without_ids_makes_a_second_workspace_as_temper_does(
    server: MockTemperFSServer,
) -> None:
    # Temper takes the entity id from the body's id/Id only; the old module sends
    # WorkspaceId/FileId, so a repeated Provision makes new entities.
    first = send_as_old_module(server.url, "a1", "hi")
    second = send_as_old_module(server.url, "a1", "hi")
    assert first["workspace_id"] != second["workspace_id"]
    assert server.stats().workspaces == 2


def test_a_repeat_with_ids_is_get_or_create_and_keeps_the_first_fields(
    server: MockTemperFSServer,
) -> None:
    first = send_as_old_module(server.url, "a1", "hi", with_ids=True)
    assert first["workspace_id"] == "agent-a1" and first["conversation_file_id"] == "conv-a1"
    with httpx.Client(base_url=server.url) as http:
        again = http.post(
            "/tdata/Workspaces", headers=headers(), json={"Id": "agent-a1", "name": "renamed"}
        )
    assert again.status_code == 201
    assert again.json()["fields"]["name"] == "Agent a1 Workspace"
    assert again.json()["@odata.id"] == "Workspaces('agent-a1')"
    assert send_as_old_module(server.url, "a1", "hi", with_ids=True) == first
    stats = server.stats()
    assert (stats.workspaces, stats.files) == (1, 3)


def test_a_file_on_a_path_another_file_holds_is_a_409_declared_key_conflict(
    server: MockTemperFSServer,
) -> None:
    with httpx.Client(base_url=server.url) as http:
        body: dict[str, Any] = {"workspace_id": "ws-1", "path": "/a.md", "name": "a.md"}
        assert (
            http.post("/tdata/Files", headers=headers(), json={"Id": "f1", **body}).status_code
            == 201
        )
        clash = http.post("/tdata/Files", headers=headers(), json={"Id": "f2", **body})
        assert clash.status_code == 409
        assert clash.json()["error"]["code"] == "DeclaredKeyConflict"
        assert "held by f1" in clash.json()["error"]["message"]
        # Another tenant's workspace and path are its own.
        other = {**headers(), "x-tenant-id": "other"}
        assert (
            http.post("/tdata/Files", headers=other, json={"Id": "f2", **body}).status_code == 201
        )
    assert server.stats().files == 2


def test_value_download_reads_and_errors_use_odatas_body(server: MockTemperFSServer) -> None:
    with httpx.Client(base_url=server.url) as http:
        put = http.put(
            "/tdata/Files('new-file')/$value", headers=headers("text/markdown"), content=b"# notes"
        )
        assert put.status_code == 204 and put.headers["OData-Version"] == "4.0"
        assert put.headers["ETag"].startswith('"')
        got = http.get("/tdata/Files('new-file')/$value", headers=headers())
        assert (got.status_code, got.content) == (200, b"# notes")
        assert got.headers["content-type"].startswith("text/markdown")
        entity = http.get("/tdata/Files('new-file')", headers=headers()).json()
        assert entity["fields"]["version_count"] == 1 and entity["status"] == "Ready"
        listed = http.get("/tdata/Files", headers=headers()).json()["value"]
        assert [e["entity_id"] for e in listed] == ["new-file"]
        for path, status, code in [
            ("/tdata/Files('missing')", 404, "ResourceNotFound"),
            ("/tdata/Files('missing')/$value", 404, "ResourceNotFound"),
            ("/tdata/Folders", 404, "EntitySetNotFound"),
        ]:
            response = http.get(path, headers=headers())
            assert (response.status_code, response.json()["error"]["code"]) == (status, code)
        bad = http.post("/tdata/Workspaces", headers=headers(), content=b"{not json")
        assert (bad.status_code, bad.json()["error"]["code"]) == (400, "InvalidBody")
        no_stream = http.put("/tdata/Workspaces('w')/$value", headers=headers(), content=b"x")
        assert no_stream.status_code == 400
    assert server.stats().workspaces == 0


def test_the_control_api_shows_records_and_reset_forgets_them(server: MockTemperFSServer) -> None:
    ids = send_as_old_module(server.url, "c1", "hello")
    records = httpx.get(f"{server.url}/_mock/temperfs").json()
    assert [w["entity_id"] for w in records["workspaces"]] == [ids["workspace_id"]]
    contents = {f["entity_id"]: f["content"] for f in records["files"]}
    assert json.loads(contents[ids["conversation_file_id"]]) == {"messages": []}
    assert len(records["requests"]) == 7
    httpx.post(f"{server.url}/_mock/reset")
    stats = server.stats()
    assert (stats.workspaces, stats.files, stats.requests) == (0, 0, 0)


def test_the_e2b_mock_serves_no_temperfs_and_temperfs_takes_faults() -> None:
    with running_mock() as e2b, httpx.Client(base_url=e2b.url) as http:
        off = http.post("/tdata/Workspaces", headers=headers(), json={})
        assert off.status_code == 404
    with MockTemperFSServer() as server, httpx.Client(base_url=server.url) as http:
        server.configure(faults=["503:n=1:route=tdata"])
        assert http.post("/tdata/Workspaces", headers=headers(), json={}).status_code == 503
        assert http.post("/tdata/Workspaces", headers=headers(), json={}).status_code == 201
        assert server.wait_for(lambda s: s.workspaces == 1, timeout=5)
        assert server.stats().faults_injected == 1


def test_a_temperfs_fault_it_cannot_inject_is_refused() -> None:
    """Bug caught: a hang or reset rule accepted and silently never injected."""
    with MockTemperFSServer() as server:
        with pytest.raises(ValueError, match="status faults only"):
            server.configure(faults=["hang:n=1:route=tdata"])
        with pytest.raises(ValueError, match="route"):
            server.configure(faults=["503:n=1:route=create"])
        assert server.config.faults == ()
