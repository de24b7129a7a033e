"""The Temper-ABI host's semantics, each pinned by a tiny module written for the test."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest
import wasmtime

from harness.temper_abi import (
    MAX_MODULE_SIZE,
    HttpCallFailed,
    InvalidGuestResult,
    ModuleTooLarge,
    TemperAbiModule,
    TemperLimits,
    decode_terminal_result,
)

IMPORTS = """
  (import "env" "host_get_context" (func $get (param i32 i32) (result i32)))
  (import "env" "host_set_result" (func $set (param i32 i32)))
  (import "env" "host_http_call"
    (func $http (param i32 i32 i32 i32 i32 i32 i32 i32 i32 i32) (result i32)))
"""


def ok(action: str) -> str:
    return json.dumps({"action": action, "params": {}, "success": True}, separators=(",", ":"))


def data(offset: int, text: str) -> str:
    escaped = text.replace("\\", "\\\\").replace('"', '\\"')
    return f'(data (i32.const {offset}) "{escaped}")'


def module(body: str, *, memory_pages: int = 1, extra: str = "") -> bytes:
    return bytes(
        wasmtime.wat2wasm(
            f'(module {IMPORTS} (memory (export "memory") {memory_pages}) {extra}\n'
            f'(func (export "run") (param $p i32) (param $n i32) (result i32) (local $r i32)\n'
            f"{body})\n)"
        )
    )


def invoke(wasm: bytes, context: str, http: Any = None, **kw: Any) -> Any:
    kwargs = {} if http is None else {"http": http}
    with TemperAbiModule(wasm, **kwargs) as mod:
        return mod.invoke(context, **kw)


def choosing_module(condition: str, when_true: str, when_false: str) -> bytes:
    """A module whose result is the action `when_true` if the WAT `condition` holds, else
    `when_false` (each result a 64-byte data segment handed to $set)."""
    return module(
        f"(if {condition}"
        " (then (call $set (i32.const 16) (i32.const 64)))"
        " (else (call $set (i32.const 100) (i32.const 64))))\n(i32.const 0)",
        extra=data(16, ok(when_true).ljust(64)) + data(100, ok(when_false).ljust(64)),
    )


# Echo: the context is itself a success result, so the module's result is the context.
ECHO = ok("Echo")


def test_get_context_answers_the_needed_length_and_writes_nothing_when_too_small() -> None:
    wasm = module(
        """
        (local.set $r (call $get (i32.const 2048) (i32.const 1)))
        (if (i32.ne (local.get $r) (local.get $n)) (then unreachable))
        (if (i32.ne (i32.load8_u (i32.const 2048)) (i32.const 0)) (then unreachable))
        (local.set $r (call $get (i32.const 2048) (local.get $r)))
        (call $set (i32.const 2048) (local.get $r))
        (i32.const 0)"""
    )
    result = invoke(wasm, ECHO)
    assert result.error is None, result.error
    assert result.result_json == ECHO and result.result.callback_action == "Echo"


def test_the_context_is_written_at_1024_only_when_it_fits_the_memory() -> None:
    wasm = choosing_module(
        "(i32.eq (local.get $p) (i32.const 1024))", "AtOffset1024", "PointerZero"
    )
    assert invoke(wasm, ECHO).result.callback_action == "AtOffset1024"
    big = json.dumps({"pad": "z" * 70_000})
    assert invoke(wasm, big).result.callback_action == "PointerZero"


def test_a_result_returned_by_pointer_is_read_with_its_length_prefix() -> None:
    text = ok("ByPointer")
    wasm = module(
        f"(i32.store (i32.const 60) (i32.const {len(text)}))\n(i32.const 64)",
        extra=data(64, text),
    )
    assert invoke(wasm, ECHO).result.callback_action == "ByPointer"


def test_no_result_is_an_unsuccessful_empty_result() -> None:
    result = invoke(module("(i32.const 0)"), ECHO)
    assert result.result.success is False
    assert result.result.error == "module returned empty result"


def test_a_non_utf8_result_is_dropped_as_temper_drops_it() -> None:
    wasm = module(
        "(call $set (i32.const 16) (i32.const 2))\n(i32.const 0)",
        extra='(data (i32.const 16) "\\ff\\fe")',
    )
    assert invoke(wasm, ECHO).result.error == "module returned empty result"


HTTP_CALL = """
  (local.set $r (call $http (i32.const 16) (i32.const 4) (i32.const 24) (i32.const 8)
                            (i32.const 0) (i32.const 0) (i32.const 0) (i32.const 0)
                            (i32.const 4096) (i32.const {cap})))
  (if (i32.eq (local.get $r) (i32.const -2)) (then (call $set (i32.const 100) (i32.const 64))))
  (if (i32.eq (local.get $r) (i32.const -1)) (then (call $set (i32.const 200) (i32.const 64))))
  (if (i32.gt_s (local.get $r) (i32.const 0)) (then (call $set (i32.const 4096) (local.get $r))))
  (i32.const 0)"""
HTTP_DATA = (
    data(16, "POST")
    + data(24, "http://x")
    + data(100, ok("TooSmall").ljust(64))
    + data(200, ok("CallFailed").ljust(64))
)


def test_http_answers_status_newline_body_and_its_length() -> None:
    seen: list[Any] = []

    def http(method: str, url: str, headers: Any, body: str, **kw: Any) -> tuple[int, str]:
        seen.append((method, url, headers, body, kw["max_response_bytes"]))
        return 201, "hello"

    result = invoke(module(HTTP_CALL.format(cap=1000), extra=HTTP_DATA), ECHO, http)
    assert result.result_json == "201\nhello"
    assert result.error_kind == "invalid_guest_result"  # "201\nhello" is no result, rightly
    assert seen == [("POST", "http://x", [], "", 1024 * 1024)]


def test_http_answers_minus_two_when_the_buffer_is_too_small() -> None:
    def http(*_: Any, **__: Any) -> tuple[int, str]:
        return 200, "x" * 10

    wasm = module(HTTP_CALL.format(cap=12), extra=HTTP_DATA)  # "200\n" + 10 bytes = 14
    assert invoke(wasm, ECHO, http).result.callback_action == "TooSmall"
    wasm = module(HTTP_CALL.format(cap=14), extra=HTTP_DATA)
    assert invoke(wasm, ECHO, http).result_json == "200\n" + "x" * 10


def test_http_answers_minus_one_when_the_call_fails() -> None:
    def http(*_: Any, **__: Any) -> tuple[int, str]:
        raise HttpCallFailed("refused")

    wasm = module(HTTP_CALL.format(cap=1000), extra=HTTP_DATA)
    assert invoke(wasm, ECHO, http).result.callback_action == "CallFailed"


def test_the_real_http_client_refuses_a_body_over_max_response_bytes() -> None:
    from harness.temper_abi import HttpxCall
    from tests.harness.mocks.e2b.fixtures import running_mock

    call = HttpxCall()
    with running_mock() as mock, pytest.raises(HttpCallFailed):
        call("GET", f"{mock.url}/_mock/stats", [], "", timeout_s=5, max_response_bytes=10)
    call.close()


def test_the_real_http_client_is_one_client_for_every_call() -> None:
    """Temper's host keeps one client; one per call costs an SSL context and a connection
    each time, which delayed every grant of a real-time run."""
    from harness.temper_abi import HttpxCall
    from tests.harness.mocks.e2b.fixtures import running_mock

    call = HttpxCall()
    built: list[object] = []
    original = httpx.Client.__init__

    def counting(self: httpx.Client, *args: Any, **kwargs: Any) -> None:
        built.append(self)
        original(self, *args, **kwargs)

    with running_mock() as mock, pytest.MonkeyPatch.context() as patch:
        patch.setattr(httpx.Client, "__init__", counting)
        for _ in range(3):
            status, _body = call(
                "GET", f"{mock.url}/_mock/stats", [], "", timeout_s=5, max_response_bytes=1 << 20
            )
            assert status == 200
    call.close()
    assert built == []


LOOP = "(loop $forever (br $forever))\n(i32.const 0)"


def test_fuel_is_the_budget_and_the_config_can_lower_it() -> None:
    context = json.dumps({"integration_config": {"max_fuel": "100000"}})
    result = invoke(module(LOOP), context)
    assert result.error_kind == "fuel_exhausted"


def test_the_deadline_interrupts_a_guest_that_never_returns() -> None:
    context = json.dumps({"integration_config": {"timeout_secs": "1", "max_fuel": str(10**15)}})
    result = invoke(module(LOOP), context)
    assert result.error_kind == "timeout"
    assert 0.9 < result.duration_s < 30


def test_memory_growth_past_the_cap_is_refused_with_minus_one() -> None:
    grew_not = "(i32.eq (memory.grow (i32.const 1100)) (i32.const -1))"
    wasm = choosing_module(grew_not, "Refused", "Grew")
    assert invoke(wasm, ECHO).result.callback_action == "Refused"  # 64 MiB = 1024 pages
    roomy = json.dumps({"integration_config": {"max_memory": str(128 * 1024 * 1024)}})
    assert invoke(wasm, roomy).result.callback_action == "Grew"


def test_a_module_over_ten_mib_is_refused_before_compiling() -> None:
    with pytest.raises(ModuleTooLarge):
        TemperAbiModule(b"\0asm" + b"\0" * MAX_MODULE_SIZE)


def test_a_module_importing_something_temper_lacks_is_refused() -> None:
    wasm = bytes(
        wasmtime.wat2wasm(
            '(module (import "env" "host_kv_get" (func)) (memory (export "memory") 1)'
            ' (func (export "run") (param i32 i32) (result i32) (i32.const 0)))'
        )
    )
    with pytest.raises(ValueError, match="host_kv_get"):
        TemperAbiModule(wasm)


def test_limits_follow_the_config_overrides_and_ignore_what_does_not_parse() -> None:
    limits = TemperLimits.from_integration_config(
        {"timeout_secs": "5", "max_fuel": "-3", "max_memory": "abc", "max_response_bytes": "7"}
    )
    assert limits == TemperLimits(max_duration_s=5, max_response_bytes=7)
    assert TemperLimits().epoch_deadline_ticks() == 12_000


@pytest.mark.parametrize(
    "text",
    [
        '{"action":"Done","params":{},"success":true,"error":null}',
        '{"action":"Done","params":{},"success":false}',
        '{"action":"","params":{},"success":true}',
        '{"action":"Done","params":{},"success":true,"success":false}',
        '{"action":"callback","params":{"error":"b"},"success":false,"error":"a"}',
        '{"success":false,"typed_failure":{"version":2,"category":"transient","code":"X",'
        '"retryability":"never","outcome":"not_applied"}}',
        '{"success":false,"typed_failure":{"version":1,"category":"transient","code":"X",'
        '"retryability":"never","outcome":"unknown"}}',
        '{"success":false,"typed_failure":{"version":1,"category":"ambiguous","code":"X",'
        '"retryability":"never","outcome":"not_applied"}}',
    ],
)
def test_results_temper_rejects_are_rejected(text: str) -> None:
    with pytest.raises(InvalidGuestResult) as raised:
        decode_terminal_result(text)
    assert raised.value.kind == "invalid_shape"


def test_the_three_shapes_temper_accepts_decode() -> None:
    assert decode_terminal_result('{"action":"Done","params":{"v":1},"success":true}').success
    legacy = decode_terminal_result(
        '{"action":"callback","params":{"error":"e"},"success":false,"error":"e"}'
    )
    assert legacy.error == "e" and not legacy.success
    typed = decode_terminal_result(
        '{"success":false,"typed_failure":{"version":1,"category":"transient",'
        '"code":"ProviderUnavailable","retryability":"with_backoff","outcome":"not_applied",'
        '"details":{"status":{"kind":"unsigned","value":503}}}}'
    )
    assert typed.typed_failure is not None and typed.typed_failure["category"] == "transient"
    with pytest.raises(InvalidGuestResult) as raised:
        decode_terminal_result("not json")
    assert raised.value.kind == "invalid_json"
