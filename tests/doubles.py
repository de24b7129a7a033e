"""Test doubles for the host's services (never shipped in the installed package)."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any

from host.services.telemetry import InvocationTag
from host.storage.base import StorageBackend
from provisioner.ports import Entry, LogLevel


@dataclass
class RecordingTelemetrySink:
    """Keeps everything, for tests and reports."""

    logs: list[tuple[InvocationTag, LogLevel, str]] = field(default_factory=list)
    events: list[tuple[InvocationTag, dict[str, Any]]] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def log(self, tag: InvocationTag, level: LogLevel, message: str) -> None:
        with self._lock:
            self.logs.append((tag, level, message))

    def progress(self, tag: InvocationTag, event: dict[str, Any]) -> None:
        with self._lock:
            self.events.append((tag, event))


class InterposedBackend:
    """A storage backend that hands every call on to `inner`, calling `before` first with
    the operation and the key: the seam where a test makes storage fail, or lets another
    invocation decide between this one's read and its write."""

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
        pass  # the inner backend belongs to the test that made it
