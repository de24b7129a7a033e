"""The installed package stands on its own: a wheel built from this checkout, installed into
a fresh virtual environment, runs `invoke` and `simulate` from another directory, and carries
neither the tests, the benchmarks nor their test doubles."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import API_KEY, ROOT

PRODUCT = ("host", "harness", "provisioner")
NOT_PRODUCT = ("tests", "benchmarks")
TEST_DOUBLES = ("RecordingTelemetrySink", "ManualClock", "RecordingTelemetry", "Harness")


def _imported_modules(source: Path) -> Iterator[str]:
    tree = ast.parse(source.read_text(), filename=str(source))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.module


def test_the_product_never_imports_tests_or_benchmarks() -> None:
    offenders = [
        f"{path.relative_to(ROOT)} imports {module}"
        for package in PRODUCT
        for path in sorted((ROOT / package).rglob("*.py"))
        for module in _imported_modules(path)
        if module.split(".")[0] in NOT_PRODUCT
    ]
    assert offenders == []


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory, component_path: Path) -> Path:
    """A fresh venv with the project installed from a wheel (not editable)."""
    venv = tmp_path_factory.mktemp("installed") / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = venv / "bin" / "python"
    result = subprocess.run(
        [str(python), "-m", "pip", "install", "--quiet", str(ROOT)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return venv


def _run(venv: Path, args: list[str], cwd: Path, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    env = {
        key: value
        for key, value in os.environ.items()
        if key not in ("PYTHONPATH", "VIRTUAL_ENV", "SANDBOX_PROVISIONER_COMPONENT")
    }
    env.update(
        E2B_API_KEY=API_KEY,
        SANDBOX_PROVISIONER_CACHE=str(cwd / "cache"),
        SANDBOX_PROVISIONER_STATE=str(cwd / "state"),
    )
    return subprocess.run(
        [str(venv / "bin" / args[0]), *args[1:]],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        **kwargs,
    )


@pytest.mark.slow
@pytest.mark.component
def test_an_installed_wheel_runs_invoke_and_simulate_outside_the_checkout(
    installed: Path, tmp_path: Path, mock_e2b: Any
) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    where = _run(
        installed,
        [
            "python",
            "-c",
            "import host, host.runtime.paths as p; print(host.__file__); "
            "print(p.default_component())",
        ],
        elsewhere,
    )
    package_file, component = where.stdout.split()
    assert not Path(package_file).is_relative_to(ROOT), "imported the checkout, not the wheel"
    assert Path(component).is_file() and not Path(component).is_relative_to(ROOT)

    context = {
        "tenant": "acme",
        "entity_type": "CurationJob",
        "entity_id": "job-1",
        "trigger_action": "Submit",
        "trigger_params": {},
        "entity_state": {},
        "integration_config": {"template_id": "base"},
        "session_id": "s-1",
        "trace_id": "t-1",
    }
    invoked = _run(
        installed,
        [
            "sandbox-provisioner",
            "invoke",
            "-",
            "--e2b-url",
            mock_e2b.url,
            "--allow-private-network",
        ],
        elsewhere,
        input=json.dumps(context),
    )
    assert invoked.returncode == 0, invoked.stderr
    assert json.loads(invoked.stdout)["action"] == "SandboxReady"
    assert len(mock_e2b.running_sandboxes()) == 1

    simulated = _run(
        installed,
        ["sandbox-provisioner", "simulate", "--mode", "provisioner", "--jobs", "3", "--json"],
        elsewhere,
    )
    assert simulated.returncode == 0, simulated.stderr
    report = json.loads(simulated.stdout)
    assert report["summary"]["completed"] == 3


@pytest.mark.slow
@pytest.mark.component
def test_the_installed_package_loads_each_example_spec_from_the_wheel(
    installed: Path, tmp_path: Path
) -> None:
    """Bug caught: an example left out of the wheel (examples/ ships as `harness.examples`),
    which `simulate` and the multihost worker read by name."""
    examples = sorted(path.name for path in (ROOT / "examples").glob("*.ioa.toml"))
    probe = (
        "import json, sys, harness.examples\n"
        "from harness.simulator.spec import packaged_spec, packaged_spec_text\n"
        "names = json.loads(sys.argv[1])\n"
        "print(json.dumps({'where': harness.examples.__file__, 'specs': {n: "
        "[packaged_spec(n).name, packaged_spec_text(n)] for n in names}}))\n"
    )
    result = _run(installed, ["python", "-c", probe, json.dumps(examples)], tmp_path)
    assert result.returncode == 0, result.stderr
    loaded = json.loads(result.stdout)
    assert not Path(loaded["where"]).is_relative_to(ROOT), "read the checkout, not the wheel"
    assert len(examples) == 3
    for name in examples:
        spec_name, text = loaded["specs"][name]
        assert text == (ROOT / "examples" / name).read_text(), name
        assert spec_name


@pytest.mark.slow
@pytest.mark.component
def test_the_installed_package_carries_no_tests_benchmarks_or_doubles(
    installed: Path, tmp_path: Path
) -> None:
    probe = (
        "import importlib, pkgutil, sys\n"
        "import harness, host, provisioner\n"
        "found = []\n"
        "for top in ('tests', 'benchmarks'):\n"
        "    try:\n"
        "        importlib.import_module(top)\n"
        "        found.append(top)\n"
        "    except ImportError:\n"
        "        pass\n"
        "for package in (host, harness, provisioner):\n"
        "    for info in pkgutil.walk_packages(package.__path__, package.__name__ + '.'):\n"
        # __main__ modules run on import; the WIT adapter imports only inside the component.
        "        if info.name.endswith('.__main__') or info.name == 'provisioner.component':\n"
        "            continue\n"
        "        module = importlib.import_module(info.name)\n"
        f"        for name in {TEST_DOUBLES!r}:\n"
        "            if hasattr(module, name):\n"
        "                found.append(info.name + '.' + name)\n"
        "print('\\n'.join(found))\n"
    )
    result = _run(installed, ["python", "-c", probe], tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == []
