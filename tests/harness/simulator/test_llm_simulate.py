"""Issue 15, acceptance 3: `simulate --llm`, sessions that take LLM turns, with and without
the resource gates, against the mock LLM API's limits (tier 1) in virtual time.

With the gates (examples/llm_gated_agent.ioa.toml through the guest): the provider answers
no 429 and every job completes, and while jobs wait the provider is kept at >= 90% of the
tier's binding limit. Without them (every session calls at once, the SDK's two retries):
the provider answers 429s and jobs are lost. Virtual time makes the throughput figure a
property of the gate, not of how loaded the machine running the test is.
"""

from __future__ import annotations

import json

import pytest

from harness.cli.main import main
from harness.simulator.llm_sessions import GATED, UNGATED, LlmScenario, run_gated, run_ungated

INCIDENT = LlmScenario(jobs=10, tenants=1, turns=10, tier="tier1")


def test_the_incident_with_the_gates_meets_the_tier_and_completes_every_job() -> None:
    """Bug caught: a gate that lets calls through above the tier's rate (the provider's
    429s), loses a session, or idles the provider while sessions wait (throughput)."""
    gated = run_gated(INCIDENT).summary()
    assert gated["provider_429"] == 0 and gated["provider_529"] == 0
    assert gated["completed"] == INCIDENT.jobs and gated["failed"] == 0
    assert gated["provider_ok"] == INCIDENT.jobs * INCIDENT.turns
    assert gated["binding_limit"] == "itpm"
    throughput = gated["throughput_while_waiting"]
    assert throughput["window_s"] > 120  # minutes of steady state, not a blip
    assert throughput["of_limit"] >= 0.9
    assert gated["of_ideal"] >= 0.9


def test_the_incident_without_the_gates_meets_429s_and_loses_jobs() -> None:
    """The control: the same jobs and tier with no gate. Bug caught: a comparison whose
    ungated side cannot fail (a provider with no limits, retries that never give up)."""
    ungated = run_ungated(INCIDENT).summary()
    assert ungated["provider_429"] > 0
    assert ungated["failed"] > 0
    assert ungated["completed"] < INCIDENT.jobs


def test_simulate_llm_json_reports_each_mode_side_by_side(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Bug caught: the documented --llm --json shape (a summary per mode) broken."""
    code = main(["simulate", "--llm", "--jobs", "4", "--turns", "3", "--json"])
    assert code == 0
    document = json.loads(capsys.readouterr().out)
    assert document["llm"]["tier"] == "tier1" and document["llm"]["time"] == "virtual"
    summary = document["summary"]
    assert set(summary) == {GATED, UNGATED}
    for mode in (GATED, UNGATED):
        assert set(summary[mode]) >= {
            "completed",
            "failed",
            "provider_429",
            "provider_requests",
            "input_tokens",
            "makespan_s",
            "ideal_s",
            "throughput_while_waiting",
        }
    assert summary[GATED]["provider_429"] == 0
    assert summary[GATED]["completed"] == 4
    assert "429" in document["comparison"]


def test_simulate_llm_table(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["simulate", "--llm", "--jobs", "2", "--turns", "2", "--llm-mode", "gated"])
    assert code == 0
    out = capsys.readouterr().out
    assert "provider 429s" in out and "gated" in out and "ungated" not in out
