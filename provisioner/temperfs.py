"""The conversation storage the old sandbox_provisioner sets up in TemperFS, made idempotent:
each entity is posted with its `Id`, so a repeat is Temper's get-or-create, and the ids are
stored once all five exist. The steps, and which failures are fatal: docs/gates.md
("Outside `gates/`").
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

from provisioner.config import SandboxSettings
from provisioner.invocation import Request
from provisioner.model import fields_of
from provisioner.ports import (
    HttpError,
    HttpRequest,
    HttpResponse,
    LogLevel,
    Ports,
    Scope,
    Storage,
    StorageError,
)

# `handle_odata_post`'s 409 names the holder: "duplicate declared key ... held by <id>".
_HOLDER = re.compile(r"held by (\S+)")
# A workspace quota of 100 MiB, as the old module asks (a string, as it sends it).
QUOTA_BYTES = "104857600"
_RECORD_TTL_MS = 24 * 3600 * 1000
_JSON = "application/json"
# Steps 2-7, a file and its `$value` each: (id prefix, file name, MIME type, what, label).
_File = tuple[str, str, str, str, str]
_CONVERSATION: _File = ("conv", "conversation.json", _JSON, "File creation", "conversation")
_MANIFEST: _File = ("manifest", "file_manifest.json", _JSON, "Manifest File creation", "manifest")
_SESSION: _File = ("session", "session.jsonl", "text/plain", "session file creation", "session")


class _StepFailed(Exception):
    """A step whose failure aborts the setup (the old module's `?` and `Err`)."""


@dataclass(frozen=True, slots=True)
class ConversationStorage:
    workspace_id: str = ""
    conversation_file_id: str = ""
    file_manifest_id: str = ""
    session_file_id: str = ""
    session_leaf_id: str = ""

    @property
    def complete(self) -> bool:
        return all(fields_of(self).values())


NONE = ConversationStorage()


def _compact(value: Any) -> bytes:
    # serde_json's `to_string`: compact, keys sorted (a BTreeMap), non-ASCII as UTF-8.
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
        "tokens": len(user_message.encode("utf-8", "replace")) // 4,  # Rust's UTF-8 `len`
    }
    return _compact(header) + b"\n" + _compact(user)


def _key(entity_id: str) -> str:
    """An OData key literal's content: quotes doubled, then percent-encoded for the path."""
    return quote(entity_id.replace("'", "''"), safe="-_.~")


def _text(answer: dict[str, Any], name: str) -> str:
    value = answer.get(name)
    return value if isinstance(value, str) else ""


def conversation_key(entity: str) -> str:
    return "temperfs/" + quote(entity, safe="")


def _stored_ids(storage: Storage, entity: str, base_url: str) -> ConversationStorage | None:
    """The five ids once made (under the tenant scope), if made at `base_url`."""
    entry = storage.get(Scope.TENANT, conversation_key(entity))
    if entry is None:
        return None
    try:
        data = json.loads(entry.value.decode())
        if data.get("base_url") != base_url:
            return None
        found = ConversationStorage(**{k: str(data[k]) for k in fields_of(NONE)})
    except (ValueError, KeyError, TypeError, AttributeError):
        return None
    return found if found.complete else None


def _store_ids(storage: Storage, entity: str, base_url: str, made: ConversationStorage) -> None:
    key = conversation_key(entity)
    entry = storage.get(Scope.TENANT, key)
    version = None if entry is None else entry.version
    value = json.dumps({"base_url": base_url, **fields_of(made)}).encode()
    storage.compare_and_swap(Scope.TENANT, key, version, value, _RECORD_TTL_MS)


