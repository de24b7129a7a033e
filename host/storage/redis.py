"""`redis://host:port/db`: the backend several hosts share.

Layout: one hash per entry, `{prefix}e:{namespace percent-encoded}:{key}` with fields
`value` and `version`, plus one counter `{prefix}version` that hands out versions.
(`redis+cluster://`, in `host.storage.redis_cluster`, lays keys out by hash slot instead.)

Atomicity: compare-and-swap and delete-if-version are Lua scripts (`host/storage/lua/*.lua`,
package data, read once per process), so the read-compare-write runs as one step on the
server; `get` is one HMGET, atomic by itself. A script either runs whole or not at all, so
there is never a partial write.

Versions never repeat. They come from INCR on the counter, in the same script as the write.
If the counter is lost (Redis restarted without persistence, or flushed) the script reseeds
it from the server's clock in microseconds; versions issued before the loss are below that
unless more than one version per microsecond was ever issued on average, which Redis cannot
do. So a guest holding a version from before the loss cannot compare-and-swap on top of a
different entry after it (no ABA).

Time: `now_ms()` is the Redis server's clock (TIME), the same clock Redis uses to expire
keys (PEXPIRE). Several hosts sharing one Redis thus agree on lease expiries whatever their
own clocks say. Asking TIME on every call costs a round trip, so the backend keeps the
offset between the server's clock and the local monotonic clock and refreshes it every
`clock_refresh_ms` (default 1 s); between refreshes local monotonic time only drifts by
parts per million. `now_ms()` never goes backwards and never raises: when Redis cannot be
reached it goes on from the last known offset (or the local wall clock if Redis was never
reached), because a clock has no error channel and every storage call fails meanwhile.

Failures: short socket timeouts (1 s by default) and one immediate retry on a dropped
connection (a pooled connection is stale after a Redis restart). Any Redis error raises
StorageUnavailable; the backend recovers by itself when Redis answers again. When a
connection drops after a script was sent, its outcome is unknown: the caller sees
StorageUnavailable (or, after the retry, StorageConflict if the first attempt had written),
as with any networked store; the guest re-reads before acting.
"""

from __future__ import annotations

import threading
import time
from abc import abstractmethod
from collections.abc import Callable, Iterable
from typing import Generic, Self, TypeVar
from urllib.parse import parse_qsl, quote, urlencode, urlsplit, urlunsplit

import redis
from redis.backoff import NoBackoff
from redis.cluster import RedisCluster
from redis.exceptions import RedisClusterException
from redis.retry import Retry

from host.storage.base import (
    CheckedBackend,
    Clock,
    Entry,
    StorageConflict,
    StorageUnavailable,
    Write,
)
from host.storage.lua import script
from host.storage.registry import StorageURIError

__all__ = ["DEFAULT_CLOCK_REFRESH_MS", "DEFAULT_KEY_PREFIX", "RedisBackend", "RedisBackendBase"]

DEFAULT_KEY_PREFIX = "sandbox-provisioner:"
DEFAULT_SOCKET_TIMEOUT_S = 1.0
DEFAULT_CLOCK_REFRESH_MS = 1_000

_OWN_URL_OPTIONS = ("key_prefix", "clock_refresh_ms")

T = TypeVar("T")
ClientT = TypeVar("ClientT", redis.Redis, RedisCluster)


class UrlOptions:
    """A Redis URL split into this project's options and the query left for redis-py."""

    def __init__(self, url: str) -> None:
        self.parts = urlsplit(url)
        own: dict[str, str] = {}
        passed: list[tuple[str, str]] = []
        for name, value in parse_qsl(self.parts.query, keep_blank_values=True):
            if name == "decode_responses":
                raise StorageURIError("decode_responses cannot be set: values are bytes")
            if name in _OWN_URL_OPTIONS:
                own[name] = value
            else:
                passed.append((name, value))
        self.redis_query = urlencode(passed)
        # parse_qsl has already percent-decoded the value: decoding again would be wrong.
        self.key_prefix = own.get("key_prefix", DEFAULT_KEY_PREFIX)
        try:
            self.clock_refresh_ms = int(own.get("clock_refresh_ms", DEFAULT_CLOCK_REFRESH_MS))
        except ValueError:
            raise StorageURIError(f"clock_refresh_ms must be an integer in {url!r}") from None


