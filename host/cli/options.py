"""What the subcommands share: exit codes, the options that name a host's runtime (storage,
component, E2B, TemperFS, account), and opening that runtime from parsed arguments."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from enum import IntEnum
from pathlib import Path
from typing import TypeVar

from host.runtime.assembly import API_KEY_ENV, default_storage_url, open_runtime
from host.runtime.component_runtime import ComponentRuntime
from host.runtime.loader import LoadedComponent, load_component
from host.runtime.paths import CACHE_ENV


class ExitCode(IntEnum):
    OK = 0
    FAILED = 1  # the command ran and reports a failure (a SandboxFailed, an audit violation)
    USAGE = 2  # bad arguments or input: nothing was changed
    OVERLOADED = 3  # a simulation stopped because the host could not keep up
    INTERRUPTED = 130  # Ctrl-C, as shells report SIGINT


def fail(message: str, command: str = "sandbox-provisioner") -> int:
    """Say what is wrong on stderr and return the usage exit code."""
    print(f"{command}: {message}", file=sys.stderr)
    return ExitCode.USAGE


def load_or_fail(path: Path | None, cache_dir: Path | None = None) -> LoadedComponent | int:
    """The component at `path` (None: the default one), compiled into `cache_dir` unless
    cached; when it cannot be loaded, the usage exit code, the reason said on stderr."""
    try:
        return load_component(path, cache_dir=cache_dir)
    except (FileNotFoundError, ValueError) as error:
        return fail(str(error))


_Number = TypeVar("_Number", int, float)


def positive(convert: Callable[[str], _Number]) -> Callable[[str], _Number]:
    """An argparse type: `convert(text)`, refused unless above 0."""

    def parse(text: str) -> _Number:
        value = convert(text)
        if not value > 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
        return value

    return parse


def add_value_option(
    parser: argparse._ActionsContainer,
    flag: str,
    kind: Callable[[str], object],
    default: object,
    text: str,
    metavar: str | None = None,
) -> None:
    """An option taking one value of `kind`, whose help ends with its default."""
    shown = f"{default:g}" if isinstance(default, float) else default
    parser.add_argument(
        flag, type=kind, default=default, metavar=metavar, help=f"{text} (default {shown})"
    )


def add_storage_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--storage",
        default=None,
        metavar="URL",
        help="storage backend: sqlite:///path.db, redis://host:port/db, "
        f"redis+cluster://host:port,..., memory:// (default {default_storage_url()})",
    )


def add_account_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--account",
        default="default",
        help="the E2B account namespace whose gates this host shares (default: default)",
    )


def add_component_option(parser: argparse.ArgumentParser) -> None:
    """The component, and where its compiled form is cached (every command that loads it
    takes both; `main` puts --cache-dir in $SANDBOX_PROVISIONER_CACHE for the whole run)."""
    parser.add_argument(
        "--component",
        type=Path,
        default=None,
        help="the component (default: the installed one, else dist/sandbox_provisioner.wasm)",
    )
    parser.add_argument(
        "--cache-dir",
        type=Path,
        default=None,
        help=f"compiled-component cache (default ${CACHE_ENV}, else the user cache directory)",
    )


class DefaultsHelpFormatter(argparse.HelpFormatter):
    """Shows an option's default in --help unless its help already says it (or it has
    none worth showing)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text.lower() or action.default in (None, False, argparse.SUPPRESS):
            return text
        if action.option_strings and action.nargs != 0:
            return f"{text} (default: %(default)s)"
        return text


def add_runtime_options(parser: argparse.ArgumentParser) -> None:
    """Everything `open_runtime_from` reads: E2B, TemperFS, account, storage, component."""
    parser.add_argument("--e2b-url", default="https://api.e2b.app", help="the E2B API base URL")
    parser.add_argument(
        "--api-key-env",
        default=API_KEY_ENV,
        help="environment variable holding the host's E2B API key, used when an invocation's"
        f" integration_config brings no e2b_api_key (default {API_KEY_ENV})",
    )
    parser.add_argument(
        "--temper-api-url",
        default=None,
        metavar="URL",
        help="the Temper API whose /tdata (TemperFS) the guest may reach for the"
        " conversation storage; filled into the config when it names none (default: none)",
    )
    add_account_option(parser)
    parser.add_argument(
        "--allow-private-network",
        action="store_true",
        help="let the E2B URL be a loopback or private address (a local mock E2B)",
    )
    add_storage_option(parser)
    add_component_option(parser)


@contextmanager
def open_runtime_from(args: argparse.Namespace) -> Iterator[ComponentRuntime]:
    """The runtime the options of `add_runtime_options` describe. An invocation's own
    `e2b_api_key` wins over the host's (host/runtime/credentials.py); without either, a
    provision that needs E2B answers e2b_api_key_missing (a static sandbox_url needs none)."""
    with open_runtime(
        e2b_url=args.e2b_url,
        api_key=os.environ.get(args.api_key_env, ""),
        storage_url=args.storage,
        account=args.account,
        component=args.component,
        allow_private_network=args.allow_private_network,
        temperfs_url=args.temper_api_url,
    ) as runtime:
        yield runtime
