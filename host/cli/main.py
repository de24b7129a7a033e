"""The `sandbox-provisioner` command line."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from host.cli.options import (
    ExitCode,
    add_component_option,
    add_runtime_options,
    add_storage_option,
    fail,
    open_runtime_from,
)
from host.runtime.temper_context import InvalidContext, outcome_to_json, parse_context
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


def _cmd_mock_e2b(args: argparse.Namespace) -> int:
    from host.mock_e2b.cli import config_from_args, serve

    return serve(config_from_args(args), host=args.host, port=args.port)


def _cmd_mock_llm(args: argparse.Namespace) -> int:
    from host.mock_llm.cli import config_from_args, serve

    try:
        config = config_from_args(args)
    except ValueError as error:
        return fail(str(error))
    return serve(config, host=args.host, port=args.port)


def _cmd_demo(args: argparse.Namespace) -> int:
    from host.sessions.demo import run_demo

    return run_demo(storage_url=args.storage, component=args.component)


def _cmd_simulate(args: argparse.Namespace) -> int:
    from host.sessions.simulate import run_simulate

    return run_simulate(args)


def _cmd_soak(args: argparse.Namespace) -> int:
    from host.multihost.soak import run_soak

    return run_soak(args)


def _cmd_multihost(args: argparse.Namespace) -> int:
    from host.multihost.run import run_multihost

    return run_multihost(args)


def _cmd_serve(args: argparse.Namespace) -> int:
    from host.serve.cli import run_serve

    return run_serve(args)


def _cmd_status(args: argparse.Namespace) -> int:
    from host.operator.status import run_status

    return run_status(args)


def _add_host_options(parser: argparse.ArgumentParser) -> None:
    add_storage_option(parser)
    add_component_option(parser)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sandbox-provisioner",
        description="Run the E2B sandbox provisioner component the way the Temper runtime does.",
    )
    commands = parser.add_subparsers(dest="command", required=True)

    invoke = commands.add_parser("invoke", help="run one invocation context through the component")
    invoke.add_argument(
        "context",
        nargs="?",
        default="-",
        help="invocation context JSON file, or - for stdin (default)",
    )
    invoke.add_argument(
        "--operation",
        choices=("provision", "release", "status"),
        help="override the context's integration_config.operation",
    )
    add_runtime_options(invoke)
    invoke.set_defaults(handler=_cmd_invoke)

    mock = commands.add_parser("mock-e2b", help="run the mock E2B API server on loopback")
    from host.mock_e2b.cli import add_arguments

    add_arguments(mock)
    mock.set_defaults(handler=_cmd_mock_e2b)

    mock_llm = commands.add_parser(
        "mock-llm", help="run the mock LLM API (Anthropic Messages) on loopback"
    )
    from host.mock_llm.cli import add_arguments as add_mock_llm_arguments

    add_mock_llm_arguments(mock_llm)
    mock_llm.set_defaults(handler=_cmd_mock_llm)

    demo = commands.add_parser("demo", help="provision and release one sandbox through the mock")
    _add_host_options(demo)
    demo.set_defaults(handler=_cmd_demo)

    simulate = commands.add_parser(
        "simulate", help="replay the incident: Temper-style sessions against the mock E2B"
    )
    from host.sessions.simulate import add_simulate_arguments

    add_simulate_arguments(simulate)
    simulate.set_defaults(handler=_cmd_simulate)

    multihost = commands.add_parser(
        "multihost",
        help="several host processes sharing one Redis run one workload (optionally kill -9 one)",
    )
    from host.multihost.run import add_multihost_arguments

    add_multihost_arguments(multihost)
    multihost.set_defaults(handler=_cmd_multihost)

    serve = commands.add_parser(
        "serve", help="run the provisioner as an HTTP service (for the Temper shim)"
    )
    from host.serve.cli import add_serve_arguments

    add_serve_arguments(serve)
    serve.set_defaults(handler=_cmd_serve)

    soak = commands.add_parser(
        "soak",
        help="hosts on one Redis against the mock E2B under seeded faults, then an audit "
        "from E2B's records (exit 1 on any violation)",
    )
    from host.multihost.soak import add_soak_arguments

    add_soak_arguments(soak)
    soak.set_defaults(handler=_cmd_soak)

    status = commands.add_parser(
        "status", help="show an account's gates and every waiter (read-only; --watch: live)"
    )
    from host.operator.status import add_status_arguments

    add_status_arguments(status)
    status.set_defaults(handler=_cmd_status)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        code: int = args.handler(args)
    except KeyboardInterrupt:
        print("sandbox-provisioner: interrupted", file=sys.stderr)
        return ExitCode.INTERRUPTED
    return code


if __name__ == "__main__":
    sys.exit(main())
