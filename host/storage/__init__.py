"""Host storage backends, chosen by URI like the `limits` library's storage URIs.

Accepted URIs:
- `memory://` — in-process (`MemoryBackend`); nothing after the scheme is allowed.
- `sqlite:///abs/path/state.db` — a SQLite file at an absolute path (`SqliteBackend`);
  `sqlite:////abs/path/state.db` (SQLAlchemy's spelling) means the same file.
- `sqlite://relative/path/state.db` — a SQLite file relative to the current directory.
  Parent directories are created. Option: `?busy_timeout_ms=N` (default 5000), how long
  a writer waits for another writer's lock before StorageUnavailable.
- `redis://[[user]:password@]host[:port][/db]` and `rediss://…` — Redis (`RedisBackend`).
  Query options are redis-py's (`socket_timeout`, `socket_connect_timeout`,
  `max_connections`, `health_check_interval`, …) plus this project's `key_prefix`
  (default `sandbox-provisioner:`) and `clock_refresh_ms` (default 1000).

`clock` (milliseconds) replaces the wall clock of `memory://` and `sqlite://`, for tests and
simulations. Redis takes time from the Redis server, which also expires its keys, so a
clock cannot be injected there: passing one is a ValueError.
"""

from __future__ import annotations

from collections.abc import Callable
from urllib.parse import parse_qsl, urlsplit

from host.storage.base import StorageBackend
from host.storage.memory import MemoryBackend
from host.storage.sqlite import DEFAULT_BUSY_TIMEOUT_MS, SqliteBackend

__all__ = ["MemoryBackend", "SqliteBackend", "StorageBackend", "storage_from_uri"]

SCHEMES = ("memory", "sqlite", "redis", "rediss")


def storage_from_uri(uri: str, *, clock: Callable[[], int] | None = None) -> StorageBackend:
    scheme, sep, rest = uri.partition("://")
    scheme = scheme.lower()
    if not sep or scheme not in SCHEMES:
        raise ValueError(
            f"unsupported storage URI {uri!r}: expected one of "
            + ", ".join(f"{name}://" for name in SCHEMES)
        )
    if scheme == "memory":
        if rest:
            raise ValueError(f"memory:// takes nothing after the scheme, got {uri!r}")
        return MemoryBackend() if clock is None else MemoryBackend(clock)
    if scheme == "sqlite":
        return _sqlite_from_uri(uri, clock)
    if clock is not None:
        raise ValueError("a redis:// backend takes time from the Redis server; it accepts no clock")
    # Imported here so that hosts without Redis never import redis-py.
    from host.storage.redis import RedisBackend

    return RedisBackend.from_url(uri)


def _sqlite_from_uri(uri: str, clock: Callable[[], int] | None) -> SqliteBackend:
    parts = urlsplit(uri)
    path = parts.netloc + parts.path
    if path.startswith("//"):
        # `sqlite:////abs/path` (SQLAlchemy's spelling of an absolute path) means /abs/path.
        path = "/" + path.lstrip("/")
    if not path or path == "/":
        raise ValueError(f"sqlite URI names no file: {uri!r}")
    if parts.fragment:
        raise ValueError(f"sqlite URI must not have a fragment: {uri!r}")
    busy_timeout_ms = DEFAULT_BUSY_TIMEOUT_MS
    for name, value in parse_qsl(parts.query, keep_blank_values=True, strict_parsing=False):
        if name != "busy_timeout_ms":
            raise ValueError(f"unknown sqlite URI option {name!r} in {uri!r}")
        try:
            busy_timeout_ms = int(value)
        except ValueError:
            raise ValueError(f"busy_timeout_ms must be an integer, got {value!r}") from None
        if busy_timeout_ms < 0:
            raise ValueError(f"busy_timeout_ms must not be negative, got {value!r}")
    return SqliteBackend(path, clock=clock, busy_timeout_ms=busy_timeout_ms)
