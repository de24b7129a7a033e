"""The pace rule serve and the simulator share: answer, hold, or answer and wake."""

from __future__ import annotations

from host.runtime.temper_context import outcome_to_json
from host.serve.pace import (
    Answer,
    AnswerAndWake,
    AskAgainAt,
    Promised,
    next_step,
    promised,
    retry_at_ms,
    without_promises,
)
from provisioner.model import SANDBOX_QUEUED, SANDBOX_READY, Outcome


def queued(**params: object) -> Outcome:
    return Outcome(SANDBOX_QUEUED, dict(params))


def test_only_a_queued_answer_has_a_retry_time() -> None:
    assert retry_at_ms(Outcome(SANDBOX_READY, {"retry_at_ms": 5}), 0) is None
    assert retry_at_ms(queued(retry_at_ms=1_500, retry_after_ms=9), 1_000) == 1_500
    # A component without retry_at_ms: retry_after_ms from now.
    assert retry_at_ms(queued(retry_after_ms=200), 1_000) == 1_200
    assert retry_at_ms(queued(), 1_000) is None
    assert retry_at_ms(Outcome("ResourceQueued", {"retry_at_ms": 1_300}), 1_000) == 1_300


def test_a_turn_within_the_hold_window_is_asked_again_at_its_time() -> None:
    assert next_step(queued(retry_at_ms=1_400), 1_000, 2_000, False) == AskAgainAt(1_400)
    # A turn already due is asked again at once, never in the past.
    assert next_step(queued(retry_at_ms=900), 1_000, 2_000, False) == AskAgainAt(1_000)
    assert next_step(queued(retry_at_ms=2_000), 1_000, 2_000, False) == AskAgainAt(2_000)


def test_a_turn_past_the_window_is_answered_and_woken_only_with_push() -> None:
    late = queued(retry_at_ms=2_001, reservation="r-7")
    assert next_step(late, 1_000, 2_000, False) == Answer()
    assert next_step(late, 1_000, 2_000, True) == AnswerAndWake(2_001, "r-7")
    assert next_step(queued(retry_at_ms=9_000), 1_000, 2_000, True) == AnswerAndWake(9_000, "")


def test_any_other_answer_goes_back_at_once() -> None:
    assert next_step(Outcome(SANDBOX_READY, {}), 1_000, 5_000, True) == Answer()


def test_promises_are_read_and_never_reach_temper() -> None:
    # Catches: another tenant's entity ids in the result Temper receives.
    wake = {
        "tenant": "t2",
        "entity_type": "TemperAgent",
        "entity_id": "a-9",
        "at_ms": 5,
        "reservation": "v1",
    }
    outcome = Outcome(SANDBOX_READY, {"sandbox_id": "s", "wake_ups": [wake, {"tenant": 1}]})
    assert promised(outcome) == [Promised("t2", "TemperAgent", "a-9", 5, "v1")]
    assert "wake_ups" not in without_promises(outcome).params
    assert "wake_ups" not in outcome_to_json(outcome)["params"]
