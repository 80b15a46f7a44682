"""``upstream.total_timeout_s``: an answer has a deadline from sending the request to its last
byte, however steadily the upstream trickles (each wait well inside ``read_timeout_s``).

Past the deadline before anything reached the client (no headers yet, no first event, a
non-streamed body still arriving): 504 ``upstream_timeout`` with Retry-After, as a read timeout
gives (gRPC: DEADLINE_EXCEEDED). Past it mid-stream: the events so far, then the guard's error
event and no ``[DONE]``, the way a broken stream ends (gRPC: the chunks so far, then
UNAVAILABLE). Either way the upstream connection is closed, so vLLM aborts the generation, and
the client's slot is free again. An answer inside the deadline is untouched.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

import grpc
import httpx
import openai
import pytest
from fastapi import FastAPI, Request
from fastapi.responses import Response, StreamingResponse

from guard.sse import SSEParser
from guard.v1 import guard_pb2 as pb
from guard.v1 import guard_pb2_grpc as pb_grpc
from tests.servers import AppServer, RunningGuard, wait_for

TOTAL = 0.6  # the guard's total_timeout_s in these tests
EVENT_S = 0.2  # a trickling upstream's pause between events: far inside read_timeout_s
LATE_S = 10.0  # a wait no answer may sit out: only the deadline can end it
LIMIT_S = 1.0  # how long after the deadline the upstream may still be held
CREATED = 1_700_000_000


@dataclass(frozen=True)
class Plan:
    """How the stand-in upstream answers a model name."""

    headers_s: float = 0.0  # before the response headers
    first_s: float = 0.0  # then before the first event (JSON: the first piece of the body)
    pause_s: float = EVENT_S  # then between events
    tokens: int = 50


PLANS = {
    "trickle": Plan(),  # 50 tokens 0.2 s apart: ten seconds, each wait short
    "slow-first": Plan(first_s=LATE_S),  # headers at once, then nothing for a long time
    "late": Plan(headers_s=LATE_S),  # nothing at all for a long time (vLLM, non-streamed)
    "fast": Plan(pause_s=0.01, tokens=10),  # done in a fraction of the deadline
}


def chunk(rid: str, model: str, delta: dict[str, Any], finish: str | None = None) -> bytes:
    """One event in vLLM's ``chat.completion.chunk`` shape."""
    choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
    event = {
        "id": f"chatcmpl-{rid}",
        "object": "chat.completion.chunk",
        "created": CREATED,
        "model": model,
        "choices": [choice],
    }
    return f"data: {json.dumps(event, separators=(',', ':'))}\n\n".encode()


def events(rid: str, model: str, tokens: int) -> list[bytes]:
    """A whole streamed answer: the role, one event per token, the finish, ``[DONE]``."""
    out = [chunk(rid, model, {"role": "assistant", "content": ""})]
    out += [chunk(rid, model, {"content": f"t{i} "}) for i in range(tokens)]
    out += [chunk(rid, model, {}, "stop"), b"data: [DONE]\n\n"]
    return out


def completion(rid: str, model: str, tokens: int) -> bytes:
    message = {"role": "assistant", "content": "".join(f"t{i} " for i in range(tokens))}
    choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": "stop"}
    body = {
        "id": f"chatcmpl-{rid}",
        "object": "chat.completion",
        "created": CREATED,
        "model": model,
        "choices": [choice],
        "usage": {"prompt_tokens": 5, "completion_tokens": tokens, "total_tokens": 5 + tokens},
    }
    return json.dumps(body).encode()


class Trickle:
    """An OpenAI-compatible upstream that answers by its ``Plan`` and records, per request id,
    when the request came, when it noticed the guard had gone (as vLLM's abort would) and
    when it finished an answer."""

    def __init__(self) -> None:
        self.started: dict[str, float] = {}
        self.closed: dict[str, float] = {}
        self.finished: dict[str, float] = {}
        app = FastAPI()

        @app.post("/v1/chat/completions")
        async def chat(request: Request) -> Response:
            body = await request.json()
            rid = request.headers["x-request-id"]
            self.started[rid] = time.monotonic()
            model, stream = body["model"], bool(body.get("stream"))
            plan = PLANS[model]
            waited = time.monotonic() + plan.headers_s
            while time.monotonic() < waited:
                await asyncio.sleep(0.02)
                if await request.is_disconnected():
                    self.closed[rid] = time.monotonic()
                    return Response(status_code=499)
            if stream:
                pieces = events(rid, model, plan.tokens)
            else:  # a JSON body in pieces: bytes keep coming, the answer never completes
                whole = completion(rid, model, plan.tokens)
                step = len(whole) // 8 + 1
                pieces = [whole[i : i + step] for i in range(0, len(whole), step)]
            media = "text/event-stream" if stream else "application/json"
            return StreamingResponse(self._send(rid, plan, pieces), media_type=media)

        self.server = AppServer(app)

    async def _send(self, rid: str, plan: Plan, pieces: list[bytes]) -> AsyncIterator[bytes]:
        # Starlette cancels this generator as soon as the connection is lost.
        try:
            await asyncio.sleep(plan.first_s)
            for i, piece in enumerate(pieces):
                if i:
                    await asyncio.sleep(plan.pause_s)
                yield piece
            self.finished[rid] = time.monotonic()
        except BaseException:
            self.closed[rid] = time.monotonic()
            raise