class RedisBackendBase(CheckedBackend, Generic[ClientT]):
    """What plain Redis and Redis Cluster share: the scripts, the reads, the server clock.

    A subclass says where keys live (`_entry_key`, `_counter_key`), how to list a
    namespace's keys and how to read the server's clock."""

    def __init__(
        self,
        client: ClientT,
        *,
        key_prefix: str = DEFAULT_KEY_PREFIX,
        clock_refresh_ms: int = DEFAULT_CLOCK_REFRESH_MS,
    ) -> None:
        if clock_refresh_ms < 0:
            raise ValueError("clock_refresh_ms must not be negative")
        self._check_key_prefix(key_prefix)
        self._client: ClientT = client
        self._prefix = key_prefix
        # Registering only hashes the text; the script is sent on its first use (EVALSHA,
        # then EVAL on a server that does not know it yet).
        self._cas = client.register_script(script("compare_and_swap"))
        self._delete_script = client.register_script(script("delete"))
        self._time_script = client.register_script(script("server_time"))
        self._clock_refresh_ns = clock_refresh_ms * 1_000_000
        self._clock_lock = threading.Lock()
        # server_ms = local monotonic ns / 1e6 + offset; None until Redis first answers TIME.
        self._offset_ms: float | None = None
        self._refresh_due_ns = 0
        self._last_now_ms = 0

    @classmethod
    def from_uri(cls, uri: str, *, clock: Clock | None = None) -> Self:
        if clock is not None:
            raise StorageURIError(
                "a Redis backend takes time from the Redis server; it accepts no clock"
            )
        return cls.from_url(uri)

    @classmethod
    @abstractmethod
    def from_url(cls, url: str) -> Self:
        """A backend from its URL (see `host.storage` for the options)."""

    @property
    def client(self) -> ClientT:
        return self._client

    def close(self) -> None:
        self._client.close()

    def now_ms(self) -> int:
        with self._clock_lock:
            if time.monotonic_ns() >= self._refresh_due_ns:
                self._refresh_offset()
            offset = self._offset_ms
            if offset is None:
                now = time.time_ns() // 1_000_000
            else:
                now = int(time.monotonic_ns() / 1_000_000 + offset)
            self._last_now_ms = max(self._last_now_ms, now)
            return self._last_now_ms

    @classmethod
    def _check_key_prefix(cls, key_prefix: str) -> None:
        """Refuse a prefix this layout cannot use (StorageURIError)."""

    @abstractmethod
    def _entry_key(self, namespace: str, key: str) -> bytes: ...

    @abstractmethod
    def _counter_key(self, namespace: str) -> bytes: ...

    @abstractmethod
    def _server_time(self) -> tuple[int, int]:
        """The server's TIME: seconds and microseconds."""

    @abstractmethod
    def _scan(self, namespace: str, match: bytes) -> Iterable[bytes | str]:
        """The names of the keys matching `match` where `namespace` lives."""

    def _get(self, namespace: str, key: str) -> Entry | None:
        entry_key = self._entry_key(namespace, key)
        value, version = self._call(lambda: self._client.hmget(entry_key, ["value", "version"]))
        if value is None or version is None:
            return None
        return Entry(_as_bytes(value), int(version))

    def _compare_and_swap(self, write: Write) -> int:
        keys = [self._entry_key(write.namespace, write.key), self._counter_key(write.namespace)]
        args: list[str | bytes] = [
            _version_arg(write.expected_version),
            write.value,
            "" if write.ttl_ms is None else str(write.ttl_ms),
        ]
        result = self._call(lambda: self._cas(keys=keys, args=args))
        if result is None:
            raise StorageConflict(write.key)
        return int(result)

    def _delete(self, namespace: str, key: str, expected_version: int | None) -> bool:
        keys = [self._entry_key(namespace, key)]
        args = [_version_arg(expected_version)]
        result = self._call(lambda: self._delete_script(keys=keys, args=args))
        if result == -1:
            raise StorageConflict(key)
        return bool(result == 1)

    def _keys(self, namespace: str) -> list[str]:
        head = self._entry_key(namespace, "")
        found = self._call(lambda: list(self._scan(namespace, _glob_escape(head) + b"*")))
        return [_as_bytes(name)[len(head) :].decode("utf-8", "surrogatepass") for name in found]

    def _refresh_offset(self) -> None:
        before = time.monotonic_ns()
        # Due again one interval later even when this attempt fails, so that an unreachable
        # or hung Redis does not stall every clock read for a socket timeout.
        self._refresh_due_ns = before + self._clock_refresh_ns
        try:
            seconds, micros = self._server_time()
        except (redis.RedisError, RedisClusterException):
            return  # keep the last offset
        after = time.monotonic_ns()
        server_ms = seconds * 1000 + micros / 1000
        # The server read its clock somewhere in the round trip: assume the middle.
        self._offset_ms = server_ms - (before + after) / 2 / 1_000_000

    def _call(self, operation: Callable[[], T]) -> T:
        try:
            return operation()
        except (redis.RedisError, RedisClusterException) as error:
            # RedisClusterException (no slot covered, no node reachable) is not a RedisError.
            raise StorageUnavailable(f"redis: {error}") from error


