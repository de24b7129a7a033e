"""Where the guest's logs and progress events go."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from provisioner.ports import LogLevel

_LOG = logging.getLogger("sandbox_provisioner.guest")
_PY_LEVELS = {
    LogLevel.DEBUG: logging.DEBUG,
    LogLevel.INFO: logging.INFO,
    LogLevel.WARN: logging.WARNING,
    LogLevel.ERROR: logging.ERROR,
}


@dataclass(frozen=True)
class InvocationTag:
    """Who an event is about."""

    tenant: str
    entity_type: str
    entity_id: str
    trace_id: str


class TelemetrySink(Protocol):
    def log(self, tag: InvocationTag, level: LogLevel, message: str) -> None: ...

    def progress(self, tag: InvocationTag, event: dict[str, Any]) -> None: ...


class LoggingTelemetry:
    """Logs through the `logging` module; progress events at debug level."""

    def __init__(self, on_progress: Callable[[InvocationTag, dict[str, Any]], None] | None = None):
        self._on_progress = on_progress

    def log(self, tag: InvocationTag, level: LogLevel, message: str) -> None:
        _LOG.log(
            _PY_LEVELS[level], "[%s %s/%s] %s", tag.tenant, tag.entity_type, tag.entity_id, message
        )

    def progress(self, tag: InvocationTag, event: dict[str, Any]) -> None:
        _LOG.debug("[%s %s/%s] progress %s", tag.tenant, tag.entity_type, tag.entity_id, event)
        if self._on_progress is not None:
            self._on_progress(tag, event)
