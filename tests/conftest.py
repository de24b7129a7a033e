"""Shared fixtures: the built component, a mock E2B server, host runtimes."""

from __future__ import annotations

import functools
import json
import logging
import os
import queue
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from hypothesis import HealthCheck, settings

from host.runtime.loader import LoadedComponent, load_component
from host.runtime.paths import BUILT_COMPONENT

if TYPE_CHECKING:
    from tests.harness.multihost.soak_support import RunSoak

ROOT = Path(__file__).resolve().parent.parent
API_KEY = "e2b_test_key_0123456789"

settings.register_profile(
    "default", max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile(
    "long", max_examples=2000, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
# The mutation run's (docs/mutation.md): a few short examples, replayed the same way every
# run, so each mutant costs seconds rather than minutes.
settings.register_profile(
    "mutation",
    max_examples=8,
    stateful_step_count=30,
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Under mutmut (docs/mutation.md), quickest tests first: it stops at the first failure,
    so a mutant a unit test kills then costs that test, not the state machines before it.
    The durations are the ones mutmut measured (its stats file, in the mutants/ copy)."""
    stats = Path("mutmut-stats.json")
    if "MUTANT_UNDER_TEST" not in os.environ or not stats.is_file():
        return
    durations: dict[str, float] = json.loads(stats.read_text()).get("duration_by_test", {})
    items.sort(key=lambda item: durations.get(item.nodeid, 0.0))


@pytest.fixture(scope="session")
def component_path() -> Path:
    """The built component; built here when missing, so component tests never skip."""
    result = subprocess.run([str(ROOT / "build.sh")], cwd=ROOT, capture_output=True, text=True)
    if result.returncode != 0:
        pytest.fail(f"build.sh failed:\n{result.stdout}\n{result.stderr}")
    assert BUILT_COMPONENT.is_file()
    return BUILT_COMPONENT


@pytest.fixture(scope="session")
def _fresh_component_cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("component-cache")


@pytest.fixture(scope="session")
def loaded_component(component_path: Path, _fresh_component_cache_dir: Path) -> LoadedComponent:
    """The session's one compile of the component, into an empty cache directory (so
    `from_cache` is always False: test_end_to_end.py's cache tests rely on it)."""
    return load_component(component_path, cache_dir=_fresh_component_cache_dir)


@pytest.fixture(scope="session")
def component_cache_dir(
    loaded_component: LoadedComponent, _fresh_component_cache_dir: Path
) -> Path:
    """The compile cache that holds the session's compiled component: hosts and host
    processes given it load in milliseconds instead of compiling again (5-7 s quiet, a
    minute or more on a loaded machine). Requesting it compiles first, in this process, so
    `loaded_component` is the cold compile whichever test asks first."""
    assert not loaded_component.from_cache
    return _fresh_component_cache_dir


@pytest.fixture
def run_soak_command(
    capsys: pytest.CaptureFixture[str],
    loaded_component: LoadedComponent,
    component_cache_dir: Path,
) -> RunSoak:
    """`sandbox-provisioner soak` in-process on the session's component: called with the
    extra arguments, it returns the exit code and the JSON report."""
    from tests.harness.multihost.soak_support import soak_report

    return functools.partial(soak_report, capsys, loaded_component, component_cache_dir)


@pytest.fixture
def ctrl_c_raises_keyboard_interrupt() -> Iterator[None]:
    """What a user at a terminal has: SIGINT raises KeyboardInterrupt here and, after exec,
    in a child (a Python handler becomes the default there). A test runner started in the
    background without job control, or an xdist worker, can inherit SIGINT *ignored*, which
    every child inherits too (and `_thread.interrupt_main` then does nothing): tests of
    Ctrl-C would fail for a reason that is not the product's."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


@pytest.fixture
def mock_e2b() -> Iterator[object]:
    from harness.mocks.e2b import MockE2BConfig, MockE2BServer

    with MockE2BServer(MockE2BConfig(api_key=API_KEY)) as server:
        yield server


def ci_requires_everything() -> bool:
    """Under CI every test must run: a missing server fails instead of skipping."""
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def require_redis_server() -> None:
    """Skip (locally) or fail (under CI) a test that needs Debian's redis-server."""
    from harness.multihost.redis_server import find_redis_server

    if find_redis_server() is None:
        message = "redis-server not installed (apt-get install redis-server)"
        if ci_requires_everything():
            pytest.fail(f"{message}; CI is set, so redis tests must run, not skip")
        pytest.skip(message)


# -- every answer the mock E2B sends in the suite is checked against E2B's OpenAPI ---------
# The mock's app is wrapped (inside its raw-send keeper, so TCP resets still work) with a
# tap that only records each answer; they are checked after the test, so the checking
# takes no CPU from the servers and clients a test times. A test fails if an answer sent
# during it (or before it, by a shared server) does not conform.
# See tests/harness/mocks/e2b/openapi_check.py.

_answers: queue.SimpleQueue[Any] = queue.SimpleQueue()


@pytest.fixture(scope="session", autouse=True)
def _tap_mock_e2b_answers() -> Iterator[None]:
    from harness.mocks.e2b.app import build_app
    from harness.mocks.e2b.connection import KeepRawSend
    from tests.harness.mocks.e2b.openapi_check import ResponseTap

    def tapped_build_app(*args: Any, **kwargs: Any) -> Any:
        app, runtime = build_app(*args, **kwargs)
        assert isinstance(app, KeepRawSend)
        return KeepRawSend(ResponseTap(app.app, _answers.put)), runtime

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("harness.mocks.e2b.server.build_app", tapped_build_app)
        yield


@pytest.fixture(autouse=True)
def _mock_e2b_answers_conform(
    _tap_mock_e2b_answers: None, caplog: pytest.LogCaptureFixture
) -> Iterator[None]:
    from tests.harness.mocks.e2b.openapi_check import check_answer

    yield
    found: list[str] = []
    checked: set[Any] = set()
    while True:
        try:
            answer = _answers.get_nowait()
        except queue.Empty:
            break
        key = (
            answer.method,
            answer.path,
            answer.status,
            answer.body,
            tuple(sorted(answer.headers.items())),
        )
        if key not in checked:  # the same answer again (a poll's) conforms as the first did
            checked.add(key)
            found += check_answer(answer)
    # A text/plain 500 is an exception the mock did not handle (seen once, in a loaded CI
    # run's short soak): uvicorn logged its traceback, which says where.
    crashes = [
        caplog.handler.format(record)
        for record in caplog.get_records("call")
        if record.levelno >= logging.ERROR and record.name.startswith("uvicorn")
    ]
    assert not found, (
        "mock E2B answers that do not conform to E2B's OpenAPI:\n"
        + "\n".join(found[:20])
        + "".join(f"\nlogged by the server: {crash[-3000:]}" for crash in crashes[:3])
    )
