"""Shared fixtures: the built component, a mock E2B server, host runtimes."""

from __future__ import annotations

import os
import queue
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

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


# -- every answer the mock E2B sends in the suite is checked against E2B's OpenAPI ---------
# The mock's app is wrapped (inside its raw-send keeper, so TCP resets still work) with a
# tap that queues each answer; a checker thread validates them off the server's event loop,
# and each test fails if an answer sent during it (or before it, by a shared server) did
# not conform. See tests/host/mock_e2b/openapi_check.py.

_answers: queue.Queue[Any] = queue.Queue()
_violations: list[str] = []


def _check_answers() -> None:
    from tests.host.mock_e2b.openapi_check import check_answer

    while True:
        answer = _answers.get()
        try:
            _violations.extend(check_answer(answer))
        except Exception as exc:  # a checker bug must fail the test, not kill this thread
            _violations.append(f"{answer.describe()}: checker failed: {exc!r}")
        finally:
            _answers.task_done()


@pytest.fixture(scope="session", autouse=True)
def _tap_mock_e2b_answers() -> Iterator[None]:
    from host.mock_e2b.app import build_app
    from host.mock_e2b.connection import KeepRawSend
    from tests.host.mock_e2b.openapi_check import ResponseTap

    def tapped_build_app(*args: Any, **kwargs: Any) -> Any:
        app, runtime = build_app(*args, **kwargs)
        assert isinstance(app, KeepRawSend)
        return KeepRawSend(ResponseTap(app.app, _answers.put)), runtime

    threading.Thread(target=_check_answers, name="openapi-check", daemon=True).start()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("host.mock_e2b.server.build_app", tapped_build_app)
        yield


@pytest.fixture(autouse=True)
def _mock_e2b_answers_conform(_tap_mock_e2b_answers: None) -> Iterator[None]:
    yield
    _answers.join()
    found = list(_violations)
    _violations.clear()
    assert not found, "mock E2B answers that do not conform to E2B's OpenAPI:\n" + "\n".join(
        found[:20]
    )
