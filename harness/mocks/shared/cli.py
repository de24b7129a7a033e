"""What the mocks' command lines share: the listen flags and the run-until-signal loop."""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from collections.abc import Callable, Mapping, Sequence
from types import FrameType
from typing import Any, TypeVar

from harness.mocks.shared.server import LoopbackServer

ConfigT = TypeVar("ConfigT")


def add_listen_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--port", type=int, default=0, help="port (0: any free port)")


def preset_changes(
    ns: argparse.Namespace,
    preset: str,
    presets: Mapping[str, Mapping[str, Any]],
    fields: Mapping[str, str],
) -> dict[str, Any]:
    """Config changes the flags make: the named preset's (``--plan``, ``--tier``) first,
    then every flag in ``fields`` (flag destination -> config field) that was given."""
    changes: dict[str, Any] = {}
    name = getattr(ns, preset, None)
    if name is not None:
        changes.update(presets[name])
    for dest, field in fields.items():
        value = getattr(ns, dest, None)
        if value is not None:
            changes[field] = value
    return changes


def serve_until_signal(
    server: LoopbackServer, banner: Callable[[str], list[str]], name: str
) -> int:
    """Runs ``server`` until Ctrl-C or SIGTERM, printing ``banner(url)`` once it listens.
    Returns the exit code (1, with a message naming ``name``, when it cannot listen)."""
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    in_main = threading.current_thread() is threading.main_thread()
    previous = {}
    if in_main:
        for signum in (signal.SIGINT, signal.SIGTERM):
            previous[signum] = signal.signal(signum, on_signal)
    try:
        with server:
            for line in banner(server.url):
                print(line, flush=True)
            while not stop.wait(0.5):
                pass
        return 0
    except OSError as exc:
        print(f"{name} could not start: {exc}", file=sys.stderr)
        return 1
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def run_command(
    argv: Sequence[str] | None,
    *,
    prog: str,
    description: str | None,
    add_arguments: Callable[[argparse.ArgumentParser], None],
    config_from_args: Callable[[argparse.Namespace], ConfigT],
    serve: Callable[[ConfigT, str, int], int],
) -> int:
    """Parses ``argv`` (a bad value: argparse's usage error, exit 2) and serves the config
    it describes on ``--host``/``--port``."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    add_arguments(parser)
    ns = parser.parse_args(argv)
    try:
        config = config_from_args(ns)
    except ValueError as exc:
        parser.error(str(exc))
    return serve(config, ns.host, ns.port)
