"""`sqlite:///path`: the embedded default backend, one SQLite file shared by threads and processes.

Why it is safe across processes: every write runs in a `BEGIN IMMEDIATE` transaction, which
takes SQLite's database write lock before reading the current version, so the
read-compare-write of compare-and-swap cannot interleave with another writer in any thread
or process. WAL lets readers go on while one writer holds that lock; `busy_timeout` makes a
writer wait for the lock instead of failing at once. A lock still not granted after the
timeout, a full disk or an I/O error raises StorageUnavailable, and the transaction is
rolled back, so nothing changes.

Versions come from one counter in the `meta` table, bumped in the same transaction as the
write, so a version never repeats for any key, across deletes and expiries.

Expired rows are treated as absent by every read and purged lazily: the row of the key
being written, and a bounded batch of expired rows every `_PURGE_EVERY` writes.

`synchronous=NORMAL` (the usual WAL setting): a committed write survives a process crash;
a power cut may lose the last few commits, with their counter bumps, as one unit.
"""

from __future__ import annotations

import itertools
import os
import sqlite3
import threading
import time
import weakref
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Self
from urllib.parse import parse_qsl, urlsplit

from host.storage.base import (
    CheckedBackend,
    Clock,
    Entry,
    StorageConflict,
    StorageUnavailable,
    Write,
)
from host.storage.registry import StorageURIError

DEFAULT_BUSY_TIMEOUT_MS = 5_000
_PURGE_EVERY = 128
_PURGE_BATCH = 256

_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value INTEGER NOT NULL)",
    "INSERT OR IGNORE INTO meta (name, value) VALUES ('last_version', 0)",
    """CREATE TABLE IF NOT EXISTS entries (
        namespace TEXT NOT NULL,
        key BLOB NOT NULL,
        value BLOB NOT NULL,
        version INTEGER NOT NULL,
        expires_at INTEGER,
        PRIMARY KEY (namespace, key)
    ) WITHOUT ROWID""",
    "CREATE INDEX IF NOT EXISTS entries_expiry ON entries (expires_at)"
    " WHERE expires_at IS NOT NULL",
)


def _wall_clock_ms() -> int:
    return time.time_ns() // 1_000_000


def _key_bytes(key: str) -> bytes:
    # Keys are stored as bytes so that any str the validator accepts round-trips.
    return key.encode("utf-8", "surrogatepass")


class _ThreadConnection:
    """One thread's connection; a weakly referenced holder, since connections are not."""

    __slots__ = ("__weakref__", "connection", "pid")

    def __init__(self, connection: sqlite3.Connection) -> None:
        self.connection = connection
        self.pid = os.getpid()


