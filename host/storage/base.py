"""The storage backend contract every host backend implements.

Semantics (checked by the conformance tests in tests/test_storage_backends.py):
- Keys live in namespaces; the host, never the guest, chooses the namespace.
- A version is an integer that never repeats for a key: not after a delete, not after a
  TTL expiry. That rules out the ABA problem for compare-and-swap.
- `compare_and_swap` with `expected_version=None` succeeds only when the key is absent.
- `delete` with a version deletes only at that version (else StorageConflict); an absent
  key deletes nothing and returns False.
- `ttl_ms` makes a key vanish after that many milliseconds of the backend's clock.
- `now_ms` is the backend's clock: the one source of time for TTLs and for the guest's
  lease expiries, so several hosts sharing one backend agree on time.
- A backend failure raises StorageUnavailable and changes nothing.
"""

from __future__ import annotations

import re
from typing import Protocol

from provisioner.ports import (
    Entry,
    StorageConflict,
    StorageError,
    StorageInvalidKey,
    StorageTooLarge,
    StorageUnavailable,
)

__all__ = [
    "MAX_KEY_BYTES",
    "MAX_VALUE_BYTES",
    "Entry",
    "StorageBackend",
    "StorageConflict",
    "StorageError",
    "StorageInvalidKey",
    "StorageTooLarge",
    "StorageUnavailable",
    "check_key",
    "check_value",
]

MAX_KEY_BYTES = 512
_CONTROL_CHARACTERS = re.compile("[\x00-\x1f\x7f]")
MAX_VALUE_BYTES = 256 * 1024


class StorageBackend(Protocol):
    def get(self, namespace: str, key: str) -> Entry | None: ...

    def compare_and_swap(
        self,
        namespace: str,
        key: str,
        expected_version: int | None,
        value: bytes,
        ttl_ms: int | None,
    ) -> int: ...

    def delete(self, namespace: str, key: str, expected_version: int | None) -> bool: ...

    def now_ms(self) -> int: ...

    def close(self) -> None: ...


def check_key(key: str) -> None:
    if not key:
        raise StorageInvalidKey("empty key")
    if len(key.encode("utf-8", "surrogatepass")) > MAX_KEY_BYTES:
        raise StorageInvalidKey(f"key longer than {MAX_KEY_BYTES} bytes")
    if _CONTROL_CHARACTERS.search(key):
        raise StorageInvalidKey("key holds control characters")


def check_value(value: bytes) -> None:
    if len(value) > MAX_VALUE_BYTES:
        raise StorageTooLarge(MAX_VALUE_BYTES)


def check_ttl(ttl_ms: int | None) -> None:
    if ttl_ms is not None and ttl_ms <= 0:
        raise StorageInvalidKey("ttl must be positive")
