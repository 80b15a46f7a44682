"""The gRPC API through a real guard (grpc.aio on loopback) with the generated stubs."""

from __future__ import annotations

import asyncio
import io
import json
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, cast

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from PIL import Image
from starlette.types import Receive, Scope, Send

from guard.config import ImagesConfig, StageConfig
from guard.intake.decode import decode_image, image_digest
from guard.toy.openai_server import EchoModel, create_app
from guard.transport.grpc import set_serving
from guard.types import Action, Decision, GuardRequest, ImageInput
from guard.v1 import guard_pb2 as pb
from guard.v1 import guard_pb2_grpc as pb_grpc
from tests.images import data_url, encode, gradient, image_message
from tests.servers import AppServer, RunningGuard

MakeGuard = Callable[..., RunningGuard]

IMAGE = gradient(64, 48)
PNG = encode(IMAGE)
DIGEST = image_digest(decode_image(PNG, 0, ImagesConfig(), param="x").image)
LEAKS = ("Traceback", "Error", "PIL", "/etc/passwd", "0xdeadbeef", "secret", ".py")


# Test-only stages implementing guard.types.Stage.
@dataclass
class Fixed:
    name: str
    action: Action = "allow"
    category: str | None = None
    may_rewrite: bool = False

    async def check(self, request: GuardRequest) -> Decision:
        details = {"k": [1, 2], "obj": object(), "nested": {"x": 1.5}}  # obj: not JSON
        return Decision(self.name, self.action, "fixed", self.category, 0.75, details=details)

    def ready(self) -> bool:
        return True


@dataclass
class Raises:
    name: str
    may_rewrite: bool = False

    async def check(self, request: GuardRequest) -> Decision:
        raise RuntimeError("secret internal detail /etc/passwd 0xdeadbeef")

    def ready(self) -> bool:
        return True


@dataclass
class Inverts:
    """A purify-like stage: every image comes back with inverted pixels."""

    name: str = "purify"
    may_rewrite: bool = True

    async def check(self, request: GuardRequest) -> Decision:
        out = []
        for im in request.images:
            inverted = Image.eval(im.image, lambda v: 255 - v)
            out.append(ImageInput(im.index, inverted, image_digest(inverted)))
        details = {"images": [{"steps": 7, "similarity": [0.9, 0.99]} for _ in out]}
        return Decision(self.name, "rewrite", images=tuple(out), details=details)

    def ready(self) -> bool:
        return True


INVERTED_DIGEST = image_digest(Image.eval(IMAGE, lambda v: 255 - v))


@asynccontextmanager
async def connect(guard: RunningGuard) -> AsyncIterator[pb_grpc.GuardStub]:
    async with grpc.aio.insecure_channel(guard.grpc_target) as channel:
        yield pb_grpc.GuardStub(channel)


async def rpc_error(awaitable: Any) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await awaitable
    return info.value


async def chunks(call: Any) -> list[Any]:
    return [c async for c in call]


def chat_body(stream: bool, **extra: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"model": "echo", "messages": image_message(data_url(PNG))}
    if stream:
        body.update(stream=True, stream_options={"include_usage": True})
    return {**body, **extra}


def chat(body: dict[str, Any], request_id: str = "") -> Any:
    return pb.ChatRequest(json=json.dumps(body), request_id=request_id)


async def post_direct(upstream: AppServer) -> httpx.Response:
    """Send the upstream exactly what the guard last sent it, straight over HTTP."""
    forwarded = cast(Any, upstream.app).state.received[-1]
    async with httpx.AsyncClient(timeout=10) as client:
        return await client.post(upstream.url + "/v1/chat/completions", json=forwarded)


def sse_payloads(raw: bytes) -> list[str]:
    lines = raw.decode().split("\n\n")
    return [e.removeprefix("data: ") for e in lines if e and e != "data: [DONE]"]


# --- health, reflection -------------------------------------------------------------------


async def test_health_and_reflection(guard: RunningGuard) -> None:
    async with grpc.aio.insecure_channel(guard.grpc_target) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for name in ("", "guard.v1.Guard"):
            reply = await health.Check(health_pb2.HealthCheckRequest(service=name))
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        reflect = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        replies = [r async for r in reflect.ServerReflectionInfo(iter([request]))]
        names = {s.name for s in replies[0].list_services_response.service}
        assert {"guard.v1.Guard", "grpc.health.v1.Health"} <= names
        # What shutdown will do: flip both names to NOT_SERVING (on the guard's own loop).
        server = guard.server._grpc
        assert server is not None
        guard._thread.call(lambda: set_serving(server, False))
        for name in ("", "guard.v1.Guard"):
            reply = await health.Check(health_pb2.HealthCheckRequest(service=name))
            assert reply.status == health_pb2.HealthCheckResponse.NOT_SERVING


