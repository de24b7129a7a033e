"""The official ``anthropic`` SDK against the mock: ``messages.create``, its typed errors,
and its own retries on 429 and 529, which must wait the ``retry-after`` the mock sent.

The retry tests read the wait from the mock's request log: ``answered_at`` of the refused
attempt is taken before its answer is sent, and the SDK sleeps only after receiving it, so
the next attempt's ``arrived_at`` is at least ``retry-after`` later if the SDK honoured it
(its own backoff for a first retry is at most 0.5 s). Only lower bounds are asserted.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from typing import Any

import anthropic
import pytest

from harness.mocks.llm import MockLLMServer, RequestRecord
from tests.harness.mocks.llm.fixtures import API_KEY, running_mock, text_of_tokens

MODEL = "claude-mock-1"  # a name the SDK does not know, so it warns of nothing


CLIENTS: list[anthropic.Anthropic] = []


@pytest.fixture(autouse=True)
def close_clients() -> Iterator[None]:
    # A client left to the garbage collector at interpreter exit (Ctrl-C during the tests)
    # printed an AttributeError traceback from its __del__.
    yield
    while CLIENTS:
        CLIENTS.pop().close()


def sdk(server: MockLLMServer, **options: Any) -> anthropic.Anthropic:
    options.setdefault("max_retries", 2)
    client = anthropic.Anthropic(api_key=API_KEY, base_url=server.url, timeout=30.0, **options)
    CLIENTS.append(client)
    return client


def ask(client: anthropic.Anthropic, tokens: int = 5, **params: Any) -> anthropic.types.Message:
    params.setdefault("max_tokens", 256)
    message = client.messages.create(
        model=MODEL, messages=[{"role": "user", "content": text_of_tokens(tokens)}], **params
    )
    assert isinstance(message, anthropic.types.Message)
    return message


def assert_waited_retry_after(records: list[RequestRecord]) -> None:
    """Each refused attempt is followed by one that came at least its retry-after later."""
    for refused, retry in itertools.pairwise(records):
        if refused.status in (429, 529):
            assert refused.retry_after_s is not None and refused.retry_after_s >= 1
            waited = retry.arrived_at - refused.answered_at
            assert waited >= refused.retry_after_s, (refused, retry)


@pytest.fixture
def server() -> Iterator[MockLLMServer]:
    with running_mock(output_tokens=12) as mock:
        yield mock


def test_messages_create_returns_a_message(server: MockLLMServer) -> None:
    raw = sdk(server).messages.with_raw_response.create(
        model=MODEL,
        max_tokens=256,
        system="be brief",  # 8 characters
        messages=[{"role": "user", "content": text_of_tokens(10)}],
    )
    message = raw.parse()
    assert isinstance(message, anthropic.types.Message)
    assert message.role == "assistant" and message.model == MODEL
    assert message.stop_reason == "end_turn" and message.stop_sequence is None
    assert [block.type for block in message.content] == ["text"]
    assert message.content[0].text == " ".join(["mock"] * 12)  # type: ignore[union-attr]
    assert (message.usage.input_tokens, message.usage.output_tokens) == (12, 12)
    assert raw.status_code == 200
    assert server.stats().messages_ok == 1


def test_sdk_raises_typed_errors_without_retries(server: MockLLMServer) -> None:
    server.configure(rpm=1)
    client = sdk(server, max_retries=0)
    ask(client)
    with pytest.raises(anthropic.RateLimitError) as limited:
        ask(client)
    assert limited.value.status_code == 429
    assert limited.value.response.json()["error"]["type"] == "rate_limit_error"
    assert int(limited.value.response.headers["retry-after"]) >= 59
    server.configure(rpm=None, overloaded=True)
    with pytest.raises(anthropic.OverloadedError) as overloaded:
        ask(client)
    assert overloaded.value.status_code == 529
    assert overloaded.value.response.json()["error"]["type"] == "overloaded_error"
    server.configure(overloaded=False)
    with pytest.raises(anthropic.AuthenticationError):
        ask(anthropic.Anthropic(api_key="sk-ant-wrong", base_url=server.url, max_retries=0))
    with pytest.raises(anthropic.BadRequestError, match="does not stream"):
        ask(client, stream=True)
    with pytest.raises(anthropic.BadRequestError, match="max_tokens"):
        ask(client, max_tokens=0)
    stats = server.stats()
    assert (stats.messages_ok, stats.rate_limited, stats.overloaded) == (1, 1, 1)
    assert (stats.unauthorized, stats.bad_requests) == (1, 2)


def test_sdk_retries_a_429_after_the_retry_after_the_mock_sent(server: MockLLMServer) -> None:
    # One request every 5 s, none banked: the SDK's call right after a warm-up is refused
    # with a retry-after of up to 5 s (a window wide enough for a loaded machine; the
    # statuses assert it held), and its retry then passes.
    server.configure(rpm=12, rpm_burst=1)
    client = sdk(server)
    ask(client)
    message = ask(client)
    assert message.usage.output_tokens == 12
    records = server.requests()
    assert [r.status for r in records] == [200, 429, 200], records
    assert records[1].limit == "requests"
    assert_waited_retry_after(records)
    assert server.stats().rate_limited_by["requests"] == 1


def test_sdk_retries_an_output_token_debt_429(server: MockLLMServer) -> None:
    # 60 output tokens a minute (1/s) and a first answer of 12 tokens from a bucket of
    # 10: the debt of 2 plus the one token needed takes 3 s, so the call right after is
    # refused (the statuses assert it) and the retry-after is 3 s.
    server.configure(otpm=60, otpm_burst=10)
    client = sdk(server)
    ask(client)
    ask(client)
    records = server.requests()
    assert [r.status for r in records][:2] == [200, 429], records
    assert records[1].limit == "output_tokens"
    assert records[-1].status == 200
    assert_waited_retry_after(records)


def test_sdk_retries_529s_and_honours_their_retry_after(server: MockLLMServer) -> None:
    server.configure(overload_first=1, overload_last=2, overload_retry_after_s=1)
    message = ask(sdk(server))
    assert message.type == "message"
    records = server.requests()
    assert [r.status for r in records] == [529, 529, 200]
    assert_waited_retry_after(records)
    assert server.stats().overloaded == 2


def test_sdk_gives_up_after_its_retries(server: MockLLMServer) -> None:
    server.configure(overloaded=True)
    with pytest.raises(anthropic.OverloadedError):
        ask(sdk(server, max_retries=1))
    assert server.stats().overloaded == 2  # the attempt and one retry
