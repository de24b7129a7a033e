"""The mock's HTTP routes (Starlette): E2B's sandbox API plus a control API under /_mock/."""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
from collections.abc import AsyncIterator, Awaitable, Callable
from functools import partial
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from harness.mocks.e2b.config import FaultRule, MockE2BConfig
from harness.mocks.e2b.connection import KeepRawSend, reset_connection
from harness.mocks.e2b.state import MockState
from harness.mocks.e2b.team import Admitted, MustWait, Refused, SandboxRecord
from harness.mocks.e2b.wire import (
    ABSENT,
    MAX_REFRESH_S,
    BadRequest,
    CreateRequest,
    ListQuery,
    created_body,
    detail_body,
    encode_cursor,
    error_response,
    json_object,
    lifetime_field,
    listed_body,
    parse_create,
    parse_list_query,
    seconds_field,
    short_sandbox_id,
)
from harness.mocks.shared.control import control_routes

Handler = Callable[[Request], Awaitable[Response]]
# What a route did: the answer, its status and its JSON body (what a body fault garbles).
Outcome = tuple[Response, int, dict[str, Any] | None]
FAULT_HEADER = "X-Mock-Fault"
_RATE_MESSAGE = "Rate limit exceeded, please try again later."
_CONCURRENCY_MESSAGE = "too many concurrent sandbox create requests, please try again later"


def capacity_message(cap: int) -> str:
    return (
        f"you have reached the maximum number of concurrent E2B sandboxes ({cap}). "
        "If you need more, please contact us at 'https://e2b.dev/docs/getting-help'"
    )


class Runtime:
    """What lives on the server's event loop: the wait for a create slot, idempotency-key
    locks and the event that ends hanging requests when the server stops."""

    def __init__(self, state: MockState) -> None:
        self.state = state
        self.closing = asyncio.Event()
        self._slots = asyncio.Condition()
        self._key_locks: dict[str, asyncio.Lock] = {}

    async def wait_or_close(self, seconds: float) -> None:
        """Sleeps, but returns at once when the server is stopping."""
        if seconds <= 0:
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.closing.wait(), seconds)

    def key_lock(self, key: str) -> asyncio.Lock:
        return self._key_locks.setdefault(key, asyncio.Lock())

    async def config_changed(self) -> None:
        """Wakes creates waiting for a slot: a create ended, or the cap may have grown."""
        async with self._slots:
            self._slots.notify_all()

    async def close(self) -> None:
        """Ends hangs, slow bodies and waits for a create slot: the server is stopping."""
        self.closing.set()
        await self.config_changed()

    async def admit_after_wait(self, timeout_ms: float | None) -> Admitted | Refused | None:
        """Waits for a create slot ("slow" overload), then admits the create as the team
        decides; None when the wait timed out or the server is stopping."""
        loop = asyncio.get_running_loop()
        deadline = None if timeout_ms is None else loop.time() + timeout_ms / 1000.0
        while True:
            async with self._slots:
                try:
                    await asyncio.wait_for(
                        self._slots.wait_for(self._slot_or_closing),
                        None if deadline is None else max(0.0, deadline - loop.time()),
                    )
                except TimeoutError:
                    return None
            if self.closing.is_set():
                return None
            verdict = self.state.admit_create(after_wait=True)
            if not isinstance(verdict, MustWait):
                return verdict

    def _slot_or_closing(self) -> bool:
        return self.state.has_create_slot() or self.closing.is_set()


class NoAnswer(Response):
    """What a route returns when its client has gone: nothing is sent."""

    def __init__(self) -> None:
        super().__init__(status_code=499)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        return


def build_app(
    state: MockState, on_configure: Callable[[dict[str, Any]], MockE2BConfig]
) -> tuple[ASGIApp, Callable[[], Runtime | None]]:
    """The ASGI app and a getter for its runtime (which exists once the app has started)."""
    api = MockE2BApi(state)
    app = Starlette(
        routes=api.routes(on_configure),
        lifespan=api.lifespan,
        exception_handlers={HTTPException: unserved},
    )
    return KeepRawSend(app), lambda: api.started


def not_found(sandbox_id: str) -> Response:
    return error_response(
        404, f"sandbox \"{sandbox_id}\" doesn't exist or you don't have access to it"
    )