# --- Check ---------------------------------------------------------------------------------


async def test_check_bytes_and_data_url(guard: RunningGuard) -> None:
    async with connect(guard) as stub:
        images = [pb.Image(data=PNG), pb.Image(url=data_url(PNG))]
        reply = await stub.Check(pb.CheckRequest(text="hi", images=images, request_id="r-1"))
        assert reply.request_id == "r-1"
        assert reply.outcome == pb.OUTCOME_ALLOW
        assert [(i.index, i.digest, i.width, i.height) for i in reply.images] == [
            (0, DIGEST, 64, 48),
            (1, DIGEST, 64, 48),
        ]
        assert all(i.png == b"" for i in reply.images)
        reply = await stub.Check(
            pb.CheckRequest(images=[pb.Image(data=PNG)], return_images=True, request_id="bad id")
        )
        assert reply.request_id != "bad id" and len(reply.request_id) == 32
        returned = Image.open(io.BytesIO(reply.images[0].png))
        assert returned.format == "PNG" and image_digest(returned.convert("RGB")) == DIGEST
    labels = {"transport": "grpc", "outcome": "allow"}
    assert guard.metric("vlm_guard_requests_total", labels) == 2


async def test_check_bad_input(make_guard: MakeGuard) -> None:
    guard = make_guard({"server": {"grpc_max_message_bytes": 200_000}})
    async with connect(guard) as stub:
        err = await rpc_error(stub.Check(pb.CheckRequest(images=[pb.Image(data=b"not a png")])))
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "image 0" in err.details() and not any(s in err.details() for s in LEAKS)
        err = await rpc_error(stub.Check(pb.CheckRequest(images=[pb.Image()])))
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
        err = await rpc_error(stub.Check(pb.CheckRequest(images=[pb.Image(data=PNG)] * 9)))
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "too many images" in err.details()
        big = pb.CheckRequest(images=[pb.Image(data=b"\0" * 300_000)])
        err = await rpc_error(stub.Check(big))
        assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    labels = {"transport": "grpc", "outcome": "invalid"}
    assert guard.metric("vlm_guard_requests_total", labels) == 3


async def test_unexpected_error_is_internal_without_details(guard: RunningGuard) -> None:
    async def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("secret internal detail /etc/passwd")

    guard.service.check = broken  # type: ignore[method-assign]
    async with connect(guard) as stub:
        err = await rpc_error(stub.Check(pb.CheckRequest(text="x")))
    assert err.code() == grpc.StatusCode.INTERNAL
    assert err.details() == "internal error"


# --- Chat ----------------------------------------------------------------------------------


async def test_chat_stream_matches_upstream(guard: RunningGuard, upstream: AppServer) -> None:
    async with connect(guard) as stub:
        call = stub.Chat(chat(chat_body(stream=True), request_id="chat-1"))
        got = await chunks(call)
        assert ("x-request-id", "chat-1") in list(await call.initial_metadata())
    direct = await post_direct(upstream)
    assert [c.json for c in got] == sse_payloads(direct.content)
    assert [c.decision for c in got] == ["allow"] + [""] * (len(got) - 1)
    events = [json.loads(c.json) for c in got]
    text = "".join(e["choices"][0]["delta"].get("content", "") for e in events if e["choices"])
    assert text == f"echo: What is in this image? images=1 img:{DIGEST[:16]}"
    assert events[-1]["choices"] == [] and events[-1]["usage"]["total_tokens"] > 0


async def test_chat_non_stream_matches_upstream(guard: RunningGuard, upstream: AppServer) -> None:
    async with connect(guard) as stub:
        (got,) = await chunks(stub.Chat(chat(chat_body(stream=False))))
    direct = await post_direct(upstream)
    assert got.decision == "allow"
    assert json.loads(got.json) == direct.json()
    assert direct.json()["choices"][0]["message"]["content"].endswith(f"img:{DIGEST[:16]}")


