"""The `sandbox-provisioner` command line."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from importlib import metadata
from pathlib import Path

from host.cli.options import (
    DefaultsHelpFormatter,
    ExitCode,
    add_runtime_options,
    fail,
    open_runtime_from,
)
from host.operator.status import add_status_arguments, run_status
from host.runtime.paths import CACHE_ENV
from host.runtime.temper_context import InvalidContext, outcome_to_json, parse_context
from host.serve.cli import add_serve_arguments, run_serve
from provisioner.model import SANDBOX_FAILED, Invocation


def with_api_url(invocation: Invocation, e2b_url: str) -> Invocation:
    """Point the guest at the host's E2B URL unless the context already names one."""
    if any(key == "e2b_api_url" for key, _ in invocation.config):
        return invocation
    return replace(invocation, config=(*invocation.config, ("e2b_api_url", e2b_url)))


def _cmd_invoke(args: argparse.Namespace) -> int:
    try:
        text = sys.stdin.read() if args.context == "-" else Path(args.context).read_text()
    except OSError as error:
        return fail(f"cannot read {args.context}: {error.strerror}")
    except UnicodeDecodeError:
        return fail(f"{args.context} is not UTF-8 text")
    try:
        invocation = parse_context(text)
    except InvalidContext as error:
        return fail(f"invalid invocation context: {error}")
    if args.operation:
        config = tuple((k, v) for k, v in invocation.config if k != "operation")
        invocation = replace(invocation, config=(*config, ("operation", args.operation)))
    try:
        with open_runtime_from(args) as runtime:
            outcome = runtime.invoke(with_api_url(invocation, args.e2b_url))
    except (FileNotFoundError, ValueError) as error:
        return fail(str(error))
    print(json.dumps(outcome_to_json(outcome), indent=2, sort_keys=True))
    return ExitCode.FAILED if outcome.action == SANDBOX_FAILED else ExitCode.OK


def _add_invoke_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "context",
        nargs="?",
        default="-",
        help="invocation context JSON file, or - for stdin (default)",
    )
    parser.add_argument(
        "--operation",
        choices=("provision", "release", "status"),
        help="override the context's integration_config.operation",
    )
    add_runtime_options(parser)


@dataclass(frozen=True)
class Subcommand:
    """One `sandbox-provisioner` subcommand: what `--help` says of it, how its arguments
    are declared, and what runs it (returning the exit code)."""

    name: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


# The product's commands. The console script is the harness's command line
# (harness/cli/main.py), which adds the mocks, `simulate`, `multihost`, `soak` and
# `temper-invoke` to these; the product never imports the harness.
SUBCOMMANDS = (
    Subcommand(
        "invoke",
        "run one invocation context through the component",
        _add_invoke_arguments,
        _cmd_invoke,
    ),
    Subcommand(
        "serve",
        "run the provisioner as an HTTP service (for the Temper shim)",
        add_serve_arguments,
        run_serve,
    ),
    Subcommand(
        "status",
        "show an account's gates and every waiter (read-only; --watch: live)",
        add_status_arguments,
        run_status,
    ),
)


def build_parser(subcommands: Sequence[Subcommand] = SUBCOMMANDS) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sandbox-provisioner",
        description="Run the E2B sandbox provisioner component the way the Temper runtime does.",
        formatter_class=DefaultsHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {version()}")
    commands = parser.add_subparsers(dest="command", required=True)
    for command in sorted(subcommands, key=lambda command: command.name):
        sub = commands.add_parser(
            command.name, help=command.help, formatter_class=DefaultsHelpFormatter
        )
        command.add_arguments(sub)
        sub.set_defaults(handler=command.run)
    return parser


def version() -> str:
    try:
        return metadata.version("temper-sandbox-provisioner")
    except metadata.PackageNotFoundError:  # run from a checkout that was never installed
        return "unknown (not installed)"


def main(argv: Sequence[str] | None = None, subcommands: Sequence[Subcommand] = SUBCOMMANDS) -> int:
    args = build_parser(subcommands).parse_args(argv)
    if getattr(args, "cache_dir", None) is not None:
        # Every load in this run, and in the worker processes it starts, uses it.
        os.environ[CACHE_ENV] = str(args.cache_dir)
    try:
        code: int = args.handler(args)
    except KeyboardInterrupt:
        print("sandbox-provisioner: interrupted", file=sys.stderr)
        return ExitCode.INTERRUPTED
    return code


if __name__ == "__main__":
    sys.exit(main())
