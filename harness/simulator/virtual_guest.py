"""Module `sandbox_provisioner` in virtual time with the guest's whole path: every
invocation runs `provisioner.app.run` natively (entity records, admission, the E2B client's
requests, settling) on the virtual clock over in-memory storage, against the in-process E2B
of `fake_e2b.py` spoken to over its HTTP shapes.

The guest's HTTP calls are synchronous, and a create takes virtual seconds. So each
invocation runs on a worker thread and exactly one thread runs at a time (a baton): the
event loop hands the baton to an invocation, which keeps it until it finishes or sends a
create; the create's answer is a timer at its latency, which hands the baton back to that
invocation. Strict alternation keeps a run deterministic from its seed.
"""

from __future__ import annotations

import json
import math
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from urllib.parse import parse_qs, urlsplit

from harness.mocks.e2b.team import SandboxSpec
from harness.simulator.fake_e2b import START_MS, FakeE2B
from harness.simulator.simulated_ports import EventLog, SeededRandom
from harness.simulator.virtual_serve import VirtualTimers
from host.runtime.native import native_ports
from host.storage.memory import MemoryBackend
from provisioner.app import run
from provisioner.failures import FailureCode
from provisioner.gates.results import CapacityExhausted, Created, RateLimited, Unavailable
from provisioner.model import Failure, Invocation, Outcome, failed
from provisioner.ports import HttpRequest, HttpResponse

ACCOUNT = "sim-account"
_JSON = (("content-type", "application/json"),)


class _Baton:
    """One worker thread: runs invocations handed to it, one thread at a time with the
    event loop."""

    def __init__(self) -> None:
        self._go = threading.Semaphore(0)
        self._back = threading.Semaphore(0)
        self._work: Callable[[], None] | None = None
        self.finished = False
        thread = threading.Thread(target=self._serve, name="virtual-guest", daemon=True)
        thread.start()

    def _serve(self) -> None:
        while True:
            self._go.acquire()
            work = self._work
            if work is None:
                return
            work()
            self.finished = True
            self._back.release()

    def begin(self, work: Callable[[], None]) -> None:
        """From the loop: run `work` until it finishes or pauses."""
        self._work = work
        self.finished = False
        self.resume()

    def resume(self) -> None:
        """From the loop: let the paused work go on until it finishes or pauses again."""
        self._go.release()
        self._back.acquire()

    def pause(self) -> None:
        """From the work: give the baton back to the loop and wait to be resumed."""
        self._back.release()
        self._go.acquire()

    def close(self) -> None:
        self._work = None
        self._go.release()


@dataclass
class E2BHttp:
    """E2B's REST shapes over the fake's model: create (with its idempotency key and
    metadata), list by metadata, kill."""

    e2b: FakeE2B
    loop: VirtualTimers
    by_key: dict[str, str] = field(default_factory=dict)
    created_for: dict[str, list[str]] = field(default_factory=dict)

    def send(self, request: HttpRequest, pause: Callable[[int], None]) -> HttpResponse:
        parts = urlsplit(request.url)
        if request.method == "POST" and parts.path == "/v2/sandboxes":
            return self._create(request, pause)
        if request.method == "GET" and parts.path == "/v2/sandboxes":
            return self._list(parse_qs(parts.query).get("metadata", [""])[0])
        if request.method == "DELETE" and parts.path.startswith("/sandboxes/"):
            sandbox = parts.path.rsplit("/", 1)[1]
            found = sandbox in self.e2b.sandboxes
            self.e2b.kill(sandbox)
            return HttpResponse(204 if found else 404, (), b"")
        return HttpResponse(404, _JSON, b'{"message": "no such route in the simulation"}')

    def _create(self, request: HttpRequest, pause: Callable[[int], None]) -> HttpResponse:
        key = next((v for k, v in request.headers if k.lower() == "idempotency-key"), "")
        adopted = self.by_key.get(key)
        if adopted is not None and adopted in self.e2b.sandboxes:
            return self._created(adopted)
        body = json.loads(request.body or b"{}")
        meta = body.get("metadata") if isinstance(body, dict) else None
        spec = SandboxSpec(
            metadata=tuple(meta.items()) if isinstance(meta, dict) else (),
            idempotency_key=key or None,
        )
        result, latency_ms = self.e2b.begin_create(self.loop.clock.now_ms(), spec)
        pause(latency_ms)
        self.e2b.end_create(result)
        if isinstance(result, Created):
            self.created_for.setdefault(key, []).append(result.sandbox_id)
            if key:
                self.by_key[key] = result.sandbox_id
            return self._created(result.sandbox_id)
        if isinstance(result, RateLimited):
            headers: tuple[tuple[str, str], ...] = _JSON
            if result.retry_after_ms is not None:
                headers += (("retry-after", str(math.ceil(result.retry_after_ms / 1000))),)
            return HttpResponse(429, headers, b'{"message": "rate limit exceeded"}')
        if isinstance(result, CapacityExhausted):
            message = (
                "maximum number of concurrent E2B sandboxes "
                f"({result.reported_limit or ''}) reached"
            ).replace(" ()", "")
            return HttpResponse(429, _JSON, json.dumps({"message": message}).encode())
        status = result.status if isinstance(result, Unavailable) and result.status else 503
        return HttpResponse(status, _JSON, b'{"message": "unavailable"}')

    @staticmethod
    def _created(sandbox_id: str) -> HttpResponse:
        body = {
            "sandboxID": sandbox_id,
            "clientID": "sim",
            "templateID": "base",
            "envdVersion": "0.2.0",
            "domain": "e2b.app",
        }
        return HttpResponse(201, _JSON, json.dumps(body).encode())

    def _list(self, query: str) -> HttpResponse:
        wanted = {k: v[0] for k, v in parse_qs(query).items()}
        found = [
            {"sandboxID": s, "clientID": "sim", "templateID": "base"}
            for s in sorted(self.e2b.listed(wanted))
        ]
        return HttpResponse(200, _JSON, json.dumps(found).encode())

    @property
    def duplicates(self) -> int:
        """Sandboxes created beyond the first for one idempotency key (one entity's try)."""
        return sum(len(ids) - 1 for ids in self.created_for.values() if len(ids) > 1)


