"""Guest operations natively, with E2B faked at the Http port: what happens around a grant,
and the operations layer's ordering rules (provisioner/operations.py): the entity record
is written before a create is sent, deleted only after E2B confirmed the kill, and one
idempotency key serves a whole provisioning cycle."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest

from harness.mocks.temperfs.store import TemperFSStore
from harness.simulator.simulated_ports import EventLog, SeededRandom, VirtualClock
from host.runtime.component_runtime import HostServices
from host.runtime.native import NativeRuntime, native_ports
from host.services.namespaces import account_namespace, tenant_namespace
from host.storage.memory import MemoryBackend
from provisioner.config import AdmissionConfig
from provisioner.entity_records import PENDING, EntityRecord, EntityRecords, idempotency_key
from provisioner.gates.document import GATE_KEY
from provisioner.model import Outcome
from provisioner.ports import (
    HttpRequest,
    HttpResponse,
    LogLevel,
    StorageConflict,
    StorageError,
    StorageUnavailable,
)
from tests.builders import invocation
from tests.doubles import InterposedBackend, RecordingTelemetrySink

BASE = "https://api.e2b.test"
TENANT = "acme"
CONFIG = {"e2b_api_url": BASE, "create_slots": "1", "create_rate_per_s": "1000"}


class ExplodingE2B:
    """Raises something no port promises on the first create, then behaves."""

    def __init__(self) -> None:
        self.creates = 0

    def send(self, request: HttpRequest, *, deadline_ms: int | None = None) -> HttpResponse:
        self.creates += request.method == "POST"
        if request.method == "POST" and self.creates == 1:
            raise RuntimeError("a bug below the port")
        body = {"sandboxID": f"sbx-{self.creates}", "templateID": "base", "clientID": "c"}
        return HttpResponse(201, (), json.dumps(body).encode())


def _answer(status: int, body: Any = None) -> HttpResponse:
    return HttpResponse(status, (), b"" if body is None else json.dumps(body).encode())


@dataclass
class ScriptedE2B:
    """E2B at the Http port, keeping its sandboxes (with their metadata) so a test sees what
    really runs there. `create_answers` and `kill_answers` are statuses answered in turn
    (then 201 and 204); a create answered 503 still makes its sandbox when `made_on_failure`
    (E2B made it but the answer was lost). A create carrying a known idempotency key gets
    the sandbox that key already made, as E2B's does."""

    create_answers: list[int] = field(default_factory=list)
    kill_answers: list[int] = field(default_factory=list)
    made_on_failure: bool = False
    # The host's own E2B key, as the gateway reports it (None: a double that does not say).
    api_key: str | None = None
    # What a successful create answers beyond the id (E2B's field names).
    answer: dict[str, str] = field(default_factory=lambda: {"templateID": "base", "clientID": "c"})
    on_create: Callable[[HttpRequest], None] | None = None
    sandboxes: dict[str, dict[str, str]] = field(default_factory=dict)
    create_keys: list[str] = field(default_factory=list)
    requests: list[tuple[str, str]] = field(default_factory=list)

    def send(self, request: HttpRequest, *, deadline_ms: int | None = None) -> HttpResponse:
        if not request.url.startswith(BASE):  # TemperFS, say: not here
            return _answer(503, {"message": "not this service"})
        path = urlsplit(request.url).path
        self.requests.append((request.method, path))
        if request.method == "POST" and path == "/v2/sandboxes":
            return self._create(request)
        if request.method == "GET" and path == "/v2/sandboxes":
            query = parse_qs(urlsplit(request.url).query)["metadata"][0]
            wanted = {k: v[0] for k, v in parse_qs(query).items()}
            return _answer(
                200,
                [
                    {"sandboxID": sid, "templateID": "base", "clientID": "c"}
                    for sid, metadata in self.sandboxes.items()
                    if wanted.items() <= metadata.items()
                ],
            )
        if request.method == "DELETE" and path.startswith("/sandboxes/"):
            status = self.kill_answers.pop(0) if self.kill_answers else 204
            if status in (200, 204):
                self.sandboxes.pop(path.removeprefix("/sandboxes/"), None)
            return _answer(status, None if status == 204 else {"message": "unavailable"})
        raise AssertionError(f"unexpected request {request.method} {request.url}")

    def _create(self, request: HttpRequest) -> HttpResponse:
        key = dict(request.headers)["idempotency-key"]
        self.create_keys.append(key)
        if self.on_create is not None:
            self.on_create(request)
        metadata: dict[str, str] = json.loads(request.body)["metadata"]
        assert metadata["temper_idempotency_key"] == key
        made = [sid for sid, m in self.sandboxes.items() if m["temper_idempotency_key"] == key]
        status = self.create_answers.pop(0) if self.create_answers else 201
        if status == 201 or self.made_on_failure:
            sandbox_id = made[0] if made else f"sbx-{len(self.create_keys)}"
            self.sandboxes[sandbox_id] = metadata
        if status != 201:
            return _answer(status, {"message": "unavailable"})
        return _answer(201, {"sandboxID": sandbox_id, **self.answer})


