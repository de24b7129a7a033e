"""A small TemperFS: the ``/tdata`` Workspaces and Files entity sets and ``$value`` content,
as Temper's OData API answers the requests the old ``sandbox_provisioner`` module sends
(see TEMPERFS.md beside this file for those requests and the Temper sources cited here).

What it models, from ``nerdsane/temper`` ``crates/temper-server/src/odata/``:

- ``POST /tdata/{Set}`` (``write.rs`` ``handle_odata_post``): the entity id is the body's
  ``id`` or ``Id``, else ``<prefix><uuid>`` (``entity_type_prefix``: ``ws-`` for a
  Workspace, ``fl-`` for a File). The create is get-or-create
  (``get_or_create_tenant_entity``): an id that exists answers 201 with the entity as it
  is, its fields unchanged. The answer is the entity state (``entity_type``,
  ``entity_id``, ``status``, ``fields``) with ``@odata.context`` and ``@odata.id``
  (``response.rs`` ``annotate_entity``).
- A File whose workspace and path another File already holds is refused 409
  ``DeclaredKeyConflict`` (newer Temper: declared keys, ADR-0153; the ``ws_path`` key of
  File in ``crates/temper-server/src/state`` tests, and the 409 body in the test
  ``post_returns_409_naming_the_key_and_the_holder``).
- ``PUT /tdata/Files('id')/$value`` (``stream_put.rs`` ``handle_stream_put``): stores the
  bytes and their content type, moves the File to Ready and counts a version; answers 204
  with ``OData-Version: 4.0`` and the content hash as ``ETag``. A File id that does not
  exist yet is created with its content in one step (ARN-87 in the same file).
- ``GET /tdata/Files('id')/$value``: the bytes with their content type.
- Errors use OData's body ``{"error": {"code", "message"}}`` (``odata_error``): 404
  ``EntitySetNotFound`` / ``ResourceNotFound``, 400 ``InvalidBody``.

Records are kept per tenant (``x-tenant-id``; ``default`` without it). Every request is
logged with its method, path, the headers the old module sends and its body, so tests can
check what a client sent.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
import threading
import uuid
from dataclasses import dataclass, field
from typing import Any

ENTITY_SETS = {"Workspaces": "Workspace", "Files": "File"}
_PREFIX = {"Workspace": "ws-", "File": "fl-"}
_INITIAL_STATUS = {"Workspace": "Active", "File": "Created"}
# x-api-key is logged too, so a test can show the E2B key never reaches TemperFS.
_LOGGED_HEADERS = ("content-type", "x-tenant-id", "x-temper-principal-kind", "x-api-key")
_PATH = re.compile(r"^(?P<set>[A-Za-z]+)(?:\('(?P<key>[^']*)'\))?(?P<value>/\$value)?$")
DEFAULT_TENANT = "default"


class TemperFSError(Exception):
    """An answer in OData's error shape."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message

    def body(self) -> dict[str, Any]:
        return {"error": {"code": self.code, "message": self.message}}


@dataclass
class Entity:
    tenant: str
    entity_type: str
    entity_id: str
    status: str
    fields: dict[str, Any]
    content: bytes | None = None
    content_type: str | None = None
    content_hash: str | None = None
    version_count: int = 0

    def state(self) -> dict[str, Any]:
        fields = dict(self.fields)
        if self.entity_type == "File":
            fields.update(
                version_count=self.version_count,
                has_content=self.content is not None,
                size_bytes=0 if self.content is None else len(self.content),
            )
            if self.content_hash is not None:
                fields["content_hash"] = self.content_hash
        return {
            "entity_type": self.entity_type,
            "entity_id": self.entity_id,
            "status": self.status,
            "fields": fields,
        }

    def to_json(self) -> dict[str, Any]:
        """The record as the control API shows it (content as text when it decodes)."""
        data = {"tenant": self.tenant, **self.state()}
        if self.content is not None:
            data["content_type"] = self.content_type
            try:
                data["content"] = self.content.decode()
            except UnicodeDecodeError:
                data["content"] = None
        return data


