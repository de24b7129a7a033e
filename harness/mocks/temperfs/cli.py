"""Command line of the mock: ``sandbox-provisioner mock-temperfs`` (or
``python -m harness.mocks.temperfs``)."""

from __future__ import annotations

import argparse

from harness.mocks.e2b.config import parse_fault
from harness.mocks.shared.cli import add_listen_arguments, serve_until_signal
from harness.mocks.temperfs.config import TemperFSConfig
from harness.mocks.temperfs.server import MockTemperFSServer


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_listen_arguments(parser)
    parser.add_argument("--seed", type=int, default=0, help="seed of generated ids and faults")
    parser.add_argument(
        "--fault",
        action="append",
        default=[],
        metavar="SPEC",
        help="inject a status fault on /tdata, e.g. 503:n=1:route=tdata (repeatable)",
    )


def config_from_args(ns: argparse.Namespace) -> TemperFSConfig:
    return TemperFSConfig(seed=ns.seed, faults=tuple(parse_fault(s) for s in ns.fault))


def serve(config: TemperFSConfig, host: str = "127.0.0.1", port: int = 0) -> int:
    """Runs the mock until Ctrl-C or SIGTERM; prints its URL first. Returns the exit code."""

    def banner(url: str) -> list[str]:
        return [
            f"mock TemperFS listening on {url}/tdata/ (temper_api_url: {url})",
            f"records: {url}/_mock/temperfs; control API: {url}/_mock/config, /_mock/reset",
        ]

    server = MockTemperFSServer(config, host=host, port=port)
    return serve_until_signal(server, banner, "mock TemperFS")
