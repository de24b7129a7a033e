"""Push wake-ups against a fake Temper API on loopback: each of Temper's answers handled
as docs/pace.md says, each wake-up sent once by several senders on one Redis, and one
whose claimer died sent by another after the claim lease."""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import time
from collections.abc import Callable, Iterator

import httpx
import pytest

from host.serve.wakeups import (
    DENIED,
    MOVED_ON,
    REJECTED,
    RETRIED,
    SENT,
    UNAVAILABLE,
    UNREACHABLE,
    WakeTarget,
    WakeupSender,
    WakeupStore,
    new_wakeup,
)
from host.storage.memory import MemoryBackend
from tests.conftest import require_redis_server
from tests.host.serve.fake_temper import FakeTemper

TEMPER_TOKEN = "temper-secret-token"


def target(url: str) -> WakeTarget:
    return WakeTarget(
        url,
        lambda tenant: TEMPER_TOKEN if tenant == "acme" else None,
        entity_sets={"CurationJob": "CurationJobs"},
    )


def schedule(
    store: WakeupStore,
    entity_id: str,
    *,
    at_ms: int | None = None,
    reservation: str = "",
    entity_type: str = "TemperAgent",
    tenant: str = "acme",
) -> None:
    at = store.now_ms() if at_ms is None else at_ms
    assert store.schedule(new_wakeup(tenant, entity_type, entity_id, at, reservation))


def send_due(sender: WakeupSender) -> list[str]:
    async def one_pass() -> list[str]:
        async with httpx.AsyncClient() as client:
            return await sender.send_due(client)

    return asyncio.run(one_pass())