async def unserved(request: Request, exc: Exception) -> Response:
    """Every route the mock does not serve answers E2B's Error body, not text/plain."""
    status = exc.status_code if isinstance(exc, HTTPException) else 500
    message = {404: "Not found", 405: "Method not allowed"}.get(status, "Error")
    return error_response(status, f"{message}: {request.method} {request.url.path}")


def _check_bool_flags(body: dict[str, Any], *flags: str) -> None:
    for flag in flags:
        if flag in body and not isinstance(body[flag], bool):
            raise BadRequest(f"{flag} must be a boolean")


class MockE2BApi:
    """The route handlers over one mock's state, and the runtime they share once the app
    has started."""

    def __init__(self, state: MockState) -> None:
        self.state = state
        self.started: Runtime | None = None

    @property
    def runtime(self) -> Runtime:
        if self.started is None:
            raise RuntimeError("the mock's app has not started")
        return self.started

    @contextlib.asynccontextmanager
    async def lifespan(self, _: Starlette) -> AsyncIterator[None]:
        self.started = Runtime(self.state)
        try:
            yield
        finally:
            await self.started.close()

    def routes(self, on_configure: Callable[[dict[str, Any]], MockE2BConfig]) -> list[Route]:
        one = "/sandboxes/{sandbox_id}"
        sandbox = self._sandbox_route
        return [
            Route("/sandboxes", self._authenticated(partial(self.create, version=1)),
                  methods=["POST"]),
            Route("/v2/sandboxes", self._authenticated(partial(self.create, version=2)),
                  methods=["POST"]),
            Route("/sandboxes", self._authenticated(partial(self.list_sandboxes, version=1)),
                  methods=["GET"]),
            Route("/v2/sandboxes", self._authenticated(partial(self.list_sandboxes, version=2)),
                  methods=["GET"]),
            sandbox(one, "get", self.get_sandbox, "GET"),
            sandbox(one, "kill", self.kill_sandbox, "DELETE"),
            sandbox(one + "/timeout", "timeout", self.set_timeout, "POST", "required"),
            sandbox(one + "/refreshes", "refresh", self.refresh, "POST", "optional"),
            sandbox(one + "/pause", "pause", self.pause, "POST", "optional"),
            sandbox(one + "/resume", "resume", self.resume, "POST", "optional"),
            sandbox(one + "/connect", "connect", partial(self.connect, version=1), "POST",
                    "required"),
            sandbox("/v2" + one + "/connect", "connect", partial(self.connect, version=2),
                    "POST", "optional"),
            *control_routes(
                self.state,
                on_configure,
                lambda message: error_response(400, message),
                self.config_changed,
            ),
            Route("/_mock/sandboxes", self.get_running, methods=["GET"]),
            Route("/_mock/orphans", self.post_orphans, methods=["POST"]),
        ]  # fmt: skip

    # -- what every E2B route goes through -----------------------------------------------

    def _authenticated(self, handler: Handler) -> Handler:
        async def guarded(request: Request) -> Response:
            if request.headers.get("x-api-key") != self.state.config.api_key:
                self.state.count_unauthorized()
                return error_response(401, "Invalid API key")
            return await handler(request)

        return guarded

    async def _fault_response(
        self, rule: FaultRule, request: Request, status: int, body: dict[str, Any] | None
    ) -> Response:
        rt = self.runtime
        config = self.state.config
        # Marks the answer as injected, so checks of E2B's wire format can tell it apart.
        marker = {FAULT_HEADER: rule.kind}
        if rule.kind == "status":
            headers: dict[str, str] = dict(marker)
            if rule.should_retry is not None:
                headers["Should-Retry"] = "true" if rule.should_retry else "false"
            return error_response(rule.status, "injected fault: upstream error", headers)
        if rule.kind == "reset" and await reset_connection(request.scope):
            return Response(status_code=500, headers=marker)  # never reaches the client
        # A server that hides its transport cannot reset: the client then times out instead.
        if rule.kind in ("hang", "reset"):
            await rt.wait_or_close(config.hang_s)
            return error_response(504, "injected fault: request hung", marker)
        payload = json.dumps(body if body is not None else {"ok": True}).encode()
        status = 200 if status == 204 else status  # a 204 cannot carry the garbled body
        if rule.kind == "malformed_json":
            return Response(
                payload[: max(1, len(payload) // 2)],
                status,
                media_type="application/json",
                headers=marker,
            )
        chunks = [payload[i : i + 16] for i in range(0, len(payload), 16)]
        pause = config.slow_body_ms / 1000.0 / max(1, len(chunks))

        async def trickle() -> AsyncIterator[bytes]:
            for chunk in chunks:
                yield chunk
                await rt.wait_or_close(pause)

        return StreamingResponse(trickle(), status, media_type="application/json", headers=marker)

    async def _with_faults(
        self,
        request: Request,
        route: str,
        act: Callable[[], Awaitable[Outcome]],
    ) -> Response:
        """Runs ``act`` between the faults that fire before and after it on ``route``."""
        state = self.state
        ordinal = state.count_request(route)
        before = state.pick_fault(route, ordinal, after_create=False)
        if before is not None:
            # A garbled or slow success answer for an action that never happened.
            return await self._fault_response(
                before, request, 201 if route == "create" else 200, None
            )
        response, status, body = await act()
        if 200 <= status < 300:
            after = state.pick_fault(route, ordinal, after_create=True)
            if after is not None:
                return await self._fault_response(after, request, status, body)
        return response

    async def _body_unless_abandoned(self, request: Request) -> bytes | None:
        """The request's body, or None when the caller was killed mid-request: nobody to
        answer and nothing to do (unhandled, Starlette's ClientDisconnect became a
        text/plain 500)."""
        try:
            return await request.body()
        except ClientDisconnect:
            self.state.count_abandoned_request()
            return None

    def _bad_request(self, exc: BadRequest) -> Outcome:
        self.state.count_bad_request()
        return error_response(400, str(exc)), 400, None

    # -- creates -------------------------------------------------------------------------

    async def create(self, request: Request, version: int) -> Response:
        state = self.state
        config = state.config
        key = request.headers.get("idempotency-key") if version == 2 else None
        raw = await self._body_unless_abandoned(request)
        if raw is None:
            return NoAnswer()
        try:
            body = json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            body = None
        state.begin_create()
        try:
            try:
                parsed = parse_create(body, key, config.default_timeout_s, config.max_timeout_s)
            except BadRequest as exc:
                state.count_bad_request(new_request=True)
                return error_response(400, str(exc))
            return await self._with_faults(request, "create", lambda: self._admit(parsed))
        finally:
            state.end_create()

    async def _admit(self, parsed: CreateRequest) -> Outcome:
        key = parsed.idempotency_key
        if key is None:
            return await self._create_sandbox(parsed)
        async with self.runtime.key_lock(key):
            record = self.state.replay(key)
            if record is not None:
                return self._sandbox_answer(record, 201)
            return await self._create_sandbox(parsed)

    async def _create_sandbox(self, parsed: CreateRequest) -> Outcome:
        state = self.state
        rt = self.runtime
        verdict = state.admit_create()
        rate = verdict.rate  # the route's limiter spoke once, before any wait for a slot
        if isinstance(verdict, MustWait):
            waited = await rt.admit_after_wait(state.config.create_overload_timeout_ms)
            if waited is None:
                state.count_overload_timeout()
                return error_response(504, "sandbox creation timed out"), 504, None
            verdict = waited
        if isinstance(verdict, Refused):
            return self._refusal(verdict)
        try:
            await rt.wait_or_close(state.sample_latency_ms() / 1000.0)
            record = state.commit_create(verdict.sandbox_id, parsed)
        except BaseException:
            state.abandon_create()
            raise
        finally:
            await rt.config_changed()
        config = state.config
        body = created_body(record, config.envd_version, config.domain)
        rate_headers = {} if rate is None else rate.headers()
        return JSONResponse(body, 201, headers=rate_headers), 201, body

    def _refusal(self, refused: Refused) -> Outcome:
        if refused.kind == "capacity":
            return self._capacity_refusal(refused.cap or 0)
        if refused.kind == "rate" and refused.rate is not None:
            headers = refused.rate.headers()
        else:
            headers = {"Retry-After": str(math.ceil((refused.retry_after_ms or 0) / 1000))}
        message = _CONCURRENCY_MESSAGE if refused.kind == "concurrency" else _RATE_MESSAGE
        return error_response(429, message, headers), 429, None

    def _capacity_refusal(self, cap: int) -> Outcome:
        headers = {}
        if self.state.config.capacity_should_retry is not None:
            headers["Should-Retry"] = self.state.config.capacity_should_retry
        return error_response(429, capacity_message(cap), headers), 429, None

    # -- listing -------------------------------------------------------------------------

    async def list_sandboxes(self, request: Request, version: int) -> Response:
        async def act() -> Outcome:
            try:
                query = parse_list_query(request.query_params, version)
            except BadRequest as exc:
                return self._bad_request(exc)
            records, headers = self._list_page(query)
            if version == 1:
                headers = {}
            items = [self._listed(r) for r in records]
            return JSONResponse(items, 200, headers=headers), 200, None

        return await self._with_faults(request, "list", act)

    def _listed(self, record: SandboxRecord) -> dict[str, Any]:
        state = self.state
        return listed_body(
            record,
            state.wall_time_ms(record.started_at_ms),
            state.wall_time_ms(record.end_at_ms),
            state.config.envd_version,
        )

    def _list_page(self, query: ListQuery) -> tuple[list[SandboxRecord], dict[str, str]]:
        """One page, newest first unless ``order=asc``, after the cursor: keyset pagination
        on (startedAt, sandboxID) as E2B's (infra: packages/api/internal/handlers/
        sandboxes_list.go, utils/sandboxes_list.go), so sandboxes that come or go between
        pages neither shift nor repeat the rest."""
        state = self.state

        def keep(r: SandboxRecord) -> bool:
            return (
                r.has_metadata(query.metadata)
                and (query.template is None or query.template in (r.template_id, r.alias))
                and (
                    query.started_after is None
                    or state.wall_time_ms(r.started_at_ms) >= query.started_after
                )
            )

        records = [r for r in state.listed(query.states) if keep(r)]
        headers: dict[str, str] = {}
        if "running" in query.states:
            running = sum(1 for r in records if r.state == "running")
            headers["X-Total-Running"] = str(running)
        desc = query.order == "desc"
        # Newest first; equal start times by id ascending (asc reverses both).
        records.sort(key=lambda r: r.sandbox_id, reverse=not desc)
        records.sort(key=lambda r: r.started_at_ms, reverse=desc)
        if query.cursor is not None:
            at, after_id = query.cursor

            def past_cursor(r: SandboxRecord) -> bool:
                started = state.wall_time_ms(r.started_at_ms)
                if desc:
                    return started < at or (started == at and r.sandbox_id > after_id)
                return started > at or (started == at and r.sandbox_id < after_id)

            records = [r for r in records if past_cursor(r)]
        if len(records) > query.limit:
            records = records[: query.limit]
            last = records[-1]
            headers["X-Next-Token"] = encode_cursor(
                state.wall_time_ms(last.started_at_ms), last.sandbox_id, query.order
            )
        return records, headers

    # -- one sandbox ---------------------------------------------------------------------

    def _sandbox_route(
        self,
        path: str,
        route: str,
        handle: Callable[[str, Any], Outcome],
        method: str,
        body: str = "none",
    ) -> Route:
        on_sandbox = partial(self.on_sandbox, route=route, handle=handle, body=body)
        return Route(path, self._authenticated(on_sandbox), methods=[method])

    async def on_sandbox(
        self, request: Request, route: str, handle: Callable[[str, Any], Outcome], body: str
    ) -> Response:
        """A route on one sandbox: the path's id read as E2B reads it, the JSON body
        (``body``: "none", "optional" or "required") checked to be an object."""
        raw = await self._body_unless_abandoned(request)
        if raw is None:
            return NoAnswer()
        payload: Any = ABSENT
        malformed = False
        if raw.strip():
            try:
                payload = json.loads(raw)
            except (ValueError, UnicodeDecodeError):
                malformed = True

        async def act() -> Outcome:
            try:
                sandbox_id = short_sandbox_id(request.path_params["sandbox_id"])
                if malformed:
                    raise BadRequest("Error when parsing request: invalid JSON body")
                fields = {} if body == "none" else json_object(payload, required=body == "required")
                return handle(sandbox_id, fields)
            except BadRequest as exc:
                return self._bad_request(exc)

        return await self._with_faults(request, route, act)

    def get_sandbox(self, sandbox_id: str, _: Any) -> Outcome:
        state = self.state
        record = state.get(sandbox_id)
        if record is None:
            return not_found(sandbox_id), 404, None
        body = detail_body(
            record,
            state.wall_time_ms(record.started_at_ms),
            state.wall_time_ms(record.end_at_ms),
            state.config.envd_version,
            state.config.domain,
        )
        return JSONResponse(body, 200), 200, body

    def kill_sandbox(self, sandbox_id: str, _: Any) -> Outcome:
        if not self.state.kill(sandbox_id):
            return not_found(sandbox_id), 404, None
        return Response(status_code=204), 204, None

    def set_timeout(self, sandbox_id: str, body: dict[str, Any]) -> Outcome:
        # SandboxTimeoutRequest: timeout required; the end moves to now + timeout.
        seconds = seconds_field(body, "timeout", default=None)
        if not self.state.set_end(sandbox_id, min(seconds, self.state.config.max_timeout_s), False):
            return not_found(sandbox_id), 404, None
        return Response(status_code=204), 204, None

    def refresh(self, sandbox_id: str, body: dict[str, Any]) -> Outcome:
        # SandboxRefreshRequest: duration 0..3600, never shorter than the 15 s default.
        floor = self.state.config.default_timeout_s
        seconds = max(seconds_field(body, "duration", default=floor, maximum=MAX_REFRESH_S), floor)
        if not self.state.set_end(sandbox_id, seconds, True):
            return not_found(sandbox_id), 404, None
        return Response(status_code=204), 204, None

    def pause(self, sandbox_id: str, body: dict[str, Any]) -> Outcome:
        # SandboxPauseRequest: memory (bool) optional; infra handlers/sandbox_pause.go.
        _check_bool_flags(body, "memory")
        outcome = self.state.pause(sandbox_id)
        if outcome == "already_paused":
            message = f"Error pausing sandbox - sandbox '{sandbox_id}' is already paused"
            return error_response(409, message), 409, None
        if outcome == "not_found":
            return not_found(sandbox_id), 404, None
        return Response(status_code=204), 204, None

    def _sandbox_answer(self, record: SandboxRecord, status: int) -> Outcome:
        config = self.state.config
        body = created_body(record, config.envd_version, config.domain)
        return JSONResponse(body, status), status, body

    def _bring_back(self, sandbox_id: str, timeout_s: int, extend_running: bool) -> Outcome:
        max_timeout_s = self.state.config.max_timeout_s
        if timeout_s > max_timeout_s:
            raise BadRequest(f"Timeout cannot be greater than {max_timeout_s // 3600} hours")
        outcome, value = self.state.resume(sandbox_id, timeout_s, extend_running)
        if outcome == "not_found":
            return not_found(sandbox_id), 404, None
        if outcome == "capacity":
            return self._capacity_refusal(value)
        if outcome == "running" and not extend_running:
            message = f"Sandbox {sandbox_id} is already running"
            return error_response(409, message), 409, None
        return self._sandbox_answer(value, 200 if outcome == "running" else 201)

    def connect(self, sandbox_id: str, body: dict[str, Any], version: int) -> Outcome:
        # ConnectSandbox (v1): timeout required. The SDK's v2 body (ConnectSandboxV2)
        # makes it optional with 300. Running: 200, TTL only extended; paused: resumed,
        # 201 (infra handlers/sandbox_connect.go).
        seconds = seconds_field(body, "timeout", default=None if version == 1 else 300)
        _check_bool_flags(body, "memory")
        return self._bring_back(sandbox_id, seconds, extend_running=True)

    def resume(self, sandbox_id: str, body: dict[str, Any]) -> Outcome:
        # ResumedSandbox: timeout default 15, autoPause (bool, deprecated), memory (bool);
        # 409 if running.
        config = self.state.config
        seconds = lifetime_field(body, config.default_timeout_s, config.max_timeout_s)
        _check_bool_flags(body, "autoPause", "memory")
        return self._bring_back(sandbox_id, seconds, extend_running=False)

    # -- control -------------------------------------------------------------------------

    async def config_changed(self) -> None:
        await self.runtime.config_changed()

    async def get_running(self, _: Request) -> Response:
        return JSONResponse(self.state.running())

    async def post_orphans(self, request: Request) -> Response:
        try:
            body = await request.json()
            held = body["held"]
            if not isinstance(held, list):
                raise TypeError("held must be a list of sandbox ids")
        except (ValueError, TypeError, KeyError) as exc:
            return error_response(400, f'expected {{"held": [ids]}}: {exc}')
        return JSONResponse({"orphans": self.state.orphans({str(x) for x in held})})
