"""`memory://`: an in-process backend, for tests, simulations and single-process hosts."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from host.storage.base import (
    Entry,
    StorageConflict,
    check_key,
    check_ttl,
    check_value,
)


def _wall_clock_ms() -> int:
    return time.time_ns() // 1_000_000


class MemoryBackend:
    def __init__(self, clock: Callable[[], int] = _wall_clock_ms) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        # (namespace, key) -> (value, version, expires_at_ms or None)
        self._data: dict[tuple[str, str], tuple[bytes, int, int | None]] = {}
        self._next_version = 1

    def now_ms(self) -> int:
        return self._clock()

    def _live(self, slot: tuple[str, str], now: int) -> tuple[bytes, int, int | None] | None:
        found = self._data.get(slot)
        if found is not None and found[2] is not None and found[2] <= now:
            del self._data[slot]
            return None
        return found

    def get(self, namespace: str, key: str) -> Entry | None:
        check_key(key)
        with self._lock:
            found = self._live((namespace, key), self._clock())
        return None if found is None else Entry(found[0], found[1])

    def compare_and_swap(
        self,
        namespace: str,
        key: str,
        expected_version: int | None,
        value: bytes,
        ttl_ms: int | None,
    ) -> int:
        check_key(key)
        check_value(value)
        check_ttl(ttl_ms)
        with self._lock:
            now = self._clock()
            slot = (namespace, key)
            found = self._live(slot, now)
            current = None if found is None else found[1]
            if current != expected_version:
                raise StorageConflict(key)
            version = self._next_version
            self._next_version += 1
            self._data[slot] = (bytes(value), version, None if ttl_ms is None else now + ttl_ms)
            return version

    def delete(self, namespace: str, key: str, expected_version: int | None) -> bool:
        check_key(key)
        with self._lock:
            slot = (namespace, key)
            found = self._live(slot, self._clock())
            if found is None:
                return False
            if expected_version is not None and found[1] != expected_version:
                raise StorageConflict(key)
            del self._data[slot]
            return True

    def keys(self, namespace: str) -> list[str]:
        """Live keys of a namespace (for inspection and tests; not part of the contract)."""
        with self._lock:
            now = self._clock()
            return sorted(
                key
                for (ns, key) in list(self._data)
                if ns == namespace and self._live((ns, key), now) is not None
            )

    def close(self) -> None:
        pass
