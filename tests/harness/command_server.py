"""A server command run as a real process from the checkout, for the tests that check a
`python -m ...` server prints where it listens and serves until SIGTERM."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager

from tests.conftest import ROOT

LISTENING = re.compile(r"listening on (http://127\.0\.0\.1:\d+)")


@contextmanager
def command_server(*module_and_args: str) -> Iterator[tuple[subprocess.Popen[str], str]]:
    """Starts `python -m MODULE ARGS...` unbuffered and yields the process with the loopback
    URL its first line says it is listening on; kills it if the test leaves it running."""
    process = subprocess.Popen(
        [sys.executable, "-m", *module_and_args],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        assert process.stdout is not None
        first = process.stdout.readline()
        match = LISTENING.search(first)
        assert match, first
        yield process, match.group(1)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