async def test_chat_bad_requests(guard: RunningGuard) -> None:
    async with connect(guard) as stub:
        for raw in ("{not json", "[1]"):
            err = await rpc_error(chunks(stub.Chat(pb.ChatRequest(json=raw))))
            assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
        err = await rpc_error(chunks(stub.Chat(chat({"model": "echo", "messages": []}))))
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "messages" in err.details()
        for stream in (False, True):  # the upstream's 400 message reaches the client
            body = chat_body(stream=stream, model="nope")
            err = await rpc_error(chunks(stub.Chat(chat(body))))
            assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert err.details() == "The model `nope` does not exist."


async def test_chat_blocked_enforce_and_refusal(make_guard: MakeGuard) -> None:
    stage = Fixed("reasoner", "block", category="violence")
    guard = make_guard(stages=[stage])
    async with connect(guard) as stub:
        err = await rpc_error(chunks(stub.Chat(chat(chat_body(stream=True)))))
        assert err.code() == grpc.StatusCode.PERMISSION_DENIED
        reply = await stub.Check(pb.CheckRequest(text="x", images=[pb.Image(data=PNG)]))
        assert reply.outcome == pb.OUTCOME_BLOCK  # Check reports a block, it does not refuse
        (d,) = reply.decisions
        assert (d.stage, d.action, d.reason, d.category, d.score) == (
            "reasoner",
            "block",
            "fixed",
            "violence",
            0.75,
        )
        details = dict(d.details)
        assert list(details["k"]) == [1, 2] and details["nested"]["x"] == 1.5
        assert details["obj"].startswith("<object")
    assert guard.metric("vlm_guard_requests_total", {"transport": "grpc", "outcome": "block"}) == 2

    guard = make_guard({"server": {"block_response": "refusal"}}, stages=[stage])
    async with connect(guard) as stub:
        got = await chunks(stub.Chat(chat(chat_body(stream=True))))
        events = [json.loads(c.json) for c in got]
        assert got[0].decision == "block"
        assert [e["choices"][0]["finish_reason"] for e in events if e["choices"]][-1] == (
            "content_filter"
        )
        assert "usage" in events[-1]
        (one,) = await chunks(stub.Chat(chat(chat_body(stream=False))))
        assert json.loads(one.json)["choices"][0]["finish_reason"] == "content_filter"


async def test_monitor_mode(make_guard: MakeGuard) -> None:
    guard = make_guard({"pipeline": {"mode": "monitor"}}, stages=[Fixed("reasoner", "block")])
    async with connect(guard) as stub:
        reply = await stub.Check(pb.CheckRequest(text="x"))
        assert reply.outcome == pb.OUTCOME_WOULD_BLOCK
        (got,) = await chunks(stub.Chat(chat(chat_body(stream=False))))
        assert got.decision == "would_block"
        assert json.loads(got.json)["choices"][0]["message"]["content"].startswith("echo:")


async def test_stage_failure_closed_is_unavailable(make_guard: MakeGuard) -> None:
    guard = make_guard(
        stages=[Raises("reasoner")], stage_configs={"reasoner": StageConfig(fail_mode="closed")}
    )
    async with connect(guard) as stub:
        err = await rpc_error(stub.Check(pb.CheckRequest(text="x")))
        assert err.code() == grpc.StatusCode.UNAVAILABLE
        assert not any(s in err.details() for s in LEAKS)
        err = await rpc_error(chunks(stub.Chat(chat(chat_body(stream=True)))))
        assert err.code() == grpc.StatusCode.UNAVAILABLE
    assert guard.metric("vlm_guard_requests_total", {"transport": "grpc", "outcome": "error"}) == 2


# --- Purify --------------------------------------------------------------------------------


async def test_purify_and_rewritten_digest(make_guard: MakeGuard) -> None:
    guard = make_guard(stages=[Inverts()])
    async with connect(guard) as stub:
        reply = await stub.Purify(pb.PurifyRequest(images=[pb.Image(data=PNG)], request_id="p"))
        assert reply.request_id == "p"
        (im,) = reply.images
        assert (im.index, im.digest, im.steps) == (0, INVERTED_DIGEST, 7)
        assert list(im.similarity) == pytest.approx([0.9, 0.99])
        assert image_digest(Image.open(io.BytesIO(im.png)).convert("RGB")) == INVERTED_DIGEST
        reply = await stub.Check(pb.CheckRequest(images=[pb.Image(url=data_url(PNG))]))
        assert reply.images[0].digest == INVERTED_DIGEST
        assert reply.decisions[0].action == "rewrite"
        (got,) = await chunks(stub.Chat(chat(chat_body(stream=False))))
        content = json.loads(got.json)["choices"][0]["message"]["content"]
        assert content.endswith(f"img:{INVERTED_DIGEST[:16]}")  # the model saw the rewrite


