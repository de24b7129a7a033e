"""A Temper-ABI core-module host: runs modules (such as dist/temper_shim.wasm) with the
`env` functions, budgets and result decoding of Temper's WASM engine (`nerdsane/temper`,
`crates/temper-wasm/src/engine/`). See `host.py` for the files each behaviour follows."""

from harness.temper_abi.context import temper_context_json
from harness.temper_abi.dispatch import Dispatch, Trigger, dispatch_for
from harness.temper_abi.env_functions import TEMPER_ENV_FUNCTIONS, EnvFunction
from harness.temper_abi.host import (
    AbiInvocation,
    HttpCall,
    HttpCallFailed,
    HttpxCall,
    ModuleTooLarge,
    TemperAbiModule,
)
from host.runtime.temper_limits import MAX_MODULE_SIZE, TemperLimits
from host.runtime.temper_result import InvalidGuestResult, TemperResult, decode_terminal_result

__all__ = [
    "MAX_MODULE_SIZE",
    "TEMPER_ENV_FUNCTIONS",
    "AbiInvocation",
    "Dispatch",
    "EnvFunction",
    "HttpCall",
    "HttpCallFailed",
    "HttpxCall",
    "InvalidGuestResult",
    "ModuleTooLarge",
    "TemperAbiModule",
    "TemperLimits",
    "TemperResult",
    "Trigger",
    "decode_terminal_result",
    "dispatch_for",
    "temper_context_json",
]
