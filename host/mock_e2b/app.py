"""The mock's HTTP routes (Starlette): E2B's sandbox API plus a control API under /_mock/."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import ASGIApp

from host.mock_e2b.config import FaultRule, MockE2BConfig
from host.mock_e2b.connection import KeepRawSend, reset_connection
from host.mock_e2b.state import MockState, SandboxRecord
from host.mock_e2b.wire import (
    BadRequest,
    CreateRequest,
    created_body,
    detail_body,
    error_response,
    listed_body,
    parse_create,
    parse_metadata_filter,
    timeout_field,
)

Handler = Callable[[Request], Awaitable[Response]]
# What a route did: the answer, its status and its JSON body (what a body fault garbles).
Outcome = tuple[Response, int, dict[str, Any] | None]
MAX_PAGE = 100
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
        if rule.kind == "status":
            headers = {}
            if rule.should_retry is not None:
                headers["Should-Retry"] = "true" if rule.should_retry else "false"
            return error_response(rule.status, "injected fault: upstream error", headers)
        if rule.kind == "reset" and await reset_connection(request.scope):
            return Response(status_code=500)
        # A server that hides its transport cannot reset: the client then times out instead.
        if rule.kind in ("hang", "reset"):
            await rt.wait_or_close(config.hang_s)
            return error_response(504, "injected fault: request hung")
        payload = json.dumps(body if body is not None else {"ok": True}).encode()
        status = 200 if status == 204 else status  # a 204 cannot carry the garbled body
        if rule.kind == "malformed_json":
            return Response(payload[: max(1, len(payload) // 2)], status,
                            media_type="application/json")
        chunks = [payload[i : i + 16] for i in range(0, len(payload), 16)]
        pause = config.slow_body_ms / 1000.0 / max(1, len(chunks))

        async def trickle() -> AsyncIterator[bytes]:
            for chunk in chunks:
                yield chunk
                await rt.wait_or_close(pause)

        return StreamingResponse(trickle(), status, media_type="application/json")

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

    def create_handler(version: int) -> Handler:
        async def create(request: Request) -> Response:
            config = state.config
            key = request.headers.get("idempotency-key") if version == 2 else None
            try:
                body = await request.json()
            except (ValueError, UnicodeDecodeError):
                body = None
            state.begin_create()
            try:
                try:
                    parsed = parse_create(body, key, config.default_timeout_s,
                                          config.max_timeout_s)
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
            record = state.commit_create(
                template_id=parsed.template_id,
                timeout_s=parsed.timeout_s,
                metadata=parsed.metadata,
                env_vars=parsed.env_vars,
                allow_internet_access=parsed.allow_internet_access,
                auto_pause=parsed.auto_pause,
                idempotency_key=parsed.idempotency_key,
            )
        body = created_body(record, config.envd_version, config.domain)
        return JSONResponse(body, 201, headers=rate_headers), 201, body

    def listed(record: SandboxRecord) -> dict[str, Any]:
        return listed_body(
            record,
            state.wall_time(record.started_at),
            state.wall_time(record.end_at),
            state.config.envd_version,
        )

    def list_handler(version: int) -> Handler:
        async def list_sandboxes(request: Request) -> Response:
            async def act() -> Outcome:
                params = request.query_params
                try:
                    wanted = parse_metadata_filter(params.get("metadata"))
                    states = set(filter(None, params.get("state", "running,paused").split(",")))
                    limit = int(params.get("limit", str(MAX_PAGE))) if version == 2 else None
                    offset = int(params.get("nextToken") or 0) if version == 2 else 0
                except (BadRequest, ValueError) as exc:
                    state.count_bad_request()
                    return error_response(400, str(exc)), 400, None
                records = [
                    r
                    for r in state.all_running()
                    if "running" in states
                    and all(r.metadata.get(k) == v for k, v in wanted.items())
                    and (not params.get("template") or params["template"] in
                         (r.template_id, r.alias))
                ]
                if params.get("order") == "desc":
                    records.reverse()
                headers = {}
                if limit is not None:
                    limit = max(1, min(limit, MAX_PAGE))
                    page = records[offset : offset + limit]
                    if offset + limit < len(records):
                        headers["x-next-token"] = str(offset + limit)
                    records = page
                items = [listed(r) for r in records]
                return JSONResponse(items, 200, headers=headers), 200, None

            return await with_faults(request, "list", act)

        return list_sandboxes

    async def get_sandbox(request: Request) -> Response:
        sandbox_id = request.path_params["sandbox_id"]

        async def act() -> Outcome:
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

        return await with_faults(request, "get", act)

    async def kill_sandbox(request: Request) -> Response:
        sandbox_id = request.path_params["sandbox_id"]

        async def act() -> Outcome:
            if not state.kill(sandbox_id):
                return not_found(sandbox_id), 404, None
            return Response(status_code=204), 204, None

        return await with_faults(request, "kill", act)

    def end_handler(route: str, field: str, extend_only: bool) -> Handler:
        async def set_end(request: Request) -> Response:
            sandbox_id = request.path_params["sandbox_id"]
            try:
                body = await request.json()
            except (ValueError, UnicodeDecodeError):
                body = {}

            async def act() -> Outcome:
                config = state.config
                default = config.default_timeout_s if extend_only else None
                try:
                    seconds = timeout_field(body, field, default, config.max_timeout_s)
                except BadRequest as exc:
                    state.count_bad_request()
                    return error_response(400, str(exc)), 400, None
                if not state.set_end(sandbox_id, seconds, extend_only):
                    return not_found(sandbox_id), 404, None
                return Response(status_code=204), 204, None

            return await with_faults(request, route, act)

        return set_end

    def not_found(sandbox_id: str) -> Response:
        return error_response(404, f"sandbox \"{sandbox_id}\" doesn't exist or you don't have "
                                   "access to it")

    # -- control -------------------------------------------------------------------------

    async def get_config(_: Request) -> Response:
        return JSONResponse(state.config.to_json())

    async def post_config(request: Request) -> Response:
        try:
            changes = await request.json()
            if not isinstance(changes, dict):
                raise TypeError("expected a JSON object of config fields")
            config = on_configure(changes)
        except (ValueError, TypeError) as exc:
            return error_response(400, str(exc))
        await runtime().config_changed()
        return JSONResponse(config.to_json())

    async def get_stats(_: Request) -> Response:
        return JSONResponse(state.stats().to_json())

    async def post_reset(_: Request) -> Response:
        state.reset()
        return Response(status_code=204)

    async def get_running(_: Request) -> Response:
        return JSONResponse(state.running())

    async def post_orphans(request: Request) -> Response:
        try:
            body = await request.json()
            held = body["held"]
            if not isinstance(held, list):
                raise TypeError("held must be a list of sandbox ids")
        except (ValueError, TypeError, KeyError) as exc:
            return error_response(400, f"expected {{\"held\": [ids]}}: {exc}")
        return JSONResponse({"orphans": state.orphans({str(x) for x in held})})

    routes = [
        Route("/sandboxes", authenticated(create_handler(1)), methods=["POST"]),
        Route("/v2/sandboxes", authenticated(create_handler(2)), methods=["POST"]),
        Route("/sandboxes", authenticated(list_handler(1)), methods=["GET"]),
        Route("/v2/sandboxes", authenticated(list_handler(2)), methods=["GET"]),
        Route("/sandboxes/{sandbox_id}", authenticated(get_sandbox), methods=["GET"]),
        Route("/sandboxes/{sandbox_id}", authenticated(kill_sandbox), methods=["DELETE"]),
        Route("/sandboxes/{sandbox_id}/timeout",
              authenticated(end_handler("timeout", "timeout", extend_only=False)),
              methods=["POST"]),
        Route("/sandboxes/{sandbox_id}/refreshes",
              authenticated(end_handler("refresh", "duration", extend_only=True)),
              methods=["POST"]),
        Route("/_mock/config", get_config, methods=["GET"]),
        Route("/_mock/config", post_config, methods=["POST"]),
        Route("/_mock/stats", get_stats, methods=["GET"]),
        Route("/_mock/reset", post_reset, methods=["POST"]),
        Route("/_mock/sandboxes", get_running, methods=["GET"]),
        Route("/_mock/orphans", post_orphans, methods=["POST"]),
    ]
    app = Starlette(routes=routes, lifespan=lifespan)
    return KeepRawSend(app), lambda: holder.get("runtime")
