"""HTTP transport: the OpenAI-compatible routes, translated to and from the GuardService.

Only the routes below exist; nothing else is ever forwarded upstream. Errors of every kind
become OpenAI-shaped bodies in one place, ``error_response``. The model routes pass admission
control (``guard/admission.py``) before their bodies are read; health, readiness and metrics
never wait for it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Receive, Scope, Send

from guard.admission import Admission
from guard.auth import check_bearer
from guard.config import GuardConfig
from guard.errors import (
    GuardError,
    GuardUnavailable,
    InvalidRequest,
    NotFound,
    PayloadTooLarge,
    PolicyViolation,
    RequestTimeout,
)
from guard.service import GuardService, Screened, Tracker
from guard.sse import SSEParser
from guard.transport import openai_models as om
from guard.transport.middleware import (
    AdmissionMiddleware,
    CancelOnDisconnect,
    RequestIdMiddleware,
)
from guard.transport.openapi import ANSWER, LIST_ERRORS, METRICS, MODEL_ERRORS, request_body
from guard.upstream import UpstreamStream, UpstreamStreamError

log = logging.getLogger(__name__)

SSE_TYPE = "text/event-stream; charset=utf-8"


def create_app(
    cfg: GuardConfig, service: GuardService, admission: Admission | None = None
) -> ASGIApp:
    """The HTTP app; ``admission`` is shared with gRPC when both serve (``GuardServer``)."""
    app = FastAPI(title="vlm-guard", version="0.1.0", docs_url=None, redoc_url=None)
    app.add_middleware(CancelOnDisconnect)  # inside admission: the slot outlives the cancel
    app.add_middleware(
        AdmissionMiddleware,
        admission=admission if admission is not None else Admission(cfg.server),
        api_keys=cfg.server.api_keys,
        refuse=error_response,
    )
    limit, body_timeout = cfg.server.max_body_bytes, cfg.server.body_timeout_s

    @app.exception_handler(GuardError)
    async def _guard_error(request: Request, exc: GuardError) -> Response:
        return error_response(exc)

    @app.exception_handler(HTTPException)
    async def _http_error(request: Request, exc: HTTPException) -> Response:
        if exc.status_code == 404:
            return error_response(NotFound("no such route"))
        err = GuardError("method not allowed" if exc.status_code == 405 else "bad request")
        err.status, err.type, err.code = exc.status_code, "invalid_request_error", None
        response = error_response(err)
        response.headers.update(exc.headers or {})  # a 405's Allow (RFC 9110)
        return response

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> Response:
        # Starlette hands this to its outermost error middleware, which logs the traceback;
        # the client only ever sees a generic message.
        return error_response(GuardError())

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz", responses={503: {"description": "not ready (draining, or no upstream)"}})
    async def readyz() -> Response:
        if await service.ready():
            return JSONResponse({"status": "ready"})
        return JSONResponse({"status": "not ready"}, status_code=503)

    @app.get("/metrics", responses=METRICS)
    async def metrics() -> Response:
        return Response(generate_latest(service.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models", responses=LIST_ERRORS)
    async def models(request: Request) -> Response:
        check_bearer(request.headers.get("authorization"), cfg.server.api_keys)
        upstream = await service.upstream.get("models", request_id=_rid(request))
        return Response(upstream.content, upstream.status, headers=dict(upstream.headers))

    @app.post(
        "/v1/chat/completions",
        openapi_extra=request_body(om.ChatCompletionRequest),
        responses={**ANSWER, **MODEL_ERRORS},
    )
    async def chat_completions(request: Request) -> Response:
        tracker = service.track("http")
        try:
            check_bearer(request.headers.get("authorization"), cfg.server.api_keys)
            body = await read_json(request, limit, body_timeout)
            parsed = om.validate(om.ChatCompletionRequest, body)
            rid = _rid(request)

            async def start(forward: dict[str, Any]) -> UpstreamStream:
                return await service.upstream.open("chat/completions", forward, request_id=rid)

            screened = await service.screen_chat(rid, body, transport="http", start=start)
            if screened.refuse:
                tracker.finish("block")
                message = cfg.server.refusal_message
                if parsed.stream:
                    usage = bool(parsed.stream_options and parsed.stream_options.include_usage)
                    events = om.chat_refusal_events(parsed.model, rid, message, include_usage=usage)
                    return _sse_response([*events, "[DONE]"], screened)
                return _json(om.chat_refusal(parsed.model, rid, message), screened)
            return await _forward(
                service, "chat/completions", screened, rid, tracker, stream=bool(parsed.stream)
            )
        except BaseException as e:
            tracker.fail(e)
            raise

    @app.post(
        "/v1/completions",
        openapi_extra=request_body(om.CompletionRequest),
        responses={**ANSWER, **MODEL_ERRORS},
    )
    async def completions(request: Request) -> Response:
        tracker = service.track("http")
        try:
            check_bearer(request.headers.get("authorization"), cfg.server.api_keys)
            body = await read_json(request, limit, body_timeout)
            parsed = om.validate(om.CompletionRequest, body)
            rid = _rid(request)
            screened = await service.screen_completion(rid, body, transport="http")
            if screened.refuse:
                tracker.finish("block")
                refusal = om.completion_refusal(parsed.model, rid, cfg.server.refusal_message)
                if parsed.stream:
                    return _sse_response([refusal, "[DONE]"], screened)
                return _json(refusal, screened)
            return await _forward(
                service, "completions", screened, rid, tracker, stream=bool(parsed.stream)
            )
        except BaseException as e:
            tracker.fail(e)
            raise

    return RequestIdMiddleware(app)


async def _forward(
    service: GuardService,
    path: str,
    screened: Screened,
    rid: str,
    tracker: Tracker,
    *,
    stream: bool,
) -> Response:
    outcome = screened.outcome
    headers = {"x-guard-decision": screened.decision}
    if screened.early is not None:  # parallel gating: the call started during the checks
        opened: UpstreamStream = await screened.early
    else:
        opened = await service.upstream.open(path, screened.body, request_id=rid)
    if opened.status >= 400:
        # An upstream 4xx (unknown model, prompt too long) is the client's to read, in the
        # guard's shape and scrubbed (upstream 5xx never get here: UpstreamClient raises).
        content = await opened.read()
        tracker.finish("invalid")
        error = om.rejected_by_upstream(opened.status, content, opened.headers.get("retry-after"))
        response = error_response(error)
        response.headers.update(headers)
        return response
    if not stream:
        content = await opened.read()
        tracker.finish(outcome)
        return Response(content, opened.status, headers={**opened.headers, **headers})
    return _ClosingStream(
        _relay(opened.chunks(), tracker, outcome, rid),
        status_code=200,
        headers={**opened.headers, **headers},
        media_type=opened.headers.get("content-type", SSE_TYPE),
    )


async def _relay(
    chunks: AsyncIterator[bytes], tracker: Tracker, outcome: str, rid: str
) -> AsyncIterator[bytes]:
    """Pass the upstream's events through unchanged, up to an error event of the upstream's
    own (vLLM writes the exception's text into it): that one becomes the guard's error event,
    and the stream ends there. A broken stream ends the same way. Never a fake ``[DONE]``: the
    client must see that the answer is incomplete."""
    try:
        async for chunk in chunks:
            # ``chunks`` yields whole events, so an error event never straddles two chunks.
            cut = _error_event_at(chunk) if b"error" in chunk else None
            if cut is not None:
                log.warning("upstream sent an error event on request %s", rid)
                tracker.finish("upstream_error")
                if cut:
                    yield chunk[:cut]  # the events before it are part of the answer
                yield om.sse(om.stream_error("the upstream model server failed mid-stream"))
                return
            yield chunk
    except UpstreamStreamError:
        log.warning("upstream stream broke on request %s", rid)
        tracker.finish("upstream_error")
        yield om.sse(om.stream_error("upstream stream interrupted"))
    finally:
        tracker.finish(outcome)
        close = getattr(chunks, "aclose", None)
        if close is not None:  # the client left: the upstream response closes now (vLLM aborts)
            await close()


_EOL = re.compile(rb"\r\n|\r|\n")


def _error_event_at(data: bytes) -> int | None:
    """Where the first error event in ``data`` (whole events) starts; None if there is none."""
    start = line = 0
    for eol in _EOL.finditer(data):
        if eol.start() == line:  # a blank line: the event since ``start`` is complete
            event = data[start : eol.end()]
            if any(om.is_error_event(p) for p in SSEParser().feed(event)):
                return start
            start = eol.end()
        line = eol.end()
    return None


async def read_json(request: Request, limit: int, timeout_s: float) -> dict[str, Any]:
    """Read the body within ``limit`` bytes and ``timeout_s`` seconds and parse it as a JSON
    object. The deadline covers the whole body, not each read: the request already holds an
    admission slot, and a client trickling a byte at a time must not keep it for long."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"request body exceeds {limit} bytes")
    size = 0
    chunks: list[bytes] = []
    try:
        async with asyncio.timeout(timeout_s):
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise PayloadTooLarge(f"request body exceeds {limit} bytes")
                chunks.append(chunk)
    except TimeoutError:
        raise RequestTimeout(f"request body not received within {timeout_s:g} s") from None
    try:
        body = json.loads(b"".join(chunks))
    except (ValueError, UnicodeDecodeError):
        raise InvalidRequest("request body is not valid JSON") from None
    if not isinstance(body, dict):
        raise InvalidRequest("request body must be a JSON object")
    return body


def error_response(exc: GuardError) -> Response:
    headers = {"x-should-retry": "true" if exc.retryable else "false"}
    if exc.retry_after is not None:
        headers["retry-after"] = str(exc.retry_after)
    if isinstance(exc, PolicyViolation):
        headers["x-guard-decision"] = "block"
    elif isinstance(exc, GuardUnavailable):
        headers["x-guard-decision"] = "error"
    elif isinstance(exc, RequestTimeout):
        # The rest of the body may still arrive: the connection cannot carry another request
        # (uvicorn would keep it alive, discarding the late bytes), so it closes after the 408.
        headers["connection"] = "close"
    return JSONResponse(exc.body(), status_code=exc.status, headers=headers)


class _ClosingStream(StreamingResponse):
    """Closes its iterator however the response ends. Starlette abandons it when the client
    disconnects, and its ``finally`` (request count, upstream response) would wait for the
    garbage collector."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            close = getattr(self.body_iterator, "aclose", None)
            if close is not None:
                await close()


def _json(body: dict[str, Any], screened: Screened) -> Response:
    return JSONResponse(body, headers={"x-guard-decision": screened.decision})


def _sse_response(events: list[dict[str, Any] | str], screened: Screened) -> Response:
    payload = b"".join(om.sse(e) for e in events)
    return Response(payload, media_type=SSE_TYPE, headers={"x-guard-decision": screened.decision})


def _rid(request: Request) -> str:
    return str(request.scope["state"]["request_id"])