@dataclass(frozen=True)
class TemperFSRequest:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    status: int

    def to_json(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "path": self.path,
            "headers": dict(self.headers),
            "body": self.body.decode(errors="replace"),
            "status": self.status,
        }


@dataclass(frozen=True)
class Parsed:
    entity_set: str
    entity_type: str
    key: str | None
    value: bool


def parse_path(path: str) -> Parsed:
    """``Files``, ``Files('id')`` or ``Files('id')/$value`` (path below /tdata/)."""
    match = _PATH.match(path)
    if match is None:
        raise TemperFSError(400, "InvalidPath", f"cannot parse OData path '/{path}'")
    entity_set = match["set"]
    if entity_set not in ENTITY_SETS:
        raise TemperFSError(404, "EntitySetNotFound", f"Entity set '{entity_set}' not found")
    if match["value"] and match["key"] is None:
        raise TemperFSError(400, "InvalidPath", "$value needs an entity key")
    return Parsed(entity_set, ENTITY_SETS[entity_set], match["key"], bool(match["value"]))


@dataclass
class Answer:
    status: int
    body: dict[str, Any] | bytes | None = None
    content_type: str = "application/json"
    headers: dict[str, str] = field(default_factory=dict)


class TemperFSStore:
    """The tenants' workspaces and files. Thread-safe: one lock, never held across I/O."""

    def __init__(self, seed: int = 0) -> None:
        self._lock = threading.Lock()
        self._seed = seed
        self.reset()

    def reset(self) -> None:
        with self._lock:
            self._entities: dict[tuple[str, str, str], Entity] = {}
            self._requests: list[TemperFSRequest] = []
            self._rng = random.Random(f"temperfs:{self._seed}")

    # -- the routes ----------------------------------------------------------------------

    def handle(self, method: str, path: str, headers: dict[str, str], body: bytes) -> Answer:
        try:
            answer = self._handle(method, path, headers, body)
        except TemperFSError as exc:
            answer = Answer(exc.status, exc.body())
        logged = {k: headers[k] for k in _LOGGED_HEADERS if k in headers}
        with self._lock:
            self._requests.append(
                TemperFSRequest(method, "/tdata/" + path, logged, body, answer.status)
            )
        return answer

    def _handle(self, method: str, path: str, headers: dict[str, str], body: bytes) -> Answer:
        target = parse_path(path)
        tenant = headers.get("x-tenant-id") or DEFAULT_TENANT
        if method == "POST" and target.key is None:
            return self._create(tenant, target, body)
        if method == "PUT" and target.value:
            return self._put_value(
                tenant, target, body, headers.get("content-type", "application/octet-stream")
            )
        if method == "GET" and target.value:
            return self._get_value(tenant, target)
        if method == "GET" and target.key is not None:
            with self._lock:
                entity = self._find(tenant, target)
                return Answer(200, _annotated(entity, target))
        if method == "GET":
            with self._lock:
                values = [
                    _annotated(e, target)
                    for (t, kind, _), e in self._entities.items()
                    if t == tenant and kind == target.entity_type
                ]
            return Answer(
                200, {"@odata.context": f"$metadata#{target.entity_set}", "value": values}
            )
        raise TemperFSError(405, "MethodNotAllowed", f"{method} not supported for this path")

    def _create(self, tenant: str, target: Parsed, body: bytes) -> Answer:
        try:
            fields = json.loads(body or b"null")
        except ValueError as exc:
            raise TemperFSError(400, "InvalidBody", f"Invalid JSON body: {exc}") from exc
        if not isinstance(fields, dict):
            raise TemperFSError(400, "InvalidBody", "Invalid JSON body: expected an object")
        given = fields.get("id", fields.get("Id"))
        with self._lock:
            entity_id = (
                given
                if isinstance(given, str)
                else (
                    _PREFIX[target.entity_type]
                    + str(uuid.UUID(int=self._rng.getrandbits(128), version=4))
                )
            )
            key = (tenant, target.entity_type, entity_id)
            existing = self._entities.get(key)
            if existing is None:
                if target.entity_type == "File":
                    self._check_path_key(tenant, entity_id, fields)
                existing = Entity(
                    tenant,
                    target.entity_type,
                    entity_id,
                    _INITIAL_STATUS[target.entity_type],
                    dict(fields),
                )
                self._entities[key] = existing
            return Answer(201, _annotated(existing, target))

    def _check_path_key(self, tenant: str, entity_id: str, fields: dict[str, Any]) -> None:
        workspace = fields.get("workspace_id", fields.get("WorkspaceId"))
        path = fields.get("path", fields.get("Path"))
        if workspace is None or path is None:
            return
        for (t, kind, other_id), other in self._entities.items():
            if t != tenant or kind != "File" or other_id == entity_id:
                continue
            held = (
                other.fields.get("workspace_id", other.fields.get("WorkspaceId")),
                other.fields.get("path", other.fields.get("Path")),
            )
            if held == (workspace, path):
                raise TemperFSError(
                    409,
                    "DeclaredKeyConflict",
                    f"duplicate declared key 'ws_path' for File: held by {other_id}",
                )

    def _put_value(self, tenant: str, target: Parsed, body: bytes, content_type: str) -> Answer:
        if target.entity_type != "File":
            raise TemperFSError(
                400, "NoMediaStream", f"Entity type '{target.entity_type}' has no stream"
            )
        assert target.key is not None
        digest = hashlib.sha256(body).hexdigest()
        with self._lock:
            key = (tenant, "File", target.key)
            entity = self._entities.get(key)
            if entity is None:  # a brand-new File is created with its content
                entity = Entity(tenant, "File", target.key, "Created", {})
                self._entities[key] = entity
            entity.content = bytes(body)
            entity.content_type = content_type
            entity.content_hash = digest
            entity.version_count += 1
            entity.status = "Ready"
        return Answer(204, None, headers={"OData-Version": "4.0", "ETag": f'"{digest}"'})

    def _get_value(self, tenant: str, target: Parsed) -> Answer:
        with self._lock:
            entity = self._find(tenant, target)
            if entity.content is None:
                raise TemperFSError(
                    404,
                    "ResourceNotFound",
                    f"Entity '{target.entity_set}' with key '{target.key}' has no content",
                )
            return Answer(200, entity.content, entity.content_type or "application/octet-stream")

    def _find(self, tenant: str, target: Parsed) -> Entity:
        entity = self._entities.get((tenant, target.entity_type, target.key or ""))
        if entity is None:
            raise TemperFSError(
                404,
                "ResourceNotFound",
                f"Entity '{target.entity_set}' with key '{target.key}' not found",
            )
        return entity

    # -- reading (tests, control API) ----------------------------------------------------

    def entities(self, entity_type: str, tenant: str | None = None) -> list[Entity]:
        with self._lock:
            return [
                e
                for (t, kind, _), e in self._entities.items()
                if kind == entity_type and (tenant is None or t == tenant)
            ]

    def content(self, file_id: str, tenant: str = DEFAULT_TENANT) -> bytes | None:
        with self._lock:
            entity = self._entities.get((tenant, "File", file_id))
            return None if entity is None else entity.content

    def requests(self) -> list[TemperFSRequest]:
        with self._lock:
            return list(self._requests)

    def counts(self) -> tuple[int, int, int]:
        """(workspaces, files, requests)."""
        with self._lock:
            kinds = [kind for (_, kind, _) in self._entities]
            return kinds.count("Workspace"), kinds.count("File"), len(self._requests)

    def to_json(self) -> dict[str, Any]:
        return {
            "workspaces": [e.to_json() for e in self.entities("Workspace")],
            "files": [e.to_json() for e in self.entities("File")],
            "requests": [r.to_json() for r in self.requests()],
        }


def _annotated(entity: Entity, target: Parsed) -> dict[str, Any]:
    body = entity.state()
    body["@odata.context"] = f"$metadata#{target.entity_set}/$entity"
    body["@odata.id"] = f"{target.entity_set}('{entity.entity_id}')"
    return body
