"""The storage backend contract, and the one base class that checks every call's arguments.

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
- A backend failure raises StorageUnavailable and changes nothing. Every failure of a call
  is a StorageError (the guest adapter maps those; anything else would trap the guest).

`StorageBackend` is the contract the host consumes (wrappers such as counting proxies only
need its shape). `CheckedBackend` is the base every backend here derives from, as in the
`limits` library's `Storage` base (alisaifee/limits, limits/storage/base.py): it runs the
shared checks (key length and characters, namespace characters, value size, TTL) before
anything reaches a subclass, normalises a TTL too long to matter into "no expiry", and
registers the subclass under its URI schemes (`host.storage.registry`). A subclass writes
only its primitives: `_get`, `_compare_and_swap`, `_delete`, `_keys`, `now_ms`, `close`
and `from_uri`.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar, Protocol, Self

from host.storage import registry
from provisioner.ports import (
    Entry,
    StorageConflict,
    StorageError,
    StorageInvalidKey,
    StorageTooLarge,
    StorageUnavailable,
)

__all__ = [
    "FOREVER_MS",
    "MAX_KEY_BYTES",
    "MAX_VALUE_BYTES",
    "CheckedBackend",
    "Clock",
    "Entry",
    "StorageBackend",
    "StorageConflict",
    "StorageError",
    "StorageInvalidKey",
    "StorageTooLarge",
    "StorageUnavailable",
    "Write",
    "check_key",
    "check_namespace",
    "check_ttl",
    "check_value",
]

MAX_KEY_BYTES = 512
MAX_VALUE_BYTES = 256 * 1024
# A TTL this long (about 31,700 years) is "forever": it keeps `now + ttl` inside 64-bit
# integers (SQLite) and inside what Redis PEXPIRE accepts. The guest may pass any u64.
FOREVER_MS = 10**15
_CONTROL_CHARACTERS = re.compile("[\x00-\x1f\x7f]")

Clock = Callable[[], int]
"""A clock in milliseconds."""


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


def check_namespace(namespace: str) -> None:
    # The host makes namespaces (host.services.namespaces percent-encodes names), so a control
    # character here is a host bug; it is refused like a key's rather than stored.
    if _CONTROL_CHARACTERS.search(namespace):
        raise StorageInvalidKey("namespace holds control characters")


def check_value(value: bytes) -> None:
    if len(value) > MAX_VALUE_BYTES:
        raise StorageTooLarge(MAX_VALUE_BYTES)


def check_ttl(ttl_ms: int | None) -> None:
    if ttl_ms is not None and ttl_ms <= 0:
        raise StorageInvalidKey("ttl must be positive")


@dataclass(frozen=True, slots=True)
class Write:
    """A compare-and-swap that passed the shared checks, as a backend's primitive gets it."""

    namespace: str
    key: str
    expected_version: int | None
    """The live version the write requires; None: the key must be absent."""
    value: bytes
    ttl_ms: int | None
    """None (no expiry), or positive and below FOREVER_MS."""


class CheckedBackend(ABC):
    """A storage backend: the shared checks here, the primitives in the subclass.

    A subclass that sets `schemes` is registered under them, so `storage_from_uri` finds it.
    The primitives may assume a valid namespace and key; a write comes as a `Write`, its
    value within the size limit and its TTL bounded.
    """

    schemes: ClassVar[tuple[str, ...]] = ()
    """The URI schemes this backend serves (lower case, without `://`)."""

    def __init_subclass__(cls, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        if "schemes" in cls.__dict__:
            registry.register(cls)

    @classmethod
    @abstractmethod
    def from_uri(cls, uri: str, *, clock: Clock | None = None) -> Self:
        """A backend from a storage URI of one of `schemes` (see `host.storage`).

        A malformed URI raises ValueError (StorageURIError)."""

    def get(self, namespace: str, key: str) -> Entry | None:
        check_namespace(namespace)
        check_key(key)
        return self._get(namespace, key)

    def compare_and_swap(
        self,
        namespace: str,
        key: str,
        expected_version: int | None,
        value: bytes,
        ttl_ms: int | None,
    ) -> int:
        check_namespace(namespace)
        check_key(key)
        check_value(value)
        check_ttl(ttl_ms)
        lasting = None if ttl_ms is None or ttl_ms >= FOREVER_MS else ttl_ms
        return self._compare_and_swap(
            Write(namespace, key, expected_version, bytes(value), lasting)
        )

    def delete(self, namespace: str, key: str, expected_version: int | None) -> bool:
        check_namespace(namespace)
        check_key(key)
        return self._delete(namespace, key, expected_version)

    def keys(self, namespace: str) -> list[str]:
        """Live keys of a namespace, sorted (for inspection and tests; not the contract)."""
        check_namespace(namespace)
        return sorted(self._keys(namespace))

    @abstractmethod
    def now_ms(self) -> int: ...

    @abstractmethod
    def close(self) -> None: ...

    @abstractmethod
    def _get(self, namespace: str, key: str) -> Entry | None: ...

    @abstractmethod
    def _compare_and_swap(self, write: Write) -> int:
        """Store `write` if the key's live version is its expected one, else conflict."""

    @abstractmethod
    def _delete(self, namespace: str, key: str, expected_version: int | None) -> bool: ...

    @abstractmethod
    def _keys(self, namespace: str) -> list[str]: ...
