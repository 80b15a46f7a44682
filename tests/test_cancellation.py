"""A client that goes away cancels its request: the stages stop, and the upstream call is
closed (vLLM aborts the generation when its client disconnects) within a second, or never
made. Over HTTP (a raw socket closed, httpx closing a stream or giving up) and gRPC
(``call.cancel()``); before the first token, after it, and for a non-streamed answer.
"""

from __future__ import annotations

import asyncio
import json
import socket
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import grpc
import httpx
import pytest

from guard.config import StageConfig
from guard.types import Decision, GuardRequest
from guard.v1 import guard_pb2 as pb
from guard.v1 import guard_pb2_grpc as pb_grpc
from tests.images import data_url, encode, gradient, image_message
from tests.servers import RunningGuard, SlowUpstream, wait_for

POLL_S = 0.02  # how often the upstream looks for a disconnect, as vLLM does between steps
ANSWER_S = 4.0  # an answer takes this long: far longer than any cancellation may
TOKEN_S = 0.05
LIMIT_S = 1.0  # the longest a cancellation may take to reach the upstream


@dataclass
class Slow:
    """A checking stage that takes ``seconds``; records when it started and was cancelled."""

    seconds: float = 0.0
    name: str = "reasoner"
    may_rewrite: bool = False
    started: dict[str, float] = field(default_factory=dict)
    cancelled: dict[str, float] = field(default_factory=dict)

    async def check(self, request: GuardRequest) -> Decision:
        self.started[request.id] = time.monotonic()
        try:
            await asyncio.sleep(self.seconds)
        except asyncio.CancelledError:
            self.cancelled[request.id] = time.monotonic()
            raise
        return Decision(self.name, "allow")

    def ready(self) -> bool:
        return True


@dataclass
class World:
    upstream: SlowUpstream
    stage: Slow
    guard: RunningGuard


@pytest.fixture(scope="module")
def world() -> Iterator[World]:
    upstream = SlowUpstream(tokens=int(ANSWER_S / TOKEN_S), token_s=TOKEN_S, poll_s=POLL_S)
    stage = Slow()
    guard = RunningGuard(
        upstream.server.url + "/v1",
        {"server": {"drain_seconds": 0}},
        stages=[stage],
        stage_configs={"reasoner": StageConfig(timeout_s=30)},
    )
    yield World(upstream, stage, guard)
    guard.close()
    upstream.server.close()


@pytest.fixture
def setup(world: World) -> Iterator[World]:
    world.upstream.first_token_s = 0.0
    world.stage.seconds = 0.0
    yield world
    # Every request has let go of its slot and its in-flight count, whatever ended it.
    wait_for(lambda: world.guard.metric("vlm_guard_inflight_requests") == 0, 2)


def body(stream: bool) -> dict[str, Any]:
    image = data_url(encode(gradient(16, 16)))
    return {"model": "m", "messages": image_message(image), "stream": stream}


def raw_request(url: str, rid: str, payload: dict[str, Any]) -> socket.socket:
    """Send a chat request on a plain socket and return it unread: closing it is a client
    that disconnects."""
    host, port = url.removeprefix("http://").split(":")
    data = json.dumps(payload).encode()
    head = (
        f"POST /v1/chat/completions HTTP/1.1\r\nhost: {host}\r\n"
        f"content-type: application/json\r\ncontent-length: {len(data)}\r\n"
        f"x-request-id: {rid}\r\n\r\n"
    ).encode()
    sock = socket.create_connection((host, int(port)))
    sock.sendall(head + data)
    return sock


def grpc_chat(world: World, rid: str, payload: dict[str, Any]) -> tuple[grpc.Channel, grpc.Future]:
    channel = grpc.insecure_channel(world.guard.grpc_target)
    request = pb.ChatRequest(json=json.dumps(payload), request_id=rid)
    return channel, pb_grpc.GuardStub(channel).Chat(request, timeout=30)


def assert_upstream_cancelled(world: World, rid: str, left: float) -> float:
    """The upstream saw the request go within LIMIT_S of the client leaving; the latency."""
    up = world.upstream
    assert wait_for(lambda: rid in up.cancelled or rid in up.finished, ANSWER_S + 2), rid
    assert rid in up.cancelled, "the upstream answered a client that had gone"
    latency = up.cancelled[rid] - left
    assert latency < LIMIT_S, latency
    return latency


# When the client leaves: before the first token of a streamed answer (the upstream holds it
# back), after the first token, while a non-streamed answer is being generated, or while the
# stages are still checking (then the upstream must never be called).
WHEN = ("before_first_token", "after_first_token", "non_streamed", "during_stages")


@pytest.mark.parametrize("when", WHEN)
def test_http_client_disconnect(setup: World, when: str) -> None:
    rid = f"http-{when}-{uuid.uuid4().hex[:8]}"
    before = _outcomes(setup, "http")
    up = setup.upstream
    if when == "before_first_token":
        up.first_token_s = ANSWER_S
    if when == "during_stages":
        setup.stage.seconds = 1.0
    if when == "after_first_token":
        with (
            httpx.Client(timeout=10) as client,
            client.stream(
                "POST",
                setup.guard.url + "/v1/chat/completions",
                json=body(True),
                headers={"x-request-id": rid},
            ) as response,
        ):
            assert response.status_code == 200
            chunks = response.iter_raw()  # held: dropping it would close the stream early
            assert b"t0" in next(chunks)
            left = time.monotonic()
            response.close()  # unread: httpx closes the connection
    else:
        sock = raw_request(setup.guard.url, rid, body(when == "before_first_token"))
        started = setup.stage.started if when == "during_stages" else up.started
        assert wait_for(lambda: rid in started, 5)
        time.sleep(0.1)  # well inside the wait
        left = time.monotonic()
        sock.close()
    _check(setup, rid, when, left, before)


