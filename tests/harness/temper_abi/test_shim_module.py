"""dist/temper_shim.wasm: its size, exports and imports, and what it does with each
answer from the service (through a fake HTTP seam of the Temper-ABI host)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
import wasmtime

from harness.temper_abi import TEMPER_ENV_FUNCTIONS, HttpCallFailed, TemperAbiModule
from tests.conftest import ROOT

SHIM = ROOT / "dist" / "temper_shim.wasm"


@pytest.fixture(scope="module")
def shim_bytes(component_path: object) -> bytes:  # component_path runs build.sh
    return SHIM.read_bytes()


class FakeService:
    def __init__(self, status: int = 200, body: str = "", fail: bool = False) -> None:
        self.status, self.body, self.fail = status, body, fail
        self.calls: list[tuple[str, str, list[tuple[str, str]], str]] = []

    def __call__(
        self, method: str, url: str, headers: list[tuple[str, str]], body: str, **_: Any
    ) -> tuple[int, str]:
        self.calls.append((method, url, headers, body))
        if self.fail:
            raise HttpCallFailed("connection refused")
        return self.status, self.body


@pytest.fixture
def run(shim_bytes: bytes) -> Iterator[Any]:
    modules: list[TemperAbiModule] = []

    def invoke(service: FakeService, ctx: dict[str, Any] | str) -> Any:
        module = TemperAbiModule(shim_bytes, http=service)
        modules.append(module)
        return module.invoke(ctx)

    yield invoke
    for module in modules:
        module.close()


def context(**config: str) -> dict[str, Any]:
    return {
        "tenant": "acme",
        "entity_type": "CurationJob",
        "entity_id": "job-1",
        "trigger_action": "Provision",
        "trigger_params": {},
        "entity_state": {},
        "integration_config": {
            "provisioner_url": "http://127.0.0.1:1/v1/invocations",
            "provisioner_token": "tok-1",
            **config,
        },
    }


READY = json.dumps({"action": "SandboxReady", "params": {"sandbox_id": "sb"}, "success": True})


def test_the_shim_is_a_small_core_module_exporting_memory_and_run(shim_bytes: bytes) -> None:
    assert len(shim_bytes) < 64 * 1024
    module = wasmtime.Module(wasmtime.Engine(), shim_bytes)
    exports = {e.name: e.type for e in module.exports}
    assert isinstance(exports["memory"], wasmtime.MemoryType)
    run = exports["run"]
    assert isinstance(run, wasmtime.FuncType)
    assert [str(t) for t in run.params] == ["i32", "i32"] and [str(t) for t in run.results] == [
        "i32"
    ]


def test_the_shim_imports_only_temper_env_functions_with_their_signatures(
    shim_bytes: bytes,
) -> None:
    module = wasmtime.Module(wasmtime.Engine(), shim_bytes)
    assert module.imports, "the shim must import its host functions"
    for imp in module.imports:
        assert imp.module == "env", imp.module
        assert imp.name in TEMPER_ENV_FUNCTIONS, imp.name
        spec = TEMPER_ENV_FUNCTIONS[imp.name]
        ty = imp.type
        assert isinstance(ty, wasmtime.FuncType)
        assert [str(t) for t in ty.params] == ["i32"] * spec.params, imp.name
        assert [str(t) for t in ty.results] == (["i32"] if spec.returns_i32 else []), imp.name
    readme = (ROOT / "shim" / "README.md").read_text()
    for imp in module.imports:
        assert f"`{imp.name}`" in readme, f"{imp.name} is not listed in shim/README.md"


def test_a_2xx_answer_is_handed_back_verbatim_with_the_context_and_token_sent(run: Any) -> None:
    service = FakeService(200, READY)
    ctx = context()
    outcome = run(service, ctx)
    assert outcome.result_json == READY
    assert outcome.result.callback_action == "SandboxReady"
    [(method, url, headers, body)] = service.calls
    assert (method, url) == ("POST", "http://127.0.0.1:1/v1/invocations")
    assert ("authorization", "Bearer tok-1") in headers
    assert ("content-type", "application/json") in headers
    assert json.loads(body) == json.loads(json.dumps(ctx))


@pytest.mark.parametrize(
    ("service", "category", "code", "retryability", "outcome"),
    [
        (FakeService(fail=True), "transient", "ProvisionerUnreachable", "reconcile", "unknown"),
        (FakeService(503, "busy"), "transient", "ProvisionerBusy", "with_backoff", "not_applied"),
        (FakeService(429, ""), "transient", "ProvisionerBusy", "with_backoff", "not_applied"),
        (FakeService(502, "x"), "transient", "ProvisionerError", "reconcile", "unknown"),
        (
            FakeService(401, "{}"),
            "authorization",
            "ProvisionerUnauthorized",
            "after_authorization",
            "not_applied",
        ),
        (FakeService(400, "{}"), "permanent", "ProvisionerRejected", "never", "not_applied"),
    ],
)
def test_every_other_answer_is_a_typed_failure_temper_accepts(
    run: Any, service: FakeService, category: str, code: str, retryability: str, outcome: str
) -> None:
    result = run(service, context())
    assert result.error is None, result.error  # decode_terminal_result accepted it
    failure = result.result.typed_failure
    assert (failure["category"], failure["code"]) == (category, code)
    assert (failure["retryability"], failure["outcome"]) == (retryability, outcome)
    assert result.logs == [("warn", code)]


def test_an_answer_larger_than_the_buffer_is_not_passed_on(run: Any) -> None:
    result = run(FakeService(200, "x" * (1024 * 1024 + 100)), context())
    assert result.result.typed_failure["code"] == "ProvisionerAnswerTooLarge"


def detail(result: Any, name: str) -> Any:
    return result.result.typed_failure["details"][name]["value"]


@pytest.mark.parametrize(
    ("config", "code", "key", "reason"),
    [
        ({"provisioner_url": ""}, "ProvisionerUrlMissing", "provisioner_url", "absent"),
        ({"provisioner_token": ""}, "ProvisionerTokenMissing", "provisioner_token", "absent"),
        # escaped in the JSON: refused, never sent half
        ({"provisioner_token": 'a"b'}, "ProvisionerTokenMissing", "provisioner_token", "absent"),
        # a {secret:...} template Temper left verbatim: the tenant has no such secret
        (
            {"provisioner_url": "{secret:sandbox_provisioner_url}"},
            "ProvisionerUrlMissing",
            "provisioner_url",
            "unresolved_secret",
        ),
        (
            {"provisioner_token": "{secret:sandbox_provisioner_token}"},
            "ProvisionerTokenMissing",
            "provisioner_token",
            "unresolved_secret",
        ),
    ],
)
def test_a_missing_or_escaped_setting_fails_without_calling_and_names_the_key(
    run: Any, config: dict[str, str], code: str, key: str, reason: str
) -> None:
    service = FakeService(200, READY)
    result = run(service, context(**config))
    assert result.error is None, result.error  # Temper decodes the details
    failure = result.result.typed_failure
    assert (failure["category"], failure["code"]) == ("integrity", code)
    assert detail(result, "key") == key and detail(result, "reason") == reason
    assert service.calls == []


def test_no_config_at_all_fails_without_calling(run: Any) -> None:
    ctx = context()
    del ctx["integration_config"]
    service = FakeService(200, READY)
    result = run(service, ctx)
    assert result.result.typed_failure["code"] == "ProvisionerUrlMissing"
    assert detail(result, "key") == "provisioner_url"
    assert service.calls == []


@pytest.mark.parametrize(
    ("service", "status", "code", "message"),
    [
        (
            FakeService(
                401,
                '{"error":{"code":"unauthorized","message":"a valid bearer token is required"}}',
            ),
            401,
            "unauthorized",
            "a valid bearer token is required",
        ),
        (
            FakeService(404, '{"error":{"code":"not_found","message":"no route POST /v2/x"}}'),
            404,
            "not_found",
            "no route POST /v2/x",
        ),
        # An escape or a non-ASCII byte ends the copied message: never half an escape.
        (
            FakeService(400, '{"error":{"code":"invalid_context","message":"bad \\"x\\" \u00e9"}}'),
            400,
            "invalid_context",
            "bad ",
        ),
        (FakeService(502, "<html>bad gateway</html>"), 502, None, None),
    ],
)
def test_a_refusal_carries_the_status_and_serves_error_code_and_message(
    run: Any, service: FakeService, status: int, code: str | None, message: str | None
) -> None:
    result = run(service, context())
    assert result.error is None, result.error
    details = result.result.typed_failure["details"]
    assert details["status"] == {"kind": "unsigned", "value": status}
    assert details.get("error_code", {}).get("value") == code
    assert details.get("error_message", {}).get("value") == message


def test_entity_state_cannot_redirect_the_token(run: Any) -> None:
    ctx = context()
    spoof = {"provisioner_url": "http://evil.example/steal", "provisioner_token": "x"}
    ctx["entity_state"] = {"integration_config": spoof, **spoof}
    ctx["trigger_params"] = {"integration_config": spoof}
    service = FakeService(200, READY)
    run(service, ctx)
    [(_, url, headers, _)] = service.calls
    assert url == "http://127.0.0.1:1/v1/invocations"
    assert ("authorization", "Bearer tok-1") in headers


def test_a_context_larger_than_the_initial_buffer_is_read_whole(run: Any) -> None:
    ctx = context()
    ctx["entity_state"] = {"history": "y" * 300_000}  # past the 64 KiB buffer and page
    service = FakeService(200, READY)
    result = run(service, ctx)
    assert result.result.callback_action == "SandboxReady"
    [(_, _, _, body)] = service.calls
    assert json.loads(body)["entity_state"]["history"] == "y" * 300_000
