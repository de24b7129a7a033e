"""One record per entity, under the tenant scope: `pending` (a cycle has begun; its nonce
fixes the E2B idempotency key, so a retried create adopts the first attempt's sandbox) or
`ready` (a repeated Provision returns it). Release deletes it: the next cycle has a new key.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

from provisioner.model import fields_of
from provisioner.ports import Scope, Storage

# "type/id" made of characters `quote` leaves alone: its quoting is known without calling it.
_PLAIN_ENTITY = re.compile(r"[A-Za-z0-9_.~-]+/[A-Za-z0-9_.~-]+")

PENDING = "pending"
READY = "ready"


@dataclass(frozen=True, slots=True)
class EntityRecord:
    state: str
    nonce: str
    since_ms: int
    attempts: int = 0
    sandbox_id: str = ""
    template_id: str = ""
    client_id: str = ""
    envd_version: str = ""
    queued_ms: int = 0
    sandbox_url: str = ""

    def encode(self) -> bytes:
        return json.dumps(fields_of(self), separators=(",", ":")).encode()

    @classmethod
    def decode(cls, raw: bytes) -> EntityRecord:
        data: dict[str, Any] = json.loads(raw.decode())  # str: json skips sniffing the encoding
        try:
            return cls(**data)
        except TypeError:  # a key this version does not know: keep the ones it does
            return cls(**{key: data[key] for key in cls.__dataclass_fields__ if key in data})


def idempotency_key(tenant: str, entity: str, nonce: str) -> str:
    """E2B accepts 1-255 of [a-z0-9-]: a digest of who asks and which cycle this is."""
    digest = hashlib.sha256(f"{tenant}\0{entity}\0{nonce}".encode()).hexdigest()
    return "tsp-" + digest[:48]


class EntityRecords:
    def __init__(self, storage: Storage) -> None:
        self._storage = storage

    @staticmethod
    def key(entity: str) -> str:
        if _PLAIN_ENTITY.fullmatch(entity):
            return "entity/" + entity.replace("/", "%2F")
        return "entity/" + quote(entity, safe="")

    def load(self, entity: str) -> tuple[EntityRecord, int] | None:
        entry = self._storage.get(Scope.TENANT, self.key(entity))
        return None if entry is None else (EntityRecord.decode(entry.value), entry.version)

    def put(
        self, entity: str, record: EntityRecord, expected_version: int | None, ttl_ms: int
    ) -> int:
        return self._storage.compare_and_swap(
            Scope.TENANT, self.key(entity), expected_version, record.encode(), ttl_ms
        )

    def remove(self, entity: str, expected_version: int) -> bool:
        return self._storage.delete(Scope.TENANT, self.key(entity), expected_version)