class RedisBackend(RedisBackendBase[redis.Redis]):
    """`redis://` and `rediss://`: one Redis server (or a primary behind a failover proxy)."""

    schemes = ("redis", "rediss")

    @classmethod
    def from_url(cls, url: str) -> Self:
        """A backend from a `redis://` or `rediss://` URL (see `host.storage` for options)."""
        options = UrlOptions(url)
        # URL options override these keyword defaults (redis-py's from_url precedence).
        client = redis.Redis.from_url(
            urlunsplit(options.parts._replace(query=options.redis_query)),
            socket_timeout=DEFAULT_SOCKET_TIMEOUT_S,
            socket_connect_timeout=DEFAULT_SOCKET_TIMEOUT_S,
            retry=Retry(NoBackoff(), 1, supported_errors=(redis.ConnectionError,)),
        )
        return cls(client, key_prefix=options.key_prefix, clock_refresh_ms=options.clock_refresh_ms)

    def _entry_key(self, namespace: str, key: str) -> bytes:
        # Percent-encoding keeps ':' in a namespace from reaching into another namespace.
        return f"{self._prefix}e:{quote(namespace, safe='')}:{key}".encode("utf-8", "surrogatepass")

    def _counter_key(self, namespace: str) -> bytes:
        # One counter for the whole server: versions are unique across all keys.
        return f"{self._prefix}version".encode("utf-8", "surrogatepass")

    def _server_time(self) -> tuple[int, int]:
        seconds, micros = self._client.time()
        return int(seconds), int(micros)

    def _scan(self, namespace: str, match: bytes) -> Iterable[bytes | str]:
        return self._client.scan_iter(match=match, count=1000)


def _as_bytes(name: bytes | str) -> bytes:
    return name if isinstance(name, bytes) else name.encode("utf-8", "surrogatepass")


def _version_arg(expected_version: int | None) -> str:
    return "" if expected_version is None else str(expected_version)


def _glob_escape(raw: bytes) -> bytes:
    escaped = bytearray()
    for byte in raw:
        if byte in b"*?[]\\":
            escaped.append(ord("\\"))
        escaped.append(byte)
    return bytes(escaped)
