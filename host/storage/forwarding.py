"""A storage backend that wraps another: the base of every wrapper that refuses, counts or
interleaves what crosses the storage boundary."""

from __future__ import annotations

from host.storage.base import StorageBackend
from provisioner.ports import Entry

__all__ = ["ForwardingBackend"]


class ForwardingBackend:
    """Hands every call on to `inner`, calling `before` first with the operation and the
    key of each get, compare_and_swap and delete; closing it closes `inner`."""

    def __init__(self, inner: StorageBackend) -> None:
        self.inner = inner

    def before(self, operation: str, key: str) -> None:
        """Runs before each get, compare_and_swap and delete; does nothing here."""

    def get(self, namespace: str, key: str) -> Entry | None:
        self.before("get", key)
        return self.inner.get(namespace, key)

    def compare_and_swap(
        self,
        namespace: str,
        key: str,
        expected_version: int | None,
        value: bytes,
        ttl_ms: int | None,
    ) -> int:
        self.before("compare_and_swap", key)
        return self.inner.compare_and_swap(namespace, key, expected_version, value, ttl_ms)

    def delete(self, namespace: str, key: str, expected_version: int | None) -> bool:
        self.before("delete", key)
        return self.inner.delete(namespace, key, expected_version)

    def now_ms(self) -> int:
        return self.inner.now_ms()

    def close(self) -> None:
        self.inner.close()
