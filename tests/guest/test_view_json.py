"""The JSON of `operation = status` and `operation = inspect`, byte for byte, in a few gate
states: the operator view, `/metrics`, multihost and the benchmarks read it, so a field
renamed, reordered, retyped (an int shown as a float) or computed from the wrong place
fails here. The expected documents are in view_json.json; regenerate it with
`python -m tests.guest.test_view_json` only for a change of the JSON that is meant."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from host.services.namespaces import account_namespace
from provisioner.app import run
from provisioner.config import read_config
from provisioner.gates.document import waiter_key
from provisioner.gates.results import CapacityExhausted, RateLimited, Waiter
from tests.builders import invocation
from tests.guest.harness import ACCOUNT, Harness, grant_of, hold_release_and_hold_again, queued_of
from tests.guest.resource_harness import ResourceHarness

GOLDEN = Path(__file__).with_name("view_json.json")

SANDBOX = {
    "create_slots": "2",
    "create_rate_per_s": "1",
    "create_burst": "3",
    "retry_budget": "5",
    "retry_refill_per_s": "0.3",
    "create_lease_ms": "5000",
    "create_timeout_ms": "4000",
    "max_sandboxes": "10",
    "max_sandboxes_per_tenant": "3",
}
RESOURCE = {
    "resource": "llm",
    "resource.llm.concurrency": "2",
    "resource.llm.tenant_concurrency": "1",
    "resource.llm.rpm": "90",
    "resource.llm.itpm": "6000",
    "resource.llm.tenant_itpm": "6000",
    "resource.llm.otpm": "9000",
}


def _answer(harness: Harness, settings: dict[str, str], operation: str, tenant: str) -> Any:
    config = {**settings, "operation": operation}
    outcome = run(invocation(config, tenant=tenant, entity_id="Job/probe"), harness.ports(tenant))
    assert outcome.error is None, outcome
    return outcome.params


def _sandbox_answers(harness: Harness, settings: dict[str, str]) -> dict[str, Any]:
    return {
        "inspect": _answer(harness, settings, "inspect", "operator"),
        "status tenant-a": _answer(harness, settings, "status", "tenant-a"),
        "status tenant-b": _answer(harness, settings, "status", "tenant-b"),
    }


def untouched() -> dict[str, Any]:
    return _sandbox_answers(Harness(read_config(SANDBOX).admission), SANDBOX)


def busy() -> dict[str, Any]:
    """Every kind of permit held, a capacity shrink with its cooldown and retry, queued
    waiters of two tenants, a leftover ticket and measured latency and hold times."""
    harness = Harness(read_config(SANDBOX).admission, sandbox_timeout_ms=60_000)
    dead, holder = Waiter("tenant-c", "Job/c"), Waiter("tenant-b", "Job/b")
    grant_of(harness.admit(dead))  # never settled: an unsettled create once its lease ends
    harness.advance(6_000)
    hold_release_and_hold_again(harness, holder, create_ms=300)
    grant_of(harness.admit(Waiter("tenant-a", "Job/a0")))
    full = Waiter("tenant-d", "Job/d")
    queued_of(harness.settle(full, grant_of(harness.admit(full)), CapacityExhausted()))
    harness.advance(250)
    for tenant, entity in [("tenant-a", "Job/a1"), ("tenant-b", "Job/b1"), ("tenant-a", "Job/a2")]:
        queued_of(harness.admit(Waiter(tenant, entity)))
    harness.advance(120)
    harness.backend.delete(account_namespace(ACCOUNT), waiter_key("tenant-a", "Job/a2"), None)
    return _sandbox_answers(harness, SANDBOX)


def retry_holds_a_reservation() -> dict[str, Any]:
    settings = {"create_slots": "1", "create_rate_per_s": "1000", "retry_budget": "2"}
    settings["retry_refill_per_s"] = "0.1"
    harness = Harness(read_config(settings).admission)
    retrying, later = Waiter("tenant-a", "Job/a"), Waiter("tenant-b", "Job/b")
    grant = grant_of(harness.admit(retrying))
    queued_of(harness.settle(retrying, grant, RateLimited(retry_after_ms=1_000)))
    harness.advance(3_000)
    queued_of(harness.admit(later))
    harness.advance(10)
    answers = _sandbox_answers(harness, settings)
    grant_of(harness.admit(retrying))  # spends a retry token
    harness.advance(17)
    answers["inspect after the retry"] = _answer(harness, settings, "inspect", "operator")
    answers["status after the retry"] = _answer(harness, settings, "status", "tenant-a")
    return answers


def resources() -> dict[str, Any]:
    gates = ResourceHarness(RESOURCE)
    answers: dict[str, Any] = {"status untouched": gates.status("acme")}
    gates.acquire("acme", "a", estimated_input_tokens=400, estimated_output_tokens=100)
    gates.acquire("globex", "x", estimated_input_tokens=300)
    gates.acquire("acme", "b", estimated_input_tokens=200)
    gates.advance(500)
    answers["status acme holding"] = gates.status("acme")
    answers["status globex holding"] = gates.status("globex")
    gates.settle("acme", "a", input_tokens=6500, status=429, headers={"retry-after": "2"})
    gates.advance(250)
    answers["status acme in debt"] = gates.status("acme")
    answers["status initech"] = gates.status("initech")
    return answers


SCENARIOS = {
    "untouched": untouched,
    "busy": busy,
    "retry_holds_a_reservation": retry_holds_a_reservation,
    "resources": resources,
}


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_the_json_of_status_and_inspect_is_unchanged(scenario: str) -> None:
    expected = json.loads(GOLDEN.read_text())[scenario]
    actual = SCENARIOS[scenario]()
    for name, document in expected.items():
        assert json.dumps(actual[name]) == json.dumps(document), name
    assert list(actual) == list(expected)


if __name__ == "__main__":
    found = {name: scenario() for name, scenario in SCENARIOS.items()}
    GOLDEN.write_text(json.dumps(found, indent=1) + "\n")
