"""Test doubles for the host's services (never shipped in the installed package)."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any

from host.services.telemetry import InvocationTag
from host.storage.forwarding import ForwardingBackend
from provisioner.ports import LogLevel


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


class InterposedBackend(ForwardingBackend):
    """A storage backend that hands every call on to `inner`, calling `before` first with
    the operation and the key: the seam where a test makes storage fail, or lets another
    invocation decide between this one's read and its write."""

    def close(self) -> None:
        pass  # the inner backend belongs to the test that made it
