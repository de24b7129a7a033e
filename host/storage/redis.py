"""`redis://host:port/db`: the backend several hosts share.

Layout: one hash per entry, `{prefix}e:{namespace percent-encoded}:{key}` with fields
`value` and `version`, plus one counter `{prefix}version` that hands out versions.

Atomicity: compare-and-swap and delete-if-version are Lua scripts, so the read-compare-write
runs as one step on the server; `get` is one HMGET, atomic by itself. A script either runs
whole or not at all, so there is never a partial write.

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

Redis Cluster is not supported (a script touches the entry and the counter, two slots).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import TypeVar
from urllib.parse import parse_qsl, quote, urlencode, urlsplit, urlunsplit

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from host.storage.base import (
    Entry,
    StorageConflict,
    StorageUnavailable,
    check_key,
    check_ttl,
    check_value,
)

DEFAULT_KEY_PREFIX = "sandbox-provisioner:"
DEFAULT_SOCKET_TIMEOUT_S = 1.0
DEFAULT_CLOCK_REFRESH_MS = 1_000
# A TTL this long is "forever"; it stays inside what PEXPIRE accepts.
_FOREVER_MS = 10**15

# KEYS: entry, counter. ARGV: expected version ('' = must be absent), value, ttl ('' = none).
# Returns the new version, or false on a conflict.
_CAS_SCRIPT = """
local current = redis.call('HGET', KEYS[1], 'version')
if ARGV[1] == '' then
  if current then return false end
elseif current ~= ARGV[1] then
  return false
end
local version = redis.call('INCR', KEYS[2])
if version == 1 then
  local now = redis.call('TIME')
  version = tonumber(now[1]) * 1000000 + tonumber(now[2])
  redis.call('SET', KEYS[2], string.format('%d', version))
end
redis.call('HSET', KEYS[1], 'value', ARGV[2], 'version', string.format('%d', version))
if ARGV[3] == '' then
  redis.call('PERSIST', KEYS[1])
else
  redis.call('PEXPIRE', KEYS[1], ARGV[3])
end
return version
"""

# KEYS: entry. ARGV: expected version ('' = any). Returns 1 deleted, 0 absent, -1 conflict.
_DELETE_SCRIPT = """
local current = redis.call('HGET', KEYS[1], 'version')
if not current then return 0 end
if ARGV[1] ~= '' and current ~= ARGV[1] then return -1 end
redis.call('DEL', KEYS[1])
return 1
"""

_OWN_URL_OPTIONS = ("key_prefix", "clock_refresh_ms")

T = TypeVar("T")


class RedisBackend:
    def __init__(
        self,
        client: redis.Redis,
        *,
        key_prefix: str = DEFAULT_KEY_PREFIX,
        clock_refresh_ms: int = DEFAULT_CLOCK_REFRESH_MS,
    ) -> None:
        if clock_refresh_ms < 0:
            raise ValueError("clock_refresh_ms must not be negative")
        self._client = client
        self._prefix = key_prefix
        self._counter_key = key_prefix + "version"
        self._cas = client.register_script(_CAS_SCRIPT)
        self._delete = client.register_script(_DELETE_SCRIPT)
        self._clock_refresh_ns = clock_refresh_ms * 1_000_000
        self._clock_lock = threading.Lock()
        # server_ms = local monotonic ns / 1e6 + offset; None until Redis first answers TIME.
        self._offset_ms: float | None = None
        self._refresh_due_ns = 0
        self._last_now_ms = 0

    @classmethod
    def from_url(cls, url: str) -> RedisBackend:
        """A backend from a `redis://` or `rediss://` URL (see `host.storage` for options)."""
        parts = urlsplit(url)
        own: dict[str, str] = {}
        passed: list[tuple[str, str]] = []
        for name, value in parse_qsl(parts.query, keep_blank_values=True):
            if name == "decode_responses":
                raise ValueError("decode_responses cannot be set: values are bytes")
            if name in _OWN_URL_OPTIONS:
                own[name] = value
            else:
                passed.append((name, value))
        redis_url = urlunsplit(parts._replace(query=urlencode(passed)))
        # URL options override these keyword defaults (redis-py's from_url precedence).
        client = redis.Redis.from_url(
            redis_url,
            socket_timeout=DEFAULT_SOCKET_TIMEOUT_S,
            socket_connect_timeout=DEFAULT_SOCKET_TIMEOUT_S,
            retry=Retry(NoBackoff(), 1, supported_errors=(redis.ConnectionError,)),
        )
        try:
            refresh = int(own.get("clock_refresh_ms", DEFAULT_CLOCK_REFRESH_MS))
        except ValueError:
            raise ValueError(f"clock_refresh_ms must be an integer in {url!r}") from None
        return cls(
            client,
            # parse_qsl has already percent-decoded the value: decoding again would be wrong.
            key_prefix=own.get("key_prefix", DEFAULT_KEY_PREFIX),
            clock_refresh_ms=refresh,
        )

    @property
    def client(self) -> redis.Redis:
        return self._client

    def get(self, namespace: str, key: str) -> Entry | None:
        check_key(key)
        value, version = self._call(
            lambda: self._client.hmget(self._entry_key(namespace, key), ["value", "version"])
        )
        if value is None or version is None:
            return None
        return Entry(_as_bytes(value), int(version))

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
        ttl_arg = "" if ttl_ms is None or ttl_ms >= _FOREVER_MS else str(ttl_ms)
        result = self._call(
            lambda: self._cas(
                keys=[self._entry_key(namespace, key), self._counter_key],
                args=[_version_arg(expected_version), bytes(value), ttl_arg],
            )
        )
        if result is None:
            raise StorageConflict(key)
        return int(result)

    def delete(self, namespace: str, key: str, expected_version: int | None) -> bool:
        check_key(key)
        result = self._call(
            lambda: self._delete(
                keys=[self._entry_key(namespace, key)],
                args=[_version_arg(expected_version)],
            )
        )
        if result == -1:
            raise StorageConflict(key)
        return bool(result == 1)

    def keys(self, namespace: str) -> list[str]:
        """Live keys of a namespace (for inspection and tests; not part of the contract)."""
        head = self._entry_key(namespace, "")
        found = self._call(
            lambda: list(self._client.scan_iter(match=_glob_escape(head) + b"*", count=1000))
        )
        return sorted(
            _as_bytes(name)[len(head) :].decode("utf-8", "surrogatepass") for name in found
        )

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

    def close(self) -> None:
        self._client.close()

    def _refresh_offset(self) -> None:
        before = time.monotonic_ns()
        # Due again one interval later even when this attempt fails, so that an unreachable
        # or hung Redis does not stall every clock read for a socket timeout.
        self._refresh_due_ns = before + self._clock_refresh_ns
        try:
            seconds, micros = self._client.time()
        except redis.RedisError:
            return  # keep the last offset
        after = time.monotonic_ns()
        server_ms = seconds * 1000 + micros / 1000
        # The server read its clock somewhere in the round trip: assume the middle.
        self._offset_ms = server_ms - (before + after) / 2 / 1_000_000

    def _entry_key(self, namespace: str, key: str) -> bytes:
        # Percent-encoding keeps ':' in a namespace from reaching into another namespace.
        return f"{self._prefix}e:{quote(namespace, safe='')}:{key}".encode("utf-8", "surrogatepass")

    def _call(self, operation: Callable[[], T]) -> T:
        try:
            return operation()
        except redis.RedisError as error:
            raise StorageUnavailable(f"redis: {error}") from error


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
