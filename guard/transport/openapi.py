"""What the guard's own OpenAPI schema (``/openapi.json``) says of its routes.

The model routes read and validate their bodies themselves (size limit first, then JSON, then
the fields the guard relies on), so FastAPI cannot infer their request bodies or their error
answers: they are declared here, from the same pydantic models, so that clients and fuzzers
(tests/test_fuzz_api.py) see the real contract.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from guard.errors import (
    GuardUnavailable,
    InvalidRequest,
    Overloaded,
    PayloadTooLarge,
    RequestTimeout,
    Unauthenticated,
    UpstreamTimeout,
    UpstreamUnavailable,
)


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorBody(BaseModel):
    """Every error the guard answers: OpenAI's shape."""

    error: ErrorDetail


def _error(description: str) -> dict[str, Any]:
    return {"model": ErrorBody, "description": description}


# 431 (headers too large) is answered before routing, by the server: not part of any route.
UPSTREAM_ERRORS: dict[int | str, dict[str, Any]] = {
    UpstreamUnavailable.status: _error("the upstream failed"),
    # GuardUnavailable and NotAdmitted share the 503.
    GuardUnavailable.status: _error(
        "a stage failed (fail mode closed), no slot was free, or no room for the images"
    ),
    UpstreamTimeout.status: _error("the upstream timed out"),
}
MODEL_ERRORS: dict[int | str, dict[str, Any]] = {
    InvalidRequest.status: _error("bad request, or blocked by the content policy"),
    Unauthenticated.status: _error("missing or wrong API key"),
    404: _error("the upstream does not serve this model"),
    PayloadTooLarge.status: _error("body or image too large"),
    RequestTimeout.status: _error("the body was not received within server.body_timeout_s"),
    Overloaded.status: _error("the guard's queue is full; retry after Retry-After"),
    **UPSTREAM_ERRORS,
}
LIST_ERRORS = {Unauthenticated.status: _error("missing or wrong API key"), **UPSTREAM_ERRORS}

ANSWER: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "the upstream's answer, relayed (a JSON object, or an event stream)",
        "content": {
            "application/json": {"schema": {"type": "object"}},
            "text/event-stream": {"schema": {"type": "string"}},
        },
    }
}


METRICS: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "Prometheus text exposition",
        "content": {"text/plain": {"schema": {"type": "string"}}},
    }
}


def request_body(model: type[BaseModel]) -> dict[str, Any]:
    """``openapi_extra`` declaring ``model`` as the JSON request body (its $defs inlined)."""
    schema = model.model_json_schema()
    defs = schema.pop("$defs", {})

    def inline(node: Any) -> Any:
        if isinstance(node, dict):
            ref = node.get("$ref")
            if isinstance(ref, str) and ref.startswith("#/$defs/"):
                return inline(defs[ref.removeprefix("#/$defs/")])
            return {k: inline(v) for k, v in node.items()}
        if isinstance(node, list):
            return [inline(v) for v in node]
        return node

    content = {"application/json": {"schema": inline(schema)}}
    return {"requestBody": {"required": True, "content": content}}
