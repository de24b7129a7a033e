"""serve's pace flags: defaults from PaceSettings, push's requirements, entity sets."""

from __future__ import annotations

import argparse

import pytest

from host.serve.cli import add_serve_arguments
from host.serve.pace import PaceSettings
from host.serve.pace_options import TEMPER_TOKEN_ENV, pace_from_args, parse_entity_sets
from host.storage.memory import MemoryBackend


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_serve_arguments(parser)
    return parser.parse_args(list(argv))


def test_the_defaults_are_the_shared_pace_settings_and_push_is_off() -> None:
    pace = pace_from_args(parse(), MemoryBackend(), workers=4)
    assert pace.settings == PaceSettings()
    assert pace.wakeups is None and pace.sender is None


def test_push_needs_the_temper_api_url_and_takes_the_entity_sets(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    with pytest.raises(ValueError, match="--temper-api-url"):
        pace_from_args(parse("--push"), MemoryBackend(), workers=4)
    monkeypatch.setenv(TEMPER_TOKEN_ENV, "tok")
    args = parse(
        "--push",
        "--temper-api-url",
        "http://t",
        "--wake-action",
        "Wake",
        "--entity-set",
        "CurationJob=Jobs",
    )
    pace = pace_from_args(args, MemoryBackend(), workers=4)
    assert pace.sender is not None and pace.wakeups is not None
    target = pace.sender.target
    assert target.url("CurationJob", "j-1") == "http://t/tdata/Jobs('j-1')/Temper.Wake"
    assert target.url("TemperAgent", "a") == "http://t/tdata/TemperAgents('a')/Temper.Wake"
    assert target.credential("any-tenant") == "tok"


def test_a_malformed_entity_set_or_a_negative_window_is_refused() -> None:
    assert parse_entity_sets(["A=As", " B = Bees "]) == {"A": "As", "B": "Bees"}
    for bad in ("A", "=As", "A="):
        with pytest.raises(ValueError, match="TYPE=SET"):
            parse_entity_sets([bad])
    with pytest.raises(ValueError, match="0 or more"):
        pace_from_args(parse("--hold-ms", "-1"), MemoryBackend(), workers=4)
