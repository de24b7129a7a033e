"""The operator's reading of the gates, through the guest's `inspect` operation on gate
state built by the real controller (virtual time): read-only storage, the tables, the
JSON, the gauges."""

from __future__ import annotations

import argparse
import io
import json
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families
from rich.console import Console

from host.operator.gates import ReadOnlyBackend, read_gates_offline
from host.operator.status import EXIT_USAGE, render, run_status
from host.serve.metrics import ServeMetrics
from host.services.namespaces import account_namespace
from host.storage.base import StorageUnavailable
from host.storage.sqlite import SqliteBackend
from provisioner.config import AdmissionConfig
from provisioner.gates.results import Grant, Queued, Waiter
from tests.guest.harness import ACCOUNT, Harness

CONFIG = AdmissionConfig(create_slots=1, create_rate_per_s=1000.0, create_burst=10)
SETTINGS = {"create_slots": "1", "create_rate_per_s": "1000", "create_burst": "10"}


def queue_of_three() -> Harness:
    harness = Harness(CONFIG)
    assert isinstance(harness.admit(Waiter("acme", "Job/holder")), Grant)
    for n in range(3):
        assert isinstance(harness.admit(Waiter("acme" if n < 2 else "other", f"Job/w{n}")), Queued)
    harness.advance(1500)
    return harness


def test_the_inspection_reads_the_account_and_the_operator_storage_refuses_writes() -> None:
    # Catches: an operator's look that could change what it looks at.
    harness = queue_of_three()
    read_only = ReadOnlyBackend(harness.backend)
    namespace = account_namespace(ACCOUNT)
    with pytest.raises(StorageUnavailable):
        read_only.compare_and_swap(namespace, "adm/gate", None, b"{}", None)
    with pytest.raises(StorageUnavailable):
        read_only.delete(namespace, "adm/gate", None)
    keys_before = sorted(harness.backend.keys(namespace))
    before = harness.backend.get(namespace, "adm/gate")
    view = read_gates_offline(harness.backend, ACCOUNT, SETTINGS)
    assert harness.backend.get(namespace, "adm/gate") == before
    assert sorted(harness.backend.keys(namespace)) == keys_before
    assert view["create_slots"]["in_use"] == 1 and view["create_slots"]["limit"] == 1
    assert [w["entity"] for w in view["waiters"]] == ["Job/w0", "Job/w2", "Job/w1"]  # fair
    assert read_gates_offline(harness.backend, "another-account", SETTINGS)["waiters"] == []


def test_the_tables_and_json_show_every_gate_and_waiter() -> None:
    harness = queue_of_three()
    view = read_gates_offline(harness.backend, ACCOUNT, SETTINGS)
    console = Console(file=io.StringIO(), width=160, record=True)
    console.print(render(view, ACCOUNT))
    text = console.export_text()
    for needle in ("create slots", "rate", "capacity", "backoff", "retry budget", "3 waiting"):
        assert needle in text
    for entity in ("Job/w0", "Job/w1", "Job/w2", "acme/Job/holder"):
        assert entity in text
    assert "create_slots" in text and "1.5s" in text  # reason; waited
    doc = json.loads(json.dumps(view))
    assert doc["permits_held"] == 1
    assert [w["position"] for w in doc["waiters"]] == [1, 2, 3]
    assert {w["stage"] for w in doc["waiters"]} == {"queued"}
    assert all(w["waited_ms"] == 1500 and w["alive"] for w in doc["waiters"])


def test_the_gate_gauges_count_waiters_by_reason() -> None:
    harness = queue_of_three()
    metrics = ServeMetrics(
        read_gates=lambda: read_gates_offline(harness.backend, ACCOUNT, SETTINGS)
    )
    found = {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(metrics.exposition().decode())
        for sample in family.samples
    }
    assert found[("sandbox_provisioner_queue_length", ())] == 3
    assert found[("sandbox_provisioner_queue_waiters", (("reason", "create_slots"),))] == 3
    assert found[("sandbox_provisioner_queue_waiters", (("reason", "rate"),))] == 0
    assert found[("sandbox_provisioner_gate_in_use", (("gate", "create_slots"),))] == 1
    assert found[("sandbox_provisioner_gates_up", ())] == 1

    def broken() -> object:
        raise ConnectionError("redis down")

    down = ServeMetrics(read_gates=broken)  # type: ignore[arg-type]
    text = down.exposition().decode()
    assert "sandbox_provisioner_gates_up 0.0" in text
    assert "sandbox_provisioner_queue_length" not in text  # no stale figures


def test_a_bad_setting_is_a_usage_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # The component judges the settings, so status needs an account with state to ask.
    uri = f"sqlite:///{tmp_path / 'state.db'}"
    backend = SqliteBackend.from_uri(uri)
    backend.compare_and_swap(account_namespace("default"), "seen", None, b"1", None)
    backend.close()
    for bad in (["create_slots"], ["create_slots=0"], ["create_slots=lots"]):
        args = argparse.Namespace(
            storage=uri,
            account="default",
            config=bad,
            json=True,
            watch=False,
            interval=1.0,
        )
        assert run_status(args) == EXIT_USAGE
    assert "sandbox-provisioner status:" in capsys.readouterr().err