class Guest:
    """One tenant's storage on a virtual clock, invoked natively through `NativeRuntime`."""

    def __init__(
        self,
        e2b: Any,
        wrap: Callable[[MemoryBackend], Any] | None = None,
        random_u64: Callable[[], int] | None = None,
    ) -> None:
        self.clock = VirtualClock()
        self.backend = MemoryBackend(self.clock.now_ms)
        self.e2b = e2b
        self.telemetry = RecordingTelemetrySink()
        self.runtime = NativeRuntime(
            HostServices(
                self.backend if wrap is None else wrap(self.backend),
                e2b,
                self.telemetry,
                random_u64=random_u64 or SeededRandom(7).next_u64,
                clock_ms=self.clock.now_ms,
            )
        )

    def invoke(self, operation: str, entity_id: str = "job-1", **config: str) -> Outcome:
        merged = {**CONFIG, "operation": operation, **config}
        return self.runtime.invoke(
            invocation(merged, tenant=TENANT, entity_type="Job", entity_id=entity_id)
        )

    def record(self, entity_id: str = "job-1") -> EntityRecord | None:
        loaded = self.records().load(f"Job/{entity_id}")
        return None if loaded is None else loaded[0]

    def records(self) -> EntityRecords:
        ports = native_ports(
            self.backend,
            tenant=TENANT,
            account="default",
            http=self.e2b,
            clock=self.clock,
            random=SeededRandom(0),
            telemetry=EventLog(),
        )
        return EntityRecords(ports.storage)

    def account(self) -> dict[str, Any]:
        gates: dict[str, Any] = self.invoke("status").params["gates"]
        return dict(gates["account"])

    def events(self, name: str) -> list[dict[str, Any]]:
        return [event for _, event in self.telemetry.events if event.get("event") == name]

    def provision_until_settled(
        self, entity_id: str = "job-1", *, polls: int = 50, **config: str
    ) -> Outcome:
        """Provision as a session does: poll again when told, until an answer that ends it."""
        for _ in range(polls):
            outcome = self.invoke("provision", entity_id, **config)
            if outcome.action != "SandboxQueued":
                return outcome
            self.clock.advance(max(1, int(outcome.params["retry_after_ms"])))
        raise AssertionError(f"still queued after {polls} polls")


def provision(runtime: NativeRuntime, entity_id: str) -> Outcome:
    return runtime.invoke(
        invocation(CONFIG, entity_type="Job", entity_id=entity_id, trigger_action="Submit")
    )


def test_a_grant_is_settled_even_when_the_create_blows_up() -> None:
    """With create_slots=1, a slot kept after the failure would queue the next entity
    (reason create_slots) until its 150 s lease expired."""
    clock = VirtualClock()
    e2b = ExplodingE2B()
    runtime = NativeRuntime(
        HostServices(
            MemoryBackend(clock.now_ms),
            e2b,  # type: ignore[arg-type]
            RecordingTelemetrySink(),
            clock_ms=clock.now_ms,
        )
    )
    broken = provision(runtime, "job-1")
    assert broken.error is not None and broken.error.code == "internal_error"
    clock.advance(10)  # past the rate gate's spacing, far inside the slot's lease
    after = provision(runtime, "job-2")
    assert after.action == "SandboxReady", after


def stored(guest: Guest) -> dict[tuple[str, str], Any]:
    """Every stored entry (value and version) of the tenant's and the account's."""
    namespaces = (tenant_namespace(TENANT), account_namespace("default"))
    return {
        (ns, key): guest.backend.get(ns, key) for ns in namespaces for key in guest.backend.keys(ns)
    }


def test_a_release_answers_the_name_its_released_action_gives_with_the_same_params() -> None:
    # Catches: released_action ignored (a spec's Failing never leaves: its answer is
    # SandboxReleased, which Failing drops), or the renamed answer losing its params.
    plain, renamed = Guest(ScriptedE2B()), Guest(ScriptedE2B())
    for guest in (plain, renamed):
        assert guest.invoke("provision").action == "SandboxReady"
    default = plain.invoke("release")
    named = renamed.invoke("release", released_action="FailureReleased")
    assert default.action == "SandboxReleased", default  # absent: the old name (parity)
    assert named.action == "FailureReleased", named
    assert named.params == default.params and named.params["released"] is True
    assert renamed.e2b.sandboxes == {} and renamed.record() is None
    # Nothing held: the same renamed answer, as Temper's retry would get it.
    again = renamed.invoke("release", released_action="FailureReleased")
    assert again.action == "FailureReleased" and again.params["released"] is False


@pytest.mark.parametrize("bad", ["failureReleased", "Failure Released", "X" * 65, "Fail;ed"])
def test_a_bad_released_action_is_invalid_config_and_changes_nothing(bad: str) -> None:
    # Catches: a bad name checked after the kill (the sandbox gone, the permit freed, and
    # an answer Temper cannot dispatch), or not checked at all.
    guest = Guest(ScriptedE2B())
    ready = guest.invoke("provision")
    before = stored(guest)
    refused = guest.invoke("release", released_action=bad)
    assert refused.error is not None and refused.error.code == "invalid_config", refused
    assert "released_action" in refused.error.message
    assert ready.params["sandbox_id"] in guest.e2b.sandboxes
    assert guest.record() is not None
    assert stored(guest) == before  # versions too: nothing was written
    status = guest.invoke("status")
    assert status.params["gates"]["account"]["capacity"]["in_use"] == 1


def test_a_kill_answered_503_keeps_the_record_so_a_later_release_kills_the_sandbox() -> None:
    # Catches: a release that releases the permit and forgets the record before the kill;
    # a kill answered 503 then leaves the sandbox running at E2B with no record of it, an
    # orphan no later release can find.
    guest = Guest(ScriptedE2B(kill_answers=[503]))
    ready = guest.invoke("provision")
    assert ready.action == "SandboxReady", ready
    sandbox_id = ready.params["sandbox_id"]

    refused = guest.invoke("release")
    assert refused.error is not None and refused.error.code == "e2b_unavailable", refused
    assert sandbox_id in guest.e2b.sandboxes
    kept = guest.record()
    assert kept is not None and kept.sandbox_id == sandbox_id
    status = guest.invoke("status")
    assert status.params["gates"]["account"]["capacity"]["in_use"] == 1

    released = guest.invoke("release")
    assert released.action == "SandboxReleased", released
    assert released.params == {"released": True, "sandbox_id": sandbox_id}
    assert guest.e2b.sandboxes == {}
    assert guest.record() is None
    after = guest.invoke("status")
    assert after.params["gates"]["account"]["capacity"]["in_use"] == 0


def test_release_finds_an_unrecorded_create_by_key_and_keeps_it_after_a_503() -> None:
    # Catches: a release of a pending cycle (a create E2B made but whose answer was lost)
    # that forgets the record when the kill fails, or that does not look the sandbox up by
    # its idempotency key: either leaves the sandbox orphaned.
    guest = Guest(ScriptedE2B(create_answers=[503], kill_answers=[503], made_on_failure=True))
    queued = guest.invoke("provision")
    assert queued.action == "SandboxQueued", queued
    [made] = guest.e2b.sandboxes
    pending = guest.record()
    assert pending is not None and pending.state == PENDING

    refused = guest.invoke("release")
    assert refused.error is not None and refused.error.code == "e2b_unavailable", refused
    assert made in guest.e2b.sandboxes and guest.record() is not None

    released = guest.invoke("release")
    assert released.params == {"released": True, "sandbox_id": made}, released
    assert guest.e2b.sandboxes == {} and guest.record() is None


