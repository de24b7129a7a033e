"""Temper's external-dispatch endpoint over HTTP, for a session run in real time.

`POST /tdata/{EntitySet}('{id}')/Temper.{Action}` with `X-Tenant-Id`, `Authorization:
Bearer <token>`, an optional `Idempotency-Key` and the action's params as the JSON body, as
Temper serves it (`build_router` in `crates/temper-server/src/router.rs`, `handle_odata_post`
in `odata/write.rs`: only the action name's last dotted segment counts). The rules are the
executor's (`Executor.dispatch_external`); this module only carries a request onto the
run's loop thread, which owns every entity, and the answer back. A request the loop does
not take within `answer_timeout_s` (the run has ended, or is stuck) gets 503 with
`Retry-After`, as Temper answers a transient refusal (`odata/bindings/execute.rs`).
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Future
from contextlib import asynccontextmanager
from typing import Any, Protocol, TypeVar

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from harness.mocks.shared.server import LoopbackServer
from harness.simulator.executor import Executor, ExternalAnswer

# EntitySet('id')/Namespace.Action, the key quoted as OData quotes it ('' inside).
_BOUND_ACTION = re.compile(
    r"^(?P<set>[A-Za-z_][\w]*)\('(?P<key>(?:[^']|'')*)'\)/(?P<action>[\w.]+)$"
)


T = TypeVar("T")


class LoopThread(Protocol):
    """Runs a call on the thread that owns the executor's entities (a cancelled future's
    call does not run)."""

    def submit(self, call: Callable[[], T]) -> Future[T]: ...


def _odata_error(answer: ExternalAnswer, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(
        {"error": {"code": answer.code, "message": answer.message}},
        status_code=answer.status,
        headers=headers,
    )


class _Runtime:
    async def close(self) -> None:
        return None


def temper_api_app(
    executor: Executor,
    loop: LoopThread,
    *,
    answer_timeout_s: float = 10.0,
    on_answer: Callable[[ExternalAnswer], None] | None = None,
) -> Starlette:
    """The endpoint over `executor`, each request run on `loop`'s thread."""

    async def bound_action(request: Request) -> JSONResponse:
        match = _BOUND_ACTION.match(request.path_params["path"])
        if match is None:
            return _odata_error(
                ExternalAnswer(400, "InvalidPath", "Action must be bound to an entity")
            )
        body = await request.body()
        try:
            params: Any = json.loads(body) if body.strip() else {}
        except ValueError as error:
            return _odata_error(ExternalAnswer(400, "InvalidBody", f"Invalid JSON body: {error}"))
        if not isinstance(params, dict):
            params = {}
        authorization = request.headers.get("authorization", "")
        token = authorization[len("Bearer ") :] if authorization.startswith("Bearer ") else None
        tenant = request.headers.get("x-tenant-id", "")
        action = match["action"].rsplit(".", 1)[-1]
        key = match["key"].replace("''", "'")
        idempotency = request.headers.get("idempotency-key") or None

        def call() -> tuple[ExternalAnswer, str]:
            answer = executor.dispatch_external(
                tenant, match["set"], key, action, params, token, idempotency_key=idempotency
            )
            entity = executor.entities.get(key)
            return answer, entity.status if entity is not None else ""

        try:
            # A request that times out is cancelled: its action never runs after the 503.
            answer, status = await asyncio.wait_for(
                asyncio.wrap_future(loop.submit(call)), answer_timeout_s
            )
        except TimeoutError:
            answer = ExternalAnswer(503, "DispatchTransient", "the run is not taking actions")
            if on_answer is not None:
                on_answer(answer)
            return _odata_error(answer, {"Retry-After": "1"})
        if on_answer is not None:
            on_answer(answer)
        if not answer.ok:
            return _odata_error(answer)
        return JSONResponse(
            {"@odata.context": f"$metadata#{match['set']}/$entity", "Id": key, "Status": status},
            status_code=answer.status,
        )

    runtime = _Runtime()

    @asynccontextmanager
    async def lifespan(_: Starlette) -> AsyncIterator[None]:
        yield
        await runtime.close()

    return Starlette(
        routes=[Route("/tdata/{path:path}", bound_action, methods=["POST"])], lifespan=lifespan
    )


class TemperApiServer(LoopbackServer):
    """The endpoint on 127.0.0.1 (a free port unless given), from a daemon thread."""

    def __init__(
        self,
        executor: Executor,
        loop: LoopThread,
        *,
        port: int = 0,
        answer_timeout_s: float = 10.0,
    ) -> None:
        self.answers: dict[int, int] = {}
        app = temper_api_app(
            executor, loop, answer_timeout_s=answer_timeout_s, on_answer=self._count
        )
        runtime = _Runtime()
        super().__init__(app, lambda: runtime, name="Temper API", port=port)

    def _count(self, answer: ExternalAnswer) -> None:
        # Called on the server's one event-loop thread.
        self.answers[answer.status] = self.answers.get(answer.status, 0) + 1
