"""Parallel gating: the upstream call starts while the checks run, nothing reaches the client
before the verdict, and a block cancels the upstream call (which sees the connection close)."""

from __future__ import annotations

import asyncio
import json
import time
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
from tests.servers import RunningGuard, SlowUpstream


@dataclass
class Judge:
    """A checking stage that takes ``seconds`` and then allows or blocks."""

    action: str
    seconds: float = 0.4
    name: str = "reasoner"
    may_rewrite: bool = False
    decided: list[float] = field(default_factory=list)

    async def check(self, request: GuardRequest) -> Decision:
        await asyncio.sleep(self.seconds)
        self.decided.append(time.monotonic())
        category = "violence" if self.action == "block" else None
        return Decision(self.name, self.action, category=category)  # type: ignore[arg-type]

    def ready(self) -> bool:
        return True


@pytest.fixture
def slow() -> Iterator[SlowUpstream]:
    upstream = SlowUpstream()  # 10 tokens 50 ms apart: about half a second
    yield upstream
    upstream.server.close()


def _guard(slow: SlowUpstream, judge: Judge, gating: str) -> RunningGuard:
    return RunningGuard(
        slow.server.url + "/v1",
        {"pipeline": {"gating": gating}},
        stages=[judge],
        stage_configs={"reasoner": StageConfig()},
    )


def _body(stream: bool) -> dict[str, Any]:
    image = data_url(encode(gradient(16, 16)))
    return {"model": "m", "messages": image_message(image), "stream": stream}


@pytest.mark.parametrize("stream", [False, True])
def test_a_block_cancels_the_early_upstream_call(slow: SlowUpstream, stream: bool) -> None:
    judge = Judge("block")
    guard = _guard(slow, judge, "parallel")
    try:
        with httpx.stream(
            "POST", guard.url + "/v1/chat/completions", json=_body(stream), timeout=30
        ) as response:
            raw = response.read()
        deadline = time.monotonic() + 2
        while not slow.cancelled and time.monotonic() < deadline:
            time.sleep(0.02)
    finally:
        guard.close()
    assert response.status_code == 400
    assert json.loads(raw)["error"]["code"] == "content_policy_violation"
    assert b"slow answer" not in raw and b"t0" not in raw  # nothing of the answer leaked
    (rid,) = slow.started
    assert slow.started[rid] < judge.decided[0]  # it really started before the verdict
    assert rid in slow.cancelled and rid not in slow.finished  # and the upstream saw the cancel
    assert slow.cancelled[rid] - judge.decided[0] < 1.0


@pytest.mark.parametrize("stream", [False, True])
def test_an_allowed_answer_arrives_whole_and_sooner(slow: SlowUpstream, stream: bool) -> None:
    took = {}
    for gating in ("sequential", "parallel"):
        judge = Judge("allow")
        guard = _guard(slow, judge, gating)
        try:
            start = time.monotonic()
            with httpx.stream(
                "POST", guard.url + "/v1/chat/completions", json=_body(stream), timeout=30
            ) as response:
                chunks = response.iter_raw()
                first = next(chunks)  # time to the first byte of the answer
                took[gating] = time.monotonic() - start
                raw = first + b"".join(chunks)
        finally:
            guard.close()
        assert response.status_code == 200
        assert (b"t9" if stream else b"slow answer") in raw
        rid = response.headers["x-request-id"]
        if gating == "sequential":
            assert slow.started[rid] >= judge.decided[0]  # nothing left before the verdict
        else:
            assert slow.started[rid] < judge.decided[0]
    assert not slow.cancelled
    # The check (0.4 s) and the non-streamed answer (0.5 s) overlap instead of adding up.
    if not stream:
        assert took["parallel"] < took["sequential"] - 0.2, took


async def test_grpc_chat_is_gated_too(slow: SlowUpstream) -> None:
    for action in ("block", "allow"):
        judge = Judge(action)
        guard = _guard(slow, judge, "parallel")
        request = pb.ChatRequest(json=json.dumps(_body(stream=True)))
        chunks: list[Any] = []
        code = None
        try:
            async with grpc.aio.insecure_channel(guard.grpc_target) as channel:
                try:
                    async for chunk in pb_grpc.GuardStub(channel).Chat(request):
                        chunks.append(chunk)
                except grpc.aio.AioRpcError as e:
                    code = e.code()
            deadline = time.monotonic() + 2
            while action == "block" and not slow.cancelled and time.monotonic() < deadline:  # noqa: ASYNC110 - the upstream records in its own thread
                await asyncio.sleep(0.02)
        finally:
            guard.close()
        rid = max(slow.started, key=lambda r: slow.started[r])  # this round's request
        assert slow.started[rid] < judge.decided[0]  # started during the checks
        if action == "block":
            assert code == grpc.StatusCode.PERMISSION_DENIED and not chunks
            assert rid in slow.cancelled and rid not in slow.finished
        else:
            assert code is None and chunks[0].decision == "allow"
            assert any("t9" in c.json for c in chunks)
