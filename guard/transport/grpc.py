"""gRPC transport: ``guard.v1.Guard`` translated to and from the GuardService.

Like ``http.py`` it only translates: the service decides, ``grpc_errors.GuardInterceptor`` maps
every error to a status in one place. Health (``grpc.health.v1``) and reflection are served
beside it, without a key and without admission control; every Guard method takes an admission
slot (``guard/admission.py``) for its whole run, a Chat stream until it ends or is cancelled.
"""

from __future__ import annotations

import asyncio
import functools
import io
import json
import logging
import math
import numbers
import weakref
from collections.abc import AsyncGenerator, Awaitable, Callable, Mapping, Sequence
from contextlib import aclosing
from typing import Any, TypeVar

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from PIL import Image

from guard.admission import Admission
from guard.config import GuardConfig
from guard.errors import GuardUnavailable, InvalidRequest, UpstreamUnavailable
from guard.intake.loader import ImageSource
from guard.service import GuardService
from guard.sse import SSEError, SSEParser
from guard.transport import openai_models as om
from guard.transport.grpc_errors import GUARD_SERVICE, GuardInterceptor
from guard.transport.ids import request_id
from guard.types import Decision, ImageInput
from guard.upstream import UpstreamStream, UpstreamStreamError
from guard.v1 import guard_pb2 as pb
from guard.v1 import guard_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

# A block is Check's answer, not an error: nothing was going to be forwarded anyway.
_OUTCOMES = {
    "allow": pb.OUTCOME_ALLOW,
    "would_block": pb.OUTCOME_WOULD_BLOCK,
    "block": pb.OUTCOME_BLOCK,
}
_HEALTH_NAMES = ("", GUARD_SERVICE)
_SERVING = health_pb2.HealthCheckResponse.SERVING
_NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
_health: weakref.WeakKeyDictionary[Any, health.aio.HealthServicer] = weakref.WeakKeyDictionary()

_Servicer = TypeVar("_Servicer", bound="GuardServicer")


def create_server(
    cfg: GuardConfig, service: GuardService, admission: Admission | None = None
) -> tuple[grpc.aio.Server, int]:
    """A grpc.aio server (not yet started) with Guard, health and reflection, and its port.

    ``admission`` is shared with the HTTP app when both serve (``GuardServer``)."""
    size = cfg.server.grpc_max_message_bytes
    server = grpc.aio.server(
        interceptors=[GuardInterceptor(cfg.server.api_keys, service.track)],
        options=[
            ("grpc.max_receive_message_length", size),
            ("grpc.max_send_message_length", size),
            ("grpc.so_reuseport", 0),  # a port in use is an error, never silently shared
        ],
    )
    admission = admission if admission is not None else Admission(cfg.server)
    pb_grpc.add_GuardServicer_to_server(GuardServicer(cfg, service, admission), server)
    checker = _HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(checker, server)
    _health[server] = checker
    reflection.enable_server_reflection(
        (
            pb.DESCRIPTOR.services_by_name["Guard"].full_name,
            health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
            reflection.SERVICE_NAME,
        ),
        server,
    )
    host = f"[{cfg.server.host}]" if ":" in cfg.server.host else cfg.server.host
    address = f"{host}:{cfg.server.grpc_port}"
    port = int(server.add_insecure_port(address))
    if port == 0:
        raise OSError(f"cannot bind gRPC to {address}")
    return server, port


async def set_serving(server: grpc.aio.Server, serving: bool) -> None:
    """Flip the health status of "" and guard.v1.Guard (e.g. NOT_SERVING while draining)."""
    status = _SERVING if serving else _NOT_SERVING
    for name in _HEALTH_NAMES:
        await _health[server].set(name, status)


class _HealthServicer(health.aio.HealthServicer):  # type: ignore[misc]
    def __init__(self) -> None:
        super().__init__()
        # SERVING from the first call: ``set`` is a coroutine and create_server is not.
        for name in _HEALTH_NAMES:
            self._server_status[name] = _SERVING


def _admitted(
    method: Callable[[_Servicer, Any, Any], Awaitable[Any]],
) -> Callable[[_Servicer, Any, Any], Awaitable[Any]]:
    """Run a unary method inside an admission slot; a refusal raises before it starts."""

    @functools.wraps(method)
    async def unary(self: _Servicer, request: Any, context: Any) -> Any:
        async with self._admission.slot("grpc"):
            return await method(self, request, context)

    return unary


