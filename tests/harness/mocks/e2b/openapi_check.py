"""Checks the mock E2B server's answers against E2B's vendored OpenAPI description.

``SpecChecker.check(method, path, status, headers, body)`` returns what is wrong with one
answer (an empty list when it conforms): the operation must exist, the status must be one it
documents (or, for an error status, one of ``components/responses``), a JSON body must
validate against the response schema (OpenAPI 3.0 semantics: ``nullable``, ``format``), a
bodiless response must be empty, and documented headers must parse as their schema says.

``ResponseTap`` is an ASGI wrapper that hands every complete answer to a callback, so the
test suite can check every answer the mock sends (see ``tests/conftest.py``).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import yaml
from jsonschema.exceptions import ValidationError
from openapi_schema_validator import OAS30Validator

SPEC_PATH = Path(__file__).parent / "openapi" / "e2b-openapi.yml"
# Routes the SDK calls that the spec lacks, checked as the v1 operation they stand for.
SDK_ONLY_ROUTES = {
    ("post", "/v2/sandboxes"): "/sandboxes",
    ("post", "/v2/sandboxes/{sandboxID}/connect"): "/sandboxes/{sandboxID}/connect",
}
# Marker the mock puts on injected faults (see harness/mocks/e2b/app.py).
FAULT_HEADER = "x-mock-fault"
NOT_E2B_PREFIXES = ("/_mock/", "/tdata/", "/tdata")


@dataclass(frozen=True)
class Answer:
    method: str
    path: str
    status: int
    headers: Mapping[str, str]
    body: bytes

    def describe(self) -> str:
        return f"{self.method} {self.path} -> {self.status}"


class SpecChecker:
    def __init__(self, spec_path: Path = SPEC_PATH) -> None:
        self.spec: dict[str, Any] = yaml.safe_load(spec_path.read_text())
        self._validators: dict[str, OAS30Validator] = {}
        self._paths = [
            (template, re.compile("^" + re.sub(r"\{[^/}]+\}", "[^/]+", template) + "$"))
            for template in self.spec["paths"]
        ]

    def operation(self, method: str, path: str) -> tuple[str, dict[str, Any]] | None:
        method = method.lower()
        for template, pattern in self._paths:
            if pattern.match(path):
                item = self.spec["paths"][template]
                if method in item:
                    return template, item[method]
        for (sdk_method, sdk_template), v1_template in SDK_ONLY_ROUTES.items():
            sdk_pattern = "^" + re.sub(r"\{[^/}]+\}", "[^/]+", sdk_template) + "$"
            if method == sdk_method and re.match(sdk_pattern, path):
                return v1_template, self.spec["paths"][v1_template][method]
        return None

    def _resolve(self, node: dict[str, Any]) -> dict[str, Any]:
        while "$ref" in node:
            pointer = node["$ref"].removeprefix("#/").split("/")
            target: Any = self.spec
            for part in pointer:
                target = target[part]
            node = target
        return node

    def _validator(self, schema: dict[str, Any]) -> OAS30Validator:
        # Rooted beside the spec's components, so "#/components/..." references resolve;
        # built once per schema (the suite checks thousands of answers).
        key = json.dumps(schema, sort_keys=True)
        validator = self._validators.get(key)
        if validator is None:
            rooted = {"allOf": [schema], "components": self.spec["components"]}
            validator = OAS30Validator(rooted, format_checker=OAS30Validator.FORMAT_CHECKER)
            self._validators[key] = validator
        return validator

    def response_spec(self, operation: dict[str, Any], status: int) -> dict[str, Any] | None:
        documented = operation.get("responses", {})
        if str(status) in documented:
            return self._resolve(documented[str(status)])
        if status >= 400 and str(status) in self.spec["components"]["responses"]:
            return self._resolve(self.spec["components"]["responses"][str(status)])
        return None

    def check(self, answer: Answer) -> list[str]:
        found = self.operation(answer.method, answer.path)
        if found is None:
            if answer.status == 404 or answer.status == 405:
                # An unserved route: it must still answer E2B's Error body.
                return self._check_body(answer, {"$ref": "#/components/schemas/Error"})
            return [f"{answer.describe()}: no such operation in the spec"]
        _, operation = found
        response = self.response_spec(operation, answer.status)
        if response is None:
            return [f"{answer.describe()}: status not documented for this operation"]
        problems: list[str] = []
        content = response.get("content", {})
        if "application/json" in content:
            problems += self._check_body(answer, content["application/json"]["schema"])
        elif answer.body:
            problems.append(f"{answer.describe()}: a bodiless response carried {answer.body!r}")
        for name, header in response.get("headers", {}).items():
            value = answer.headers.get(name.lower())
            if value is None:
                continue
            schema = self._resolve(header).get("schema", {})
            if schema.get("type") == "integer" and re.fullmatch(r"-?\d+", value) is None:
                problems.append(f"{answer.describe()}: header {name}={value!r} is no integer")
        return problems

    def _check_body(self, answer: Answer, schema: dict[str, Any]) -> list[str]:
        media = answer.headers.get("content-type", "")
        if not media.startswith("application/json"):
            return [f"{answer.describe()}: content-type {media!r}, not application/json"]
        try:
            document = json.loads(answer.body)
        except ValueError as exc:
            return [f"{answer.describe()}: body is not JSON ({exc}): {answer.body[:200]!r}"]
        errors: list[ValidationError] = list(self._validator(schema).iter_errors(document))
        return [
            f"{answer.describe()}: {'/'.join(map(str, e.absolute_path)) or '<body>'}: {e.message}"
            for e in errors
        ]


@cache
def checker() -> SpecChecker:
    return SpecChecker()


def is_e2b_route(path: str) -> bool:
    return not path.startswith(NOT_E2B_PREFIXES)


def check_answer(answer: Answer) -> list[str]:
    """What the suite-wide hook checks: E2B routes only; an injected fault only when it is a
    status fault (its Error body must still conform); garbled bodies are the point of theirs."""
    if not is_e2b_route(answer.path):
        return []
    fault = answer.headers.get(FAULT_HEADER)
    if fault is not None:
        if fault != "status":
            return []
        return checker()._check_body(answer, {"$ref": "#/components/schemas/Error"})
    return checker().check(answer)


Receiver = Callable[[Answer], None]


class ResponseTap:
    """ASGI wrapper: passes every complete HTTP answer to ``receive_answer``."""

    def __init__(self, app: Any, receive_answer: Receiver) -> None:
        self.app = app
        self.receive_answer = receive_answer

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started: dict[str, Any] = {}
        chunks: list[bytes] = []

        async def tapped(message: Any) -> None:
            if message["type"] == "http.response.start":
                started["status"] = message["status"]
                started["headers"] = {
                    k.decode("latin-1").lower(): v.decode("latin-1")
                    for k, v in message.get("headers", [])
                }
            elif message["type"] == "http.response.body":
                chunks.append(message.get("body", b""))
                if not message.get("more_body", False) and "status" in started:
                    self.receive_answer(
                        Answer(
                            scope["method"],
                            scope["path"],
                            started["status"],
                            started["headers"],
                            b"".join(chunks),
                        )
                    )
            await send(message)

        await self.app(scope, receive, tapped)
