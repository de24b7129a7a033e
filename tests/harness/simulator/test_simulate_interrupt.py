"""Ctrl-C in the middle of `simulate`: a clean exit that leaves nothing running."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from host.runtime.loader import LoadedComponent
from tests.harness.simulator.interrupted import interrupt_when_first_queued

ROOT = Path(__file__).resolve().parents[3]
pytestmark = [pytest.mark.component, pytest.mark.usefixtures("ctrl_c_raises_keyboard_interrupt")]


def children_of(pid: int) -> set[int]:
    found = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # The command may contain spaces and parentheses: the ppid follows the last ')'.
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            found.add(int(entry.name))
    return found


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_ctrl_c_mid_run_exits_cleanly_and_stops_the_mock_e2b(
    loaded_component: LoadedComponent, component_cache_dir: Path
) -> None:
    """Bug caught: Ctrl-C hanging on worker threads blocked in a create, a traceback
    instead of a clean exit, or the mock E2B server left listening."""
    env = dict(os.environ, SANDBOX_PROVISIONER_CACHE=str(component_cache_dir), PYTHONUNBUFFERED="1")
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "harness.cli",
            "simulate",
            "--mode",
            "provisioner",
            "--jobs",
            "10",
            "--component",
            str(loaded_component.path),
            "--verbose",
        ],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert process.stdout is not None and process.stderr is not None
    port = None
    queued_seen = threading.Event()
    lines: list[str] = []

    def read_until_queued() -> None:
        nonlocal port
        assert process.stdout is not None
        for line in process.stdout:
            lines.append(line)
            match = re.search(r"mock E2B at http://127\.0\.0\.1:(\d+)", line)
            if match:
                port = int(match.group(1))
            if " queued #" in line:
                queued_seen.set()
                return

    reader = threading.Thread(target=read_until_queued, daemon=True)
    reader.start()
    try:
        assert queued_seen.wait(60), "no session was ever queued:\n" + "".join(lines)
        assert port is not None
        helpers = children_of(process.pid)
        process.send_signal(signal.SIGINT)
        _out, err = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 130, err
    assert "interrupted" in err
    assert "Traceback" not in err, err
    with (
        pytest.raises(ConnectionRefusedError),
        socket.create_connection(("127.0.0.1", port), timeout=2),
    ):
        pass
    assert not [pid for pid in helpers if alive(pid)]


def test_keyboard_interrupt_in_process_stops_the_mock_and_joins_every_thread(
    loaded_component: LoadedComponent,
) -> None:
    """Bug caught: an interrupted run leaving the mock server, the invocation pool or the
    epoch ticker running inside the process (what a subprocess test cannot see)."""
    urls: list[str] = []
    interrupt_when_first_queued(loaded_component, announce=urls.append)
    assert len(urls) == 1, "the run never announced its mock before it was interrupted"
    port = int(urls[0].rsplit(":", 1)[1])
    with (
        pytest.raises(ConnectionRefusedError),
        socket.create_connection(("127.0.0.1", port), timeout=2),
    ):
        pass
