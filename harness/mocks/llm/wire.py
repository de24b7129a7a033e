"""Anthropic's Messages API on the wire: the request the mock accepts, the message it
answers, its error bodies, and the input-token estimate it charges."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from starlette.responses import JSONResponse

from harness.mocks.llm.config import CHARS_PER_TOKEN

# Top-level fields of a Messages request the mock understands; like the real API, it
# refuses others ("Extra inputs are not permitted") so that a client's typo is seen.
KNOWN_FIELDS = frozenset(
    {
        "model",
        "max_tokens",
        "messages",
        "system",
        "stream",
        "metadata",
        "stop_sequences",
        "temperature",
        "top_p",
        "top_k",
        "tools",
        "tool_choice",
        "thinking",
        "service_tier",
    }
)
ROLES = ("user", "assistant")


class BadRequest(ValueError):
    """A malformed Messages request: answered with 400 ``invalid_request_error``."""


@dataclass(frozen=True)
class MessagesRequest:
    model: str
    max_tokens: int
    input_tokens: int


def parse_messages_request(body: Any) -> MessagesRequest:
    """Checks a Messages request body and estimates its input tokens (BadRequest if bad)."""
    if not isinstance(body, Mapping):
        raise BadRequest("the request body must be a JSON object")
    extra = sorted(set(body) - KNOWN_FIELDS)
    if extra:
        raise BadRequest(f"{extra[0]}: Extra inputs are not permitted")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise BadRequest("model: Field required (a non-empty string)")
    max_tokens = body.get("max_tokens")
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise BadRequest("max_tokens: Field required (an integer >= 1)")
    if body.get("stream", False) is not False:
        if not isinstance(body.get("stream"), bool):
            raise BadRequest("stream: Input should be a valid boolean")
        raise BadRequest("stream: the mock LLM API does not stream; send stream=false")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise BadRequest("messages: Field required (a non-empty list)")
    chars = 0
    for index, message in enumerate(messages):
        where = f"messages.{index}"
        if not isinstance(message, Mapping):
            raise BadRequest(f"{where}: Input should be an object")
        if message.get("role") not in ROLES:
            raise BadRequest(f"{where}.role: Input should be 'user' or 'assistant'")
        chars += _content_chars(message.get("content"), f"{where}.content")
    if "system" in body:
        chars += _content_chars(body["system"], "system", text_only=True)
    stop = body.get("stop_sequences", [])
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
        raise BadRequest("stop_sequences: Input should be a list of strings")
    if "tools" in body:
        if not isinstance(body["tools"], list):
            raise BadRequest("tools: Input should be a list")
        chars += len(json.dumps(body["tools"]))  # tool definitions are input too
    return MessagesRequest(model, max_tokens, estimate_tokens(chars))


def estimate_tokens(chars: int) -> int:
    """Input tokens of ``chars`` characters of request text: one per ``CHARS_PER_TOKEN``,
    rounded up, at least one."""
    return max(1, math.ceil(chars / CHARS_PER_TOKEN))


def _content_chars(content: Any, where: str, text_only: bool = False) -> int:
    """Characters of a message's (or the system prompt's) content: text blocks by their
    text, other blocks (images, tool use and results) by the length of their JSON."""
    if isinstance(content, str):
        return len(content)
    if not isinstance(content, list):
        raise BadRequest(f"{where}: Input should be a string or a list of content blocks")
    chars = 0
    for index, block in enumerate(content):
        if not isinstance(block, Mapping) or not isinstance(block.get("type"), str):
            raise BadRequest(f"{where}.{index}: a content block needs a string 'type'")
        if block["type"] == "text":
            if not isinstance(block.get("text"), str):
                raise BadRequest(f"{where}.{index}.text: Field required (a string)")
            chars += len(block["text"])
        elif text_only:
            raise BadRequest(f"{where}.{index}.type: Input should be 'text'")
        else:
            chars += len(json.dumps(block))
    return chars


def message_body(
    message_id: str, model: str, input_tokens: int, output_tokens: int, stop_reason: str
) -> dict[str, Any]:
    """A Messages API answer with ``output_tokens`` tokens of text (one word each)."""
    return {
        "id": message_id,
        "type": "message",
        "role": "assistant",
        "content": [{"type": "text", "text": " ".join(["mock"] * output_tokens)}],
        "model": model,
        "stop_reason": stop_reason,
        "stop_sequence": None,
        "usage": {"input_tokens": input_tokens, "output_tokens": output_tokens},
    }


def error_body(error_type: str, message: str) -> dict[str, Any]:
    return {"type": "error", "error": {"type": error_type, "message": message}}


def error_response(
    status: int, error_type: str, message: str, headers: Mapping[str, str] | None = None
) -> JSONResponse:
    return JSONResponse(error_body(error_type, message), status, headers=dict(headers or {}))


def rfc3339(moment: datetime) -> str:
    """``2025-08-21T12:40:59Z``: the form of Anthropic's ``-reset`` headers (whole seconds,
    UTC)."""
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")
