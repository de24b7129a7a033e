"""The OpenAPI description of `sandbox-provisioner serve`, served at GET /openapi.json.

The request body of POST /v1/invocations is Temper's `WasmInvocationContext`
(`crates/temper-wasm/src/types.rs`) exactly as Temper serialises it for a WASM module; the
shim forwards it unchanged. The 200 answer is a Temper terminal result, which the shim
hands back to Temper verbatim (`crates/temper-wasm/src/engine/result.rs`). docs/contract.md
says the same in prose; tests/host/serve/test_openapi.py checks this document against the
service's answers.
"""

from __future__ import annotations

from typing import Any

from host.runtime.temper_context import MAX_CONTEXT_BYTES

_ERROR = {"$ref": "#/components/schemas/Error"}


def _error_response(description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": _ERROR}}}


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


_STRINGS = {"type": "object", "additionalProperties": {"type": "string"}}

OPENAPI: dict[str, Any] = {
    "openapi": "3.1.0",
    "info": {
        "title": "sandbox-provisioner serve",
        "version": "1",
        "description": "The provisioner component as an HTTP service for Temper's shim "
        "(dist/temper_shim.wasm). Every route but /healthz, /readyz and /openapi.json needs "
        "`Authorization: Bearer <SANDBOX_PROVISIONER_TOKEN>`.",
    },
    "components": {
        "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        "schemas": {
            "WasmInvocationContext": {
                "type": "object",
                "description": "Temper's invocation context (crates/temper-wasm/src/types.rs), "
                "unchanged. integration_config is the trigger's config with {secret:...} "
                "templates resolved; serve drops provisioner_url and provisioner_token "
                "before the component sees it.",
                "required": ["tenant", "entity_type", "entity_id"],
                "properties": {
                    "tenant": {"type": "string"},
                    "entity_type": {"type": "string"},
                    "entity_id": {"type": "string"},
                    "trigger_action": {"type": "string"},
                    "wasm_module": {"type": "string"},
                    "trigger_params": {"description": "the action's params (any JSON)"},
                    "entity_state": {
                        "description": "the entity after the transition: {status, fields, ...}"
                    },
                    "agent_id": {"type": ["string", "null"]},
                    "session_id": {"type": ["string", "null"]},
                    "integration_config": {
                        **_STRINGS,
                        "description": "operation (provision, release, status, acquire, "
                        "settle) and the component's keys (docs/contract.md)",
                    },
                    "trace_id": {"type": "string"},
                },
            },
            "TemperResult": {
                "type": "object",
                "description": "A Temper terminal result. Every outcome the component "
                "produced is a success naming its action: SandboxReady, SandboxQueued, "
                "SandboxReleased (or the config's released_action), SandboxStatus, the "
                "resource gates' actions, and "
                "SandboxFailed (with code, message, retryable) for the component's refusals.",
                "required": ["action", "params", "success"],
                "additionalProperties": False,
                "properties": {
                    "action": {"type": "string", "minLength": 1},
                    "params": {"type": "object"},
                    "success": {"const": True},
                },
            },
            "Error": {
                "type": "object",
                "required": ["error"],
                "properties": {
                    "error": {
                        "type": "object",
                        "required": ["code", "message"],
                        "properties": {
                            "code": {"type": "string"},
                            "message": {"type": "string"},
                        },
                    }
                },
            },
        },
    },
    "security": [{"bearer": []}],
    "paths": {
        "/v1/invocations": {
            "post": {
                "summary": "Run one invocation of the component",
                "description": "The shim POSTs the raw Temper context; nothing ran unless "
                "the answer is 200. Sending the same context again is safe: the component "
                "answers the same sandbox for the same entity.",
                "requestBody": {
                    "required": True,
                    "content": {
                        "application/json": {
                            "schema": {"$ref": "#/components/schemas/WasmInvocationContext"}
                        }
                    },
                },
                "responses": {
                    "200": _json(
                        {"$ref": "#/components/schemas/TemperResult"},
                        "the outcome, for the shim to hand to Temper verbatim",
                    ),
                    "400": _error_response(
                        "invalid_context: not UTF-8, not JSON, or not a context"
                    ),
                    "401": _error_response("unauthorized: no bearer token, or not serve's"),
                    "413": _error_response(f"too_large: a context over {MAX_CONTEXT_BYTES} bytes"),
                    "503": _error_response(
                        "saturated (every worker busy) or draining (shutting down); nothing "
                        "ran; Retry-After says when to try again"
                    ),
                },
            }
        },
        "/healthz": {
            "get": {
                "security": [],
                "summary": "Liveness: the process is up",
                "responses": {"200": _json({"type": "object"}, "{status: ok}")},
            }
        },
        "/readyz": {
            "get": {
                "security": [],
                "summary": "Readiness: the component is compiled and storage answers",
                "responses": {
                    "200": _json({"type": "object"}, "{status: ready, ...}"),
                    "503": _json({"type": "object"}, "{status: unready or draining, ...}"),
                },
            }
        },
        "/metrics": {
            "get": {
                "summary": "Prometheus exposition (docs/operations.md)",
                "responses": {
                    "200": {"description": "text/plain; version=0.0.4"},
                    "401": _error_response("unauthorized"),
                },
            }
        },
        "/openapi.json": {
            "get": {
                "security": [],
                "summary": "This document",
                "responses": {"200": _json({"type": "object"}, "OpenAPI 3.1")},
            }
        },
    },
}

__all__ = ["OPENAPI"]
