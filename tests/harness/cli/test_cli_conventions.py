"""The command line's conventions (issue 26, point 8): --version, one flag name per idea
(the old names kept as aliases), defaults shown in --help, a clear error and exit 1 for a
port in use, and the quick start's events only with --verbose."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from harness.cli.main import build_parser, main
from tests.conftest import ROOT


def test_version_prints_the_installed_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0
    assert capsys.readouterr().out.startswith("sandbox-provisioner 0.")


@pytest.mark.parametrize(
    ("command", "old", "new", "dest"),
    [
        ("multihost", "--create-latency-ms", "--e2b-create-latency-ms", "create_latency_ms"),
        ("multihost", "--timeout-s", "--finish-timeout-s", "timeout_s"),
    ],
)
def test_one_flag_name_per_idea_and_the_old_name_still_works(
    command: str, old: str, new: str, dest: str
) -> None:
    parser = build_parser()
    assert getattr(parser.parse_args([command, new, "7"]), dest) == 7
    assert getattr(parser.parse_args([command, old, "7"]), dest) == 7


@pytest.mark.parametrize("command", ["serve", "invoke", "simulate", "multihost", "soak", "demo"])
def test_every_command_that_loads_the_component_takes_cache_dir(command: str) -> None:
    args = build_parser().parse_args([command, "--cache-dir", "/tmp/x"])
    assert args.cache_dir == Path("/tmp/x")


def test_help_shows_defaults(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["invoke", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "the E2B API base URL (default: https://api.e2b.app)" in text
    assert "(default: default)" in text  # --account


def test_a_port_in_use_is_a_clear_error_and_exit_1(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("SANDBOX_PROVISIONER_TOKEN", "t")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code = main(["serve", "--listen", f"127.0.0.1:{port}", "--storage", "memory://",
                     "--e2b-url", "http://127.0.0.1:9", "--allow-private-network"])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 1
    assert f"cannot listen on 127.0.0.1:{port}" in err and "--listen" in err


@pytest.mark.component
def test_the_quick_start_prints_events_only_with_verbose(
    component_path: Path, component_cache_dir: Path
) -> None:
    def run(*extra: str) -> str:
        result = subprocess.run(
            [sys.executable, "-m", "harness.cli", "simulate", "--mode", "provisioner", "--jobs",
             "2", "--turns", "1", "--no-tradeoff", *extra],
            cwd=ROOT, capture_output=True, text=True, timeout=600,
            env={**os.environ, "SANDBOX_PROVISIONER_CACHE": str(component_cache_dir)},
        )  # fmt: skip
        assert result.returncode == 0, result.stderr[-2000:]
        return result.stdout

    quiet, verbose = run(), run("--verbose")
    assert "2/2 completed" in quiet and "2/2 completed" in verbose
    assert "ready ->" not in quiet and "submitted" not in quiet
    assert "ready ->" in verbose
    assert len(quiet.splitlines()) < 12 < len(verbose.splitlines())