class TemperFS:
    def __init__(self, ports: Ports, base_url: str, tenant: str, timeout_ms: int) -> None:
        self._ports = ports
        self._base = base_url.rstrip("/") + "/tdata"
        self._headers = (("x-tenant-id", tenant), ("x-temper-principal-kind", "admin"))
        self._timeout_ms = timeout_ms

    def log(self, level: LogLevel, message: str) -> None:
        self._ports.telemetry.log(level, f"sandbox_provisioner: {message}")

    def _send(self, method: str, path: str, body: bytes, content_type: str) -> HttpResponse:
        headers = (("content-type", content_type), *self._headers)
        request = HttpRequest(method, self._base + path, headers, body, self._timeout_ms)
        return self._ports.http.send(request)

    def _call(self, method: str, path: str, body: bytes, what: str) -> dict[str, Any]:
        """The JSON object answered (a POST's 409 naming the holder: the holder as it is)."""
        try:
            response = self._send(method, path, body, _JSON)
        except HttpError as error:
            raise _StepFailed(f"{what} failed: {error}") from None
        if response.status == 409 and method == "POST":
            holder = _HOLDER.search(response.body.decode("utf-8", "replace"))
            if holder is not None:
                holder_id = _key(holder.group(1).rstrip("'\".,}"))
                found = self._call("GET", f"{path}('{holder_id}')", b"", f"{what} lookup")
                self.log(LogLevel.INFO, f"{what}: using the existing {found.get('entity_id')}")
                return found
        if not 200 <= response.status < 300:
            excerpt = response.body[:300].decode("utf-8", "replace")
            raise _StepFailed(f"{what} failed (HTTP {response.status}): {excerpt}")
        try:
            parsed = json.loads(response.body.decode("utf-8", "replace"))
        except ValueError as error:
            raise _StepFailed(f"parse {what} response: {error}") from None
        return parsed if isinstance(parsed, dict) else {}

    def _file(self, agent_id: str, workspace_id: str, row: _File) -> tuple[str, bool]:
        """(file id, whether it already holds content)."""
        prefix, name, mime, what, _ = row
        file_id = f"{prefix}-{agent_id}"
        body = {
            "Id": file_id,
            "FileId": file_id,
            "workspace_id": workspace_id,
            "name": name,
            "mime_type": mime,
            "path": f"/{name}",
        }
        answer = self._call("POST", "/Files", _compact(body), what)
        return _text(answer, "entity_id"), answer.get("status") == "Ready"

    def _write(self, file_id: str, row: _File, content: bytes) -> bool:
        """PUT a file's `$value`; a non-2xx only warns (a transport error is raised)."""
        response = self._send("PUT", f"/Files('{_key(file_id)}')/$value", content, row[2])
        if 200 <= response.status < 300:
            return True
        self.log(LogLevel.WARN, f"initial {row[4]} $value write failed (HTTP {response.status})")
        return False

    def setup(self, agent_id: str, user_message: str) -> ConversationStorage:
        try:
            key = f"agent-{agent_id}"
            workspace = {
                "Id": key,
                "WorkspaceId": key,
                "name": f"Agent {agent_id} Workspace",
                "owner_id": agent_id,
                "quota_bytes": QUOTA_BYTES,
            }
            answer = self._call("POST", "/Workspaces", _compact(workspace), "Workspace creation")
            workspace_id = _text(answer, "entity_id")
            self.log(LogLevel.INFO, f"created workspace {workspace_id}")
            file_ids = []
            initial: tuple[Any, ...] = ({"messages": []}, {"files": {}, "synced_at_turn": 0})
            for row, content in zip((_CONVERSATION, _MANIFEST), initial, strict=True):
                file_id, filled = self._file(agent_id, workspace_id, row)
                self.log(LogLevel.INFO, f"created {row[4]} file {file_id}")
                if not filled:
                    self._write(file_id, row, _compact(content))
                file_ids.append(file_id)
            session = self._session(agent_id, workspace_id, user_message)
            conversation_id, manifest_id = file_ids
            return ConversationStorage(workspace_id, conversation_id, manifest_id, *session)
        except (_StepFailed, HttpError) as error:
            self.log(LogLevel.WARN, f"TemperFS setup failed: {error}, falling back to inline")
            return NONE

    def _session(self, agent_id: str, workspace_id: str, user_message: str) -> tuple[str, str]:
        """Steps 6 and 7 (`create_session_tree`): never abort the setup."""
        try:
            file_id, filled = self._file(agent_id, workspace_id, _SESSION)
        except _StepFailed as error:
            self.log(LogLevel.WARN, f"Failed to create session file: {error}")
            return "", ""
        if not file_id:
            return "", ""
        if not filled:
            try:
                if self._write(file_id, _SESSION, session_jsonl(agent_id, user_message)):
                    self.log(LogLevel.INFO, "session tree initialized")
            except HttpError as error:
                self.log(LogLevel.WARN, f"Failed to write session file: {error}")
        return file_id, f"u-{agent_id}-0"


def conversation_storage(
    ports: Ports, settings: SandboxSettings, request: Request
) -> ConversationStorage:
    """The entity's conversation storage: the stored ids, or a (re)run of the setup."""
    base_url = settings.temper_api_url
    try:
        known = _stored_ids(ports.storage, request.entity, base_url)
    except StorageError:
        known = None
    if known is not None:
        return known
    agent_id = request.entity_state.get("entity_id")
    if not isinstance(agent_id, str) or not agent_id:
        agent_id = request.entity_id
    temperfs = TemperFS(ports, base_url, request.tenant, settings.request_timeout_ms)
    made = temperfs.setup(agent_id, request.field_text("user_message"))
    if made.complete:
        try:
            _store_ids(ports.storage, request.entity, base_url, made)
        except StorageError as error:
            # Not fatal: a repeat finds the same entities through get-or-create.
            temperfs.log(LogLevel.WARN, f"could not store the ids: {error}")
    return made
