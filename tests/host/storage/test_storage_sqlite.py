"""SQLite backend behaviour beyond the shared conformance tests: processes, locks, files."""

from __future__ import annotations

import multiprocessing
import signal
import sqlite3
import subprocess
import sys
from multiprocessing.synchronize import Barrier
from pathlib import Path

import pytest

from host.storage.sqlite import SqliteBackend
from provisioner.ports import Entry, StorageConflict, StorageUnavailable

NS = "account/e2b"
PROCESSES = 2
INCREMENTS_PER_PROCESS = 150


def _count_in_process(path: str, start: Barrier, increments: int) -> None:
    """Runs in a child process: `increments` CAS increments of one counter."""
    backend = SqliteBackend(path)
    start.wait()
    for _ in range(increments):
        while True:
            found = backend.get(NS, "counter")
            count = 0 if found is None else int(found.value)
            try:
                backend.compare_and_swap(
                    NS,
                    "counter",
                    None if found is None else found.version,
                    str(count + 1).encode(),
                    None,
                )
                break
            except StorageConflict:
                continue
    backend.close()


def test_two_processes_racing_on_one_file_lose_no_update(tmp_path: Path) -> None:
    """Bug caught: a CAS atomic only within one process (a deferred transaction or a
    Python lock instead of SQLite's write lock) loses increments across processes."""
    path = tmp_path / "shared.db"
    SqliteBackend(path).close()  # schema and WAL set up before the race
    context = multiprocessing.get_context("spawn")
    start = context.Barrier(PROCESSES)
    workers = [
        context.Process(target=_count_in_process, args=(str(path), start, INCREMENTS_PER_PROCESS))
        for _ in range(PROCESSES)
    ]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=120)
    assert [worker.exitcode for worker in workers] == [0] * PROCESSES
    backend = SqliteBackend(path)
    found = backend.get(NS, "counter")
    assert found is not None
    assert int(found.value) == PROCESSES * INCREMENTS_PER_PROCESS
    backend.close()


def test_versions_never_repeat_across_reopen(tmp_path: Path) -> None:
    """Bug caught: a version counter kept in memory, restarting with each backend object."""
    path = tmp_path / "state.db"
    first = SqliteBackend(path)
    old = first.compare_and_swap(NS, "k", None, b"x", None)
    assert first.delete(NS, "k", old)
    first.close()
    second = SqliteBackend(path)
    new = second.compare_and_swap(NS, "k", None, b"y", None)
    assert new > old
    second.close()


def test_data_survives_reopen(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    first = SqliteBackend(path)
    version = first.compare_and_swap(NS, "k", None, b"kept", None)
    first.close()
    second = SqliteBackend(path)
    assert second.get(NS, "k") == Entry(b"kept", version)
    second.close()


def test_write_lock_held_elsewhere_is_unavailable_and_changes_nothing(tmp_path: Path) -> None:
    """Bug caught: a lock timeout escaping as sqlite3.OperationalError (trapping the guest)
    or leaving a half-done transaction behind."""
    path = tmp_path / "state.db"
    backend = SqliteBackend(path, busy_timeout_ms=50)
    version = backend.compare_and_swap(NS, "k", None, b"before", None)
    blocker = sqlite3.connect(path, isolation_level=None)
    blocker.execute("BEGIN EXCLUSIVE")
    try:
        with pytest.raises(StorageUnavailable):
            backend.compare_and_swap(NS, "k", version, b"during", None)
        with pytest.raises(StorageUnavailable):
            backend.delete(NS, "k", version)
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    assert backend.get(NS, "k") == Entry(b"before", version)
    after = backend.compare_and_swap(NS, "k", version, b"after", None)
    assert backend.get(NS, "k") == Entry(b"after", after)
    backend.close()


def test_unusable_path_is_unavailable(tmp_path: Path) -> None:
    not_a_directory = tmp_path / "file"
    not_a_directory.write_text("")
    with pytest.raises(StorageUnavailable):
        SqliteBackend(not_a_directory / "state.db")
    with pytest.raises(StorageUnavailable):
        SqliteBackend(tmp_path)  # a directory, not a database file


def test_corrupt_file_is_unavailable(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    path.write_bytes(b"this is not a database" * 100)
    with pytest.raises(StorageUnavailable):
        SqliteBackend(path)


def test_calls_after_close_are_unavailable(tmp_path: Path) -> None:
    backend = SqliteBackend(tmp_path / "state.db")
    backend.compare_and_swap(NS, "k", None, b"x", None)
    backend.close()
    with pytest.raises(StorageUnavailable):
        backend.get(NS, "k")
    with pytest.raises(StorageUnavailable):
        backend.compare_and_swap(NS, "other", None, b"x", None)


def test_expired_rows_are_purged_lazily(tmp_path: Path) -> None:
    """Bug caught: expired rows piling up in the file forever."""
    now = [1_000]
    path = tmp_path / "state.db"
    backend = SqliteBackend(path, clock=lambda: now[0])
    for i in range(100):
        backend.compare_and_swap(NS, f"lease-{i}", None, b"x", 10)
    now[0] += 10
    version = None
    for _ in range(300):
        version = backend.compare_and_swap(NS, "ticker", version, b"t", None)
    rows = sqlite3.connect(path).execute("SELECT count(*) FROM entries").fetchone()[0]
    assert rows == 1
    assert backend.keys(NS) == ["ticker"]
    backend.close()


_DIE_MID_WRITE = """
import os, signal, sqlite3, sys
conn = sqlite3.connect(sys.argv[1], isolation_level=None)
conn.execute("BEGIN IMMEDIATE")
conn.execute("UPDATE entries SET value = x'68616c66', version = version + 1000")
conn.execute("UPDATE meta SET value = value + 1000")
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_process_killed_mid_write_leaves_no_partial_write_and_no_lock(tmp_path: Path) -> None:
    """Bug caught (issue 6, kill -9 a host): a crashed writer leaving a half-applied write
    or a write lock that blocks every other host."""
    path = tmp_path / "state.db"
    backend = SqliteBackend(path, busy_timeout_ms=2_000)
    version = backend.compare_and_swap(NS, "k", None, b"whole", None)
    crashed = subprocess.run([sys.executable, "-c", _DIE_MID_WRITE, str(path)], check=False)
    assert crashed.returncode == -signal.SIGKILL
    assert backend.get(NS, "k") == Entry(b"whole", version)
    after = backend.compare_and_swap(NS, "k", version, b"next", None)
    assert after < version + 1000, "the crashed writer's counter bump must not survive"
    backend.close()
