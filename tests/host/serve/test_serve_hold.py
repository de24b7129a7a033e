"""Held answers through the service: a queued invocation is held and the component asked
again at the waiter's turn, within the window, the bound and the drain."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
from starlette.testclient import TestClient

from host.serve import InvocationPool, ServeState, create_app
from host.serve.hold import (
    DEADLINE_MARGIN_MS,
    HeldAnswer,
    Holds,
    InvalidHoldConfig,
    answer_held,
    hold_until_ms,
    hold_window_ms,
)
from host.serve.metrics import ServeMetrics
from host.serve.pace import PaceSettings
from host.serve.pacing import ServePace
from provisioner.model import SANDBOX_QUEUED, SANDBOX_READY, SANDBOX_RELEASED, Invocation, Outcome

TOKEN = "t0ken"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def now_ms() -> int:
    return int(time.time() * 1000)


def context(entity_id: str = "job-1", **config: str) -> dict[str, Any]:
    return {
        "tenant": "acme",
        "entity_type": "CurationJob",
        "entity_id": entity_id,
        "integration_config": {"operation": "provision", **config},
    }


def queued(in_ms: int, position: int = 1) -> Outcome:
    return Outcome(
        SANDBOX_QUEUED, {"position": position, "retry_at_ms": now_ms() + in_ms, "reservation": ""}
    )


class ScriptedComponent:
    """Answers each entity's calls from its script (the last answer repeats); records
    when each call came, on the pace clock."""

    def __init__(self, scripts: dict[str, list[Callable[[], Outcome]]]) -> None:
        self.scripts = scripts
        self.calls: list[tuple[str, int, Invocation]] = []
        self.lock = threading.Lock()

    def __call__(self, invocation: Invocation) -> Outcome:
        with self.lock:
            seen = sum(1 for entity, _, _ in self.calls if entity == invocation.entity_id)
            self.calls.append((invocation.entity_id, now_ms(), invocation))
        script = self.scripts[invocation.entity_id]
        return script[min(seen, len(script) - 1)]()

    def count(self, entity_id: str) -> int:
        with self.lock:
            return sum(1 for entity, _, _ in self.calls if entity == entity_id)


class PacedClient(TestClient):
    def __init__(self, state: ServeState, lines: list[dict[str, Any]]) -> None:
        super().__init__(create_app(state))
        self.state = state
        self.lines = lines

    @property
    def pace(self) -> ServePace:
        assert self.state.pace is not None
        return self.state.pace


def paced(
    component: ScriptedComponent, *, hold_ms: int = 60_000, max_held: int = 8, workers: int = 2
) -> PacedClient:
    lines: list[dict[str, Any]] = []
    metrics = ServeMetrics()
    pace = ServePace(
        PaceSettings(hold_ms=hold_ms, max_held=max_held),
        now_ms,
        wake_count=workers,
        observe_hold=metrics.observe_hold,
    )
    state = ServeState(
        token=TOKEN,
        pool=InvocationPool(workers),
        invoke=component,
        e2b_url="http://e2b.local",
        storage_probe=lambda: None,
        metrics=metrics,
        pace=pace,
        log=lines.append,
    )
    return PacedClient(state, lines)


def wait_for(condition: Callable[[], bool], what: str, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.005)


def post_in_thread(http: PacedClient, body: dict[str, Any]) -> tuple[threading.Thread, list[Any]]:
    answers: list[Any] = []
    thread = threading.Thread(
        target=lambda: answers.append(http.post("/v1/invocations", json=body, headers=AUTH))
    )
    thread.start()
    return thread, answers


def metric(http: PacedClient, name: str) -> float:
    value = http.state.metrics.registry.get_sample_value(name) if http.state.metrics else None
    return value or 0.0


def test_a_held_request_answers_the_grant_the_component_gives_at_the_turn() -> None:
    # Catches: a queued answer sent back at once (Temper would learn of the grant only at
    # the next poll), or an ask again before the turn the component named.
    turn: dict[str, int] = {}

    def first() -> Outcome:
        outcome = queued(150)
        turn["at"] = outcome.params["retry_at_ms"]
        return outcome

    component = ScriptedComponent({"job-1": [first, lambda: Outcome(SANDBOX_READY, {"x": 1})]})
    http = paced(component)
    response = http.post("/v1/invocations", json=context(), headers=AUTH)
    assert response.json()["action"] == SANDBOX_READY
    assert component.count("job-1") == 2
    second_at = component.calls[1][1]
    assert second_at >= turn["at"] - 2  # asked again at its turn, not before
    [line] = http.lines
    assert line["component_calls"] == 2 and 0 < line["held_ms"] < 30_000
    assert metric(http, "sandbox_provisioner_grants_after_hold_total") == 1
    assert metric(http, "sandbox_provisioner_hold_seconds_count") == 1


def test_hold_ms_is_the_service_s_own_key_and_zero_turns_holding_off() -> None:
    component = ScriptedComponent({"job-1": [lambda: queued(20), lambda: Outcome(SANDBOX_READY)]})
    http = paced(component)
    response = http.post("/v1/invocations", json=context(hold_ms="0"), headers=AUTH)
    assert response.json()["action"] == SANDBOX_QUEUED
    assert component.count("job-1") == 1
    [(_, _, invocation)] = component.calls
    assert "hold_ms" not in dict(invocation.config)  # the component never sees it
    assert http.lines[0]["component_calls"] == 1 and http.lines[0]["held_ms"] == 0


def test_a_malformed_hold_ms_is_invalid_config_and_reaches_no_component() -> None:
    component = ScriptedComponent({"job-1": [lambda: Outcome(SANDBOX_READY)]})
    http = paced(component)
    answer = http.post("/v1/invocations", json=context(hold_ms="soon"), headers=AUTH).json()
    assert answer["action"] == "SandboxFailed" and answer["params"]["code"] == "invalid_config"
    assert component.calls == []


def test_the_window_stays_below_the_trigger_s_timeout() -> None:
    # Catches: a hold that outlives Temper's deadline for the call (timeout_secs, 120 s by
    # default), which would turn a grant into a failed invocation.
    assert hold_window_ms({}, 1_500) == 1_500
    assert hold_window_ms({"hold_ms": "900"}, 1_500) == 900
    assert hold_window_ms({"hold_ms": "500000"}, 1_500) == 120_000 - DEADLINE_MARGIN_MS
    assert hold_window_ms({"hold_ms": "60000", "timeout_secs": "30"}, 0) == 30_000 - 10_000
    assert hold_window_ms({"timeout_secs": "5"}, 1_500) == 0  # no room: off
    with pytest.raises(InvalidHoldConfig):
        hold_window_ms({"hold_ms": "-1"}, 1_500)


def test_a_turn_past_the_capped_window_is_answered_at_once() -> None:
    component = ScriptedComponent(
        {"job-1": [lambda: queued(25_000), lambda: Outcome(SANDBOX_READY)]}
    )
    http = paced(component)
    # timeout_secs 30: the window is 20 s, the turn 25 s away.
    response = http.post("/v1/invocations", json=context(timeout_secs="30"), headers=AUTH)
    assert response.json()["action"] == SANDBOX_QUEUED
    assert component.count("job-1") == 1


def test_past_max_held_a_request_is_answered_at_once_and_drain_answers_the_held() -> None:
    # Catches: an unbounded number of open held requests, and a drain that waits for the
    # held requests' turns (up to the whole window) before the process can exit.
    component = ScriptedComponent(
        {
            "job-1": [lambda: queued(50_000), lambda: Outcome(SANDBOX_READY)],
            "job-2": [lambda: queued(50_000), lambda: Outcome(SANDBOX_READY)],
        }
    )
    http = paced(component, max_held=1)
    thread, answers = post_in_thread(http, context("job-1"))
    wait_for(lambda: http.pace.holds.count == 1, "job-1 to be held")
    second = http.post("/v1/invocations", json=context("job-2"), headers=AUTH)
    assert second.json()["action"] == SANDBOX_QUEUED and component.count("job-2") == 1
    assert thread.is_alive()  # job-1 is still held
    http.pace.holds.drain()
    thread.join(10)
    assert not thread.is_alive()
    assert answers[0].json()["action"] == SANDBOX_QUEUED  # its latest outcome, at once
    assert component.count("job-1") == 1 and http.pace.holds.count == 0


@pytest.mark.parametrize(
    ("renamed", "answer"), [({}, SANDBOX_RELEASED), ({"released_action": "Freed"}, "Freed")]
)
def test_a_release_in_this_process_wakes_a_held_request_to_ask_again_early(
    renamed: dict[str, str], answer: str
) -> None:
    # Catches: a held request that waits for its estimated turn (50 s here) although a
    # permit was freed by an invocation this service just answered; also when the spec
    # renamed the release's answer (released_action, a Failing -> Failed answer).
    component = ScriptedComponent(
        {
            "job-1": [lambda: queued(50_000), lambda: Outcome(SANDBOX_READY, {"sandbox_id": "s"})],
            "job-2": [lambda: Outcome(answer)],
        }
    )
    http = paced(component)
    thread, answers = post_in_thread(http, context("job-1"))
    wait_for(lambda: http.pace.holds.count == 1, "job-1 to be held")
    job_2 = context("job-2", operation="release", **renamed)
    release = http.post("/v1/invocations", json=job_2, headers=AUTH)
    assert release.json()["action"] == answer
    thread.join(20)
    assert not thread.is_alive()
    assert answers[0].json()["action"] == SANDBOX_READY
    assert component.count("job-1") == 2


def test_with_push_a_turn_past_the_window_is_answered_and_its_wake_up_stored() -> None:
    # Catches: a push-mode answer that stores no wake-up (the entity then waits for its
    # poll timer), or one stored for the wrong time or reservation.
    from host.serve.wakeups import WakeupStore
    from host.storage.memory import MemoryBackend

    turn: dict[str, int] = {}

    def far() -> Outcome:
        outcome = queued(50_000)
        outcome.params["reservation"] = "r-9"
        turn["at"] = outcome.params["retry_at_ms"]
        return outcome

    component = ScriptedComponent({"job-1": [far]})
    http = paced(component, hold_ms=1_000)
    store = WakeupStore(MemoryBackend())
    http.pace.settings = PaceSettings(hold_ms=1_000, push=True)
    http.pace.wakeups = store
    response = http.post("/v1/invocations", json=context(), headers=AUTH)
    assert response.json()["action"] == SANDBOX_QUEUED and component.count("job-1") == 1
    assert list(store.pending().values()) == [turn["at"]]


def test_a_held_request_whose_client_went_away_asks_the_component_nothing_more() -> None:
    # Catches: a hold that goes on asking (and may be granted a sandbox) for a caller
    # Temper already gave up on.
    asked: list[int] = []

    async def ask_again() -> Outcome:
        asked.append(1)
        return Outcome(SANDBOX_READY)

    async def gone() -> bool:
        return True

    async def held() -> HeldAnswer:
        return await answer_held(
            queued(20),
            ask_again,
            holds=Holds(4),
            hold_until=hold_until_ms(now_ms(), 60_000),
            push=False,
            now_ms=now_ms,
            client_gone=gone,
        )

    answer = asyncio.run(held())
    assert asked == [] and answer.outcome.action == SANDBOX_QUEUED and answer.calls == 1


def test_a_wake_up_for_a_turn_due_now_is_sent_after_the_answer_can_arrive() -> None:
    # Catches: a wake-up sent before Temper has applied the queued answer (the entity is
    # not yet in its queued state: 409, and the wake-up is lost to the poll timer).
    from host.serve.pacing import WAKE_AFTER_ANSWER_MS
    from host.serve.wakeups import WakeupStore
    from host.storage.memory import MemoryBackend

    component = ScriptedComponent({"job-1": [lambda: queued(0)]})
    http = paced(component, max_held=0)  # nothing may be held: answered at once
    store = WakeupStore(MemoryBackend())
    http.pace.settings = PaceSettings(hold_ms=1_000, max_held=0, push=True)
    http.pace.wakeups = store
    before = now_ms()
    assert http.post("/v1/invocations", json=context(), headers=AUTH).json()["action"] == (
        SANDBOX_QUEUED
    )
    [at] = store.pending().values()
    assert at >= before + WAKE_AFTER_ANSWER_MS
