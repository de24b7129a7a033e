"""The `sandbox-provisioner` command line: the product's commands (`host.cli.main`) and the
harness's (the mocks, `demo`, `simulate`, `multihost`, `soak`, `temper-invoke`)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from harness.mocks.e2b import cli as mock_e2b_cli
from harness.mocks.llm import cli as mock_llm_cli
from harness.mocks.shared.cli import MockCommandLine
from harness.mocks.temperfs import cli as mock_temperfs_cli
from harness.multihost.run import add_multihost_arguments, run_multihost
from harness.multihost.soak import add_soak_arguments, run_soak
from harness.simulator.demo import run_demo
from harness.simulator.simulate import add_simulate_arguments, run_simulate
from harness.temper_abi import cli as temper_invoke_cli
from host.cli import main as product
from host.cli.main import Subcommand
from host.cli.options import add_component_option, add_storage_option, fail


def _serving(mock_cli: MockCommandLine) -> Callable[[argparse.Namespace], int]:
    """A mock's command: its flags make its config (a bad value: a clear error), then serve."""

    def command(args: argparse.Namespace) -> int:
        try:
            config = mock_cli.config_from_args(args)
        except ValueError as error:
            return fail(str(error))
        return mock_cli.serve(config, host=args.host, port=args.port)

    return command


def _add_demo_arguments(parser: argparse.ArgumentParser) -> None:
    add_storage_option(parser)
    add_component_option(parser)


def _cmd_demo(args: argparse.Namespace) -> int:
    return run_demo(storage_url=args.storage, component=args.component)


HARNESS_SUBCOMMANDS = (
    Subcommand(
        "mock-e2b",
        "run the mock E2B API server on loopback",
        mock_e2b_cli.add_arguments,
        _serving(mock_e2b_cli),
    ),
    Subcommand(
        "mock-temperfs",
        "run the mock TemperFS (Temper's OData Workspaces and Files) on loopback",
        mock_temperfs_cli.add_arguments,
        _serving(mock_temperfs_cli),
    ),
    Subcommand(
        "mock-llm",
        "run the mock LLM API (Anthropic Messages) on loopback",
        mock_llm_cli.add_arguments,
        _serving(mock_llm_cli),
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
)
SUBCOMMANDS = (*product.SUBCOMMANDS, *HARNESS_SUBCOMMANDS)


def build_parser() -> argparse.ArgumentParser:
    return product.build_parser(SUBCOMMANDS)


def main(argv: Sequence[str] | None = None) -> int:
    return product.main(argv, SUBCOMMANDS)


if __name__ == "__main__":
    sys.exit(main())
