"""`sandbox-provisioner mock-temperfs`: the flags make the config, and a real process serves."""

from __future__ import annotations

import signal

import httpx
import pytest

from harness.cli.main import build_parser
from harness.mocks.e2b import parse_fault
from harness.mocks.temperfs import TemperFSConfig
from harness.mocks.temperfs.cli import config_from_args
from tests.harness.command_server import command_server


def config_of(*flags: str) -> TemperFSConfig:
    return config_from_args(build_parser().parse_args(["mock-temperfs", *flags]))


def test_flags_make_the_config() -> None:
    assert config_of() == TemperFSConfig()
    config = config_of("--seed", "3", "--fault", "503:n=1:route=tdata")
    assert config == TemperFSConfig(seed=3, faults=(parse_fault("503:n=1:route=tdata"),))


def test_a_fault_it_cannot_inject_is_refused() -> None:
    with pytest.raises(ValueError, match="status faults only"):
        config_of("--fault", "reset:n=1:route=tdata")


def test_the_command_serves_until_sigterm() -> None:
    with command_server(
        "harness.cli", "mock-temperfs", "--port", "0", "--fault", "503:n=1:route=tdata"
    ) as (process, url):
        headers = {"x-tenant-id": "acme"}
        failed = httpx.post(f"{url}/tdata/Workspaces", json={"Id": "w"}, headers=headers)
        made = httpx.post(f"{url}/tdata/Workspaces", json={"Id": "w"}, headers=headers)
        assert (failed.status_code, made.status_code) == (503, 201)
        assert made.json()["entity_id"] == "w"
        records = httpx.get(f"{url}/_mock/temperfs").json()
        assert [w["entity_id"] for w in records["workspaces"]] == ["w"]
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0
