"""The ports: every effect the guest has goes through one of these.

Inside the component they are bound to the WIT imports (`provisioner.component`); in
native tests and simulations they are bound to in-process fakes. The guest never reads
the wall clock or OS randomness, never prints, and never touches the network directly.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Any, Protocol


class Scope(Enum):
    """Which namespace a key lives in; the host decides what each one maps to."""

    TENANT = "tenant"
    ACCOUNT = "account"


@dataclass(frozen=True, slots=True)
class Entry:
    value: bytes
    version: int


class StorageError(Exception):
    """Base of every storage failure the guest sees."""


class StorageConflict(StorageError):
    """The key's version moved (or it exists when it had to be absent)."""


class StorageUnavailable(StorageError):
    """The backend failed or could not be reached; nothing was changed."""


class StorageInvalidKey(StorageError):
    """The key was refused by the host."""


class StorageTooLarge(StorageError):
    """The value exceeds the host's size limit."""

    def __init__(self, limit: int) -> None:
        super().__init__(f"value larger than the storage limit of {limit} bytes")
        self.limit = limit


class StorageReader(Protocol):
    """The reading half of `Storage`: all that an inspection needs."""

    def get(self, scope: Scope, key: str) -> Entry | None: ...


class Storage(StorageReader, Protocol):
    def compare_and_swap(
        self,
        scope: Scope,
        key: str,
        expected_version: int | None,
        value: bytes,
        ttl_ms: int | None,
    ) -> int:
        """Write if the version is `expected_version` (None: must be absent); return the
        new version, or raise StorageConflict."""
        ...

    def delete(self, scope: Scope, key: str, expected_version: int | None) -> bool:
        """Delete if the version matches (None: unconditionally); False when absent."""
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
        for key, value in self.headers:
            if key.lower() == wanted:
                return value
        return None


class HttpErrorKind(Enum):
    DENIED = "denied"
    TIMEOUT = "timeout"
    CONNECTION = "connection"
    TOO_LARGE = "too_large"
    INVALID_REQUEST = "invalid_request"


class HttpError(Exception):
    """The request produced no HTTP response."""

    def __init__(self, kind: HttpErrorKind, detail: str = "") -> None:
        super().__init__(f"{kind.value}: {detail}" if detail else kind.value)
        self.kind = kind
        self.detail = detail


class Http(Protocol):
    def send(self, request: HttpRequest) -> HttpResponse:
        """Return the response, whatever its status, or raise HttpError."""
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

    def uniform(self) -> float:
        """A float in [0, 1) from the host's randomness."""
        return (self.random.next_u64() >> 11) / float(1 << 53)