class SqliteBackend(CheckedBackend):
    schemes = ("sqlite",)

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        clock: Clock | None = None,
        busy_timeout_ms: int = DEFAULT_BUSY_TIMEOUT_MS,
    ) -> None:
        if busy_timeout_ms < 0:
            raise ValueError("busy_timeout_ms must not be negative")
        self.path = Path(path)
        self._clock = clock if clock is not None else _wall_clock_ms
        self._busy_timeout_s = busy_timeout_ms / 1000
        self._local = threading.local()
        self._open: weakref.WeakSet[_ThreadConnection] = weakref.WeakSet()
        self._open_lock = threading.Lock()
        self._closed = False
        self._writes = itertools.count(1)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise StorageUnavailable(f"cannot create {self.path.parent}: {error}") from error
        with self._errors_as_unavailable(), self._write_transaction() as conn:
            for statement in _SCHEMA:
                conn.execute(statement)

    @staticmethod
    def path_of(uri: str) -> str:
        """The file a `sqlite://` URI names."""
        parts = urlsplit(uri)
        path = parts.netloc + parts.path
        if path.startswith("//"):
            # `sqlite:////abs/path` (SQLAlchemy's spelling of an absolute path) means /abs/path.
            path = "/" + path.lstrip("/")
        if not path or path == "/":
            raise StorageURIError(f"sqlite URI names no file: {uri!r}")
        return path

    @classmethod
    def from_uri(cls, uri: str, *, clock: Clock | None = None) -> Self:
        parts = urlsplit(uri)
        path = cls.path_of(uri)
        if parts.fragment:
            raise StorageURIError(f"sqlite URI must not have a fragment: {uri!r}")
        busy_timeout_ms = DEFAULT_BUSY_TIMEOUT_MS
        for name, value in parse_qsl(parts.query, keep_blank_values=True):
            if name != "busy_timeout_ms":
                raise StorageURIError(f"unknown sqlite URI option {name!r} in {uri!r}")
            try:
                busy_timeout_ms = int(value)
            except ValueError:
                raise StorageURIError(
                    f"busy_timeout_ms must be an integer, got {value!r}"
                ) from None
            if busy_timeout_ms < 0:
                raise StorageURIError(f"busy_timeout_ms must not be negative, got {value!r}")
        return cls(path, clock=clock, busy_timeout_ms=busy_timeout_ms)

    def now_ms(self) -> int:
        return self._clock()

    def _get(self, namespace: str, key: str) -> Entry | None:
        with self._errors_as_unavailable():
            row = (
                self._connection()
                .execute(
                    "SELECT value, version FROM entries WHERE namespace = ? AND key = ?"
                    " AND (expires_at IS NULL OR expires_at > ?)",
                    (namespace, _key_bytes(key), self._clock()),
                )
                .fetchone()
            )
        return None if row is None else Entry(bytes(row[0]), int(row[1]))

    def _compare_and_swap(self, write: Write) -> int:
        with self._errors_as_unavailable(), self._write_transaction() as conn:
            now = self._clock()
            if self._live_version(conn, write.namespace, write.key, now) != write.expected_version:
                raise StorageConflict(write.key)
            (version,) = conn.execute(
                "UPDATE meta SET value = value + 1 WHERE name = 'last_version' RETURNING value"
            ).fetchone()
            expires_at = None if write.ttl_ms is None else now + write.ttl_ms
            conn.execute(
                "INSERT OR REPLACE INTO entries (namespace, key, value, version, expires_at)"
                " VALUES (?, ?, ?, ?, ?)",
                (write.namespace, _key_bytes(write.key), write.value, version, expires_at),
            )
            self._maybe_purge(conn, now)
            return int(version)

    def _delete(self, namespace: str, key: str, expected_version: int | None) -> bool:
        with self._errors_as_unavailable(), self._write_transaction() as conn:
            now = self._clock()
            current = self._live_version(conn, namespace, key, now)
            if current is None:
                return False
            if expected_version is not None and current != expected_version:
                raise StorageConflict(key)
            conn.execute(
                "DELETE FROM entries WHERE namespace = ? AND key = ?",
                (namespace, _key_bytes(key)),
            )
            self._maybe_purge(conn, now)
            return True

    def _keys(self, namespace: str) -> list[str]:
        with self._errors_as_unavailable():
            rows = (
                self._connection()
                .execute(
                    "SELECT key FROM entries WHERE namespace = ?"
                    " AND (expires_at IS NULL OR expires_at > ?)",
                    (namespace, self._clock()),
                )
                .fetchall()
            )
        return [bytes(row[0]).decode("utf-8", "surrogatepass") for row in rows]

    def close(self) -> None:
        with self._open_lock:
            self._closed = True
            holders = list(self._open)
            self._open.clear()
        for holder in holders:
            holder.connection.close()

    def _live_version(
        self, conn: sqlite3.Connection, namespace: str, key: str, now: int
    ) -> int | None:
        row = conn.execute(
            "SELECT version, expires_at FROM entries WHERE namespace = ? AND key = ?",
            (namespace, _key_bytes(key)),
        ).fetchone()
        if row is None:
            return None
        version, expires_at = row
        if expires_at is not None and expires_at <= now:
            conn.execute(
                "DELETE FROM entries WHERE namespace = ? AND key = ?",
                (namespace, _key_bytes(key)),
            )
            return None
        return int(version)

    def _maybe_purge(self, conn: sqlite3.Connection, now: int) -> None:
        if next(self._writes) % _PURGE_EVERY:
            return
        conn.execute(
            "DELETE FROM entries WHERE (namespace, key) IN (SELECT namespace, key FROM entries"
            " WHERE expires_at IS NOT NULL AND expires_at <= ? LIMIT ?)",
            (now, _PURGE_BATCH),
        )

    def _connection(self) -> sqlite3.Connection:
        holder: _ThreadConnection | None = getattr(self._local, "holder", None)
        # A connection must not cross a fork: the child opens its own.
        if holder is not None and holder.pid == os.getpid():
            return holder.connection
        with self._open_lock:
            if self._closed:
                raise StorageUnavailable("storage backend is closed")
            conn = sqlite3.connect(
                self.path,
                timeout=self._busy_timeout_s,
                isolation_level=None,
                check_same_thread=False,
            )
            holder = _ThreadConnection(conn)
            self._open.add(holder)
        try:
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute("PRAGMA synchronous = NORMAL")
        except sqlite3.Error:
            conn.close()
            raise
        self._local.holder = holder
        return conn

    def _discard_connection(self) -> None:
        holder: _ThreadConnection | None = getattr(self._local, "holder", None)
        self._local.holder = None
        if holder is not None:
            with self._open_lock:
                self._open.discard(holder)
            with suppress(sqlite3.Error):
                holder.connection.close()

    @contextmanager
    def _write_transaction(self) -> Iterator[sqlite3.Connection]:
        conn = self._connection()
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield conn
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")

    @contextmanager
    def _errors_as_unavailable(self) -> Iterator[None]:
        try:
            yield
        except sqlite3.Error as error:
            # After a failure the connection may be mid-transaction or broken: start afresh.
            self._discard_connection()
            raise StorageUnavailable(f"sqlite {self.path}: {error}") from error
