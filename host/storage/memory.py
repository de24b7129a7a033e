"""`memory://`: an in-process backend, for tests, simulations and single-process hosts."""

from __future__ import annotations

import threading
import time
from typing import Self

from host.storage.base import CheckedBackend, Clock, Entry, StorageConflict, Write
from host.storage.registry import StorageURIError


def _wall_clock_ms() -> int:
    return time.time_ns() // 1_000_000


class MemoryBackend(CheckedBackend):
    schemes = ("memory",)

    def __init__(self, clock: Clock = _wall_clock_ms) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        # (namespace, key) -> (value, version, expires_at_ms or None)
        self._data: dict[tuple[str, str], tuple[bytes, int, int | None]] = {}
        self._next_version = 1

    @classmethod
    def from_uri(cls, uri: str, *, clock: Clock | None = None) -> Self:
        if uri.partition("://")[2]:
            raise StorageURIError(f"memory:// takes nothing after the scheme, got {uri!r}")
        return cls() if clock is None else cls(clock)

    def now_ms(self) -> int:
        return self._clock()

    def close(self) -> None:
        pass

    def _live(self, slot: tuple[str, str], now: int) -> tuple[bytes, int, int | None] | None:
        found = self._data.get(slot)
        if found is not None and found[2] is not None and found[2] <= now:
            del self._data[slot]
            return None
        return found

    def _get(self, namespace: str, key: str) -> Entry | None:
        with self._lock:
            found = self._live((namespace, key), self._clock())
        return None if found is None else Entry(found[0], found[1])

    def _compare_and_swap(self, write: Write) -> int:
        with self._lock:
            now = self._clock()
            slot = (write.namespace, write.key)
            found = self._live(slot, now)
            if (None if found is None else found[1]) != write.expected_version:
                raise StorageConflict(write.key)
            version = self._next_version
            self._next_version += 1
            expires_at = None if write.ttl_ms is None else now + write.ttl_ms
            self._data[slot] = (write.value, version, expires_at)
            return version

    def _delete(self, namespace: str, key: str, expected_version: int | None) -> bool:
        with self._lock:
            slot = (namespace, key)
            found = self._live(slot, self._clock())
            if found is None:
                return False
            if expected_version is not None and found[1] != expected_version:
                raise StorageConflict(key)
            del self._data[slot]
            return True

    def _keys(self, namespace: str) -> list[str]:
        with self._lock:
            now = self._clock()
            return [
                key
                for (ns, key) in list(self._data)
                if ns == namespace and self._live((ns, key), now) is not None
            ]
