"""Push wake-ups: answer a queued invocation now and, at the waiter's turn, dispatch the
spec's wake action on its entity through Temper's API (docs/pace.md has the sources).

    POST {temper_api_url}/tdata/{EntitySet}('{entity_id}')/Temper.{WakeAction}
    X-Tenant-Id: {tenant}; Authorization: Bearer {credential}; Idempotency-Key: {key}
    body: {}

Wake-ups live in the shared storage so several `serve` processes on one Redis send each
once and one that dies loses none: a document per wake-up (keyed by its reservation) and
a bounded index of due times (the storage contract cannot list keys). A sender claims a
due wake-up by compare-and-swap with a short lease before sending; a claim whose holder
died expires and another sender takes it. The Idempotency-Key is the same for every
send of one wake-up, so a resend after a claimer died is one action in Temper.

Temper's answers: 2xx sent; 409 the entity moved on (done); 401/403 denied (logged,
dropped: the spec's timer is the safety net); 503 sent once more after Retry-After; no
connection or a timeout dropped; any other status dropped. Each is counted.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
from collections.abc import Callable, Mapping
from dataclasses import KW_ONLY, asdict, dataclass, field, replace
from typing import Any
from urllib.parse import quote

import httpx

from host.storage.base import StorageBackend, StorageConflict, StorageError

LOG = logging.getLogger("sandbox_provisioner.serve.wakeups")
WAKEUP_NAMESPACE = "sandbox-provisioner/serve/wakeups"
INDEX_KEY = "due-index"
DEFAULT_WAKE_ACTION = "WakeProvision"
MAX_PENDING = 2_000  # about 100 KiB of index: well inside one stored value
CLAIM_LEASE_MS = 15_000  # above SEND_TIMEOUT_S: a live claimer always finishes first
SEND_TIMEOUT_S = 5.0
KEEP_AFTER_DUE_MS = 3_600_000  # a wake-up nobody could send vanishes an hour after its time
POLL_INTERVAL_S = 0.2  # how soon another process's wake-up is seen when nothing is due here
SEND_BATCH = 32
CAS_ATTEMPTS = 16
# Results, the label of the wake-up counter.
SENT, MOVED_ON, DENIED, UNAVAILABLE, UNREACHABLE, REJECTED = (
    "sent",
    "moved_on",
    "denied",
    "unavailable",
    "unreachable",
    "rejected",
)
RETRIED, NO_CREDENTIAL, NOT_STORED = "retried", "no_credential", "not_stored"
RESULTS = (
    SENT,
    MOVED_ON,
    DENIED,
    UNAVAILABLE,
    UNREACHABLE,
    REJECTED,
    RETRIED,
    NO_CREDENTIAL,
    NOT_STORED,
)


def entity_set_default(entity_type: str) -> str:
    """Temper's CSDL names a type's entity set by appending "s" (`TemperAgents`,
    `AgentMemorys` in os-apps/temper-agent/specs/model.csdl.xml)."""
    return f"{entity_type}s"


@dataclass(frozen=True, slots=True)
class WakeTarget:
    """Where and how wake-ups are sent: the service's own settings, never an invocation's."""

    api_url: str
    credential: Callable[[str], str | None]
    wake_action: str = DEFAULT_WAKE_ACTION
    entity_sets: Mapping[str, str] | None = None

    def entity_set(self, entity_type: str) -> str:
        sets = self.entity_sets or {}
        return sets.get(entity_type) or entity_set_default(entity_type)

    def url(self, entity_type: str, entity_id: str) -> str:
        key = quote(entity_id.replace("'", "''"), safe="-._~")
        return (
            f"{self.api_url.rstrip('/')}/tdata/{self.entity_set(entity_type)}('{key}')"
            f"/Temper.{self.wake_action}"
        )


@dataclass(frozen=True, slots=True)
class Wakeup:
    tenant: str
    entity_type: str
    entity_id: str
    at_ms: int
    reservation: str
    idempotency_key: str
    attempts: int = 0
    claimed_until_ms: int = 0
    claimer: str = ""

    @property
    def id(self) -> str:
        return wakeup_id(self.tenant, self.entity_type, self.entity_id, self.reservation)

    def encode(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True, separators=(",", ":")).encode()

    @classmethod
    def decode(cls, data: bytes) -> Wakeup:
        return cls(**json.loads(data))


def _digest(*parts: object) -> str:
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:40]


def wakeup_id(tenant: str, entity_type: str, entity_id: str, reservation: str) -> str:
    """One document per reservation of an entity (per entity when none is held)."""
    return _digest(tenant, entity_type, entity_id, reservation)


def new_wakeup(
    tenant: str, entity_type: str, entity_id: str, at_ms: int, reservation: str
) -> Wakeup:
    """A wake-up at `at_ms`. Its Idempotency-Key names the reservation and the time: a
    later wake-up for the same reservation must not be taken by Temper for a replay of
    the first (a key seen with success answers its cached response, execute.rs)."""
    if reservation:
        key = f"{reservation}@{at_ms}"
    else:
        key = f"wake-{_digest(tenant, entity_type, entity_id, at_ms)}"
    return Wakeup(tenant, entity_type, entity_id, at_ms, reservation, key)


@dataclass
class WakeupStore:
    """Wake-up documents and the index of their due times, in one storage namespace."""

    storage: StorageBackend
    namespace: str = WAKEUP_NAMESPACE
    max_pending: int = MAX_PENDING

    def now_ms(self) -> int:
        return self.storage.now_ms()

    # -- the index: {"due": {id: at_ms}} ---------------------------------------------------
    def _read_index(self) -> tuple[dict[str, int], int | None]:
        entry = self.storage.get(self.namespace, INDEX_KEY)
        if entry is None:
            return {}, None
        due = json.loads(entry.value).get("due", {})
        return {str(k): int(v) for k, v in due.items()}, entry.version

    def _update_index(self, change: Callable[[dict[str, int]], bool]) -> bool:
        """Apply `change` (False: leave the index as it is) by compare-and-swap."""
        for _ in range(CAS_ATTEMPTS):
            due, version = self._read_index()
            if not change(due):
                return False
            value = json.dumps({"due": due}, sort_keys=True, separators=(",", ":")).encode()
            try:
                if version is None and not due:
                    return True
                if due or version is None:
                    self.storage.compare_and_swap(self.namespace, INDEX_KEY, version, value, None)
                else:
                    self.storage.delete(self.namespace, INDEX_KEY, version)
                return True
            except StorageConflict:
                continue
        raise StorageConflict("the wake-up index kept changing")

    def pending(self) -> dict[str, int]:
        return self._read_index()[0]

    # -- one wake-up -----------------------------------------------------------------------
    def _get(self, wakeup_id: str) -> tuple[Wakeup, int] | None:
        entry = self.storage.get(self.namespace, wakeup_id)
        return None if entry is None else (Wakeup.decode(entry.value), entry.version)

    def _ttl(self, wakeup: Wakeup) -> int:
        return max(1, wakeup.at_ms - self.now_ms()) + KEEP_AFTER_DUE_MS

    def schedule(self, wakeup: Wakeup) -> bool:
        """Store `wakeup` (replacing an earlier one for the same reservation, claimed or
        not: its claimer's finish then fails and leaves this one). False: the index is full."""

        def add(due: dict[str, int]) -> bool:
            if wakeup.id not in due and len(due) >= self.max_pending:
                raise OverflowError
            due[wakeup.id] = wakeup.at_ms
            return True

        try:
            self._update_index(add)
        except OverflowError:
            return False
        for _ in range(CAS_ATTEMPTS):
            found = self._get(wakeup.id)
            try:
                self.storage.compare_and_swap(
                    self.namespace,
                    wakeup.id,
                    None if found is None else found[1],
                    wakeup.encode(),
                    self._ttl(wakeup),
                )
                return True
            except StorageConflict:
                continue
        raise StorageConflict("the wake-up kept changing")

    def due(self, now_ms: int) -> list[str]:
        return [i for i, at in sorted(self.pending().items(), key=lambda kv: kv[1]) if at <= now_ms]

    def next_due_ms(self) -> int | None:
        return min(self.pending().values(), default=None)

    def claim(self, wakeup_id: str, claimer: str, lease_ms: int) -> tuple[Wakeup, int] | None:
        """Claim a due wake-up for `lease_ms`: the wake-up and its claimed version, or None
        (gone, not due, claimed by a live claimer, or taken meanwhile)."""
        now = self.now_ms()
        found = self._get(wakeup_id)
        if found is None:
            # Its sender finished it, or its schedule is writing it (index first): only an
            # entry past the documents' lifetime is stale.
            due_at = self.pending().get(wakeup_id)
            if due_at is not None and due_at + KEEP_AFTER_DUE_MS < now:
                self._forget(wakeup_id, due_at)
            return None
        wakeup, version = found
        if wakeup.at_ms > now or wakeup.claimed_until_ms > now:
            return None
        claimed = replace(wakeup, claimed_until_ms=now + lease_ms, claimer=claimer)
        try:
            new_version = self.storage.compare_and_swap(
                self.namespace, wakeup_id, version, claimed.encode(), self._ttl(claimed)
            )
        except StorageConflict:
            return None
        return claimed, new_version

    def finish(self, wakeup: Wakeup, version: int) -> None:
        """Remove a wake-up that is done; one replaced meanwhile stays."""
        try:
            self.storage.delete(self.namespace, wakeup.id, version)
        except StorageConflict:
            return
        self._forget(wakeup.id, wakeup.at_ms)

    def retry_at(self, wakeup: Wakeup, version: int, at_ms: int) -> None:
        """Send a claimed wake-up once more at `at_ms` (unclaimed, one more attempt)."""
        again = replace(
            wakeup, at_ms=at_ms, attempts=wakeup.attempts + 1, claimed_until_ms=0, claimer=""
        )
        try:
            self.storage.compare_and_swap(
                self.namespace, wakeup.id, version, again.encode(), self._ttl(again)
            )
        except StorageConflict:
            return

        def move(due: dict[str, int]) -> bool:
            due[wakeup.id] = at_ms
            return True

        self._update_index(move)

    def _forget(self, wakeup_id: str, at_ms: int | None) -> None:
        # Only the entry this wake-up was due at: a newer schedule (another time) stays.
        def drop(due: dict[str, int]) -> bool:
            if wakeup_id not in due or (at_ms is not None and due[wakeup_id] != at_ms):
                return False
            del due[wakeup_id]
            return True

        self._update_index(drop)


def retry_after_s(response: httpx.Response) -> float:
    text = response.headers.get("retry-after", "").strip()
    return float(text) if text.isdigit() else 1.0


def _ignore_result(_result: str) -> None:
    return None


@dataclass
class WakeupSender:
    """Sends the due wake-ups of a store (any process's) to Temper."""

    store: WakeupStore
    target: WakeTarget
    _: KW_ONLY
    claimer: str
    observe: Callable[[str], None] = _ignore_result
    lease_ms: int = CLAIM_LEASE_MS
    timeout_s: float = SEND_TIMEOUT_S
    kick: asyncio.Event = field(default_factory=asyncio.Event, init=False)

    async def send_due(self, client: httpx.AsyncClient) -> list[str]:
        """One pass: claim and send every due wake-up; the results, one per sent."""
        now = await asyncio.to_thread(self.store.now_ms)
        due = await asyncio.to_thread(self.store.due, now)
        results: list[str] = []
        for start in range(0, len(due), SEND_BATCH):
            batch = due[start : start + SEND_BATCH]
            results += [
                r
                for r in await asyncio.gather(*(self._one(client, i) for i in batch))
                if r is not None
            ]
        return results

    async def _one(self, client: httpx.AsyncClient, wakeup_id: str) -> str | None:
        claimed = await asyncio.to_thread(self.store.claim, wakeup_id, self.claimer, self.lease_ms)
        if claimed is None:
            return None
        wakeup, version = claimed
        result, retry_s = await self.deliver(client, wakeup)
        if result == UNAVAILABLE and wakeup.attempts == 0:
            at = await asyncio.to_thread(self.store.now_ms) + int(retry_s * 1000)
            await asyncio.to_thread(self.store.retry_at, wakeup, version, at)
            result = RETRIED
        else:
            await asyncio.to_thread(self.store.finish, wakeup, version)
        self.observe(result)
        return result

    async def deliver(self, client: httpx.AsyncClient, wakeup: Wakeup) -> tuple[str, float]:
        """Send one wake-up: its result and, for a 503, the Retry-After in seconds."""
        token = self.target.credential(wakeup.tenant)
        where = {
            "tenant": wakeup.tenant,
            "entity_type": wakeup.entity_type,
            "entity_id": wakeup.entity_id,
        }
        if not token:
            LOG.warning(json.dumps({"event": "wakeup", "result": NO_CREDENTIAL, **where}))
            return NO_CREDENTIAL, 0.0
        try:
            response = await client.post(
                self.target.url(wakeup.entity_type, wakeup.entity_id),
                headers={
                    "X-Tenant-Id": wakeup.tenant,
                    "Authorization": f"Bearer {token}",
                    "Idempotency-Key": wakeup.idempotency_key,
                },
                json={},
                timeout=self.timeout_s,
            )
        except httpx.HTTPError as error:
            LOG.info(
                json.dumps(
                    {
                        "event": "wakeup",
                        "result": UNREACHABLE,
                        "error": type(error).__name__,
                        **where,
                    }
                )
            )
            return UNREACHABLE, 0.0
        status = response.status_code
        if 200 <= status < 300:
            result = SENT
        elif status == 409:
            result = MOVED_ON
        elif status in (401, 403):
            result = DENIED
        elif status == 503:
            result = UNAVAILABLE
        else:
            result = REJECTED
        line: dict[str, Any] = {"event": "wakeup", "result": result, "status": status, **where}
        if result in (DENIED, REJECTED):
            LOG.warning(json.dumps(line))  # the token is never logged
        else:
            LOG.info(json.dumps(line))
        return result, retry_after_s(response) if status == 503 else 0.0

    async def run(self, client: httpx.AsyncClient) -> None:
        """Send due wake-ups until cancelled; a storage or send failure waits a poll."""
        while True:
            wait_s = POLL_INTERVAL_S
            try:
                await self.send_due(client)
                next_due = await asyncio.to_thread(self.store.next_due_ms)
                now = await asyncio.to_thread(self.store.now_ms)
                # One still due after the pass is claimed elsewhere: look again in a poll.
                if next_due is not None and next_due > now:
                    wait_s = min(POLL_INTERVAL_S, (next_due - now) / 1000)
            except StorageError as error:
                LOG.warning(json.dumps({"event": "wakeup_storage", "error": str(error)[:200]}))
            except Exception:  # a bad stored document must not end the sender for good
                LOG.exception("wake-up sender pass failed")
            self.kick.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.kick.wait(), max(wait_s, 0.01))


__all__ = [
    "DEFAULT_WAKE_ACTION",
    "RESULTS",
    "WAKEUP_NAMESPACE",
    "WakeTarget",
    "Wakeup",
    "WakeupSender",
    "WakeupStore",
    "entity_set_default",
    "new_wakeup",
    "wakeup_id",
]