@dataclass
class World:
    upstream: Trickle
    guard: RunningGuard


@pytest.fixture(scope="module")
def world() -> Iterator[World]:
    upstream = Trickle()
    guard = RunningGuard(
        upstream.server.url + "/v1",
        {
            "server": {"drain_seconds": 0},
            "upstream": {"total_timeout_s": TOTAL, "read_timeout_s": 30.0},
        },
    )
    yield World(upstream, guard)
    guard.close()
    upstream.server.close()


@pytest.fixture
def setup(world: World) -> Iterator[World]:
    yield world
    # Whatever ended the answer, the request let go of its slot.
    assert wait_for(lambda: world.guard.metric("vlm_guard_inflight_requests") == 0, 2)


def new_rid(name: str) -> str:
    return f"{name}-{uuid.uuid4().hex[:8]}"


def chat_body(model: str, stream: bool) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": "hi"}], "stream": stream}


async def grpc_chat(
    world: World, rid: str, model: str, *, stream: bool
) -> tuple[list[str], grpc.aio.AioRpcError | None]:
    """The chunks a gRPC Chat call received, and the error it ended with (None: none)."""
    received: list[str] = []
    async with grpc.aio.insecure_channel(world.guard.grpc_target) as channel:
        call = pb_grpc.GuardStub(channel).Chat(
            pb.ChatRequest(json=json.dumps(chat_body(model, stream)), request_id=rid),
            timeout=LATE_S,
        )
        try:
            async for part in call:
                received.append(part.json)
        except grpc.aio.AioRpcError as e:
            return received, e
    return received, None


def assert_upstream_closed(world: World, rid: str) -> None:
    """The upstream saw its connection close within LIMIT_S of the deadline, unfinished."""
    up = world.upstream
    assert wait_for(lambda: rid in up.closed or rid in up.finished, TOTAL + LIMIT_S + 2), rid
    assert rid in up.closed, "the upstream finished an answer that was past its deadline"
    held = up.closed[rid] - up.started[rid]
    assert held < TOTAL + LIMIT_S, held


def assert_deadline_logged(caplog: pytest.LogCaptureFixture) -> None:
    assert any("total_timeout_s" in r.getMessage() for r in caplog.records), caplog.text


# --- mid-stream: the events so far, then an error event --------------------------------------


