"""Shared fixtures: the built component, a mock E2B server, host runtimes."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

from host.runtime.loader import LoadedComponent, load_component
from host.runtime.paths import BUILT_COMPONENT

ROOT = Path(__file__).resolve().parent.parent
API_KEY = "e2b_test_key_0123456789"

settings.register_profile(
    "default", max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile(
    "long", max_examples=2000, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))


@pytest.fixture(scope="session")
def component_path() -> Path:
    """The built component; built here when missing, so component tests never skip."""
    result = subprocess.run([str(ROOT / "build.sh")], cwd=ROOT, capture_output=True, text=True)
    if result.returncode != 0:
        pytest.fail(f"build.sh failed:\n{result.stdout}\n{result.stderr}")
    assert BUILT_COMPONENT.is_file()
    return BUILT_COMPONENT


@pytest.fixture(scope="session")
def component_cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("component-cache")


@pytest.fixture(scope="session")
def loaded_component(component_path: Path, component_cache_dir: Path) -> LoadedComponent:
    return load_component(component_path, cache_dir=component_cache_dir)


@pytest.fixture
def mock_e2b() -> Iterator[object]:
    from host.mock_e2b import MockE2BConfig, MockE2BServer

    with MockE2BServer(MockE2BConfig(api_key=API_KEY)) as server:
        yield server


def ci_requires_everything() -> bool:
    """Under CI every test must run: a missing server fails instead of skipping."""
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def require_redis_server() -> None:
    """Skip (locally) or fail (under CI) a test that needs Debian's redis-server."""
    from host.multihost.redis_server import find_redis_server

    if find_redis_server() is None:
        message = "redis-server not installed (apt-get install redis-server)"
        if ci_requires_everything():
            pytest.fail(f"{message}; CI is set, so redis tests must run, not skip")
        pytest.skip(message)