class _PausingHttp:
    def __init__(self, http: E2BHttp, pause: Callable[[int], None]) -> None:
        self._http = http
        self._pause = pause

    def send(self, request: HttpRequest) -> HttpResponse:
        return self._http.send(request, self._pause)


class GuestProvisioner:
    """Plays module `sandbox_provisioner`: `provisioner.app.run` per invocation, natively,
    its E2B creates taking virtual time."""

    def __init__(
        self,
        loop: VirtualTimers,
        e2b: FakeE2B,
        backend: MemoryBackend,
        random: SeededRandom,
    ) -> None:
        self.loop = loop
        self.e2b = e2b
        self.http = E2BHttp(e2b, loop)
        self.backend = backend
        self.random = random
        self.telemetry = EventLog()
        self._idle: list[_Baton] = []
        self._batons: list[_Baton] = []

    def start(self, invocation: Invocation, done: Callable[[Outcome], None]) -> None:
        baton = self._idle.pop() if self._idle else self._new_baton()
        result: list[Outcome] = []

        def pause(latency_ms: int) -> None:
            self.loop.call_at(self._at(latency_ms), lambda: self._step(baton, result, done))
            baton.pause()

        def work() -> None:
            self.telemetry.events.clear()
            self.telemetry.logs.clear()
            try:
                ports = native_ports(
                    self.backend,
                    tenant=invocation.tenant,
                    account=ACCOUNT,
                    http=_PausingHttp(self.http, pause),
                    clock=self.loop.clock,
                    random=self.random,
                    telemetry=self.telemetry,
                )
                result.append(run(invocation, ports))
            except BaseException as error:  # the loop must get its baton back
                result.append(
                    failed(
                        Failure(FailureCode.HOST_ERROR, f"{type(error).__name__}: {error}", True)
                    )
                )

        baton.begin(work)
        self._settle(baton, result, done)

    def _new_baton(self) -> _Baton:
        baton = _Baton()
        self._batons.append(baton)
        return baton

    def _at(self, latency_ms: int) -> float:
        return (self.loop.clock.now_ms() + latency_ms - START_MS) / 1000

    def _step(self, baton: _Baton, result: list[Outcome], done: Callable[[Outcome], None]) -> None:
        baton.resume()
        self._settle(baton, result, done)

    def _settle(
        self, baton: _Baton, result: list[Outcome], done: Callable[[Outcome], None]
    ) -> None:
        if baton.finished:
            self._idle.append(baton)
            done(result[0])

    @property
    def duplicates(self) -> int:
        return self.http.duplicates

    def close(self) -> None:
        for baton in self._batons:
            baton.close()
        self._batons.clear()
        self._idle.clear()
