"""Host storage backends, chosen by URI through a scheme registry, as in the `limits` library.

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
- `redis+cluster://[[user]:password@]host:port[,host:port…][/0]` — Redis Cluster
  (`RedisClusterBackend`, the scheme `limits` uses): any reachable nodes of the cluster,
  comma-separated; the rest is discovered. The same options as `redis://`.

An unknown scheme raises `UnknownStorageScheme`, which names the known ones; any malformed
URI raises `StorageURIError`; both are ValueErrors. `known_schemes()` lists the schemes.
A backend class registers itself by deriving from `CheckedBackend` with `schemes` set.

`clock` (milliseconds) replaces the wall clock of `memory://` and `sqlite://`, for tests and
simulations. Redis takes time from the Redis server, which also expires its keys, so a
clock cannot be injected there: passing one is a ValueError.
"""

from __future__ import annotations

from host.storage.base import CheckedBackend, Clock, StorageBackend
from host.storage.memory import MemoryBackend
from host.storage.registry import (
    StorageURIError,
    UnknownStorageScheme,
    backend_for,
    known_schemes,
)
from host.storage.sqlite import SqliteBackend

__all__ = [
    "CheckedBackend",
    "MemoryBackend",
    "SqliteBackend",
    "StorageBackend",
    "StorageURIError",
    "UnknownStorageScheme",
    "known_schemes",
    "storage_from_uri",
]


def storage_from_uri(uri: str, *, clock: Clock | None = None) -> CheckedBackend:
    """The backend a storage URI names (see the module docstring for the schemes)."""
    return backend_for(uri).from_uri(uri, clock=clock)
