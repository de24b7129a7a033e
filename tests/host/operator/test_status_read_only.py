"""`status` never writes: it refuses a storage that does not exist or an account with no
state (exit 1, a message) instead of creating one and printing empty gates; `--watch`
without a terminal prints a timestamped snapshot per interval (issue 26, point 7)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from host.cli.main import main
from host.services.namespaces import account_namespace
from host.storage.sqlite import SqliteBackend
from tests.conftest import ROOT


def test_a_storage_that_does_not_exist_is_refused_and_not_created(tmp_path: Path) -> None:
    target = tmp_path / "nonexistent" / "dir" / "x.db"
    assert main(["status", "--storage", f"sqlite:///{target}"]) == 1
    assert not target.parent.exists()
    assert main(["status", "--storage", "memory://"]) == 1


def state_db(tmp_path: Path) -> str:
    path = tmp_path / "state.db"
    backend = SqliteBackend(path)
    backend.compare_and_swap(account_namespace("default"), "some-key", None, b"x", None)
    backend.close()
    return f"sqlite:///{path}"


def test_an_account_with_no_state_is_refused(tmp_path: Path) -> None:
    storage = state_db(tmp_path)
    assert main(["status", "--storage", storage, "--account", "defualt"]) == 1
    assert main(["status", "--storage", storage, "--account", "default", "--json"]) == 0


@pytest.mark.usefixtures("ctrl_c_raises_keyboard_interrupt")
def test_watch_without_a_terminal_prints_a_timestamped_snapshot_per_interval(
    tmp_path: Path,
) -> None:
    storage = state_db(tmp_path)
    process = subprocess.Popen(
        [sys.executable, "-m", "host.cli", "status", "--storage", storage, "--watch",
         "--interval", "0.2"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "TERM": "dumb"},
    )  # fmt: skip
    assert process.stdout is not None
    stamps: list[str] = []
    deadline = time.monotonic() + 120
    while len(stamps) < 2 and time.monotonic() < deadline:
        line = process.stdout.readline()
        if line.startswith("--- "):
            stamps.append(line)
    process.send_signal(signal.SIGINT)
    process.communicate(timeout=30)
    assert len(stamps) == 2, stamps
    assert all(stamp.rstrip().endswith("UTC") for stamp in stamps)
