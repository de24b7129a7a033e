"""A storage backend wrapper that counts what crosses the storage boundary."""

from __future__ import annotations

import threading

from host.storage.base import StorageBackend
from host.storage.forwarding import ForwardingBackend
from provisioner.ports import Entry, StorageConflict


class CountingBackend(ForwardingBackend):
    """Counts operations, bytes moved (keys and values), compare-and-swaps and the ones
    that lost to a concurrent writer. Safe to share between threads."""

    def __init__(self, inner: StorageBackend) -> None:
        super().__init__(inner)
        self.ops = 0
        self.bytes = 0
        self.swaps = 0
        self.conflicts = 0
        self._lock = threading.Lock()

    def _count(self, moved: int, *, swap: bool = False, lost: bool = False) -> None:
        with self._lock:
            self.ops += 1
            self.bytes += moved
            self.swaps += swap
            self.conflicts += lost

    def get(self, namespace: str, key: str) -> Entry | None:
        found = self.inner.get(namespace, key)
        self._count(len(key) + (0 if found is None else len(found.value)))
        return found

    def compare_and_swap(
        self, namespace: str, key: str, expected: int | None, value: bytes, ttl: int | None
    ) -> int:
        try:
            version = self.inner.compare_and_swap(namespace, key, expected, value, ttl)
        except StorageConflict:
            self._count(len(key) + len(value), swap=True, lost=True)
            raise
        self._count(len(key) + len(value), swap=True)
        return version

    def delete(self, namespace: str, key: str, expected: int | None) -> bool:
        self._count(len(key))
        return self.inner.delete(namespace, key, expected)
