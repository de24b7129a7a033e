"""The mock's HTTP routes (Starlette): E2B's sandbox API plus a control API under /_mock/."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from host.mock_e2b.config import FaultRule, MockE2BConfig
from host.mock_e2b.connection import KeepRawSend, reset_connection
from host.mock_e2b.state import MockState, SandboxRecord
from host.mock_e2b.wire import (
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
from host.mock_server.control import control_routes

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
    """What lives on the server's event loop: the create slots, idempotency-key locks and
    the event that ends hanging requests when the server stops."""

    def __init__(self, state: MockState) -> None:
        self.state = state
        self.closing = asyncio.Event()
        self._slots = asyncio.Condition()
        self._admitted = 0
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
        """Wakes waiting creates: the concurrent-create cap may have grown."""
        async with self._slots:
            self._slots.notify_all()

    async def close(self) -> None:
        """Ends hangs, slow bodies and waits for a create slot: the server is stopping."""
        self.closing.set()
        await self.config_changed()

    @contextlib.asynccontextmanager
    async def create_slot(self, config: MockE2BConfig) -> AsyncIterator[str | None]:
        """Admits a create past the concurrent-create cap. Yields None when admitted, or
        why not: "reject" (429 at once) or "timeout" (waited too long, 504)."""
        cap = config.max_concurrent_creates
        if cap is None:
            yield None
            return
        refusal: str | None = None
        async with self._slots:
            if self._admitted >= cap:
                if config.create_overload_mode == "reject":
                    refusal = "reject"
                else:
                    limit = config.create_overload_timeout_ms
                    try:
                        await asyncio.wait_for(
                            self._slots.wait_for(self._has_slot),
                            None if limit is None else limit / 1000.0,
                        )
                    except TimeoutError:
                        refusal = "timeout"
            if refusal is None:
                self._admitted += 1
        if refusal == "reject":
            self.state.count_concurrency_limited()
        elif refusal == "timeout":
            self.state.count_overload_timeout()
        if refusal is not None:
            yield refusal
            return
        try:
            yield None
        finally:
            async with self._slots:
                self._admitted -= 1
                self._slots.notify_all()

    def _has_slot(self) -> bool:
        cap = self.state.config.max_concurrent_creates
        return cap is None or self._admitted < cap or self.closing.is_set()


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
    holder: dict[str, Runtime] = {}

    def runtime() -> Runtime:
        return holder["runtime"]

    @contextlib.asynccontextmanager
    async def lifespan(_: Starlette) -> AsyncIterator[None]:
        holder["runtime"] = Runtime(state)
        try:
            yield
        finally:
            await holder["runtime"].close()

    def authenticated(handler: Handler) -> Handler:
        async def guarded(request: Request) -> Response:
            if request.headers.get("x-api-key") != state.config.api_key:
                state.count_unauthorized()
                return error_response(401, "Invalid API key")
            return await handler(request)

        return guarded

    async def fault_response(
        rule: FaultRule, request: Request, status: int, body: dict[str, Any] | None
    ) -> Response:
        rt = runtime()
        config = state.config
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

    async def with_faults(
        request: Request,
        route: str,
        act: Callable[[], Awaitable[Outcome]],
    ) -> Response:
        """Runs ``act`` between the faults that fire before and after it on ``route``."""
        ordinal = state.count_request(route)
        before = state.pick_fault(route, ordinal, after_create=False)
        if before is not None:
            # A garbled or slow success answer for an action that never happened.
            return await fault_response(before, request, 201 if route == "create" else 200, None)
        response, status, body = await act()
        if 200 <= status < 300:
            after = state.pick_fault(route, ordinal, after_create=True)
            if after is not None:
                return await fault_response(after, request, status, body)
        return response

    # -- sandboxes -----------------------------------------------------------------------

    async def body_unless_abandoned(request: Request) -> bytes | None:
        """The request's body, or None when the caller was killed mid-request: nobody to
        answer and nothing to do (unhandled, Starlette's ClientDisconnect became a
        text/plain 500 under a soak's kills)."""
        try:
            return await request.body()
        except ClientDisconnect:
            state.count_abandoned_request()
            return None

    def create_handler(version: int) -> Handler:
        async def create(request: Request) -> Response:
            config = state.config
            key = request.headers.get("idempotency-key") if version == 2 else None
            raw = await body_unless_abandoned(request)
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
                return await with_faults(request, "create", lambda: admit(parsed))
            finally:
                state.end_create()

        return create

    async def admit(parsed: CreateRequest) -> Outcome:
        key = parsed.idempotency_key
        if key is None:
            return await create_sandbox(parsed)
        async with runtime().key_lock(key):
            record = state.replay(key)
            if record is not None:
                body = created_body(record, state.config.envd_version, state.config.domain)
                return JSONResponse(body, 201), 201, body
            return await create_sandbox(parsed)

    async def create_sandbox(
        parsed: CreateRequest,
    ) -> Outcome:
        rt = runtime()
        decision = state.take_rate()
        rate_headers = {} if decision is None else decision.headers()
        if decision is not None and not decision.allowed:
            return error_response(429, _RATE_MESSAGE, rate_headers), 429, None
        config = state.config
        async with rt.create_slot(config) as refused:
            if refused == "reject":
                return error_response(429, _CONCURRENCY_MESSAGE, {"Retry-After": "1"}), 429, None
            if refused == "timeout":
                return error_response(504, "sandbox creation timed out"), 504, None
            cap = state.reserve_capacity()
            if cap is not None:
                headers = {}
                if config.capacity_should_retry is not None:
                    headers["Should-Retry"] = config.capacity_should_retry
                return error_response(429, capacity_message(cap), headers), 429, None
            try:
                await rt.wait_or_close(state.sample_latency_ms() / 1000.0)
            except BaseException:
                state.release_reservation()
                raise
            record = state.commit_create(parsed)
        body = created_body(record, config.envd_version, config.domain)
        return JSONResponse(body, 201, headers=rate_headers), 201, body

    def listed(record: SandboxRecord) -> dict[str, Any]:
        return listed_body(
            record,
            state.wall_time(record.started_at),
            state.wall_time(record.end_at),
            state.config.envd_version,
        )

    def bad_request(exc: BadRequest) -> Outcome:
        state.count_bad_request()
        return error_response(400, str(exc)), 400, None

    def list_page(query: ListQuery) -> tuple[list[SandboxRecord], dict[str, str]]:
        """One page, newest first unless ``order=asc``, after the cursor: keyset pagination
        on (startedAt, sandboxID) as E2B's (infra: packages/api/internal/handlers/
        sandboxes_list.go, utils/sandboxes_list.go), so sandboxes that come or go between
        pages neither shift nor repeat the rest."""

        def keep(r: SandboxRecord) -> bool:
            return (
                all(r.metadata.get(k) == v for k, v in query.metadata.items())
                and (query.template is None or query.template in (r.template_id, r.alias))
                and (
                    query.started_after is None
                    or state.wall_time(r.started_at) >= query.started_after
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
        records.sort(key=lambda r: r.started_at, reverse=desc)
        if query.cursor is not None:
            at, after_id = query.cursor

            def past_cursor(r: SandboxRecord) -> bool:
                started = state.wall_time(r.started_at)
                if desc:
                    return started < at or (started == at and r.sandbox_id > after_id)
                return started > at or (started == at and r.sandbox_id < after_id)

            records = [r for r in records if past_cursor(r)]
        if len(records) > query.limit:
            records = records[: query.limit]
            last = records[-1]
            headers["X-Next-Token"] = encode_cursor(
                state.wall_time(last.started_at), last.sandbox_id, query.order
            )
        return records, headers

    def list_handler(version: int) -> Handler:
        async def list_sandboxes(request: Request) -> Response:
            async def act() -> Outcome:
                try:
                    query = parse_list_query(request.query_params, version)
                except BadRequest as exc:
                    return bad_request(exc)
                records, headers = list_page(query)
                if version == 1:
                    headers = {}
                items = [listed(r) for r in records]
                return JSONResponse(items, 200, headers=headers), 200, None

            return await with_faults(request, "list", act)

        return list_sandboxes

    def sandbox_route(
        route: str, handle: Callable[[str, Any], Outcome], body: str = "none"
    ) -> Handler:
        """A route on one sandbox: the path's id read as E2B reads it, the JSON body
        (``body``: "none", "optional" or "required") checked to be an object."""

        async def on_sandbox(request: Request) -> Response:
            raw = await body_unless_abandoned(request)
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
                    fields = (
                        {} if body == "none" else json_object(payload, required=body == "required")
                    )
                    return handle(sandbox_id, fields)
                except BadRequest as exc:
                    return bad_request(exc)

            return await with_faults(request, route, act)

        return on_sandbox

    def get_sandbox(sandbox_id: str, _: Any) -> Outcome:
        record = state.get(sandbox_id)
        if record is None:
            return not_found(sandbox_id), 404, None
        body = detail_body(
            record,
            state.wall_time(record.started_at),
            state.wall_time(record.end_at),
            state.config.envd_version,
            state.config.domain,
        )
        return JSONResponse(body, 200), 200, body

    def kill_sandbox(sandbox_id: str, _: Any) -> Outcome:
        if not state.kill(sandbox_id):
            return not_found(sandbox_id), 404, None
        return Response(status_code=204), 204, None

    def set_timeout(sandbox_id: str, body: dict[str, Any]) -> Outcome:
        # SandboxTimeoutRequest: timeout required; the end moves to now + timeout.
        seconds = seconds_field(body, "timeout", default=None)
        if not state.set_end(sandbox_id, min(seconds, state.config.max_timeout_s), False):
            return not_found(sandbox_id), 404, None
        return Response(status_code=204), 204, None

    def refresh(sandbox_id: str, body: dict[str, Any]) -> Outcome:
        # SandboxRefreshRequest: duration 0..3600, never shorter than the 15 s default.
        floor = state.config.default_timeout_s
        seconds = max(seconds_field(body, "duration", default=floor, maximum=MAX_REFRESH_S), floor)
        if not state.set_end(sandbox_id, seconds, True):
            return not_found(sandbox_id), 404, None
        return Response(status_code=204), 204, None

    def pause(sandbox_id: str, body: dict[str, Any]) -> Outcome:
        # SandboxPauseRequest: memory (bool) optional; infra handlers/sandbox_pause.go.
        if "memory" in body and not isinstance(body["memory"], bool):
            raise BadRequest("memory must be a boolean")
        outcome = state.pause(sandbox_id)
        if outcome == "already_paused":
            message = f"Error pausing sandbox - sandbox '{sandbox_id}' is already paused"
            return error_response(409, message), 409, None
        if outcome == "not_found":
            return not_found(sandbox_id), 404, None
        return Response(status_code=204), 204, None

    def sandbox_answer(record: SandboxRecord, status: int) -> Outcome:
        body = created_body(record, state.config.envd_version, state.config.domain)
        return JSONResponse(body, status), status, body

    def bring_back(sandbox_id: str, timeout_s: int, extend_running: bool) -> Outcome:
        if timeout_s > state.config.max_timeout_s:
            raise BadRequest(
                f"Timeout cannot be greater than {state.config.max_timeout_s // 3600} hours"
            )
        outcome, value = state.resume(sandbox_id, timeout_s, extend_running)
        if outcome == "not_found":
            return not_found(sandbox_id), 404, None
        if outcome == "capacity":
            headers = {}
            if state.config.capacity_should_retry is not None:
                headers["Should-Retry"] = state.config.capacity_should_retry
            return error_response(429, capacity_message(value), headers), 429, None
        if outcome == "running" and not extend_running:
            message = f"Sandbox {sandbox_id} is already running"
            return error_response(409, message), 409, None
        return sandbox_answer(value, 200 if outcome == "running" else 201)

    def connect_handler(version: int) -> Callable[[str, Any], Outcome]:
        def connect(sandbox_id: str, body: dict[str, Any]) -> Outcome:
            # ConnectSandbox (v1): timeout required. The SDK's v2 body (ConnectSandboxV2)
            # makes it optional with 300. Running: 200, TTL only extended; paused: resumed,
            # 201 (infra handlers/sandbox_connect.go).
            seconds = seconds_field(body, "timeout", default=None if version == 1 else 300)
            if "memory" in body and not isinstance(body["memory"], bool):
                raise BadRequest("memory must be a boolean")
            return bring_back(sandbox_id, seconds, extend_running=True)

        return connect

    def resume(sandbox_id: str, body: dict[str, Any]) -> Outcome:
        # ResumedSandbox: timeout default 15, autoPause (bool, deprecated), memory (bool);
        # 409 if running.
        config = state.config
        seconds = lifetime_field(body, config.default_timeout_s, config.max_timeout_s)
        for flag in ("autoPause", "memory"):
            if flag in body and not isinstance(body[flag], bool):
                raise BadRequest(f"{flag} must be a boolean")
        return bring_back(sandbox_id, seconds, extend_running=False)

    def not_found(sandbox_id: str) -> Response:
        return error_response(
            404, f"sandbox \"{sandbox_id}\" doesn't exist or you don't have access to it"
        )

    async def temperfs(request: Request) -> Response:
        """The TemperFS routes under /tdata, when the config turns them on."""
        if not state.config.temperfs:
            return error_response(404, f"Not found: {request.method} {request.url.path}")
        body = await request.body()
        headers = {k.lower(): v for k, v in request.headers.items()}

        async def act() -> Outcome:
            answer = state.temperfs.handle(
                request.method, request.path_params["path"], headers, body
            )
            if isinstance(answer.body, bytes):
                response: Response = Response(
                    answer.body, answer.status, media_type=answer.content_type
                )
            elif answer.body is None:
                response = Response(status_code=answer.status, headers=answer.headers)
            else:
                response = JSONResponse(answer.body, answer.status, headers=answer.headers)
            json_body = answer.body if isinstance(answer.body, dict) else None
            return response, answer.status, json_body

        try:
            return await with_faults(request, "tdata", act)
        finally:
            state.notify_changed()

    async def unserved(request: Request, exc: Exception) -> Response:
        """Every route the mock does not serve answers E2B's Error body, not text/plain."""
        status = exc.status_code if isinstance(exc, HTTPException) else 500
        message = {404: "Not found", 405: "Method not allowed"}.get(status, "Error")
        return error_response(status, f"{message}: {request.method} {request.url.path}")

    # -- control -------------------------------------------------------------------------

    async def config_changed() -> None:
        await runtime().config_changed()

    async def get_temperfs(_: Request) -> Response:
        return JSONResponse(state.temperfs.to_json())

    async def get_running(_: Request) -> Response:
        return JSONResponse(state.running())

    async def post_orphans(request: Request) -> Response:
        try:
            body = await request.json()
            held = body["held"]
            if not isinstance(held, list):
                raise TypeError("held must be a list of sandbox ids")
        except (ValueError, TypeError, KeyError) as exc:
            return error_response(400, f'expected {{"held": [ids]}}: {exc}')
        return JSONResponse({"orphans": state.orphans({str(x) for x in held})})

    def sandbox(
        path: str,
        route: str,
        handle: Callable[[str, Any], Outcome],
        method: str,
        body: str = "none",
    ) -> Route:
        return Route(path, authenticated(sandbox_route(route, handle, body)), methods=[method])

    one = "/sandboxes/{sandbox_id}"
    routes = [
        Route("/sandboxes", authenticated(create_handler(1)), methods=["POST"]),
        Route("/v2/sandboxes", authenticated(create_handler(2)), methods=["POST"]),
        Route("/sandboxes", authenticated(list_handler(1)), methods=["GET"]),
        Route("/v2/sandboxes", authenticated(list_handler(2)), methods=["GET"]),
        sandbox(one, "get", get_sandbox, "GET"),
        sandbox(one, "kill", kill_sandbox, "DELETE"),
        sandbox(one + "/timeout", "timeout", set_timeout, "POST", "required"),
        sandbox(one + "/refreshes", "refresh", refresh, "POST", "optional"),
        sandbox(one + "/pause", "pause", pause, "POST", "optional"),
        sandbox(one + "/resume", "resume", resume, "POST", "optional"),
        sandbox(one + "/connect", "connect", connect_handler(1), "POST", "required"),
        sandbox("/v2" + one + "/connect", "connect", connect_handler(2), "POST", "optional"),
        *control_routes(
            state, on_configure, lambda message: error_response(400, message), config_changed
        ),
        Route("/_mock/sandboxes", get_running, methods=["GET"]),
        Route("/_mock/orphans", post_orphans, methods=["POST"]),
        Route("/_mock/temperfs", get_temperfs, methods=["GET"]),
        Route("/tdata/{path:path}", temperfs, methods=["GET", "POST", "PUT"]),
    ]
    app = Starlette(routes=routes, lifespan=lifespan, exception_handlers={HTTPException: unserved})
    return KeepRawSend(app), lambda: holder.get("runtime")