def _admitted_stream(
    method: Callable[[_Servicer, Any, Any], AsyncGenerator[Any, None]],
) -> Callable[[_Servicer, Any, Any], AsyncGenerator[Any, None]]:
    """The same for a streaming method: the slot is held until the stream ends or is closed."""

    @functools.wraps(method)
    async def stream(self: _Servicer, request: Any, context: Any) -> AsyncGenerator[Any, None]:
        async with (
            self._admission.slot("grpc"),
            aclosing(method(self, request, context)) as responses,
        ):
            async for response in responses:
                yield response

    return stream


class GuardServicer(pb_grpc.GuardServicer):  # type: ignore[misc]
    def __init__(self, cfg: GuardConfig, service: GuardService, admission: Admission) -> None:
        self._cfg = cfg
        self._service = service
        self._admission = admission

    @_admitted
    async def Check(self, request: Any, context: Any) -> Any:
        tracker = self._service.track("grpc")
        try:
            rid = request_id(request.request_id)
            sources = _sources(request.images)
            # The pixel budget covers the verdict's images until they are encoded here.
            async with self._service.intake.pixels.hold("grpc") as hold:
                verdict = await self._service.check(
                    rid, request.text, sources, transport="grpc", hold=hold
                )
                if verdict.outcome == "error":
                    raise GuardUnavailable("the guard could not check this request; try again")
                images = await asyncio.to_thread(
                    _checked, verdict.request.images, bool(request.return_images)
                )
            response = pb.CheckResponse(
                request_id=rid,
                outcome=_OUTCOMES[verdict.outcome],
                decisions=[_decision(d) for d in verdict.decisions],
                images=images,
            )
        except BaseException as e:
            tracker.fail(e)
            raise
        tracker.finish(verdict.outcome)
        return response

    @_admitted_stream
    async def Chat(self, request: Any, context: Any) -> AsyncGenerator[Any, None]:
        tracker = self._service.track("grpc")
        outcome: str | None = None  # set once the pipeline has decided
        try:
            rid = request_id(request.request_id)
            # Chunks carry no id field: the id a user can quote travels as metadata.
            await context.send_initial_metadata((("x-request-id", rid),))
            body = _json_object(request.json)
            parsed = om.validate(om.ChatCompletionRequest, body)
            upstream = self._service.upstream

            async def start(forward: dict[str, Any]) -> UpstreamStream:
                return await upstream.open("chat/completions", forward, request_id=rid)

            screened = await self._service.screen_chat(rid, body, transport="grpc", start=start)
            outcome = "block" if screened.refuse else screened.outcome
            decision = screened.decision
            if screened.refuse:
                message = self._cfg.server.refusal_message
                if parsed.stream:
                    usage = bool(parsed.stream_options and parsed.stream_options.include_usage)
                    events = om.chat_refusal_events(parsed.model, rid, message, include_usage=usage)
                else:
                    events = [om.chat_refusal(parsed.model, rid, message)]
                for i, event in enumerate(events):
                    text = json.dumps(event, separators=(",", ":"))
                    yield pb.ChatChunk(json=text, decision="" if i else decision)
            else:
                # Parallel gating: the call started during the checks; otherwise start it now.
                early = screened.early
                opened = await (early if early is not None else start(screened.body))
                if parsed.stream:
                    async with aclosing(_stream(opened, rid)) as payloads:
                        async for i, payload in payloads:
                            yield pb.ChatChunk(json=payload, decision="" if i else decision)
                else:
                    content = await opened.read()
                    if opened.status >= 400:
                        retry_after = opened.headers.get("retry-after")
                        raise om.rejected_by_upstream(opened.status, content, retry_after)
                    text = content.decode("utf-8", errors="replace")
                    yield pb.ChatChunk(json=text, decision=decision)
        except BaseException as e:
            # A client that leaves after the verdict counts as that verdict, as over HTTP.
            if outcome is None or not isinstance(e, GeneratorExit | asyncio.CancelledError):
                tracker.fail(e)
            raise
        finally:
            tracker.finish(outcome or "error")

    @_admitted
    async def Purify(self, request: Any, context: Any) -> Any:
        tracker = self._service.track("grpc")
        try:
            rid = request_id(request.request_id)
            sources = _sources(request.images)
            async with self._service.intake.pixels.hold("grpc") as hold:
                decision = await self._service.purify(rid, sources, hold=hold)
                traces = decision.details.get("images")
                purified = await asyncio.to_thread(
                    _purified, decision.images or (), traces if isinstance(traces, list) else []
                )
            response = pb.PurifyResponse(request_id=rid, images=purified)
        except BaseException as e:
            tracker.fail(e)
            raise
        tracker.finish("allow")
        return response


