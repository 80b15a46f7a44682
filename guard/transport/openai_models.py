"""OpenAI wire shapes the guard itself produces or validates.

Request models accept unknown fields (``extra="allow"``): the guard forwards what it does not
use untouched, so vLLM's extra sampling fields keep working. They are validated only for the
fields the guard relies on.
"""

from __future__ import annotations

import json
import time
from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from guard.errors import InvalidRequest

M = TypeVar("M", bound=BaseModel)


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: str
    content: str | list[dict[str, Any]] | None = None


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow")
    include_usage: bool | None = None


class ChatCompletionRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: str
    messages: list[ChatMessage] = Field(min_length=1)
    stream: bool | None = False
    stream_options: StreamOptions | None = None


class CompletionRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: str
    prompt: str | list[str]
    stream: bool | None = False
    stream_options: StreamOptions | None = None


def validate(model: type[M], body: dict[str, Any]) -> M:
    """Validate ``body``; the client learns which field is wrong, not pydantic's internals."""
    try:
        return model.model_validate(body)
    except ValidationError as e:
        first = e.errors()[0]
        param = ".".join(str(p) for p in first["loc"]) or None
        raise InvalidRequest(f"invalid value for '{param}': {first['msg']}", param=param) from None


def _ids(request_id: str) -> tuple[str, int]:
    return f"chatcmpl-guard-{request_id}", int(time.time())


def chat_refusal(model: str, request_id: str, message: str) -> dict[str, Any]:
    rid, created = _ids(request_id)
    return {
        "id": rid,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": message},
                "logprobs": None,
                "finish_reason": "content_filter",
            }
        ],
        "usage": {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0},
    }


def chat_refusal_events(
    model: str, request_id: str, message: str, *, include_usage: bool
) -> list[dict[str, Any]]:
    """The chunks of a streamed refusal, in the order vLLM would send them."""
    rid, created = _ids(request_id)

    def chunk(delta: dict[str, Any], finish: str | None) -> dict[str, Any]:
        return {
            "id": rid,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
        }

    events = [
        chunk({"role": "assistant", "content": ""}, None),
        chunk({"content": message}, None),
        chunk({}, "content_filter"),
    ]
    if include_usage:
        events.append(
            {
                "id": rid,
                "object": "chat.completion.chunk",
                "created": created,
                "model": model,
                "choices": [],
                "usage": {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0},
            }
        )
    return events


def completion_refusal(model: str, request_id: str, message: str) -> dict[str, Any]:
    rid, created = _ids(request_id)
    return {
        "id": rid.replace("chatcmpl", "cmpl"),
        "object": "text_completion",
        "created": created,
        "model": model,
        "choices": [
            {"index": 0, "text": message, "logprobs": None, "finish_reason": "content_filter"}
        ],
        "usage": {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0},
    }


def is_error_event(payload: str) -> bool:
    """Whether an event-stream ``data`` payload is an error event rather than a chunk.

    vLLM ends a failed stream with one (its message is the exception's text), then ``[DONE]``.
    The transports replace it with their own error: HTTP with ``stream_error``, gRPC with a
    status (``transport/grpc.py`` has its own copy of this check and could import this one).
    """
    if '"error"' not in payload:
        return False
    try:
        event = json.loads(payload)
    except ValueError:
        return False
    # OpenAI nests {"error": {...}}; older vLLM sends {"object": "error", "message": ...}.
    return isinstance(event, dict) and ("error" in event or event.get("object") == "error")


def stream_error(message: str) -> dict[str, Any]:
    """The guard's own error event for a stream that cannot end well (no ``[DONE]`` after it)."""
    return {
        "error": {
            "message": message,
            "type": "upstream_error",
            "param": None,
            "code": "upstream_stream_error",
        }
    }


def sse(event: dict[str, Any] | str) -> bytes:
    data = event if isinstance(event, str) else json.dumps(event, separators=(",", ":"))
    return f"data: {data}\n\n".encode()
