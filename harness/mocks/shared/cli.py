"""What the mocks' command lines share: the listen flags, the flags that set one config field
each, the run-until-signal loop and the command that ties a mock's `cli` module together."""

from __future__ import annotations

import argparse
import signal
import sys
import threading
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import FrameType
from typing import Any, Protocol

from harness.mocks.shared.config import MockConfig
from harness.mocks.shared.server import LoopbackServer


class MockCommandLine(Protocol):
    """What a mock's `cli` module offers (harness/mocks/*/cli.py)."""

    def add_arguments(self, parser: argparse.ArgumentParser, /) -> None: ...

    def config_from_args(self, ns: argparse.Namespace, /) -> Any: ...

    def serve(self, config: Any, host: str = ..., port: int = ...) -> int: ...


def add_listen_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--port", type=int, default=0, help="port (0: any free port)")


@dataclass(frozen=True)
class ConfigFlags:
    """A mock's flags that make its config: a named preset of limits (``--plan``,
    ``--tier``) and flags that each set one field of ``config``, which win over the preset.

    ``helps``: flag -> help, in the order ``--help`` lists them; the flag sets the field of
    its name (``--create-burst``: ``create_burst``) unless ``renamed`` names another. Its
    type, and its choices for a ``Literal`` field, are the field's, so the two cannot
    disagree."""

    config: type[MockConfig]
    preset: str
    presets: Mapping[str, Mapping[str, Any]]
    preset_help: str
    helps: Mapping[str, str]
    renamed: Mapping[str, str] = field(default_factory=dict)

    def field_of(self, flag: str) -> str:
        return self.renamed.get(flag) or flag.removeprefix("--").replace("-", "_")

    def add_to(self, parser: argparse.ArgumentParser) -> None:
        """Adds the listen flags, the preset and the field flags to ``parser``."""
        add_listen_arguments(parser)
        parser.add_argument(
            self.preset, choices=sorted(self.presets), default=None, help=self.preset_help
        )
        hints = typing.get_type_hints(self.config)
        for flag, help_ in self.helps.items():
            convert, choices = _parsed_as(hints[self.field_of(flag)])
            parser.add_argument(flag, type=convert, choices=choices, default=None, help=help_)

    def changes(self, ns: argparse.Namespace) -> dict[str, Any]:
        """Config changes the flags make: the named preset's first, then every field flag
        that was given."""
        changes: dict[str, Any] = {}
        name = getattr(ns, self.preset.removeprefix("--"), None)
        if name is not None:
            changes.update(self.presets[name])
        for flag in self.helps:
            value = getattr(ns, flag.removeprefix("--").replace("-", "_"), None)
            if value is not None:
                changes[self.field_of(flag)] = value
        return changes


def _parsed_as(hint: Any) -> tuple[Callable[[str], Any], tuple[str, ...] | None]:
    """How a flag for a field of type ``hint`` parses its value: ``float | None`` as a
    float; a ``Literal`` as one of its values."""
    if typing.get_origin(hint) is typing.Literal:
        return str, typing.get_args(hint)
    kinds = [kind for kind in typing.get_args(hint) if kind is not type(None)] or [hint]
    if len(kinds) != 1 or kinds[0] not in (str, int, float):
        raise TypeError(f"no flag parses a {hint}")
    convert: Callable[[str], Any] = kinds[0]
    return convert, None


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


def run_command(prog: str, mock_cli: MockCommandLine, argv: Sequence[str] | None = None) -> int:
    """``python -m harness.mocks.NAME``: parses ``argv`` (a bad value: argparse's usage
    error, exit 2) and serves the config it describes on ``--host``/``--port``."""
    parser = argparse.ArgumentParser(prog=prog, description=mock_cli.__doc__)
    mock_cli.add_arguments(parser)
    ns = parser.parse_args(argv)
    try:
        config = mock_cli.config_from_args(ns)
    except ValueError as exc:
        parser.error(str(exc))
    return mock_cli.serve(config, ns.host, ns.port)
