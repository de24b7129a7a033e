"""Fixtures of the host's tests."""

from __future__ import annotations

import functools
from pathlib import Path

import pytest

from tests.host.serve.serve_process import ServingAMock, serving_a_mock


@pytest.fixture
def serving_mock(tmp_path: Path, component_cache_dir: Path) -> ServingAMock:
    """A mock E2B and a serve process in front of it, on this test's `tmp_path` (so
    `serve_storage(tmp_path)` is the serve's storage) and the session's compiled component."""
    return functools.partial(serving_a_mock, tmp_path, component_cache_dir)