def test_one_idempotency_key_per_provisioning_cycle_across_retries() -> None:
    # Catches: a key drawn per attempt, so a retry after a lost answer makes a second
    # sandbox instead of adopting the first; and a key reused by the next cycle, which
    # would hand a released entity its killed sandbox back.
    guest = Guest(ScriptedE2B(create_answers=[503, 503], made_on_failure=True))
    ready = guest.provision_until_settled()
    assert ready.action == "SandboxReady", ready
    assert ready.params["attempts"] == 3
    first_cycle = guest.e2b.create_keys
    assert len(first_cycle) == 3 and len(set(first_cycle)) == 1
    assert list(guest.e2b.sandboxes) == [ready.params["sandbox_id"]]

    assert guest.invoke("release").params["released"] is True
    again = guest.provision_until_settled()
    assert again.action == "SandboxReady", again
    assert guest.e2b.create_keys[3] != first_cycle[0]


def test_the_entity_record_is_written_before_the_create_is_sent() -> None:
    # Catches: a create sent before its cycle's record (and nonce) is stored; a crash
    # between them leaves a sandbox no release can find by its key.
    guest: Guest
    seen: list[EntityRecord | None] = []

    def at_create(request: HttpRequest) -> None:
        seen.append(guest.record())

    guest = Guest(ScriptedE2B(on_create=at_create))
    ready = guest.invoke("provision")
    assert ready.action == "SandboxReady", ready
    [record] = seen
    assert record is not None and record.state == PENDING
    stored = guest.record()
    assert stored is not None and stored.nonce == record.nonce
    assert stored.sandbox_id == ready.params["sandbox_id"]


def test_static_mode_answers_ready_without_e2b_or_stored_state() -> None:
    # Catches: a static sandbox_url that still creates at E2B, stores an entity record or
    # takes a permit; and the old module's order of the three places the URL may come from.
    e2b = ScriptedE2B()
    guest = Guest(e2b)
    static = "https://sandbox.static.test"
    ready = guest.invoke("provision", sandbox_url=static)
    assert ready.action == "SandboxReady", ready
    assert ready.params["sandbox_id"] == "static-sandbox"
    assert ready.params["sandbox_url"] == static
    assert ready.params["attempts"] == 0
    assert e2b.requests == [] and guest.record() is None
    assert (LogLevel.INFO, f"sandbox_provisioner: using static sandbox_url: {static}") in [
        (level, message) for _, level, message in guest.telemetry.logs
    ]
    status = guest.invoke("status")
    assert status.params["entity"] is None
    assert status.params["gates"]["account"]["capacity"]["in_use"] == 0
    released = guest.invoke("release", sandbox_url=static)
    assert released.params == {"released": False, "held_permit": False}, released
    assert e2b.requests == []

    def url_from(entity_state: dict[str, Any], config: dict[str, str], trigger: Any) -> str:
        outcome = guest.runtime.invoke(
            invocation(
                {**CONFIG, **config},
                tenant=TENANT,
                entity_type="Job",
                entity_id="job-2",
                entity_state=entity_state,
                trigger_params={"sandbox_url": trigger},
            )
        )
        assert outcome.action == "SandboxReady", outcome
        return str(outcome.params["sandbox_url"])

    field_url, config_url, param_url = (f"https://{n}.static.test" for n in "fcp")
    fields = {"fields": {"sandbox_url": field_url}}
    assert url_from(fields, {"sandbox_url": config_url}, param_url) == field_url
    assert url_from({}, {"sandbox_url": config_url}, param_url) == config_url
    assert url_from({}, {}, param_url) == param_url
    assert e2b.requests == []


def test_ready_params_the_stored_record_and_the_create_metadata_name_the_sandbox() -> None:
    # Catches: a SandboxReady param, record field or create metadata key lost or renamed
    # (a repeated Provision answers from the stored record, so both must carry them).
    bodies: list[dict[str, Any]] = []
    e2b = ScriptedE2B(on_create=lambda request: bodies.append(json.loads(request.body)))
    guest = Guest(e2b)
    ready = guest.invoke("provision")
    expected = {
        "sandbox_url": "https://49983-sbx-1.e2b.app",
        "sandbox_id": "sbx-1",
        "template_id": "base",
        "client_id": "c",
        "envd_version": "",
        "attempts": 1,
        "queued_ms": 0,
    }
    assert {k: ready.params[k] for k in expected} == expected, ready
    again = guest.invoke("provision")
    assert {k: again.params[k] for k in expected} == expected, again
    [body] = bodies
    assert body["metadata"] == {
        "temper_tenant": TENANT,
        "temper_entity_type": "Job",
        "temper_entity_id": "job-1",
        "temper_idempotency_key": e2b.create_keys[0],
    }
    assert guest.events("sandbox_ready") == [
        {
            "event": "sandbox_ready",
            "tenant": TENANT,
            "entity": "Job/job-1",
            "sandbox_id": "sbx-1",
            "attempts": 1,
            "queued_ms": 0,
        }
    ]
    guest.invoke("release")
    assert guest.events("sandbox_released") == [
        {
            "event": "sandbox_released",
            "tenant": TENANT,
            "entity": "Job/job-1",
            "sandbox_ids": ["sbx-1"],
        }
    ]


