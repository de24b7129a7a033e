"""A deliberately misbehaving guest for the sandbox-provisioner world.

Built with componentize-py --stub-wasi against the project's wit/ (see tests/guests/build.py)
so the host's containment can be tested against code that tries what the real provisioner
never would. `config.probe_mode` picks the misbehaviour:

- noop: answer at once (also the benchmarks' empty-call floor)
- loop: spin forever (with `probe_stop_key`: until that tenant key exists)
- alloc: allocate without end, logging each 4 MiB reached
- huge: return a result larger than 1 MiB
- trap: let an exception escape the export
- storage_escape: try crafted keys in both scopes and report what each read/write did
- http_escape: GET every URL of the JSON list `probe_urls`, report status or error
- key_hunt: collect everything visible (environment, invocation, HTTP answers, storage)
- marker: report what a module-level global and a module-level buffer held on entry, then
  write `probe_marker` into both (a fresh instance must never see a previous marker);
  `probe_repeat=N` runs the same steps N times within the one call
- bytes_echo: store the bytes `probe_bytes_hex` under tenant key `probe_key` and read them
  back (a `list<u8>` each way across the boundary); report whether they came back equal
- answer: return the outcome `probe_action` with the params text `probe_params` as given
  (unchecked: the host's reading of whatever a component answers is under test)
"""

from __future__ import annotations

import json
import os
from typing import Any

from componentize_py_types import Err  # type: ignore[import-not-found]
from wit_world import exports  # type: ignore[import-not-found]
from wit_world.exports import provisioner as wit  # type: ignore[import-not-found]
from wit_world.imports import http, storage, telemetry  # type: ignore[import-not-found]

MIB = 1 << 20
CRAFTED_KEYS = (
    "secret",
    "../victim/secret",
    "../../tenant/victim/secret",
    "/tenant/victim/secret",
    "tenant/victim/secret",
    "tenant%2Fvictim/secret",
    "..%2Fvictim%2Fsecret",
    "e:tenant%2Fvictim:secret",
    "victim:secret",
    "account/default/secret",
    "\x00secret",
    "secret\x00",
    "sec\nret",
    "",
    "k" * 600,
    "ключ/秘密",
)
SCOPES = {"tenant": storage.Scope.TENANT, "account": storage.Scope.ACCOUNT}
OWN_MARK = b"written-by-probe"
MARKER_BYTES = 256
# Part of the memory image: a fresh instance finds them as the build left them.
_last_marker: str | None = None
_marker_buffer = bytearray(MARKER_BYTES)


def _outcome(action: str, params: dict[str, Any]) -> Any:
    return wit.Outcome(action=action, params=json.dumps(params))


def _error_name(error: Any) -> str:
    value = getattr(error, "value", error)
    payload = getattr(value, "value", None)
    return f"{type(value).__name__}:{payload}"


def _noop(invocation: Any, config: dict[str, str]) -> Any:
    return _outcome("ProbeDone", {"mode": "noop"})


def _loop(invocation: Any, config: dict[str, str]) -> Any:
    stop_key = config.get("probe_stop_key")
    telemetry.log(telemetry.Level.INFO, "probe: looping")
    spins = 0
    while True:
        spins += 1
        if stop_key and spins % 1000 == 0:
            try:
                if storage.get(storage.Scope.TENANT, stop_key) is not None:
                    return _outcome("ProbeStopped", {"spins": spins})
            except Err:
                pass


def _alloc(invocation: Any, config: dict[str, str]) -> Any:
    blocks: list[bytearray] = []
    while True:
        blocks.append(bytearray(MIB))
        if len(blocks) % 4 == 0:
            telemetry.log(telemetry.Level.INFO, f"probe: allocated {len(blocks)} MiB")


def _huge(invocation: Any, config: dict[str, str]) -> Any:
    return _outcome("ProbeDone", {"blob": "x" * (2 * MIB)})


def _trap(invocation: Any, config: dict[str, str]) -> Any:
    raise RuntimeError("probe: an exception escapes the export")