async def test_purify_without_stage(guard: RunningGuard) -> None:
    async with connect(guard) as stub:
        err = await rpc_error(stub.Purify(pb.PurifyRequest(images=[pb.Image(data=PNG)])))
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION


# --- API keys, metrics ---------------------------------------------------------------------


async def test_api_keys(make_guard: MakeGuard) -> None:
    guard = make_guard({"server": {"api_keys": ["k1"]}})
    async with grpc.aio.insecure_channel(guard.grpc_target) as channel:
        stub = pb_grpc.GuardStub(channel)
        for metadata in ((), (("authorization", "Bearer k2"),), (("authorization", "k1"),)):
            err = await rpc_error(stub.Check(pb.CheckRequest(text="x"), metadata=metadata))
            assert err.code() == grpc.StatusCode.UNAUTHENTICATED
        err = await rpc_error(chunks(stub.Chat(chat(chat_body(stream=True)))))
        assert err.code() == grpc.StatusCode.UNAUTHENTICATED
        good = (("authorization", "Bearer k1"),)
        reply = await stub.Check(pb.CheckRequest(text="x"), metadata=good)
        assert reply.outcome == pb.OUTCOME_ALLOW
        got = await chunks(stub.Chat(chat(chat_body(stream=True)), metadata=good))
        assert got[0].decision == "allow"
        health = health_pb2_grpc.HealthStub(channel)
        reply = await health.Check(health_pb2.HealthCheckRequest(service="guard.v1.Guard"))
        assert reply.status == health_pb2.HealthCheckResponse.SERVING

    def count(outcome: str) -> float:
        return guard.metric("vlm_guard_requests_total", {"transport": "grpc", "outcome": outcome})

    assert (count("unauthenticated"), count("allow")) == (4, 2)


# --- a broken upstream stream, a client that leaves ---------------------------------------

BROKEN = {
    "error-event": b'data: {"id":"a","choices":[]}\n\ndata: {"error":{"message":"boom"}}\n\n',
    "no-done": b'data: {"id":"a","choices":[]}\n\n',
    "cut": b'data: {"id":"a","choices":[]}\n\ndata: {"id":',
}


async def broken_upstream(scope: Scope, receive: Receive, send: Send) -> None:
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body"):
            break
    payload = BROKEN[json.loads(body)["model"]]
    headers = [(b"content-type", b"text/event-stream")]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": payload})


async def test_upstream_stream_interrupted(make_guard: MakeGuard) -> None:
    server = AppServer(broken_upstream)
    try:
        guard = make_guard(upstream_url=server.url + "/v1")
        async with connect(guard) as stub:
            for model in BROKEN:
                call = stub.Chat(
                    chat(
                        {
                            "model": model,
                            "messages": [{"role": "user", "content": "x"}],
                            "stream": True,
                        }
                    )
                )
                received = []
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    async for c in call:
                        received.append(c.json)
                assert received == ['{"id":"a","choices":[]}'], model
                assert info.value.code() == grpc.StatusCode.UNAVAILABLE
                assert info.value.details() == "upstream stream interrupted"
        labels = {"transport": "grpc", "outcome": "upstream_error"}
        assert guard.metric("vlm_guard_requests_total", labels) == 3
    finally:
        server.close()


async def test_client_cancel_finishes_tracker_once(make_guard: MakeGuard) -> None:
    # Left alone, the answer would take ~20 s: only the cancellation can end it in time.
    slow = AppServer(create_app(EchoModel("echo"), token_delay_s=2.0))
    try:
        guard = make_guard(upstream_url=slow.url + "/v1")
        async with connect(guard) as stub:
            call = stub.Chat(chat(chat_body(stream=True)))
            first = await call.read()
            assert first.decision == "allow"
            call.cancel()
            for _ in range(300):
                if guard.metric("vlm_guard_inflight_requests") == 0:
                    break
                await asyncio.sleep(0.01)
        assert guard.metric("vlm_guard_inflight_requests") == 0
        labels = {"transport": "grpc", "outcome": "allow"}
        assert guard.metric("vlm_guard_requests_total", labels) == 1
    finally:
        slow.close()