def test_the_records_live_as_long_as_the_queue_timeout_and_the_sandbox() -> None:
    # Catches: a pending record that outlives neither the longest queue wait (a waiter
    # would lose its idempotency key mid-queue) nor vanishes afterwards, and a ready record
    # kept past its sandbox's E2B timeout (or dropped before it).
    guest = Guest(ScriptedE2B(create_answers=[503]))
    assert guest.invoke("provision", queue_timeout_s="60").action == "SandboxQueued"
    pending_ttl_ms = 60_000 + 10 * 60 * 1000
    guest.clock.advance(pending_ttl_ms - 1)
    assert guest.record() is not None
    guest.clock.advance(1)
    assert guest.record() is None

    ready_guest = Guest(ScriptedE2B())
    assert ready_guest.invoke("provision", sandbox_timeout_s="120").action == "SandboxReady"
    ready_guest.clock.advance(120_000 - 1)
    assert ready_guest.record() is not None
    ready_guest.clock.advance(1)
    assert ready_guest.record() is None


def test_a_release_during_the_create_kills_the_new_sandbox_and_frees_the_permit() -> None:
    # Catches: a sandbox created for an entity released while its create was in flight
    # left running (nobody will release it again), or its permit kept.
    guest: Guest

    def released_meanwhile(request: HttpRequest) -> None:
        assert guest.invoke("release").action == "SandboxReleased"

    e2b = ScriptedE2B(on_create=released_meanwhile, kill_answers=[204])
    guest = Guest(e2b)
    outcome = guest.invoke("provision")
    assert outcome.error is not None and outcome.error.code == "released_during_create"
    assert outcome.error.retryable is False
    assert outcome.error.message == "the entity was released while its sandbox was being created"
    assert e2b.sandboxes == {} and ("DELETE", "/sandboxes/sbx-1") in e2b.requests
    account = guest.account()
    assert account["capacity"]["in_use"] == 0 and account["create_slots"]["in_use"] == 0


def test_a_failed_kill_after_a_release_during_the_create_is_reported() -> None:
    guest: Guest

    def released_meanwhile(request: HttpRequest) -> None:
        guest.invoke("release")

    guest = Guest(ScriptedE2B(on_create=released_meanwhile, kill_answers=[503]))
    outcome = guest.invoke("provision")
    assert outcome.error is not None and outcome.error.code == "released_during_create"
    assert outcome.error.message.startswith(
        "the entity was released while its sandbox was being created; kill failed: "
    )


def test_a_release_that_cannot_list_keeps_the_record_and_says_so() -> None:
    # Catches: a pending cycle's release that forgets the record when E2B cannot say which
    # sandboxes carry its key, or answers with an untyped or non-retryable failure.
    class ListFails(ScriptedE2B):
        def send(self, request: HttpRequest, *, deadline_ms: int | None = None) -> HttpResponse:
            if request.method == "GET":
                return _answer(500, {"message": "down"})
            return super().send(request, deadline_ms=deadline_ms)

    guest = Guest(ListFails(create_answers=[503]))
    assert guest.invoke("provision").action == "SandboxQueued"
    refused = guest.invoke("release")
    assert refused.error is not None and refused.error.code == "e2b_unavailable"
    assert refused.error.retryable is True
    assert refused.error.message == "could not list sandboxes: connection: list answered 500"
    assert guest.record() is not None


def test_a_failed_kill_names_the_sandbox_it_could_not_kill() -> None:
    guest = Guest(ScriptedE2B(kill_answers=[503]))
    sandbox_id = guest.invoke("provision").params["sandbox_id"]
    refused = guest.invoke("release")
    assert refused.params["sandbox_id"] == sandbox_id and refused.params["retryable"] is True


def test_a_telemetry_sink_that_fails_does_not_fail_the_provision_or_the_release() -> None:
    # Catches: a progress event whose sink raises turning the SandboxReady it reports into
    # internal_error (the sandbox made, recorded, and its caller told it failed).
    guest = Guest(ScriptedE2B())

    def refuse(tag: object, event: dict[str, Any]) -> None:
        raise RuntimeError("the telemetry pipe is full")

    guest.telemetry.progress = refuse  # type: ignore[method-assign]
    ready = guest.invoke("provision")
    assert ready.action == "SandboxReady", ready
    assert guest.invoke("release").action == "SandboxReleased"
    assert guest.e2b.sandboxes == {}


def test_a_queue_timeout_forgets_the_cycle_so_the_next_one_starts_afresh() -> None:
    # Catches: a rejected waiter whose pending record (and so its idempotency key) is kept,
    # so a later cycle would reuse a key E2B may hold a sandbox for.
    guest = Guest(ScriptedE2B())
    holder = guest.invoke("provision", "job-0", create_slots="1")
    assert holder.action == "SandboxReady"
    config = {"max_sandboxes": "1", "queue_timeout_s": "1"}
    assert guest.invoke("provision", "job-1", **config).action == "SandboxQueued"
    assert guest.record("job-1") is not None
    guest.clock.advance(1_000)
    rejected = guest.invoke("provision", "job-1", **config)
    assert rejected.error is not None and rejected.error.code == "queue_timeout", rejected
    assert guest.record("job-1") is None


def test_a_waiter_refused_after_a_create_e2b_made_leaves_no_sandbox_behind() -> None:
    # Catches: a waiter refused after its attempts (`retry_budget_exhausted`) that forgets
    # its record, and so its idempotency key, while a create whose answer was lost made a
    # sandbox: the release that follows finds no record, and the sandbox runs on with no
    # owner (the soak's "sandbox alive at E2B whose job has ended").
    guest = Guest(ScriptedE2B(create_answers=[503] * 10, made_on_failure=True))
    refused = guest.provision_until_settled("job-1", max_create_attempts="2")
    assert refused.error is not None, refused
    assert refused.error.code == "retry_budget_exhausted", refused
    assert guest.e2b.sandboxes == {}, "killed before the key was forgotten"
    assert guest.record() is None
    # The possible sandbox still counts until the release that follows a SandboxFailed.
    assert guest.account()["capacity"]["in_use"] == 1
    released = guest.invoke("release", max_create_attempts="2")
    assert released.params == {"released": False, "held_permit": True}, released
    assert guest.account()["capacity"]["in_use"] == 0


