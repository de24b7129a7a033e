"""A host for core modules written against Temper's WASM ABI, the way Temper runs them.

Mirrors `nerdsane/temper`:
- loading: `WasmEngine::compile_and_cache` (`crates/temper-wasm/src/engine/mod.rs`):
  a module over `MAX_MODULE_SIZE` is refused before compiling; engines meter fuel and use
  epoch interruption;
- invoking: `WasmEngine::invoke_blocking` (same file): a fresh store per invocation with
  fuel, a memory cap (a refused `memory.grow` returns -1, `MemoryLimiter`) and an epoch
  deadline; the context is serialised once; it is written at offset 1024 when it fits the
  module's current memory, else `run` gets `ctx_ptr = 0`; `run(ctx_ptr, ctx_len) -> i32`
  is called; the result is the `host_set_result` text if any, else the length-prefixed
  bytes at the returned pointer when it is positive, else empty (a failure);
- the `env` functions (`crates/temper-wasm/src/engine/host_functions.rs`):
  `host_get_context(buf, len)` writes the context only when it fits and always answers
  its length; `host_set_result(ptr, len)` keeps the text only when it is UTF-8;
  `host_http_call(...)` reads method, URL, headers (a JSON array of `[name, value]`, an
  unparsable one counting as none) and body, and writes `"{status}\\n{body}"`, answering
  its length, -2 when the buffer is too small, -1 when the call failed;
  `host_log(level, msg)`;
- results: `decode_terminal_result` (`engine/result.rs`, see `result.py`);
- budgets and their config overrides: `limits.py`.

The HTTP client is a seam (`HttpCall`): the default uses httpx within the invocation's
remaining time and refuses a body over `max_response_bytes`. Temper's authorisation gate
(Cedar) and secret injection are out of scope: this host allows every call.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import httpx
import wasmtime

from harness.temper_abi.context import temper_context_json
from harness.temper_abi.env_functions import TEMPER_ENV_FUNCTIONS
from host.runtime.epochs import TickedByEpochs
from host.runtime.temper_limits import EPOCH_TICK_MS, MAX_MODULE_SIZE, TemperLimits
from host.runtime.temper_result import InvalidGuestResult, TemperResult, decode_terminal_result

CONTEXT_OFFSET = 1024


class ModuleTooLarge(ValueError):
    pass


class HttpCallFailed(Exception):
    """The call did not produce a response (host_http_call answers -1)."""


class HttpCall(Protocol):
    def __call__(
        self,
        method: str,
        url: str,
        headers: list[tuple[str, str]],
        body: str,
        *,
        timeout_s: float,
        max_response_bytes: int,
    ) -> tuple[int, str]: ...


class HttpxCall:
    """`host_http_call` over one httpx client kept for the module's life, as Temper's host
    keeps one: a client per call would build an SSL context (CPU under the GIL) and open a
    connection each time. Safe from many threads."""

    def __init__(self) -> None:
        self._client = httpx.Client(
            follow_redirects=False,
            limits=httpx.Limits(max_connections=None, max_keepalive_connections=64),
        )

    def __call__(
        self,
        method: str,
        url: str,
        headers: list[tuple[str, str]],
        body: str,
        *,
        timeout_s: float,
        max_response_bytes: int,
    ) -> tuple[int, str]:
        try:
            with self._client.stream(
                method, url, headers=headers, content=body.encode(), timeout=timeout_s
            ) as response:
                chunks: list[bytes] = []
                size = 0
                for chunk in response.iter_bytes():
                    size += len(chunk)
                    if size > max_response_bytes:
                        raise HttpCallFailed(f"response body over {max_response_bytes} bytes")
                    chunks.append(chunk)
                return response.status_code, b"".join(chunks).decode("utf-8", "replace")
        except httpx.HTTPError as error:
            raise HttpCallFailed(f"{type(error).__name__}: {error}") from None

    def close(self) -> None:
        self._client.close()


@dataclass
class AbiInvocation:
    """What one invocation produced: a decoded result, or the engine error Temper would
    raise (`WasmError` in `engine/mod.rs`: fuel_exhausted, timeout, guest_execution,
    invalid_guest_result, ...)."""

    result: TemperResult | None
    error: str | None
    error_kind: str | None
    result_json: str | None
    logs: list[tuple[str, str]] = field(default_factory=list)
    http_calls: list[tuple[str, str, int]] = field(default_factory=list)
    duration_s: float = 0.0


def _engine() -> wasmtime.Engine:
    config = wasmtime.Config()
    config.consume_fuel = True
    config.epoch_interruption = True
    return wasmtime.Engine(config)


class TemperAbiModule(TickedByEpochs):
    """A compiled core module and the host that runs it; safe to invoke from many threads
    (each invocation has its own store and linker, as in Temper)."""

    def __init__(
        self,
        wasm: bytes,
        *,
        http: HttpCall | None = None,
        engine: wasmtime.Engine | None = None,
    ) -> None:
        if len(wasm) > MAX_MODULE_SIZE:
            raise ModuleTooLarge(f"module too large: {len(wasm)} bytes (max {MAX_MODULE_SIZE})")
        self.sha256 = hashlib.sha256(wasm).hexdigest()
        self.engine = engine or _engine()
        self.module = wasmtime.Module(self.engine, wasm)
        self._owned_http: HttpxCall | None = None
        if http is None:
            http = self._owned_http = HttpxCall()
        self._http = http
        unknown = [
            f"{imp.module}.{imp.name}"
            for imp in self.module.imports
            if imp.module != "env" or imp.name not in TEMPER_ENV_FUNCTIONS
        ]
        if unknown:
            raise ValueError(f"imports Temper's host does not define: {unknown}")
        super().__init__(self.engine, EPOCH_TICK_MS)

    @classmethod
    def load(cls, path: Path, **kwargs: Any) -> TemperAbiModule:
        return cls(path.read_bytes(), **kwargs)

    def _before_release(self) -> None:
        if self._owned_http is not None:
            self._owned_http.close()

    def invoke(
        self, context: Mapping[str, Any] | str, limits: TemperLimits | None = None
    ) -> AbiInvocation:
        """Run the module on one context (a WasmInvocationContext mapping, or its JSON).
        The limits default to Temper's, overridden by the context's integration config."""
        if isinstance(context, str):
            context_json = context
            config = json.loads(context).get("integration_config") or {}
        else:
            context_json = temper_context_json(context)
            config = context.get("integration_config") or {}
        limits = TemperLimits.from_integration_config(config, limits)
        call = _Call(context_json.encode(), time.monotonic() + limits.max_duration_s, limits)
        started = time.monotonic()
        report = self._run(call, limits)
        report.duration_s = time.monotonic() - started
        return report

    def _run(self, call: _Call, limits: TemperLimits) -> AbiInvocation:
        store = wasmtime.Store(self.engine)
        store.set_fuel(limits.max_fuel)
        store.set_limits(memory_size=limits.max_memory)
        store.set_epoch_deadline(limits.epoch_deadline_ticks())
        linker = wasmtime.Linker(self.engine)
        _link(linker, call, self._http)

        def failure(kind: str, message: str) -> AbiInvocation:
            return AbiInvocation(None, message, kind, None, call.logs, call.http_calls)

        try:
            instance = linker.instantiate(store, self.module)
        except (wasmtime.WasmtimeError, wasmtime.Trap) as error:
            return failure("instantiation", str(error))
        exports = instance.exports(store)
        run = exports.get("run") if "run" in exports else None
        memory = exports.get("memory") if "memory" in exports else None
        if not isinstance(run, wasmtime.Func) or not _is_run_type(run.type(store)):
            return failure("invocation", "module missing 'run' export of type (i32, i32) -> i32")
        if not isinstance(memory, wasmtime.Memory):
            return failure("invocation", "module missing 'memory' export")
        context = call.context
        ctx_ptr = CONTEXT_OFFSET
        if len(context) <= max(0, memory.data_len(store) - ctx_ptr):
            memory.write(store, context, ctx_ptr)
        else:
            ctx_ptr = 0
        try:
            result_ptr = run(store, ctx_ptr, len(context))
        except wasmtime.Trap as trap:
            if trap.trap_code == wasmtime.TrapCode.OUT_OF_FUEL:
                return failure("fuel_exhausted", "fuel exhausted -- module exceeded budget")
            if trap.trap_code == wasmtime.TrapCode.INTERRUPT:
                return failure("timeout", f"execution timeout after {limits.max_duration_s} s")
            return failure("guest_execution", trap.message)
        except wasmtime.WasmtimeError as error:
            return failure("guest_execution", str(error))
        if call.result_json is not None:
            text = call.result_json
        elif isinstance(result_ptr, int) and result_ptr > 0:
            try:
                length = int.from_bytes(memory.read(store, result_ptr - 4, result_ptr), "little")
                raw = bytes(memory.read(store, result_ptr, result_ptr + length))
                text = raw.decode("utf-8")
            except (ValueError, IndexError, wasmtime.WasmtimeError, UnicodeDecodeError) as error:
                return failure("invocation", f"failed to read result: {error}")
        else:
            return AbiInvocation(
                TemperResult("", None, False, error="module returned empty result"),
                None,
                None,
                "",
                call.logs,
                call.http_calls,
            )
        try:
            decoded = decode_terminal_result(text)
        except InvalidGuestResult as invalid:
            return AbiInvocation(
                None, str(invalid), "invalid_guest_result", text, call.logs, call.http_calls
            )
        return AbiInvocation(decoded, None, None, text, call.logs, call.http_calls)


@dataclass
class _Call:
    context: bytes
    deadline: float
    limits: TemperLimits
    result_json: str | None = None
    logs: list[tuple[str, str]] = field(default_factory=list)
    http_calls: list[tuple[str, str, int]] = field(default_factory=list)


def _read(caller: wasmtime.Caller, ptr: int, length: int) -> bytes | None:
    """Guest bytes, or None when the range is negative or outside memory (the newer
    Temper hosts refuse such ranges: `validate_guest_range`, engine/guest_memory.rs)."""
    memory = caller.get("memory")
    if not isinstance(memory, wasmtime.Memory) or ptr < 0 or length < 0:
        return None
    if ptr + length > memory.data_len(caller):
        return None
    return bytes(memory.read(caller, ptr, ptr + length))


def _write(caller: wasmtime.Caller, ptr: int, data: bytes) -> bool:
    memory = caller.get("memory")
    if not isinstance(memory, wasmtime.Memory) or ptr < 0:
        return False
    if ptr + len(data) > memory.data_len(caller):
        return False
    memory.write(caller, data, ptr)
    return True


def _link(linker: wasmtime.Linker, call: _Call, http: HttpCall) -> None:
    i32 = wasmtime.ValType.i32()

    def define(name: str, fn: Callable[..., Any]) -> None:
        spec = TEMPER_ENV_FUNCTIONS[name]
        ty = wasmtime.FuncType([i32] * spec.params, [i32] if spec.returns_i32 else [])
        linker.define_func("env", name, ty, fn, access_caller=True)

    def host_log(caller: wasmtime.Caller, lp: int, ll: int, mp: int, ml: int) -> None:
        level, message = _read(caller, lp, ll), _read(caller, mp, ml)
        if level is not None and message is not None:
            call.logs.append((level.decode("utf-8", "replace"), message.decode("utf-8", "replace")))

    def host_get_context(caller: wasmtime.Caller, ptr: int, length: int) -> int:
        context = call.context
        if length < len(context):
            return len(context)  # the needed size; nothing written
        _write(caller, ptr, context)
        return len(context)

    def host_set_result(caller: wasmtime.Caller, ptr: int, length: int) -> None:
        data = _read(caller, ptr, length)
        if data is None:
            return
        # Temper keeps only UTF-8 results (`String::from_utf8`).
        with contextlib.suppress(UnicodeDecodeError):
            call.result_json = data.decode("utf-8")

    def host_http_call(
        caller: wasmtime.Caller,
        mp: int,
        ml: int,
        up: int,
        ul: int,
        hp: int,
        hl: int,
        bp: int,
        bl: int,
        rp: int,
        rl: int,
    ) -> int:
        method, url = _read(caller, mp, ml), _read(caller, up, ul)
        raw_headers = _read(caller, hp, hl) if hl > 0 else b""
        body = _read(caller, bp, bl) if bl > 0 else b""
        if method is None or url is None or raw_headers is None or body is None:
            return -1
        headers = _parse_headers(raw_headers)
        remaining = call.deadline - time.monotonic()
        url_text = url.decode("utf-8", "replace")
        try:
            if remaining <= 0:
                raise HttpCallFailed("deadline passed")
            status, text = http(
                method.decode("utf-8", "replace"),
                url_text,
                headers,
                body.decode("utf-8", "replace"),
                timeout_s=remaining,
                max_response_bytes=call.limits.max_response_bytes,
            )
        except HttpCallFailed:
            call.http_calls.append((method.decode("utf-8", "replace"), url_text, -1))
            return -1
        call.http_calls.append((method.decode("utf-8", "replace"), url_text, status))
        answer = f"{status}\n{text}".encode()
        if len(answer) > rl:
            return -2
        if not _write(caller, rp, answer):
            return -1
        return len(answer)

    define("host_log", host_log)
    define("host_get_context", host_get_context)
    define("host_set_result", host_set_result)
    define("host_http_call", host_http_call)


def _is_run_type(ty: wasmtime.FuncType) -> bool:
    """`get_typed_func::<(i32, i32), i32>(.., "run")` in invoke_blocking."""
    return [str(t) for t in ty.params] == ["i32", "i32"] and [str(t) for t in ty.results] == ["i32"]


def _parse_headers(raw: bytes) -> list[tuple[str, str]]:
    """`serde_json::from_slice::<Vec<(String, String)>>(...).unwrap_or_default()`."""
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return []
    if not isinstance(data, list) or not all(
        isinstance(pair, list) and len(pair) == 2 and all(isinstance(s, str) for s in pair)
        for pair in data
    ):
        return []
    return [(pair[0], pair[1]) for pair in data]