def wait_for(condition: Callable[[], bool], what: str, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def test_a_wake_up_is_the_spec_s_action_on_the_entity_with_tenant_token_and_key() -> None:
    with FakeTemper({}) as temper:
        store = WakeupStore(MemoryBackend())
        results: list[str] = []
        sender = WakeupSender(store, target(temper.url), claimer="a", observe=results.append)
        schedule(store, "agent-1", reservation="r-7", at_ms=store.now_ms() - 5)
        schedule(store, "job 'x'", entity_type="CurationJob")
        schedule(store, "later", at_ms=store.now_ms() + 60_000)  # not due yet
        assert sorted(send_due(sender)) == [SENT, SENT] and sorted(results) == [SENT, SENT]
        by_entity = {r["entity"]: r for r in temper.requests}
        agent = by_entity["agent-1"]
        assert agent["path"] == "/tdata/TemperAgents('agent-1')/Temper.WakeProvision"
        assert agent["headers"]["X-Tenant-Id"] == "acme"
        assert agent["headers"]["Authorization"] == f"Bearer {TEMPER_TOKEN}"
        assert agent["headers"]["Idempotency-Key"].startswith("r-7@")
        assert json.loads(agent["body"]) == {}
        # The configured entity set, and a quote in the key doubled (OData) and encoded.
        job = by_entity["job%20%27%27x%27%27"]
        assert job["path"] == "/tdata/CurationJobs('job%20%27%27x%27%27')/Temper.WakeProvision"
        assert len(store.pending()) == 1  # only the one not yet due is left


@pytest.mark.parametrize(
    ("status", "result"),
    [(409, MOVED_ON), (403, DENIED), (401, DENIED), (404, REJECTED)],
)
def test_a_refusal_is_counted_and_dropped_and_never_logs_the_token(
    status: int, result: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    with FakeTemper({"agent-1": [(status, {})]}) as temper:
        store = WakeupStore(MemoryBackend())
        sender = WakeupSender(store, target(temper.url), claimer="a")
        schedule(store, "agent-1")
        assert send_due(sender) == [result]
        assert store.pending() == {} and len(temper.requests) == 1
        assert send_due(sender) == []  # dropped: never sent again
    assert TEMPER_TOKEN not in caplog.text


def test_a_503_is_sent_once_more_after_retry_after_then_dropped() -> None:
    # Catches: a 503 (Temper's [admission]) dropped at once, retried at once (ignoring
    # Retry-After), or retried forever.
    with FakeTemper(
        {
            "ok-later": [(503, {"Retry-After": "1"}), (200, {})],
            "always-busy": [(503, {"Retry-After": "1"})],
        }
    ) as temper:
        store = WakeupStore(MemoryBackend())
        sender = WakeupSender(store, target(temper.url), claimer="a")
        schedule(store, "ok-later")
        schedule(store, "always-busy")
        sent_at = store.now_ms()
        assert send_due(sender) == [RETRIED, RETRIED]
        # Retry-After honoured, in stored state.
        assert min(store.pending().values()) >= sent_at + 1_000
        retry_at = max(store.pending().values())
        assert len(temper.requests) == 2
        wait_for(lambda: store.now_ms() >= retry_at, "the Retry-After to pass")
        assert sorted(send_due(sender)) == [SENT, UNAVAILABLE]
        assert store.pending() == {}
        keys: dict[str, set[str]] = {r["entity"]: set() for r in temper.requests}
        for r in temper.requests:
            keys[r["entity"]].add(r["headers"]["Idempotency-Key"])
        assert all(len(k) == 1 for k in keys.values())  # one wake-up: one key


def test_an_unreachable_temper_drops_the_wake_up() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed_port = probe.getsockname()[1]
    store = WakeupStore(MemoryBackend())
    sender = WakeupSender(store, target(f"http://127.0.0.1:{closed_port}"), claimer="a")
    schedule(store, "agent-1")
    assert send_due(sender) == [UNREACHABLE]
    assert store.pending() == {}


def test_a_tenant_without_a_credential_is_not_sent() -> None:
    with FakeTemper({}) as temper:
        store = WakeupStore(MemoryBackend())
        sender = WakeupSender(store, target(temper.url), claimer="a")
        schedule(store, "agent-1", tenant="other")
        assert send_due(sender) == ["no_credential"] and temper.requests == []


def test_a_wake_up_whose_claimer_died_is_sent_by_another_after_the_lease() -> None:
    # Catches: a claim that is never released blocking the wake-up forever, or a second
    # sender ignoring a live claim (two sends).
    clock = {"ms": 1_000_000}
    storage = MemoryBackend(lambda: clock["ms"])
    store = WakeupStore(storage)
    with FakeTemper({}) as temper:
        schedule(store, "agent-1", reservation="r-1")
        [wakeup_id] = store.pending()
        claimed = store.claim(wakeup_id, "dead", lease_ms=1_000)  # then its process dies
        assert claimed is not None
        survivor = WakeupSender(store, target(temper.url), claimer="alive")
        clock["ms"] += 999
        assert send_due(survivor) == [] and temper.requests == []  # the claim is live
        clock["ms"] += 2
        assert send_due(survivor) == [SENT]
        assert temper.keys_sent() == [claimed[0].idempotency_key]
        assert store.pending() == {}


def test_a_newer_wake_up_for_the_reservation_replaces_a_claimed_one() -> None:
    # Catches: a sender's finish deleting a wake-up rescheduled while it was sending.
    storage = MemoryBackend()
    store = WakeupStore(storage)
    schedule(store, "agent-1", reservation="r-1")
    [wakeup_id] = store.pending()
    claimed = store.claim(wakeup_id, "a", lease_ms=10_000)
    assert claimed is not None
    later = store.now_ms() + 5_000
    schedule(store, "agent-1", reservation="r-1", at_ms=later)
    store.finish(*claimed)
    assert store.pending() == {wakeup_id: later}


def test_the_index_is_bounded() -> None:
    store = WakeupStore(MemoryBackend(), max_pending=2)
    schedule(store, "a")
    schedule(store, "b")
    assert not store.schedule(new_wakeup("acme", "TemperAgent", "c", 1, ""))
    schedule(store, "a")  # the same wake-up again still fits
    assert len(store.pending()) == 2


@pytest.fixture
def redis_url() -> Iterator[str]:
    require_redis_server()
    from harness.multihost.redis_server import RedisServer

    with RedisServer(persistent=False) as server:
        yield server.url


@pytest.mark.redis
def test_two_services_on_one_redis_send_each_wake_up_once(redis_url: str) -> None:
    # Catches: two serve processes both sending a due wake-up (no claim), or one lost.
    from host.storage import storage_from_uri

    first, second = storage_from_uri(redis_url), storage_from_uri(redis_url)
    try:
        with FakeTemper({}) as temper:
            stores = [WakeupStore(first), WakeupStore(second)]
            senders = [
                WakeupSender(s, target(temper.url), claimer=n)
                for s, n in zip(stores, ("one", "two"), strict=True)
            ]
            for n in range(24):
                schedule(stores[n % 2], f"agent-{n}", reservation=f"r-{n}")

            async def both() -> list[str]:
                async with httpx.AsyncClient() as client:
                    passes = await asyncio.gather(*(s.send_due(client) for s in senders))
                    return [r for p in passes for r in p]

            results: list[str] = []
            for _ in range(10):
                results += asyncio.run(both())
                if not stores[0].pending():
                    break
            keys = temper.keys_sent()
            assert len(keys) == 24 and len(set(keys)) == 24
            assert results == [SENT] * 24 and stores[1].pending() == {}
    finally:
        first.close()
        second.close()