@pytest.mark.parametrize(
    ("answers", "looked"),
    [
        ([400], False),  # the cycle's only create, refused outright: E2B made nothing
        ([503, 400], True),  # the first create's answer was lost: it may have made one
    ],
)
def test_a_cycle_refused_at_a_create_kills_what_its_key_may_have_made(
    answers: list[int], looked: bool
) -> None:
    # Catches: a refusal after a lost answer that forgets the key without killing the
    # sandbox that create made, and a lookup at E2B after a refusal that made nothing.
    guest = Guest(ScriptedE2B(create_answers=list(answers), made_on_failure=looked))
    refused = guest.provision_until_settled("job-1")
    assert refused.error is not None and refused.action == "SandboxFailed", refused
    listed = ("GET", "/v2/sandboxes") in guest.e2b.requests
    assert (listed, guest.e2b.sandboxes, guest.record()) == (looked, {}, None)


def test_a_queue_timeout_after_a_lost_create_kills_what_its_key_made() -> None:
    # Catches: a waiter refused without a create of its own in this invocation that
    # forgets the key of an earlier create whose answer was lost (its sandbox would run on).
    guest = Guest(ScriptedE2B(create_answers=[503], made_on_failure=True))
    config = {"queue_timeout_s": "1"}
    assert guest.invoke("provision", "job-1", **config).action == "SandboxQueued"
    assert len(guest.e2b.sandboxes) == 1
    guest.clock.advance(1_000)
    refused = guest.invoke("provision", "job-1", **config)
    assert refused.error is not None and refused.error.code == "queue_timeout", refused
    assert guest.e2b.sandboxes == {} and guest.record() is None


def test_a_refused_waiter_whose_sandbox_cannot_be_killed_keeps_its_record() -> None:
    # Catches: a refused waiter that forgets its record when the kill of what its key made
    # failed: no later release could find that sandbox.
    guest = Guest(ScriptedE2B(create_answers=[503] * 10, made_on_failure=True, kill_answers=[503]))
    refused = guest.provision_until_settled("job-1", max_create_attempts="2")
    assert refused.error is not None and refused.error.code == "retry_budget_exhausted"
    [made] = guest.e2b.sandboxes
    assert guest.record() is not None
    released = guest.invoke("release")
    assert released.params == {"released": True, "sandbox_id": made}, released
    assert guest.e2b.sandboxes == {} and guest.record() is None


def test_a_create_that_raises_is_an_internal_error_that_is_not_retried() -> None:
    guest = Guest(ExplodingE2B())
    broken = guest.invoke("provision")
    assert broken.error is not None and broken.error.code == "internal_error"
    assert broken.error.message == "RuntimeError: a bug below the port"
    # The slot went back through a settle with a non-retryable failure: no retry, no backoff.
    [settled] = [e for e in guest.events("admission_rejected") if e["step"] == "settle"]
    assert settled["code"] == "internal_error" and settled["e2b_answer"] == "CreateFailed"
    assert settled["message"] == "create failed: RuntimeError('a bug below the port')"
    assert guest.account()["backoff"]["failures"] == 0


class RivalWrites(InterposedBackend):
    """Another invocation writes the entity record between this one's read and its write,
    `times` times (removing it again before each next read, as a release would)."""

    def __init__(self, inner: MemoryBackend, times: int) -> None:
        super().__init__(inner)
        self.times = times

    def before(self, operation: str, key: str) -> None:
        if not key.startswith("entity/") or self.times <= 0:
            return
        namespace = tenant_namespace(TENANT)
        if operation == "get":
            self.inner.delete(namespace, key, None)
        elif operation == "compare_and_swap":
            self.times -= 1
            rival = EntityRecord(state=PENDING, nonce="rival", since_ms=0)
            self.inner.compare_and_swap(namespace, key, None, rival.encode(), None)


def test_a_record_that_keeps_changing_is_a_retryable_contention() -> None:
    e2b = ScriptedE2B()
    guest = Guest(e2b, lambda inner: RivalWrites(inner, times=4))
    outcome = guest.invoke("provision")
    assert outcome.error is not None and outcome.error.code == "storage_contention", outcome
    assert outcome.error.retryable is True
    assert outcome.error.message == "the entity record kept changing; try again"
    assert e2b.requests == []


def test_a_record_written_by_a_rival_first_is_adopted_with_its_key() -> None:
    # Catches: giving up at the first conflict instead of reading the rival's record (its
    # nonce, so both invocations create with the same idempotency key).
    e2b = ScriptedE2B()
    guest = Guest(e2b, lambda inner: RivalWrites(inner, times=1))
    assert guest.invoke("provision").action == "SandboxReady"
    assert e2b.create_keys == [idempotency_key(TENANT, "Job/job-1", "rival")]


class GateWritesFail(InterposedBackend):
    """Storage whose writes of the account gate fail `failures` times once armed, with
    `error` (an outage, or a rival's write: a conflict)."""

    def __init__(self, inner: MemoryBackend) -> None:
        super().__init__(inner)
        self.failures = 0
        self.error: StorageError = StorageUnavailable("the gate's store is down")

    def before(self, operation: str, key: str) -> None:
        if operation == "compare_and_swap" and key == GATE_KEY and self.failures > 0:
            self.failures -= 1
            raise self.error


def provision_with_failing_settles(failures: int) -> tuple[Guest, Outcome]:
    backends: list[GateWritesFail] = []

    def arm(request: HttpRequest) -> None:
        backends[0].failures = failures

    def wrap(inner: MemoryBackend) -> GateWritesFail:
        backends.append(GateWritesFail(inner))
        return backends[0]

    guest = Guest(ScriptedE2B(on_create=arm), wrap)
    return guest, guest.invoke("provision")


