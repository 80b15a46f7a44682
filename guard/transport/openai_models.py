"""OpenAI wire shapes the guard itself produces or validates.

Request models accept unknown fields (``extra="allow"``): the guard forwards what it does not
use untouched, so vLLM's extra sampling fields keep working. They are validated only for the
fields the guard relies on.
"""

from __future__ import annotations

import contextlib
import json
import re
import time
from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from guard.errors import InvalidRequest, UpstreamRejected

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
    status.
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


# What an upstream error message may not carry to a client: vLLM puts str(exception) there,
# which has leaked heap addresses (a Pillow error, GHSA-...) and can hold paths or tracebacks.
_TRACEBACK = re.compile(r"Traceback \(most recent call last\)|File \"[^\"]+\", line \d+")
_ADDRESS = re.compile(r"0x[0-9a-fA-F]{6,}|\b(?:\d{1,3}\.){3}\d{1,3}(?::\d{1,5})?\b")
_EXCEPTION = re.compile(r"\b[A-Z]\w*(?:Error|Exception):\s*")  # "ValueError: " prefixes
_PATH = re.compile(r"(?<![\w:/.])(?:/[\w.@+-]+){2,}/?")


def rejected_by_upstream(status: int, content: bytes, retry_after: str | None) -> UpstreamRejected:
    """An upstream 4xx in the guard's own error shape: message scrubbed, code a string."""
    error: Any = None
    with contextlib.suppress(ValueError, AttributeError):  # not JSON, or not an object
        error = json.loads(content).get("error")
    error = error if isinstance(error, dict) else {}
    message = error.get("message")
    if not isinstance(message, str) or not message or _TRACEBACK.search(message):
        message = f"the upstream model server rejected the request (status {status})"
    message = _PATH.sub("<path>", _ADDRESS.sub("<address>", _EXCEPTION.sub("", message)))
    message = message[:2000]
    param, code = error.get("param"), error.get("code")
    return UpstreamRejected(
        message,
        status=status if 400 <= status < 500 else 400,
        param=param if isinstance(param, str) else None,
        code=str(code) if isinstance(code, str | int) and not isinstance(code, bool) else None,
        retry_after=int(retry_after) if retry_after and retry_after.isdigit() else None,
    )
