"""The mock LLM API over real HTTP on loopback: limits, headers, error bodies, control API.

Bucket arithmetic runs on a FrozenClock, so every retry-after and -remaining value is
exact; only latency takes real time.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import httpx
import pytest

from tests.harness.mocks.llm.fixtures import (
    API_KEY,
    FrozenClock,
    client,
    in_threads,
    reset_in_s,
    running_mock,
    send,
)

RATE_LIMIT_PREFIX = "anthropic-ratelimit-"


def ratelimit_headers(response: httpx.Response) -> dict[str, str]:
    return {k: v for k, v in response.headers.items() if k.startswith(RATE_LIMIT_PREFIX)}


def test_an_answer_has_the_messages_api_shape() -> None:
    with running_mock(output_tokens=7) as server, client(server) as http:
        response = send(http, tokens=12, model="claude-sonnet-4-5")
    assert response.status_code == 200
    body = response.json()
    assert body["id"].startswith("msg_")
    assert body == {
        "id": body["id"],
        "type": "message",
        "role": "assistant",
        "content": [{"type": "text", "text": " ".join(["mock"] * 7)}],
        "model": "claude-sonnet-4-5",
        "stop_reason": "end_turn",
        "stop_sequence": None,
        "usage": {"input_tokens": 12, "output_tokens": 7},
    }
    # No limits configured: no rate-limit headers.
    assert ratelimit_headers(response) == {}


def test_rpm_limit_refuses_past_the_bucket_and_refills_continuously() -> None:
    clock = FrozenClock()
    with running_mock(clock, rpm=3) as server, client(server) as http:
        answers = [send(http) for _ in range(3)]
        assert [r.status_code for r in answers] == [200, 200, 200]
        assert [r.headers["anthropic-ratelimit-requests-remaining"] for r in answers] == [
            "2",
            "1",
            "0",
        ]
        refused = send(http, tokens=5)
        assert refused.status_code == 429
        # One request comes back every 60/3 = 20 s.
        assert refused.headers["retry-after"] == "20"
        assert refused.json() == {
            "type": "error",
            "error": {"type": "rate_limit_error", "message": refused.json()["error"]["message"]},
        }
        assert "3 requests per minute" in refused.json()["error"]["message"]
        clock.advance(19.5)
        early = send(http)
        assert (early.status_code, early.headers["retry-after"]) == (429, "1")
        clock.advance(0.5)
        assert send(http).status_code == 200
        stats = server.stats()
    assert stats.rate_limited_by == {"requests": 2, "input_tokens": 0, "output_tokens": 0}
    assert stats.rate_limited == 2
    assert (stats.requests_total, stats.messages_ok) == (6, 4)
    # A refused request is charged nothing: 4 admitted requests of 1 input token each.
    assert stats.input_tokens == 4


def test_itpm_limit_charges_the_estimate_up_front() -> None:
    clock = FrozenClock()
    with running_mock(clock, itpm=100) as server, client(server) as http:
        first, second = send(http, tokens=50), send(http, tokens=50)
        assert [r.status_code for r in (first, second)] == [200, 200]
        assert first.headers["anthropic-ratelimit-input-tokens-remaining"] == "50"
        assert second.headers["anthropic-ratelimit-input-tokens-remaining"] == "0"
        assert first.json()["usage"]["input_tokens"] == 50
        refused = send(http, tokens=50)
        assert refused.status_code == 429
        # 50 tokens at 100/60 per second: 30 s.
        assert refused.headers["retry-after"] == "30"
        assert "100 input tokens per minute" in refused.json()["error"]["message"]
        # A small request still fits what has refilled: the limit is on tokens, not requests.
        clock.advance(3)
        assert send(http, tokens=5).status_code == 200
        assert server.levels(API_KEY)["input_tokens"] == pytest.approx(0.0)
        stats = server.stats()
    assert stats.rate_limited_by["input_tokens"] == 1
    assert stats.input_tokens == 105


def test_a_prompt_larger_than_the_itpm_bucket_waits_for_a_full_bucket_then_leaves_debt() -> None:
    clock = FrozenClock()
    with running_mock(clock, itpm=100) as server, client(server) as http:
        assert send(http, tokens=10).status_code == 200
        refused = send(http, tokens=250)
        assert (refused.status_code, refused.headers["retry-after"]) == (429, "6")
        clock.advance(6)
        assert send(http, tokens=250).status_code == 200
        assert server.levels(API_KEY)["input_tokens"] == pytest.approx(-150.0)


def test_otpm_charges_actual_output_after_the_answer_and_runs_into_debt() -> None:
    clock = FrozenClock()
    with running_mock(clock, otpm=60, output_tokens=100) as server, client(server) as http:
        first = send(http)
        assert first.status_code == 200
        assert first.json()["usage"]["output_tokens"] == 100
        assert first.headers["anthropic-ratelimit-output-tokens-remaining"] == "0"
        assert server.levels(API_KEY)["output_tokens"] == pytest.approx(-40.0)
        # Full again only after the 40-token debt and the whole 60 have come back.
        assert 99 <= reset_in_s(first, "anthropic-ratelimit-output-tokens-reset") <= 102
        refused = send(http)
        assert refused.status_code == 429
        # Back to one output token after the debt is paid: 41 s at 1/s, not 1 s.
        assert refused.headers["retry-after"] == "41"
        assert "60 output tokens per minute" in refused.json()["error"]["message"]
        clock.advance(40)
        assert send(http).headers["retry-after"] == "1"
        clock.advance(1)
        assert send(http).status_code == 200
        stats = server.stats()
    assert stats.rate_limited_by == {"requests": 0, "input_tokens": 0, "output_tokens": 2}
    assert stats.output_tokens == 200


def test_headers_report_every_limit_and_the_most_restrictive_token_limit() -> None:
    clock = FrozenClock()
    with (
        running_mock(clock, rpm=3, itpm=100, otpm=1000, output_tokens=10) as server,
        client(server) as http,
    ):
        response = send(http, tokens=60)
        headers = ratelimit_headers(response)
        assert {k: v for k, v in headers.items() if not k.endswith("-reset")} == {
            "anthropic-ratelimit-requests-limit": "3",
            "anthropic-ratelimit-requests-remaining": "2",
            "anthropic-ratelimit-input-tokens-limit": "100",
            "anthropic-ratelimit-input-tokens-remaining": "40",
            "anthropic-ratelimit-output-tokens-limit": "1000",
            "anthropic-ratelimit-output-tokens-remaining": "990",
            # Input has fewer tokens left: it is the most restrictive.
            "anthropic-ratelimit-tokens-limit": "100",
            "anthropic-ratelimit-tokens-remaining": "40",
        }
        # -reset: when the bucket is full again, on the wall clock (RFC 3339, whole seconds
        # rounded up): 1 request at 3/min is 20 s; 60 tokens at 100/min is 36 s.
        assert 19 <= reset_in_s(response, "anthropic-ratelimit-requests-reset") <= 22
        assert 35 <= reset_in_s(response, "anthropic-ratelimit-input-tokens-reset") <= 38
        assert 0 <= reset_in_s(response, "anthropic-ratelimit-output-tokens-reset") <= 3
        assert (
            headers["anthropic-ratelimit-tokens-reset"]
            == (headers["anthropic-ratelimit-input-tokens-reset"])
        )
        server.configure(otpm=20)  # new limits start from full buckets
        tighter = send(http, tokens=1)
        assert tighter.headers["anthropic-ratelimit-tokens-limit"] == "20"
        assert tighter.headers["anthropic-ratelimit-tokens-remaining"] == "10"
        refused = send(http, tokens=1)
        assert refused.status_code == 200  # 10 output tokens still left
        over = send(http, tokens=1)
        assert over.status_code == 429
        # The 429 names the limit that refused it in the tokens-* headers.
        assert over.headers["anthropic-ratelimit-tokens-limit"] == "20"
        assert over.headers["anthropic-ratelimit-tokens-remaining"] == "0"


def test_token_remaining_can_be_rounded_to_the_thousand_like_anthropic() -> None:
    with (
        running_mock(FrozenClock(), itpm=10_000, token_remaining_rounding=1000) as server,
        client(server) as http,
    ):
        response = send(http, tokens=600)
    assert response.headers["anthropic-ratelimit-input-tokens-remaining"] == "9000"
    assert response.headers["anthropic-ratelimit-input-tokens-limit"] == "10000"


def test_limits_apply_per_api_key() -> None:
    with (
        running_mock(FrozenClock(), api_keys=("key-a", "key-b"), rpm=1) as server,
        client(server, "key-a") as a,
        client(server, "key-b") as b,
    ):
        assert send(a).status_code == 200
        assert send(a).status_code == 429
        assert send(b).status_code == 200
        assert send(b).status_code == 429


def test_wrong_or_missing_key_is_401_authentication_error() -> None:
    with running_mock(rpm=1) as server:
        with client(server, "sk-ant-wrong") as http:
            wrong = send(http)
        missing = httpx.post(
            f"{server.url}/v1/messages", json={}, headers={"anthropic-version": "2023-06-01"}
        )
        # The SDK 2.x way of presenting the key is accepted as well.
        bearer = httpx.post(
            f"{server.url}/v1/messages",
            json={"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": "x"}]},
            headers={"authorization": f"Bearer {API_KEY}", "anthropic-version": "2023-06-01"},
        )
        stats = server.stats()
    for response in (wrong, missing):
        assert response.status_code == 401
        assert response.json() == {
            "type": "error",
            "error": {"type": "authentication_error", "message": "invalid x-api-key"},
        }
    assert bearer.status_code == 200
    # A 401 touches no bucket: the one request of the RPM went to the bearer request.
    assert (stats.unauthorized, stats.messages_ok, stats.rate_limited) == (2, 1, 0)


@pytest.mark.parametrize(
    ("content", "headers", "fragment"),
    [
        (b"{not json", {}, "not valid JSON"),
        (b"[1, 2]", {}, "JSON object"),
        (b'{"model": "m", "messages": [{"role": "user", "content": "x"}]}', {}, "max_tokens"),
        (b'{"model": "m", "max_tokens": 5, "messages": []}', {}, "messages"),
        (
            b'{"model": "m", "max_tokens": 5, "stream": true, '
            b'"messages": [{"role": "user", "content": "x"}]}',
            {},
            "does not stream",
        ),
        (
            b'{"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": "x"}]}',
            {"anthropic-version": ""},
            "anthropic-version",
        ),
    ],
)
def test_malformed_requests_are_400_invalid_request_error_and_charge_nothing(
    content: bytes, headers: dict[str, str], fragment: str
) -> None:
    with running_mock(FrozenClock(), rpm=1) as server, client(server) as http:
        response = http.post(
            "/v1/messages", content=content, headers={"content-type": "application/json", **headers}
        )
        assert response.status_code == 400
        body = response.json()
        assert body["type"] == "error"
        assert body["error"]["type"] == "invalid_request_error"
        assert fragment in body["error"]["message"]
        # The one request a minute is still there.
        assert send(http).status_code == 200
        stats = server.stats()
    assert (stats.bad_requests, stats.messages_ok, stats.input_tokens) == (1, 1, 1)


def test_scheduled_overload_answers_529_and_charges_nothing() -> None:
    with (
        running_mock(FrozenClock(), rpm=10, overload_first=2, overload_last=3) as server,
        client(server) as http,
    ):
        answers = [send(http) for _ in range(4)]
        stats = server.stats()
    assert [r.status_code for r in answers] == [200, 529, 529, 200]
    assert answers[1].json() == {
        "type": "error",
        "error": {"type": "overloaded_error", "message": "Overloaded"},
    }
    assert "retry-after" not in answers[1].headers
    assert answers[3].headers["anthropic-ratelimit-requests-remaining"] == "8"
    assert (stats.overloaded, stats.messages_ok, stats.rate_limited) == (2, 2, 0)


def test_overload_mode_answers_every_request_529_with_the_configured_retry_after() -> None:
    with (
        running_mock(overloaded=True, overload_retry_after_s=2.5) as server,
        client(server) as http,
    ):
        answers = [send(http) for _ in range(3)]
        server.configure(overloaded=False)
        after = send(http)
    assert [r.status_code for r in answers] == [529, 529, 529]
    assert {r.headers["retry-after"] for r in answers} == {"3"}
    assert after.status_code == 200


def overload_pattern(server: Any, count: int) -> list[int]:
    with client(server) as http:
        return [send(http).status_code for _ in range(count)]


def test_overload_probability_is_seeded_and_replays_after_reset() -> None:
    with running_mock(overload_probability=0.5, seed=7) as server:
        first = overload_pattern(server, 30)
        server.reset()
        replay = overload_pattern(server, 30)
        server.configure(seed=8)
        other_seed = overload_pattern(server, 30)
        stats = server.stats()
    assert first == replay
    assert 529 in first and 200 in first
    assert other_seed != first
    assert stats.overloaded == replay.count(529) + other_seed.count(529)  # since the reset


def test_output_tokens_are_seeded_within_their_range_and_capped_by_max_tokens() -> None:
    def usages(server: Any) -> list[int]:
        with client(server) as http:
            return [send(http).json()["usage"]["output_tokens"] for _ in range(20)]

    with running_mock(output_tokens=5, output_tokens_max=50, seed=3) as server:
        first = usages(server)
        server.reset()
        assert usages(server) == first
        with client(server) as http:
            capped = send(http, max_tokens=4).json()
    assert all(5 <= n <= 50 for n in first) and len(set(first)) > 1
    assert capped["usage"]["output_tokens"] == 4
    assert capped["stop_reason"] == "max_tokens"
    assert capped["content"][0]["text"] == "mock mock mock mock"


def test_latency_holds_the_answer_at_least_the_configured_time() -> None:
    with running_mock(latency_ms=300) as server, client(server) as http:
        started = time.monotonic()
        assert send(http).status_code == 200
        assert time.monotonic() - started >= 0.3
    with running_mock(latency_ms=200, latency_max_ms=400, seed=1) as server, client(server) as http:
        started = time.monotonic()
        assert send(http).status_code == 200
        assert time.monotonic() - started >= 0.2


def test_limits_are_exact_under_concurrent_requests() -> None:
    with running_mock(FrozenClock(), rpm=5, itpm=1000) as server:

        def one() -> int:
            with client(server) as http:
                return send(http, tokens=7).status_code

        statuses = in_threads(one, 12)
        stats = server.stats()
    assert sorted(statuses) == [200] * 5 + [429] * 7
    assert (stats.requests_total, stats.messages_ok, stats.rate_limited) == (12, 5, 7)
    assert stats.input_tokens == 35
    assert stats.in_flight == 0


def test_concurrency_and_token_counters_are_exact() -> None:
    # Latencies long enough to hold every request in flight at once (proven by wait_for);
    # stopping the server ends them, so the test does not wait them out, and every request
    # still gets its answer.
    results: list[int] = []
    lock = threading.Lock()
    with running_mock(latency_ms=600_000, output_tokens=9) as server:

        def run() -> None:
            with client(server, timeout=120) as http:
                status = send(http, tokens=3).status_code
            with lock:
                results.append(status)

        threads = [threading.Thread(target=run) for _ in range(10)]
        for thread in threads:
            thread.start()
        held = server.wait_for(lambda s: s.in_flight == 10, timeout=60)
        assert held.messages_ok == 0
    for thread in threads:
        thread.join(60)
    stats = server.stats()
    assert results == [200] * 10
    assert (stats.max_concurrency, stats.in_flight) == (10, 0)
    assert (stats.requests_total, stats.messages_ok) == (10, 10)
    assert (stats.input_tokens, stats.output_tokens) == (30, 90)


def test_control_api_reads_stats_and_requests_reconfigures_and_resets() -> None:
    clock = FrozenClock()
    with running_mock(clock, rpm=1) as server, client(server) as http:
        assert send(http).status_code == 200
        assert send(http).status_code == 429
        stats = http.get("/_mock/stats").json()
        assert stats["rate_limited_by"]["requests"] == 1
        assert stats["requests_total"] == 2
        log = http.get("/_mock/requests").json()
        assert [(r["status"], r["limit"], r["retry_after_s"]) for r in log] == [
            (200, None, None),
            (429, "requests", 60),
        ]
        assert log[1]["arrived_at"] == clock.now
        config = http.post("/_mock/config", json={"rpm": 2, "output_tokens": 3}).json()
        assert (config["rpm"], config["output_tokens"]) == (2, 3)
        assert http.get("/_mock/config").json()["rpm"] == 2
        # Changed limits start full: two more requests pass.
        assert [send(http).status_code for _ in range(3)] == [200, 200, 429]
        bad = http.post("/_mock/config", json={"rpm": 0})
        assert bad.status_code == 400
        assert bad.json()["error"]["type"] == "invalid_request_error"
        assert http.post("/_mock/config", json=[1]).status_code == 400
        assert server.config.rpm == 2
        assert http.post("/_mock/reset").status_code == 204
        assert http.get("/_mock/stats").json()["requests_total"] == 0
        assert http.get("/_mock/requests").json() == []
        # Reset refills the buckets too.
        assert send(http).status_code == 200
