"""The soak audit's account of a permit left in the gate (harness/multihost/soak.py
`leftover_permits`): which lease, whose, its stored fields and its job's history, so a
failure can be diagnosed from the report alone."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from harness.multihost.run import Event
from harness.multihost.soak import (
    FaultRecord,
    _leftover_line,
    leftover_permits,
    read_entity_record,
)
from host.services.namespaces import ScopedStorage
from host.storage import storage_from_uri
from provisioner.config import AdmissionConfig
from provisioner.entity_records import READY, EntityRecord, EntityRecords
from provisioner.gates.document import GateState, SandboxLease
from provisioner.gates.view import GateView, gate_view

JOB = "ab12cd-00007"
OTHER = "ab12cd-00008"


@dataclass
class RecordedHost:
    name: str
    stderr_path: Path
    events: list[Event] = field(default_factory=list)


@dataclass
class RecordedCluster:
    """What a finished run reported: the events, results and hosts the audit reads."""

    hosts: list[RecordedHost]
    reported: list[Event]
    finished: dict[str, Event]

    def events(self) -> list[Event]:
        return list(self.reported)

    def results(self) -> dict[str, Event]:
        return dict(self.finished)


def run_with_a_lease_left(tmp_path: Path) -> tuple[RecordedCluster, list[FaultRecord], GateView]:
    """A run whose job JOB completed although its release could not write the gate: the
    sandbox was killed, its lease stayed."""
    stderr = tmp_path / "host-2.stderr"
    stderr.write_text(
        f"guest warn [tenant-a {JOB}] admission release failed: StorageUnavailable('down')\n"
        f"guest warn [tenant-b {OTHER}] admission for TemperAgent/{OTHER} fails closed\n"
    )
    events: list[Event] = [
        {"event": "create_sent", "host": "host-1", "at_ms": 10, "key": "tsp-k7", "job": JOB},
        {"event": "create_sent", "host": "host-1", "at_ms": 11, "key": "tsp-k8", "job": OTHER},
        {"event": "create_answered", "host": "host-1", "at_ms": 20, "key": "tsp-k7", "job": JOB},
        {"event": "outcome", "host": "host-1", "at_ms": 21, "job": JOB, "operation": "provision",
         "action": "SandboxReady", "sandbox_id": "sbx-7"},
        {"event": "kill_sent", "host": "host-2", "at_ms": 40, "sandbox_id": "sbx-7"},
        {"event": "kill_sent", "host": "host-2", "at_ms": 41, "sandbox_id": "sbx-8"},
        {"event": "kill_answered", "host": "host-2", "at_ms": 45, "sandbox_id": "sbx-7",
         "status": 204},
        {"event": "outcome", "host": "host-2", "at_ms": 46, "job": JOB, "operation": "release",
         "action": "SandboxReleased", "sandbox_id": "sbx-7"},
        {"event": "result", "host": "host-2", "at_ms": 50, "id": JOB, "state": "Completed"},
    ]  # fmt: skip
    result = events[-1]
    hosts = [RecordedHost("host-1", tmp_path / "host-1.stderr"), RecordedHost("host-2", stderr)]
    run = RecordedCluster(hosts, events, {JOB: result})
    faults = [
        FaultRecord("kill_mid_create", 3.0, {"host": "host-2", "hit": True}),
        FaultRecord("rate_429", 5.0, {"hit": True}),
    ]
    state = GateState(
        sandbox_leases=[
            SandboxLease("c0007", "tenant-a", f"TemperAgent/{JOB}", 300_030, 30, "sbx-7")
        ]
    )
    return run, faults, gate_view(state, AdmissionConfig(), 1_000, 9)


def test_a_lease_left_over_is_reported_with_its_fields_and_its_jobs_history(
    tmp_path: Path,
) -> None:
    # Catches: a report that says only how many permits were left (last session's "one
    # sandbox lease left over", which no one could diagnose): which lease, whose, when it
    # expires, how its job ended, what its releases answered and what the guest warned.
    run, faults, gate = run_with_a_lease_left(tmp_path)
    [left] = leftover_permits(run, faults, gate)
    assert left["kind"] == "sandbox_lease"
    assert left["stored"] == {
        "lease_id": "c0007",
        "tenant": "tenant-a",
        "entity": f"TemperAgent/{JOB}",
        "expires_ms": 300_030,
        "started_ms": 30,
        "sandbox_id": "sbx-7",
    }
    assert (left["now_ms"], left["holds_for_ms"]) == (1_000, 299_030)
    assert left["job"] == JOB and left["result"]["state"] == "Completed"
    assert left["hosts"] == ["host-1", "host-2"]
    assert left["sandboxes"] == ["sbx-7"]
    # Its own create, kill and release, not the other job's.
    assert [(e["event"], e["at_ms"]) for e in left["events"]] == [
        ("create_sent", 10),
        ("create_answered", 20),
        ("outcome", 21),
        ("kill_sent", 40),
        ("kill_answered", 45),
        ("outcome", 46),
        ("result", 50),
    ]
    assert left["releases"] == [
        {"host": "host-2", "at_ms": 46, "action": "SandboxReleased", "sandbox_id": "sbx-7"}
    ]
    assert left["guest_warnings"] == [
        f"host-2: guest warn [tenant-a {JOB}] admission release failed: StorageUnavailable('down')"
    ]
    assert [f["kind"] for f in left["faults_at_its_hosts"]] == ["kill_mid_create"]

    line = _leftover_line(left)
    for named in ("sandbox_lease", "c0007", "sbx-7", "299030 ms", JOB, "Completed",
                  "host-2: SandboxReleased", "1 guest warnings"):  # fmt: skip
        assert named in line, (named, line)


def test_the_leftover_report_reads_the_entity_record_from_the_run_storage(tmp_path: Path) -> None:
    # Catches: the entity record read from the wrong scope (the account's instead of the
    # tenant's) or under the wrong key, which would report a kept record as forgotten:
    # whether a release forgot the record is what tells the two leaks apart.
    url = f"sqlite:///{tmp_path / 'run.db'}"
    backend = storage_from_uri(url)
    try:
        records = EntityRecords(ScopedStorage(backend, tenant="tenant-a", account="soak-x"))
        version = records.put(
            f"TemperAgent/{JOB}", EntityRecord(READY, "n7", 5, 1, "sbx-7"), None, 600_000
        )
    finally:
        backend.close()
    found = read_entity_record(url, "soak-x", "tenant-a", f"TemperAgent/{JOB}")
    assert found is not None
    assert (found["state"], found["nonce"], found["sandbox_id"]) == (READY, "n7", "sbx-7")
    assert found["version"] == version
    assert read_entity_record(url, "soak-x", "tenant-b", f"TemperAgent/{JOB}") is None
    assert read_entity_record(url, "soak-x", "tenant-a", f"TemperAgent/{OTHER}") is None
