"""The ports: every effect the guest has goes through one of these (bound to the WIT imports
in `provisioner.component`, to in-process fakes in native tests and simulations)."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from enum import Enum
from typing import Any, Protocol


class Scope(Enum):
    TENANT = "tenant"
    ACCOUNT = "account"


@dataclass(frozen=True, slots=True)
class Entry:
    value: bytes
    version: int


class StorageError(Exception): ...


class StorageConflict(StorageError):
    """The key's version moved (or it exists when it had to be absent)."""


class StorageUnavailable(StorageError):
    """Nothing was changed."""


class StorageInvalidKey(StorageError): ...


class StorageTooLarge(StorageError):
    def __init__(self, limit: int) -> None:
        super().__init__(f"value larger than the storage limit of {limit} bytes")
        self.limit = limit


class StorageReader(Protocol):
    def get(self, scope: Scope, key: str) -> Entry | None: ...


class Storage(StorageReader, Protocol):
    def compare_and_swap(
        self, scope: Scope, key: str, expected_version: int | None, value: bytes, ttl_ms: int | None
    ) -> int:
        """The new version; `expected_version` None: the key must be absent."""
        ...

    def delete(self, scope: Scope, key: str, expected_version: int | None) -> bool:
        """`expected_version` None: unconditionally; False when absent."""
        ...


@dataclass(frozen=True, slots=True)
class HttpRequest:
    method: str
    url: str
    headers: tuple[tuple[str, str], ...]
    body: bytes
    timeout_ms: int


@dataclass(frozen=True, slots=True)
class HttpResponse:
    status: int
    headers: tuple[tuple[str, str], ...]
    body: bytes

    def header(self, name: str) -> str | None:
        wanted = name.lower()
        return next((value for key, value in self.headers if key.lower() == wanted), None)


class HttpErrorKind(Enum):
    DENIED = "denied"
    TIMEOUT = "timeout"
    CONNECTION = "connection"
    TOO_LARGE = "too_large"
    INVALID_REQUEST = "invalid_request"


class HttpError(Exception):
    def __init__(self, kind: HttpErrorKind, detail: str = "") -> None:
        super().__init__(f"{kind.value}: {detail}" if detail else kind.value)
        self.kind = kind
        self.detail = detail


class Http(Protocol):
    def send(self, request: HttpRequest) -> HttpResponse:
        """The response, whatever its status; HttpError when there is none."""
        ...


class Clock(Protocol):
    def now_ms(self) -> int: ...


class Random(Protocol):
    def next_u64(self) -> int: ...


class LogLevel(Enum):
    DEBUG = "debug"
    INFO = "info"
    WARN = "warn"
    ERROR = "error"


class Telemetry(Protocol):
    def log(self, level: LogLevel, message: str) -> None: ...

    def progress(self, event: dict[str, Any]) -> None: ...


@dataclass(frozen=True, slots=True)
class Ports:
    storage: Storage
    http: Http
    clock: Clock
    random: Random
    telemetry: Telemetry

    def progress(self, event: dict[str, Any]) -> None:
        # Best effort: an event that cannot be told must not fail the decision it reports.
        with contextlib.suppress(Exception):
            self.telemetry.progress(event)

    def uniform(self) -> float:
        return (self.random.next_u64() >> 11) / float(1 << 53)
