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
    add_component_option,
    add_runtime_options,
    add_storage_option,
    fail,
    open_runtime_from,
)
from host.mock_e2b import cli as mock_e2b_cli
from host.mock_llm import cli as mock_llm_cli
from host.multihost.run import add_multihost_arguments, run_multihost
from host.multihost.soak import add_soak_arguments, run_soak
from host.operator.status import add_status_arguments, run_status
from host.runtime.paths import CACHE_ENV
from host.runtime.temper_context import InvalidContext, outcome_to_json, parse_context
from host.serve.cli import add_serve_arguments, run_serve
from host.sessions.demo import run_demo
from host.sessions.simulate import add_simulate_arguments, run_simulate
from host.temper_abi import cli as temper_invoke_cli
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


def _cmd_mock_e2b(args: argparse.Namespace) -> int:
    return mock_e2b_cli.serve(mock_e2b_cli.config_from_args(args), host=args.host, port=args.port)


def _cmd_mock_llm(args: argparse.Namespace) -> int:
    try:
        config = mock_llm_cli.config_from_args(args)
    except ValueError as error:
        return fail(str(error))
    return mock_llm_cli.serve(config, host=args.host, port=args.port)


def _add_demo_arguments(parser: argparse.ArgumentParser) -> None:
    add_storage_option(parser)
    add_component_option(parser)


def _cmd_demo(args: argparse.Namespace) -> int:
    return run_demo(storage_url=args.storage, component=args.component)


@dataclass(frozen=True)
class Subcommand:
    """One `sandbox-provisioner` subcommand: what `--help` says of it, how its arguments
    are declared, and what runs it (returning the exit code)."""

    name: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


SUBCOMMANDS = (
    Subcommand(
        "invoke",
        "run one invocation context through the component",
        _add_invoke_arguments,
        _cmd_invoke,
    ),
    Subcommand(
        "mock-e2b",
        "run the mock E2B API server on loopback",
        mock_e2b_cli.add_arguments,
        _cmd_mock_e2b,
    ),
    Subcommand(
        "mock-llm",
        "run the mock LLM API (Anthropic Messages) on loopback",
        mock_llm_cli.add_arguments,
        _cmd_mock_llm,
    ),
    Subcommand(
        "demo", "provision and release one sandbox through the mock", _add_demo_arguments, _cmd_demo
    ),
    Subcommand(
        "simulate",
        "replay the incident: Temper-style sessions against the mock E2B",
        add_simulate_arguments,
        run_simulate,
    ),
    Subcommand(
        "multihost",
        "several host processes sharing one Redis run one workload (optionally kill -9 one)",
        add_multihost_arguments,
        run_multihost,
    ),
    Subcommand(
        "serve",
        "run the provisioner as an HTTP service (for the Temper shim)",
        add_serve_arguments,
        run_serve,
    ),
    Subcommand(
        "soak",
        "hosts on one Redis against the mock E2B under seeded faults, then an audit "
        "from E2B's records (exit 1 on any violation)",
        add_soak_arguments,
        run_soak,
    ),
    Subcommand(
        "temper-invoke",
        "run a core module (the shim) under the Temper-ABI host as Temper would and "
        "print the result Temper decodes",
        temper_invoke_cli.add_arguments,
        temper_invoke_cli.run,
    ),
    Subcommand(
        "status",
        "show an account's gates and every waiter (read-only; --watch: live)",
        add_status_arguments,
        run_status,
    ),
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sandbox-provisioner",
        description="Run the E2B sandbox provisioner component the way the Temper runtime does.",
        formatter_class=DefaultsHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {version()}")
    commands = parser.add_subparsers(dest="command", required=True)
    for command in SUBCOMMANDS:
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


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
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