def test_a_settle_that_met_a_storage_failure_is_repeated_twice_more() -> None:
    # Catches: a settle given up after one storage failure (the slot then stays taken
    # until its lease expires), or repeated without bound.
    guest, ready = provision_with_failing_settles(2)
    assert ready.action == "SandboxReady", ready
    assert guest.account()["create_slots"]["in_use"] == 0
    warned = [(level, message) for _, level, message in guest.telemetry.logs]
    assert len(warned) == 2 and all(
        level is LogLevel.WARN
        and message.startswith("admission for Job/job-1 fails closed: settle: StorageUnavailable(")
        for level, message in warned
    ), warned
    queued = [e for e in guest.events("admission_queued") if e["step"] == "settle"]
    # Fails closed: nothing about the gates is claimed, only when to come back (jittered).
    waits = [e["retry_after_ms"] for e in queued]
    assert [
        {k: v for k, v in e.items() if k not in ("retry_after_ms", "eta_ms")} for e in queued
    ] == [
        {
            "tenant": TENANT,
            "entity": "Job/job-1",
            "step": "settle",
            "e2b_answer": "Created",
            "attempt": 1,
            "event": "admission_queued",
            "position": 0,
            "queue_length": 0,
            "in_use": 0,
            "limit": 0,
            "reason": "storage",
            "waited_ms": 0,
            # A storage fault computes no turn: hosts fall back to retry_after_ms.
            "retry_at_ms": 0,
            "reservation": "",
            "claim_by_ms": 0,
        }
    ] * 2
    assert [e["eta_ms"] for e in queued] == waits
    assert all(200 <= wait < 1_200 for wait in waits) and max(waits) > 200, waits

    guest, ready = provision_with_failing_settles(3)
    assert ready.action == "SandboxReady", ready
    # Three tries failed: the slot waits for its lease to expire.
    assert guest.account()["create_slots"]["in_use"] == 1


def guest_whose_gate_writes_fail() -> tuple[Guest, GateWritesFail]:
    backends: list[GateWritesFail] = []

    def wrap(inner: MemoryBackend) -> GateWritesFail:
        backends.append(GateWritesFail(inner))
        return backends[0]

    guest = Guest(ScriptedE2B(), wrap)
    return guest, backends[0]


@pytest.mark.parametrize(
    "error",
    [StorageUnavailable("the gate's store is down"), StorageConflict("a rival wrote the gate")],
    ids=["outage", "contention"],
)
def test_a_release_whose_gate_write_fails_keeps_the_record_so_a_later_release_frees_it(
    error: StorageError,
) -> None:
    # Catches: a release that forgets the entity record after the gate could not be
    # written (an outage, or a conflict on every try): it answers SandboxReleased, the
    # session ends, and the sandbox's lease stays counted until the sandbox timeout with
    # no record left for any later release to find (the soak's "sandbox lease left over").
    guest, backend = guest_whose_gate_writes_fail()
    ready = guest.invoke("provision")
    assert ready.action == "SandboxReady", ready
    sandbox_id = ready.params["sandbox_id"]
    backend.failures, backend.error = 1_000, error

    refused = guest.invoke("release")
    assert refused.error is not None and refused.error.retryable, refused
    assert refused.error.code == "storage_unavailable", refused
    assert guest.e2b.sandboxes == {}  # killed: only the permit is left to free
    kept = guest.record()
    assert kept is not None and kept.sandbox_id == sandbox_id
    backend.failures = 0
    assert guest.account()["capacity"]["in_use"] == 1

    released = guest.invoke("release")
    assert released.action == "SandboxReleased", released
    assert guest.record() is None
    assert guest.account()["capacity"]["in_use"] == 0


def test_a_release_without_a_record_whose_gate_write_fails_says_so() -> None:
    # Catches: a release that answers SandboxReleased (held_permit false) when it could not
    # write the gate, so the caller never asks again and the permit stays held (the
    # record is already gone: after a release during the create, say).
    guest, backend = guest_whose_gate_writes_fail()
    assert guest.invoke("provision").action == "SandboxReady"
    loaded = guest.records().load("Job/job-1")
    assert loaded is not None and guest.records().remove("Job/job-1", loaded[1])
    backend.failures = 1_000

    refused = guest.invoke("release")
    assert refused.error is not None and refused.error.code == "storage_unavailable", refused
    assert refused.error.retryable
    backend.failures = 0
    released = guest.invoke("release")
    assert released.params == {"released": False, "held_permit": True}, released
    assert guest.account()["capacity"]["in_use"] == 0


class HostDied(BaseException):
    """The invocation's host went away mid-call (nothing in the guest may catch it)."""


def test_a_create_whose_invocation_died_counts_until_its_sandbox_would_time_out() -> None:
    # Catches: the sandbox timeout handed to admission in the wrong unit (or not at all): a
    # create never settled may have made a sandbox, which E2B runs for the timeout the
    # create asked for, so capacity counts it until then and no longer.
    def die(request: HttpRequest) -> None:
        raise HostDied

    guest = Guest(ScriptedE2B(on_create=die))
    config = {"create_lease_ms": "10000", "create_timeout_ms": "5000", "sandbox_timeout_s": "60"}
    with pytest.raises(HostDied):
        guest.invoke("provision", **config)
    guest.clock.advance(10_000 + 60_000 - 1)
    capacity = guest.invoke("status", **config).params["gates"]["account"]["capacity"]
    assert (capacity["in_use"], capacity["unsettled"]) == (1, 1), capacity
    guest.clock.advance(1)
    capacity = guest.invoke("status", **config).params["gates"]["account"]["capacity"]
    assert (capacity["in_use"], capacity["unsettled"]) == (0, 0), capacity


def test_a_run_of_503s_never_cools_the_account_down_longer_than_the_cap() -> None:
    # Catches: the backoff cap not applied (the ceiling doubles past it: 500 ms after 8
    # failures is 128 s), seen from what a session's polls meet.
    guest = Guest(ScriptedE2B(create_answers=[503] * 10))
    config = {"backoff_cap_ms": "2000", "max_create_attempts": "20", "retry_budget": "100"}
    cooldowns = []
    for _ in range(60):
        outcome = guest.invoke("provision", **config)
        if outcome.action == "SandboxReady":
            break
        cooldowns.append(guest.invoke("status", **config).params["gates"]["account"]["backoff"])
        guest.clock.advance(max(1, int(outcome.params["retry_after_ms"])))
    assert outcome.action == "SandboxReady", outcome
    assert max(c["failures"] for c in cooldowns) == 10
    assert max(c["cooling_ms"] for c in cooldowns) <= 2_000, cooldowns