@pytest.mark.parametrize("when", WHEN)
def test_grpc_call_cancel(setup: World, when: str) -> None:
    rid = f"grpc-{when}-{uuid.uuid4().hex[:8]}"
    before = _outcomes(setup, "grpc")
    up = setup.upstream
    if when == "before_first_token":
        up.first_token_s = ANSWER_S
    if when == "during_stages":
        setup.stage.seconds = 1.0
    channel, call = grpc_chat(setup, rid, body(when != "non_streamed"))
    try:
        if when == "after_first_token":
            assert "t0" in next(call).json
        else:
            started = setup.stage.started if when == "during_stages" else up.started
            assert wait_for(lambda: rid in started, 5)
            time.sleep(0.1)
        left = time.monotonic()
        call.cancel()
        _check(setup, rid, when, left, before)
    finally:
        channel.close()


def test_httpx_read_timeout_cancels_a_non_streamed_answer(setup: World) -> None:
    rid = f"timeout-{uuid.uuid4().hex[:8]}"
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(
            setup.guard.url + "/v1/chat/completions",
            json=body(False),
            headers={"x-request-id": rid},
            timeout=httpx.Timeout(10, read=0.5),
        )
    left = time.monotonic()
    assert rid in setup.upstream.started
    assert_upstream_cancelled(setup, rid, left)


def _outcomes(world: World, transport: str) -> tuple[float, float]:
    """requests_total's (cancelled, error) counts for ``transport``."""
    return tuple(  # type: ignore[return-value]
        world.guard.metric("vlm_guard_requests_total", {"transport": transport, "outcome": o})
        for o in ("cancelled", "error")
    )


def _check(world: World, rid: str, when: str, left: float, before: tuple[float, float]) -> None:
    if when != "during_stages":
        assert_upstream_cancelled(world, rid, left)
        return
    stage = world.stage
    assert wait_for(lambda: rid in stage.cancelled, LIMIT_S), "the stage ran on"
    assert stage.cancelled[rid] - left < LIMIT_S
    # Past the moment the stage would have allowed: the upstream was never called.
    time.sleep(max(0.0, stage.started[rid] + stage.seconds + 0.3 - time.monotonic()))
    assert rid not in world.upstream.started
    # A client that left before the verdict is counted as such, not as the guard's error.
    cancelled, errors = before
    assert wait_for(lambda: _outcomes(world, rid.split("-")[0]) == (cancelled + 1, errors), 1)


@pytest.mark.parametrize("transport", ["http", "grpc"])
def test_a_disconnect_cancels_an_early_upstream_call(setup: World, transport: str) -> None:
    """Parallel gating starts the upstream call while the stages run: a client that leaves
    then cancels the stages and that call alike."""
    rid = f"parallel-{transport}-{uuid.uuid4().hex[:8]}"
    setup.stage.seconds = 2.0
    guard = RunningGuard(
        setup.upstream.server.url + "/v1",
        {"server": {"drain_seconds": 0}, "pipeline": {"gating": "parallel"}},
        stages=[setup.stage],
        stage_configs={"reasoner": StageConfig(timeout_s=30)},
    )
    channel = grpc.insecure_channel(guard.grpc_target)
    try:
        if transport == "http":
            leave = raw_request(guard.url, rid, body(False)).close
        else:
            request = pb.ChatRequest(json=json.dumps(body(False)), request_id=rid)
            leave = pb_grpc.GuardStub(channel).Chat(request, timeout=30).cancel
        assert wait_for(lambda: rid in setup.upstream.started and rid in setup.stage.started, 5)
        time.sleep(0.1)
        left = time.monotonic()
        leave()
        assert wait_for(lambda: rid in setup.stage.cancelled, LIMIT_S), "the stage ran on"
        assert_upstream_cancelled(setup, rid, left)
    finally:
        channel.close()
        guard.close()


def test_grpc_check_cancel_stops_the_stages(setup: World) -> None:
    rid = f"check-{uuid.uuid4().hex[:8]}"
    setup.stage.seconds = 2.0
    image = pb.Image(data=encode(gradient(16, 16)))
    with grpc.insecure_channel(setup.guard.grpc_target) as channel:
        request = pb.CheckRequest(text="hi", images=[image], request_id=rid)
        call = pb_grpc.GuardStub(channel).Check.future(request, timeout=30)
        assert wait_for(lambda: rid in setup.stage.started, 5)
        left = time.monotonic()
        call.cancel()
        assert wait_for(lambda: rid in setup.stage.cancelled, LIMIT_S), "the stage ran on"
        assert setup.stage.cancelled[rid] - left < LIMIT_S


class Opened:
    closed = False

    def close(self) -> None:
        self.closed = True


@pytest.mark.parametrize("late_result", [False, True])
async def test_stopping_an_early_call_keeps_our_own_cancellation(late_result: bool) -> None:
    """``_cancel`` waits for the early call to stop; if the request itself is cancelled
    meanwhile (its client left), that cancellation goes on, and a response the call opened
    after all is still closed."""
    from guard.service import _cancel

    release = asyncio.Event()
    opened = Opened()

    async def early() -> Opened:
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            await release.wait()  # slow to stop, like a connection being torn down
            if late_result:
                return opened  # it had opened its response when the cancel landed
            raise
        return opened

    task = asyncio.create_task(early())
    await asyncio.sleep(0)
    stopper = asyncio.create_task(_cancel(task))
    await asyncio.sleep(0.05)
    stopper.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(stopper, 1)
    release.set()
    await asyncio.wait({task})
    await asyncio.sleep(0)  # done callbacks run on the next loop pass
    assert opened.closed == late_result