async def _stream(opened: UpstreamStream, rid: str) -> AsyncGenerator[tuple[int, str], None]:
    """(index, payload) per upstream SSE event up to ``[DONE]``; a cut stream raises."""
    if opened.status != 200:
        content = await opened.read()
        raise om.rejected_by_upstream(opened.status, content, opened.headers.get("retry-after"))
    parser = SSEParser()
    count = 0
    try:
        async for chunk in opened.chunks():
            for payload in parser.feed(chunk):
                if payload == "[DONE]":
                    return
                if om.is_error_event(payload):
                    log.warning("upstream sent an error event on request %s", rid)
                    raise UpstreamUnavailable("upstream stream interrupted")
                yield count, payload
                count += 1
        parser.close()
    except (UpstreamStreamError, SSEError):
        log.warning("upstream stream broke on request %s", rid)
        raise UpstreamUnavailable("upstream stream interrupted") from None
    finally:
        opened.close()  # at [DONE], on error, or when the client went away
    # No [DONE]: the client must learn that the answer may be incomplete.
    log.warning("upstream stream ended without [DONE] on request %s", rid)
    raise UpstreamUnavailable("upstream stream interrupted")


def _sources(images: Sequence[Any]) -> list[ImageSource]:
    for i, image in enumerate(images):
        if image.WhichOneof("source") is None:
            raise InvalidRequest(f"image {i}: no data and no url", param=f"images[{i}]")
    return [
        ImageSource(data=im.data) if im.WhichOneof("source") == "data" else ImageSource(url=im.url)
        for im in images
    ]


def _json_object(text: str) -> dict[str, Any]:
    try:
        body = json.loads(text)
    except ValueError:
        raise InvalidRequest("request json is not valid JSON", param="json") from None
    if not isinstance(body, dict):
        raise InvalidRequest("request json must be a JSON object", param="json")
    return body


def _decision(d: Decision) -> Any:
    out = pb.StageDecision(
        stage=d.stage, action=d.action, reason=d.reason, category=d.category or ""
    )
    if d.score is not None:
        out.score = float(d.score)
    out.details.update(_json_safe(dict(d.details)))
    return out


def _json_safe(value: Any) -> Any:
    """What a protobuf Struct can hold (numbers are doubles); anything else as a string."""
    if value is None or isinstance(value, bool | str):
        return value
    if isinstance(value, numbers.Integral):  # numpy integers too
        return int(value) if abs(int(value)) <= 2**53 else str(value)
    if isinstance(value, numbers.Real):
        return float(value) if math.isfinite(value) else str(value)
    if isinstance(value, Mapping):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    if callable(getattr(value, "tolist", None)):  # numpy arrays, torch tensors
        return _json_safe(value.tolist())
    return str(value)


def _png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def _checked(images: Sequence[ImageInput], with_png: bool) -> list[Any]:
    return [
        pb.CheckedImage(
            index=im.index,
            digest=im.digest,
            width=im.image.width,
            height=im.image.height,
            png=_png(im.image) if with_png else b"",
        )
        for im in images
    ]


def _purified(images: Sequence[ImageInput], traces: list[Any]) -> list[Any]:
    out = []
    for i, im in enumerate(images):
        item = pb.PurifiedImage(index=im.index, digest=im.digest, png=_png(im.image))
        trace = traces[i] if i < len(traces) and isinstance(traces[i], Mapping) else {}
        steps, similarity = trace.get("steps"), trace.get("similarity")
        if isinstance(steps, int) and not isinstance(steps, bool):
            item.steps = steps
        if isinstance(similarity, list | tuple):
            item.similarity.extend(float(s) for s in similarity if isinstance(s, numbers.Real))
        out.append(item)
    return out