def test_status_shows_the_entity_record_and_its_tenants_gates() -> None:
    # Catches: the entity part of SandboxStatus lost or renamed, or the gates read for
    # another tenant.
    guest = Guest(ScriptedE2B(create_answers=[503]))
    assert guest.invoke("status").params["entity"] is None
    started = guest.clock.now_ms()
    guest.invoke("provision")
    pending = guest.invoke("status")
    assert pending.action == "SandboxStatus"
    assert pending.params["entity"] == {
        "state": "pending",
        "sandbox_id": None,
        "attempts": 0,  # counted when the record becomes ready
        "since_ms": started,
    }
    guest.clock.advance(60_000)
    ready = guest.provision_until_settled()
    assert ready.action == "SandboxReady", ready
    status = guest.invoke("status").params
    assert status["entity"] == {
        "state": "ready",
        "sandbox_id": ready.params["sandbox_id"],
        "attempts": 2,
        "since_ms": guest.clock.now_ms(),
    }
    assert status["gates"]["tenant"]["tenant"] == TENANT
    assert status["gates"]["tenant"]["in_use"] == 1


def test_the_ready_record_keeps_what_e2b_answered_and_how_long_it_queued() -> None:
    # Catches: envd version, template or queued time not stored (a repeated Provision
    # answers from the record), or the configured template not used when E2B names none.
    e2b = ScriptedE2B(answer={"templateID": "tpl-x", "clientID": "c", "envdVersion": "0.2.0"})
    guest = Guest(e2b)
    assert guest.invoke("provision", "job-0", create_slots="1").action == "SandboxReady"
    assert guest.invoke("provision", create_slots="1").action == "SandboxQueued"
    guest.clock.advance(150_000)  # job-0's slot lease runs out
    ready = guest.provision_until_settled()
    assert ready.params["queued_ms"] > 0
    again = guest.invoke("provision")
    assert (again.params["template_id"], again.params["envd_version"]) == ("tpl-x", "0.2.0")
    assert again.params["queued_ms"] == ready.params["queued_ms"]

    unnamed = Guest(ScriptedE2B(answer={"clientID": "c"}))
    ready = unnamed.invoke("provision", template_id="my-template")
    assert ready.params["template_id"] == "my-template"


def test_provision_refuses_without_a_user_message_or_a_key() -> None:
    # Catches: the old module's two refusals lost, renamed or reworded.
    guest = Guest(ScriptedE2B())
    no_message = guest.invoke("provision", temperfs="on", temper_api_url="http://temper.test")
    assert no_message.error is not None
    assert (no_message.error.code, no_message.error.message) == (
        "agent_not_configured",
        "agent not configured — user_message is empty",
    )
    no_key = Guest(ScriptedE2B(api_key="")).invoke("provision")  # none here, none in config
    assert no_key.error is not None and no_key.error.code == "e2b_api_key_missing"
    assert no_key.error.message == (
        "no sandbox_url configured and no e2b_api_key available — "
        "set sandbox_url via Configure or store e2b_api_key secret"
    )
    assert guest.e2b.requests == []


def test_with_a_user_message_temperfs_provisions_and_without_it_answers_empty_ids() -> None:
    # Catches: the user_message check reading another field (every TemperFS provision
    # refused), and the five conversation ids missing from SandboxReady when the setup is
    # off or failed (the spec reads them).
    ids = (
        "workspace_id",
        "conversation_file_id",
        "file_manifest_id",
        "session_file_id",
        "session_leaf_id",
    )
    guest = Guest(ScriptedE2B())
    ready = guest.runtime.invoke(
        invocation(
            {**CONFIG, "temperfs": "on", "temper_api_url": "http://temper.test"},
            tenant=TENANT,
            entity_type="Job",
            entity_id="job-1",
            entity_state={"fields": {"user_message": "hello"}},
        )
    )
    assert ready.action == "SandboxReady", ready
    guest.clock.advance(10)  # past the rate gate's spacing
    plain = guest.invoke("provision", "job-2")
    assert plain.action == "SandboxReady"
    assert all(plain.params[name] == "" for name in ids), plain.params


class EntityRecordsDown(InterposedBackend):
    def before(self, operation: str, key: str) -> None:
        if key.startswith("entity/"):
            raise StorageUnavailable("the tenant's store is down")


def test_a_storage_outage_while_provisioning_keeps_the_session_waiting() -> None:
    # Catches: a storage outage answered SandboxFailed (it ends the session under
    # Temper's rules) instead of SandboxQueued with reason storage and a jittered wait.
    guest = Guest(ScriptedE2B(), EntityRecordsDown)
    outcome = guest.invoke("provision")
    assert outcome.action == "SandboxQueued", outcome
    wait = outcome.params["retry_after_ms"]
    assert outcome.params == {
        "position": 0,
        "queue_length": 0,
        "in_use": 0,
        "limit": 0,
        "reason": "storage",
        "retry_after_ms": wait,
        "eta_ms": wait,
        "waited_ms": 0,
        "retry_at_ms": 0,
        "reservation": "",
        "claim_by_ms": 0,
    }
    assert 200 <= wait < 1_200
    assert guest.e2b.requests == []


def test_a_release_does_not_delete_a_record_rewritten_while_it_killed() -> None:
    # Catches: a release that deletes the entity record whatever version it now has (a
    # newer one, written by another invocation while the kill was in flight, is lost), or
    # one that lets the conflict escape instead of leaving the newer record alone.
    guest: Guest

    def rewritten_meanwhile(request: HttpRequest) -> None:
        if request.method == "DELETE":
            loaded = guest.records().load("Job/job-1")
            assert loaded is not None
            guest.records().put("Job/job-1", loaded[0], loaded[1], 600_000)

    class RewriteDuringKill(ScriptedE2B):
        def send(self, request: HttpRequest, *, deadline_ms: int | None = None) -> HttpResponse:
            rewritten_meanwhile(request)
            return super().send(request, deadline_ms=deadline_ms)

    guest = Guest(RewriteDuringKill())
    assert guest.invoke("provision").action == "SandboxReady"
    released = guest.invoke("release")
    assert released.action == "SandboxReleased", released
    assert guest.record() is not None