def test_http_trickling_stream_is_cut_at_the_deadline(
    setup: World, caplog: pytest.LogCaptureFixture
) -> None:
    rid = new_rid("http-trickle")
    received: list[tuple[float, str]] = []
    parser = SSEParser()
    caplog.set_level(logging.WARNING, logger="guard.upstream")
    start = time.monotonic()
    with httpx.stream(
        "POST",
        setup.guard.url + "/v1/chat/completions",
        json=chat_body("trickle", True),
        headers={"x-request-id": rid},
        timeout=LATE_S,
    ) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        raw = b""
        for data in response.iter_bytes():
            raw += data
            received += [(time.monotonic() - start, e) for e in parser.feed(data)]
    parser.close()  # the stream ends on an event boundary
    elapsed = time.monotonic() - start
    assert b"[DONE]" not in raw  # the answer is incomplete, and says so
    *relayed, (at, last) = received
    # What came before the deadline came through unchanged, and as it arrived.
    expected = events(rid, "trickle", PLANS["trickle"].tokens)
    assert len(relayed) >= 2
    assert [f"data: {e}\n\n".encode() for _, e in relayed] == expected[: len(relayed)]
    assert relayed[0][0] < TOTAL  # the first events did not wait for the deadline
    error = json.loads(last)["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert (error["type"], error["code"]) == ("upstream_error", "upstream_stream_error")
    assert TOTAL * 0.9 <= at < TOTAL + LIMIT_S, at
    assert elapsed < TOTAL + LIMIT_S, elapsed
    assert_upstream_closed(setup, rid)
    assert_deadline_logged(caplog)


def test_official_client_raises_on_a_stream_past_its_deadline(setup: World) -> None:
    client = openai.OpenAI(base_url=setup.guard.url + "/v1", api_key="unused", max_retries=0)
    rid = new_rid("openai-trickle")
    stream = client.chat.completions.create(
        model="trickle",
        messages=[{"role": "user", "content": "hi"}],
        stream=True,
        extra_headers={"x-request-id": rid},
    )
    text: list[str] = []
    with pytest.raises(openai.APIError) as info:
        for part in stream:
            text.extend(c.delta.content or "" for c in part.choices)
    client.close()
    assert "".join(text).startswith("t0 ")  # the tokens before the deadline
    assert info.value.message == "upstream stream interrupted"
    assert_upstream_closed(setup, rid)


async def test_grpc_trickling_stream_is_cut_at_the_deadline(setup: World) -> None:
    rid = new_rid("grpc-trickle")
    start = time.monotonic()
    received, error = await grpc_chat(setup, rid, "trickle", stream=True)
    elapsed = time.monotonic() - start
    assert error is not None
    assert error.code() == grpc.StatusCode.UNAVAILABLE  # as any broken stream ends
    assert error.details() == "upstream stream interrupted"
    expected = events(rid, "trickle", PLANS["trickle"].tokens)
    assert len(received) >= 2
    assert [f"data: {e}\n\n".encode() for e in received] == expected[: len(received)]
    assert TOTAL * 0.9 <= elapsed < TOTAL + LIMIT_S, elapsed
    assert_upstream_closed(setup, rid)


# --- before the first byte: 504, as a read timeout ------------------------------------------

BEFORE = [
    pytest.param("trickle", False, id="json-body-trickles"),
    pytest.param("late", False, id="json-headers-late"),
    pytest.param("slow-first", True, id="sse-first-event-late"),
    pytest.param("late", True, id="sse-headers-late"),
]


@pytest.mark.parametrize(("model", "stream"), BEFORE)
def test_http_past_the_deadline_before_the_answer_is_504(
    setup: World, model: str, stream: bool, caplog: pytest.LogCaptureFixture
) -> None:
    rid = new_rid(f"http-{model}")
    caplog.set_level(logging.WARNING, logger="guard.upstream")
    start = time.monotonic()
    response = httpx.post(
        setup.guard.url + "/v1/chat/completions",
        json=chat_body(model, stream),
        headers={"x-request-id": rid},
        timeout=LATE_S,
    )
    elapsed = time.monotonic() - start
    assert response.status_code == 504, response.text
    assert response.json() == {
        "error": {
            "message": "upstream timed out",
            "type": "upstream_error",
            "param": None,
            "code": "upstream_timeout",
        }
    }
    assert response.headers["retry-after"] == "1"
    assert response.headers.get("x-should-retry") != "false"
    assert TOTAL * 0.9 <= elapsed < TOTAL + LIMIT_S, elapsed
    assert_upstream_closed(setup, rid)
    assert_deadline_logged(caplog)


@pytest.mark.parametrize(("model", "stream"), BEFORE)
async def test_grpc_past_the_deadline_before_the_answer(
    setup: World, model: str, stream: bool
) -> None:
    rid = new_rid(f"grpc-{model}")
    received, error = await grpc_chat(setup, rid, model, stream=stream)
    assert error is not None and received == []
    assert error.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert dict(error.trailing_metadata() or ()).get("retry-after") == "1"
    assert_upstream_closed(setup, rid)


# --- inside the deadline: untouched ---------------------------------------------------------


@pytest.mark.parametrize("stream", [True, False], ids=["sse", "json"])
def test_http_answer_inside_the_deadline_is_untouched(setup: World, stream: bool) -> None:
    rid = new_rid("http-fast")
    response = httpx.post(
        setup.guard.url + "/v1/chat/completions",
        json=chat_body("fast", stream),
        headers={"x-request-id": rid},
        timeout=LATE_S,
    )
    assert response.status_code == 200, response.text
    tokens = PLANS["fast"].tokens
    if stream:
        assert response.content == b"".join(events(rid, "fast", tokens))
    else:
        assert response.content == completion(rid, "fast", tokens)
    assert rid in setup.upstream.finished and rid not in setup.upstream.closed


async def test_grpc_stream_inside_the_deadline_is_untouched(setup: World) -> None:
    rid = new_rid("grpc-fast")
    received, error = await grpc_chat(setup, rid, "fast", stream=True)
    assert error is None
    expected = events(rid, "fast", PLANS["fast"].tokens)[:-1]  # [DONE] is not a chunk
    assert [f"data: {e}\n\n".encode() for e in received] == expected
    # Every event arrived and the call ended without an error. Whether the upstream recorded
    # its own end first is a race: the gRPC transport closes the upstream response at [DONE].
