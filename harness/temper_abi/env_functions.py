"""The `env` functions Temper's WASM host defines, with their exact signatures.

Read from `nerdsane/temper`:
- `crates/temper-wasm/src/engine/host_functions.rs` (`link_host_functions`, the
  `linker.func_wrap("env", ...)` calls; every parameter is an `i32`);
- `crates/temper-wasm-sdk/src/host.rs` (the SDK's `extern "C"` declarations of the same
  functions, including `host_evaluate_spec`).

A module Temper loads may import only these (a missing import fails instantiation in
`compile_and_cache`, which pre-links with `instantiate_pre`). The list holds the functions
whose signatures were read in those files; Temper defines more (`host_log_structured`,
`host_emit_metric`, span and cache calls, ...), which the shim does not use.
"""

from __future__ import annotations

from dataclasses import dataclass

HOST_FUNCTIONS_RS = "crates/temper-wasm/src/engine/host_functions.rs"
SDK_HOST_RS = "crates/temper-wasm-sdk/src/host.rs"


@dataclass(frozen=True)
class EnvFunction:
    name: str
    params: int  # every parameter is i32
    returns_i32: bool
    source: str


TEMPER_ENV_FUNCTIONS: dict[str, EnvFunction] = {
    f.name: f
    for f in (
        EnvFunction("host_log", 4, False, HOST_FUNCTIONS_RS),
        EnvFunction("host_get_context", 2, True, HOST_FUNCTIONS_RS),
        EnvFunction("host_set_result", 2, False, HOST_FUNCTIONS_RS),
        EnvFunction("host_emit_progress", 2, True, HOST_FUNCTIONS_RS),
        EnvFunction("host_get_secret", 4, True, HOST_FUNCTIONS_RS),
        EnvFunction("host_http_call", 10, True, HOST_FUNCTIONS_RS),
        EnvFunction("host_connect_call", 8, True, HOST_FUNCTIONS_RS),
        EnvFunction("host_http_call_stream", 10, True, HOST_FUNCTIONS_RS),
        EnvFunction("host_evaluate_spec", 10, True, SDK_HOST_RS),
    )
}