def test_a_release_names_the_waiter_it_promised_the_freed_sandbox_to() -> None:
    # Catches: the wake-ups (serve pushes them to the waiters named) dropped from the
    # outcome, renamed, or naming the entity wrongly (an id with a "/" in it splits at the
    # first one, after the entity type); and a wake-up for the caller itself.
    guest = Guest(ScriptedE2B())
    assert guest.invoke("provision", "job-1", max_sandboxes="1").action == "SandboxReady"
    guest.clock.advance(5)
    queued = guest.invoke("provision", "team/job-2", max_sandboxes="1")
    assert queued.params["reason"] == "capacity", queued
    assert "wake_ups" not in queued.params
    guest.clock.advance(5)

    released = guest.invoke("release", "job-1", max_sandboxes="1")
    assert released.action == "SandboxReleased", released
    assert (released.success, released.error) == (True, None)
    [wake] = released.params["wake_ups"]
    reservation = wake["reservation"]
    assert isinstance(reservation, str) and reservation
    assert wake == {
        "tenant": TENANT,
        "entity_type": "Job",
        "entity_id": "team/job-2",
        "at_ms": guest.clock.now_ms(),
        "reservation": reservation,
    }
    assert released.params["released"] is True
    ready = guest.invoke("provision", "team/job-2", max_sandboxes="1")
    assert ready.action == "SandboxReady", ready


def test_a_refused_create_that_promises_its_slot_keeps_its_failure() -> None:
    # Catches: a SandboxFailed outcome that also names a waiter to wake (the refused
    # create's slot is promised to the next one) losing its failure on the way out.
    queued: list[Outcome] = []
    e2b = ScriptedE2B(create_answers=[400])
    guest = Guest(e2b)
    e2b.on_create = lambda request: queued.append(guest.invoke("provision", "job-2"))
    refused = guest.invoke("provision", "job-1")
    assert [q.params["reason"] for q in queued] == ["create_slots"]
    assert refused.action == "SandboxFailed", refused
    assert refused.error is not None and refused.error.code == "e2b_bad_request"
    assert [w["entity_id"] for w in refused.params["wake_ups"]] == ["job-2"]


TEMPER = "http://temper.test"


@dataclass
class E2BAndTemperFS(ScriptedE2B):
    """E2B as `ScriptedE2B`, and the mock's TemperFS store at `TEMPER`/tdata."""

    temperfs: TemperFSStore = field(default_factory=TemperFSStore)

    def send(self, request: HttpRequest, *, deadline_ms: int | None = None) -> HttpResponse:
        prefix = f"{TEMPER}/tdata/"
        if not request.url.startswith(prefix):
            return super().send(request, deadline_ms=deadline_ms)
        headers = {name.lower(): value for name, value in request.headers}
        answer = self.temperfs.handle(
            request.method, request.url.removeprefix(prefix), headers, request.body
        )
        body = answer.body
        raw = body if isinstance(body, bytes) else b"" if body is None else json.dumps(body)
        return HttpResponse(answer.status, (), raw.encode() if isinstance(raw, str) else raw)


@pytest.mark.parametrize(
    ("entity_state", "agent_id"),
    [
        ({"entity_id": "agent-7", "fields": {"user_message": "hello there"}}, "agent-7"),
        ({"entity_id": "", "fields": {"user_message": "hello there"}}, "job-1"),
        ({"entity_id": 7, "fields": {"user_message": "hello there"}}, "job-1"),
        ({"fields": {"user_message": "hello there"}}, "job-1"),
    ],
)
def test_temperfs_storage_is_made_for_the_agent_with_the_users_first_message(
    entity_state: dict[str, Any], agent_id: str
) -> None:
    # Catches: the agent id read from another key of the entity state (or a non-string or
    # empty one used as is) instead of falling back to the entity id, and the first user
    # message missing from the session file (the agent starts from it).
    e2b = E2BAndTemperFS()
    guest = Guest(e2b)
    ready = guest.runtime.invoke(
        invocation(
            {**CONFIG, "temperfs": "on", "temper_api_url": TEMPER},
            tenant=TENANT,
            entity_type="Job",
            entity_id="job-1",
            entity_state=entity_state,
        )
    )
    assert ready.action == "SandboxReady", ready
    assert ready.params["workspace_id"] == f"agent-{agent_id}"
    [workspace] = e2b.temperfs.entities("Workspace", TENANT)
    assert workspace.fields["owner_id"] == agent_id
    session = ready.params["session_file_id"]
    [content] = [f.content for f in e2b.temperfs.entities("File") if f.entity_id == session]
    assert content is not None and b'"content":"hello there"' in content


@pytest.mark.parametrize(("draw", "spread_ms"), [(0, 0), (2**64 - 1, 999)])
def test_a_storage_outage_spreads_the_come_back_over_one_second_past_poll_min(
    draw: int, spread_ms: int
) -> None:
    # Catches: a come-back spread other than one second (the lowest and highest draws of
    # the host's randomness land on its ends).
    outcome = Guest(ScriptedE2B(), EntityRecordsDown, random_u64=lambda: draw).invoke("provision")
    assert outcome.params["reason"] == "storage", outcome
    assert outcome.params["retry_after_ms"] == AdmissionConfig().poll_min_ms + spread_ms


def test_each_release_reports_whether_it_freed_a_permit_in_telemetry() -> None:
    # Catches: the release or admit step misnamed in its admission event (the operator's
    # view of who was granted or released what), or `held` not saying whether a permit
    # was freed.
    guest = Guest(ScriptedE2B())
    assert guest.invoke("provision").action == "SandboxReady"
    guest.invoke("release")
    guest.invoke("release")
    event = {"tenant": TENANT, "entity": "Job/job-1", "step": "release"}
    assert guest.events("admission_released") == [
        {**event, "event": "admission_released", "held": True},
        {**event, "event": "admission_released", "held": False},
    ]
    [granted] = guest.events("admission_granted")
    assert (granted["step"], granted["entity"], granted["attempt"]) == ("admit", "Job/job-1", 1)
    assert isinstance(granted["lease_id"], str) and granted["lease_id"]
