"""The conversation storage the old sandbox_provisioner sets up in TemperFS, made idempotent.

After the sandbox is ready, the old module (`create_conversation_storage` and
`create_session_tree` in `os-apps/temper-agent/wasm/sandbox_provisioner/src/lib.rs`,
`nerdsane/temper`; its requests are listed in `harness/mocks/temperfs/TEMPERFS.md`) creates through
`{temper_api_url}/tdata/...`, with the headers `content-type`, `x-tenant-id` and
`x-temper-principal-kind: admin`:

1. the workspace `agent-{agent_id}`; 2. the conversation file, then 3. its `$value`
`{"messages": []}`; 4. the manifest file, then 5. its `$value`
`{"files": {}, "synced_at_turn": 0}`; 6. the session file, then 7. its `$value`: a JSONL
header and the first user message.

The same bodies are sent, plus `Id`: Temper reads the entity id from `id`/`Id` only
(`handle_odata_post` in `crates/temper-server/src/odata/write.rs`), so the old module's
`WorkspaceId`/`FileId` made a new workspace and new files on every repeat. With `Id`, a
repeat is Temper's get-or-create and answers the existing entity; a `409
DeclaredKeyConflict` (another file holds the workspace and path) names the holder, which
is looked up and used. A file whose status is already `Ready` holds content and is not
overwritten. The ids are stored once all five exist, so a repeated Provision sends nothing.

Failures are not fatal, as in the old module: a failed step 1, 2 or 4 (or a transport
error in 3 or 5) leaves all five ids empty, a failed step 6 leaves the two session ids
empty, a failed `$value` write only warns.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

from provisioner.model import fields_of
from provisioner.ports import (
    HttpError,
    HttpRequest,
    HttpResponse,
    LogLevel,
    Ports,
    Scope,
    StorageError,
)

_PREFIX = "sandbox_provisioner"
# `handle_odata_post`'s 409 names the holder: "duplicate declared key 'ws_path' for File:
# held by <id>" (the Temper test `post_returns_409_naming_the_key_and_the_holder`).
_HOLDER = re.compile(r"held by (\S+)")
# A workspace quota of 100 MiB, as the old module asks (a string, as it sends it).
QUOTA_BYTES = "104857600"
_RECORD_TTL_MS = 24 * 3600 * 1000


class _StepFailed(Exception):
    """A step whose failure aborts the setup (the old module's `?` and `Err`)."""


@dataclass(frozen=True, slots=True)
class ConversationStorage:
    workspace_id: str = ""
    conversation_file_id: str = ""
    file_manifest_id: str = ""
    session_file_id: str = ""
    session_leaf_id: str = ""

    def params(self) -> dict[str, str]:
        return fields_of(self)

    @property
    def complete(self) -> bool:
        return all(self.params().values())


NONE = ConversationStorage()


def _compact(value: Any) -> bytes:
    # serde_json's `to_string`: compact, keys in order (serde_json's map is a BTreeMap),
    # non-ASCII as UTF-8.
    text = json.dumps(value, separators=(",", ":"), sort_keys=True, ensure_ascii=False)
    return text.encode("utf-8", "replace")


def session_jsonl(agent_id: str, user_message: str) -> bytes:
    """The session tree's first two entries, joined by a newline (no trailing one)."""
    header_id = f"h-{agent_id}"
    header = {"id": header_id, "parentId": None, "type": "header", "version": 1, "tokens": 0}
    user = {
        "id": f"u-{agent_id}-0",
        "parentId": header_id,
        "type": "message",
        "role": "user",
        "content": user_message,
        # Rust's `str::len` is the UTF-8 length.
        "tokens": len(user_message.encode("utf-8", "replace")) // 4,
    }
    return _compact(header) + b"\n" + _compact(user)


class ConversationRecords:
    """The five ids once made, under the tenant scope, keyed by entity and base."""

    def __init__(self, ports: Ports) -> None:
        self._storage = ports.storage

    @staticmethod
    def key(entity: str) -> str:
        return "temperfs/" + quote(entity, safe="")

    def load(self, entity: str, base_url: str) -> ConversationStorage | None:
        entry = self._storage.get(Scope.TENANT, self.key(entity))
        if entry is None:
            return None
        try:
            data = json.loads(entry.value.decode())
            if data.get("base_url") != base_url:
                return None
            found = ConversationStorage(**{k: str(data[k]) for k in NONE.params()})
        except (ValueError, KeyError, TypeError, AttributeError):
            return None
        return found if found.complete else None

    def store(self, entity: str, base_url: str, made: ConversationStorage) -> None:
        value = json.dumps({"base_url": base_url, **made.params()}).encode()
        entry = self._storage.get(Scope.TENANT, self.key(entity))
        self._storage.compare_and_swap(
            Scope.TENANT,
            self.key(entity),
            None if entry is None else entry.version,
            value,
            _RECORD_TTL_MS,
        )


class TemperFS:
    def __init__(self, ports: Ports, base_url: str, tenant: str, timeout_ms: int) -> None:
        self._ports = ports
        self._base = base_url.rstrip("/") + "/tdata"
        self._tenant = tenant
        self._timeout_ms = timeout_ms

    def _log(self, level: LogLevel, message: str) -> None:
        self._ports.telemetry.log(level, f"{_PREFIX}: {message}")

    def _send(self, method: str, path: str, body: bytes, content_type: str) -> HttpResponse:
        return self._ports.http.send(
            HttpRequest(
                method=method,
                url=self._base + path,
                headers=(
                    ("content-type", content_type),
                    ("x-tenant-id", self._tenant),
                    ("x-temper-principal-kind", "admin"),
                ),
                body=body,
                timeout_ms=self._timeout_ms,
            )
        )

    @staticmethod
    def _json(response: HttpResponse, what: str) -> dict[str, Any]:
        try:
            parsed = json.loads(response.body.decode("utf-8", "replace"))
        except ValueError as error:
            raise _StepFailed(f"parse {what} response: {error}") from None
        return parsed if isinstance(parsed, dict) else {}

    @staticmethod
    def _failed(what: str, response: HttpResponse) -> _StepFailed:
        excerpt = response.body[:300].decode("utf-8", "replace")
        return _StepFailed(f"{what} failed (HTTP {response.status}): {excerpt}")

    def _create(self, entity_set: str, body: dict[str, Any], what: str) -> dict[str, Any]:
        """POST a Workspace or File; on a 409 naming the holder, the holder as it is."""
        try:
            response = self._send("POST", f"/{entity_set}", _compact(body), "application/json")
        except HttpError as error:
            raise _StepFailed(f"{what} failed: {error}") from None
        if response.status == 409:
            holder = _HOLDER.search(response.body.decode("utf-8", "replace"))
            if holder is None:
                raise self._failed(what, response)
            found = self._get(entity_set, holder.group(1).rstrip("'\".,}"), what)
            self._log(LogLevel.INFO, f"{what}: using the existing {found.get('entity_id')}")
            return found
        if not 200 <= response.status < 300:
            raise self._failed(what, response)
        return self._json(response, what)

    def _get(self, entity_set: str, entity_id: str, what: str) -> dict[str, Any]:
        try:
            response = self._send(
                "GET", f"/{entity_set}('{_key(entity_id)}')", b"", "application/json"
            )
        except HttpError as error:
            raise _StepFailed(f"{what} lookup failed: {error}") from None
        if not 200 <= response.status < 300:
            raise self._failed(f"{what} lookup", response)
        return self._json(response, what)

    def _write(self, file_id: str, content: bytes, content_type: str, what: str) -> bool:
        """PUT a file's `$value`; a non-2xx only warns. True when written."""
        response = self._send("PUT", f"/Files('{_key(file_id)}')/$value", content, content_type)
        if 200 <= response.status < 300:
            return True
        self._log(LogLevel.WARN, f"initial {what}$value write failed (HTTP {response.status})")
        return False

    def _file(
        self, agent_id: str, prefix: str, workspace_id: str, name: str, mime: str, what: str
    ) -> tuple[str, bool]:
        """(file id, whether it already holds content)."""
        file_id = f"{prefix}-{agent_id}"
        answer = self._create(
            "Files",
            {
                "Id": file_id,
                "FileId": file_id,
                "workspace_id": workspace_id,
                "name": name,
                "mime_type": mime,
                "path": f"/{name}",
            },
            what,
        )
        made = answer.get("entity_id")
        return (made if isinstance(made, str) else ""), answer.get("status") == "Ready"

    def setup(self, agent_id: str, user_message: str) -> ConversationStorage:
        try:
            return self._setup(agent_id, user_message)
        except (_StepFailed, HttpError) as error:
            self._log(LogLevel.WARN, f"TemperFS setup failed: {error}, falling back to inline")
            return NONE

    def _setup(self, agent_id: str, user_message: str) -> ConversationStorage:
        workspace_key = f"agent-{agent_id}"
        workspace = self._create(
            "Workspaces",
            {
                "Id": workspace_key,
                "WorkspaceId": workspace_key,
                "name": f"Agent {agent_id} Workspace",
                "owner_id": agent_id,
                "quota_bytes": QUOTA_BYTES,
            },
            "Workspace creation",
        )
        made = workspace.get("entity_id")
        workspace_id = made if isinstance(made, str) else ""
        self._log(LogLevel.INFO, f"created workspace {workspace_id}")

        conversation_id, filled = self._file(
            agent_id,
            "conv",
            workspace_id,
            "conversation.json",
            "application/json",
            "File creation",
        )
        self._log(LogLevel.INFO, f"created conversation file {conversation_id}")
        if not filled:
            self._write(conversation_id, _compact({"messages": []}), "application/json", "")

        manifest_id, filled = self._file(
            agent_id,
            "manifest",
            workspace_id,
            "file_manifest.json",
            "application/json",
            "Manifest File creation",
        )
        self._log(LogLevel.INFO, f"created manifest file {manifest_id}")
        if not filled:
            self._write(
                manifest_id,
                _compact({"files": {}, "synced_at_turn": 0}),
                "application/json",
                "manifest ",
            )

        session_file_id, session_leaf_id = self._session(agent_id, workspace_id, user_message)
        return ConversationStorage(
            workspace_id, conversation_id, manifest_id, session_file_id, session_leaf_id
        )

    def _session(self, agent_id: str, workspace_id: str, user_message: str) -> tuple[str, str]:
        """Step 6 and 7 (`create_session_tree`): never aborts the setup."""
        try:
            session_file_id, filled = self._file(
                agent_id,
                "session",
                workspace_id,
                "session.jsonl",
                "text/plain",
                "session file creation",
            )
        except _StepFailed as error:
            self._log(LogLevel.WARN, f"Failed to create session file: {error}")
            return "", ""
        if not session_file_id:
            return "", ""
        if not filled:
            try:
                if self._write(
                    session_file_id, session_jsonl(agent_id, user_message), "text/plain", "session "
                ):
                    self._log(LogLevel.INFO, "session tree initialized")
            except HttpError as error:
                self._log(LogLevel.WARN, f"Failed to write session file: {error}")
        return session_file_id, f"u-{agent_id}-0"


def _key(entity_id: str) -> str:
    """An OData key literal's content: quotes doubled, then percent-encoded for the path."""
    return quote(entity_id.replace("'", "''"), safe="-_.~")


def conversation_storage(
    ports: Ports,
    *,
    base_url: str,
    tenant: str,
    entity: str,
    agent_id: str,
    user_message: str,
    timeout_ms: int,
) -> ConversationStorage:
    """The entity's conversation storage: the stored ids, or a (re)run of the setup."""
    records = ConversationRecords(ports)
    try:
        known = records.load(entity, base_url)
    except StorageError:
        known = None
    if known is not None:
        return known
    made = TemperFS(ports, base_url, tenant, timeout_ms).setup(agent_id, user_message)
    if made.complete:
        try:
            records.store(entity, base_url, made)
        except StorageError as error:
            # Not fatal: a repeat finds the same entities through get-or-create.
            ports.telemetry.log(LogLevel.WARN, f"{_PREFIX}: could not store the ids: {error}")
    return made