def _storage_escape(invocation: Any, config: dict[str, str]) -> Any:
    reads: list[dict[str, Any]] = []
    writes: list[dict[str, Any]] = []
    for scope_name, scope in SCOPES.items():
        for key in CRAFTED_KEYS:
            try:
                found = storage.get(scope, key)
                seen = None if found is None else found.value.decode("utf-8", "replace")
                reads.append({"scope": scope_name, "key": key, "value": seen})
            except Err as error:
                reads.append({"scope": scope_name, "key": key, "error": _error_name(error)})
        for key in CRAFTED_KEYS:
            try:
                version = storage.compare_and_swap(scope, key, None, OWN_MARK, None)
                writes.append({"scope": scope_name, "key": key, "version": version})
            except Err as error:
                writes.append({"scope": scope_name, "key": key, "error": _error_name(error)})
    try:
        too_big = b"v" * (MIB // 4 + 1)
        storage.compare_and_swap(storage.Scope.TENANT, "oversized", None, too_big, None)
        oversized = "stored"
    except Err as error:
        oversized = _error_name(error)
    return _outcome("ProbeDone", {"reads": reads, "writes": writes, "oversized": oversized})


def _send(method: str, url: str, headers: list[tuple[str, str]]) -> dict[str, Any]:
    try:
        response = http.send(http.Request(method, url, headers, b"", 2000))
    except Err as error:
        return {"url": url, "error": _error_name(error)}
    return {
        "url": url,
        "status": response.status,
        "headers": [list(pair) for pair in response.headers],
        "body": response.body[:65536].decode("utf-8", "replace"),
    }


def _http_escape(invocation: Any, config: dict[str, str]) -> Any:
    urls = json.loads(config.get("probe_urls", "[]"))
    return _outcome("ProbeDone", {"results": [_send("GET", url, []) for url in urls]})


def _key_hunt(invocation: Any, config: dict[str, str]) -> Any:
    base = config.get("e2b_api_url", "https://api.e2b.app").rstrip("/")
    guesses = [("X-API-Key", "guess"), ("Authorization", "Bearer guess")]
    try:
        environment: Any = dict(os.environ)
    except BaseException as error:  # whatever the environment does, report it
        environment = f"unreadable: {type(error).__name__}"
    answers = [
        _send("GET", base + "/v2/sandboxes", guesses),
        _send("POST", base + "/v2/sandboxes", guesses),
        _send("GET", base + "/sandboxes/none", guesses),
        _send("GET", base + "/echo", guesses),
        _send("GET", "http://127.0.0.1:1/steal", guesses),
    ]
    stored = {}
    for scope_name, scope in SCOPES.items():
        for key in ("api_key", "e2b_api_key", "X-API-Key", "secret"):
            try:
                found = storage.get(scope, key)
                stored[f"{scope_name}/{key}"] = None if found is None else found.value.hex()
            except Err as error:
                stored[f"{scope_name}/{key}"] = _error_name(error)
    seen = {
        "environment": environment,
        "invocation": {
            "tenant": invocation.tenant,
            "entity_type": invocation.entity_type,
            "entity_id": invocation.entity_id,
            "trigger_params": invocation.trigger_params,
            "entity_state": invocation.entity_state,
            "config": [list(pair) for pair in invocation.config],
            "session_id": invocation.session_id,
            "trace_id": invocation.trace_id,
        },
        "answers": answers,
        "storage": stored,
    }
    return _outcome("ProbeDone", {"seen": seen})


def _marker(invocation: Any, config: dict[str, str]) -> Any:
    global _last_marker
    marker = config.get("probe_marker", "")
    seen: list[dict[str, Any]] = []
    for _ in range(max(1, int(config.get("probe_repeat", "1")))):
        held = bytes(_marker_buffer).rstrip(b"\0").decode("utf-8", "replace")
        seen.append({"global": _last_marker, "buffer": held or None})
        _last_marker = marker
        encoded = marker.encode("utf-8")[:MARKER_BYTES]
        _marker_buffer[:] = encoded + bytes(MARKER_BYTES - len(encoded))
    return _outcome("ProbeDone", {"seen": seen})


def _bytes_echo(invocation: Any, config: dict[str, str]) -> Any:
    data = bytes.fromhex(config.get("probe_bytes_hex", ""))
    key = config.get("probe_key", "echo")
    try:
        version = storage.compare_and_swap(storage.Scope.TENANT, key, None, data, None)
        found = storage.get(storage.Scope.TENANT, key)
    except Err as error:
        return _outcome("ProbeFailed", {"error": _error_name(error)})
    back = b"" if found is None else bytes(found.value)
    return _outcome(
        "ProbeDone",
        {
            "version": version,
            "found": found is not None,
            "equal": back == data,
            "length": len(back),
            "hex": back.hex() if len(back) <= 4096 else None,
        },
    )


def _answer(invocation: Any, config: dict[str, str]) -> Any:
    return wit.Outcome(action=config.get("probe_action", ""), params=config.get("probe_params", ""))


MODES = {
    "noop": _noop,
    "loop": _loop,
    "alloc": _alloc,
    "huge": _huge,
    "trap": _trap,
    "storage_escape": _storage_escape,
    "http_escape": _http_escape,
    "key_hunt": _key_hunt,
    "marker": _marker,
    "bytes_echo": _bytes_echo,
    "answer": _answer,
}


class Provisioner(exports.Provisioner):  # type: ignore[misc]
    def run(self, invocation: Any) -> Any:
        config = dict(invocation.config)
        mode = config.get("probe_mode", "noop")
        handler = MODES.get(mode)
        if handler is None:
            return _outcome("ProbeUnknownMode", {"mode": mode})
        return handler(invocation, config)
