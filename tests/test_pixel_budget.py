"""Memory across requests: decoded pixels are bounded by one budget shared by every request
(``images.max_inflight_pixels``), reserved from image headers before decoding and held until
screening ends; nothing the answer keeps holds the decoded images."""

from __future__ import annotations

import asyncio
import gc
import time
import weakref
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any
from unittest import mock

import grpc
import httpx
import openai
import pytest
from PIL import Image
from prometheus_client import CollectorRegistry

from guard.config import ImagesConfig, load_config
from guard.errors import NotAdmitted
from guard.intake.budget import PixelBudget
from guard.intake.decode import PILLOW_BLOCK_BYTES, header_pixels
from guard.metrics import Metrics
from guard.server import build_service
from guard.types import Decision, GuardRequest
from guard.v1 import guard_pb2 as pb
from guard.v1 import guard_pb2_grpc as pb_grpc
from tests.images import data_url, encode, gradient, image_message
from tests.servers import RunningGuard, SlowUpstream

SIDE = 100  # every test image is SIDE × SIDE: 10,000 pixels
PIXELS = SIDE * SIDE


def _budget(limit: int, wait_s: float = 5.0, metrics: Metrics | None = None) -> PixelBudget:
    cfg = ImagesConfig(max_pixels=limit, max_inflight_pixels=limit, pixel_wait_s=wait_s)
    return PixelBudget(cfg, metrics, retry_after=3)


# --- the budget on its own ---------------------------------------------------------------


async def test_room_is_granted_at_once_and_given_back() -> None:
    budget = _budget(100)
    async with budget.hold("http") as a, budget.hold("http") as b:
        await a.reserve(60)
        await b.reserve(40)
        assert budget.held == 100
    assert budget.held == 0


async def test_waiters_are_served_in_order_and_a_big_one_is_not_starved() -> None:
    budget = _budget(100)
    order: list[str] = []

    async def request(name: str, pixels: int, seconds: float) -> None:
        async with budget.hold("http") as hold:
            await hold.reserve(pixels)
            order.append(name)
            await asyncio.sleep(seconds)

    first = asyncio.create_task(request("first", 70, 0.05))
    await asyncio.sleep(0)
    big = asyncio.create_task(request("big", 100, 0.0))
    await asyncio.sleep(0)
    # 20 pixels would fit beside "first", but "big" waits ahead of it: "small" must not pass.
    small = asyncio.create_task(request("small", 20, 0.0))
    await asyncio.gather(first, big, small)
    assert order == ["first", "big", "small"]
    assert budget.held == 0


async def test_a_request_larger_than_the_budget_takes_all_of_it() -> None:
    budget = _budget(100)
    async with budget.hold("http") as hold:
        await hold.reserve(10 * 100)  # clamped: it runs alone rather than never
        assert hold.pixels == 100
        assert budget.held == 100
    assert budget.held == 0


async def test_a_wait_that_times_out_is_refused_as_overload_and_counted() -> None:
    metrics = Metrics(CollectorRegistry())
    budget = _budget(100, wait_s=0.05, metrics=metrics)
    async with budget.hold("grpc") as holder:
        await holder.reserve(100)
        assert metrics.pixels_inflight._value.get() == 100
        with pytest.raises(NotAdmitted) as caught:
            async with budget.hold("grpc") as other:
                await other.reserve(1)
    error = caught.value
    assert (error.status, error.code, error.retry_after) == (503, "pixel_budget", 3)
    assert metrics.overload.labels("grpc", "pixel_budget")._value.get() == 1
    assert budget.held == 0 and budget.waiting == 0
    assert metrics.pixels_inflight._value.get() == 0


async def test_a_cancelled_waiter_leaves_and_lets_the_next_one_in() -> None:
    budget = _budget(100)
    async with budget.hold("http") as holder:
        await holder.reserve(50)

        async def wait_for(pixels: int) -> None:
            async with budget.hold("http") as hold:
                await hold.reserve(pixels)

        big = asyncio.create_task(wait_for(100))
        await asyncio.sleep(0.01)
        small = asyncio.create_task(wait_for(30))
        await asyncio.sleep(0.01)
        assert budget.waiting == 2
        big.cancel()  # the client left: the small one behind it fits now
        await asyncio.wait_for(small, 1)
        assert budget.waiting == 0
    assert budget.held == 0


def test_the_budget_must_fit_one_image() -> None:
    with pytest.raises(ValueError, match="max_inflight_pixels"):
        ImagesConfig(max_pixels=1000, max_inflight_pixels=999)


def test_header_pixels_checks_limits_without_decoding() -> None:
    cfg = ImagesConfig(max_pixels=PIXELS)
    data = encode(gradient(SIDE, SIDE))
    assert header_pixels(data, 0, cfg, param="p") == PIXELS
    # A header that claims more than max_pixels is refused as it is read.
    with pytest.raises(Exception, match="too many pixels"):
        header_pixels(encode(gradient(SIDE + 1, SIDE)), 0, cfg, param="p")


# --- through the running guard ------------------------------------------------------------


@dataclass
class Watch:
    """A stage that records how many pixels the budget held while it ran, and keeps weak
    references to the decoded images it was shown."""

    budget: list[PixelBudget] = field(default_factory=list)
    seconds: float = 0.2
    name: str = "watch"
    may_rewrite: bool = False
    peak: int = 0
    seen: list[weakref.ref[Any]] = field(default_factory=list)
    inside: int = 0
    most_inside: int = 0

    async def check(self, request: GuardRequest) -> Decision:
        self.seen += [weakref.ref(im.image) for im in request.images]
        self.inside += 1
        self.most_inside = max(self.most_inside, self.inside)
        try:
            self.peak = max(self.peak, self.budget[0].held)
            await asyncio.sleep(self.seconds)
        finally:
            self.inside -= 1
        return Decision(self.name, "allow")

    def ready(self) -> bool:
        return True


@pytest.fixture
def upstream() -> Iterator[SlowUpstream]:
    slow = SlowUpstream(tokens=3, token_s=0.05)
    yield slow
    slow.server.close()


def _guard(upstream: SlowUpstream, watch: Watch, images: dict[str, Any]) -> RunningGuard:
    guard = RunningGuard(
        f"{upstream.server.url}/v1",
        {"images": images, "server": {"retry_after_s": 2}},
        stages=[watch],
    )
    watch.budget.append(guard.service.intake.pixels)
    return guard


def _two_images() -> list[dict[str, Any]]:
    url = data_url(encode(gradient(SIDE, SIDE)))
    message = image_message(url)
    message[0]["content"].append({"type": "image_url", "image_url": {"url": url}})  # type: ignore[attr-defined]
    return message


def test_concurrent_requests_never_hold_more_pixels_than_the_budget(
    upstream: SlowUpstream,
) -> None:
    # Room for three images: requests of two images each run one at a time, in turn.
    watch = Watch()
    guard = _guard(upstream, watch, {"max_inflight_pixels": 3 * PIXELS, "max_pixels": PIXELS})
    try:
        client = openai.OpenAI(base_url=f"{guard.url}/v1", api_key="k", max_retries=0)
        messages = _two_images()
        with ThreadPoolExecutor(6) as pool:
            answers = list(
                pool.map(
                    lambda _: client.chat.completions.create(model="m", messages=messages),  # type: ignore[arg-type]
                    range(6),
                )
            )
        assert [a.choices[0].message.content for a in answers] == ["slow answer"] * 6
        assert watch.peak == 2 * PIXELS
        assert watch.most_inside == 1  # two requests of two images never fit together
        assert guard.metric("vlm_guard_image_pixels_inflight") == 0
        assert guard.service.intake.pixels.waiting == 0
    finally:
        guard.close()


def test_a_request_that_cannot_get_room_in_time_gets_503_with_retry_after(
    upstream: SlowUpstream,
) -> None:
    watch = Watch(seconds=1.0)
    images = {"max_inflight_pixels": PIXELS, "max_pixels": PIXELS, "pixel_wait_s": 0.2}
    guard = _guard(upstream, watch, images)
    try:
        body = {"model": "m", "messages": image_message(data_url(encode(gradient(SIDE, SIDE))))}
        with ThreadPoolExecutor(2) as pool:
            first = pool.submit(httpx.post, f"{guard.url}/v1/chat/completions", json=body)
            time.sleep(0.3)  # the first request holds the whole budget in its stage
            second = httpx.post(f"{guard.url}/v1/chat/completions", json=body)
            assert first.result().status_code == 200
        assert second.status_code == 503
        assert second.headers["retry-after"] == "2"
        error = second.json()["error"]
        assert (error["type"], error["code"]) == ("overloaded", "pixel_budget")
        reason = {"transport": "http", "reason": "pixel_budget"}
        assert guard.metric("vlm_guard_overload_total", reason) == 1
        assert guard.metric("vlm_guard_image_pixels_inflight") == 0
    finally:
        guard.close()


def test_grpc_check_waits_for_room_and_is_refused_unavailable(upstream: SlowUpstream) -> None:
    watch = Watch(seconds=1.0)
    images = {"max_inflight_pixels": PIXELS, "max_pixels": PIXELS, "pixel_wait_s": 0.2}
    guard = _guard(upstream, watch, images)
    try:
        png = encode(gradient(SIDE, SIDE))
        request = pb.CheckRequest(text="hi", images=[pb.Image(data=png)], return_images=True)
        with grpc.insecure_channel(guard.grpc_target) as channel:
            stub = pb_grpc.GuardStub(channel)
            with ThreadPoolExecutor(1) as pool:
                first = pool.submit(stub.Check, request, timeout=10)
                time.sleep(0.3)
                with pytest.raises(grpc.RpcError) as caught:
                    stub.Check(request, timeout=10)
                assert len(first.result().images) == 1  # encoded inside its hold
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        reason = {"transport": "grpc", "reason": "pixel_budget"}
        assert guard.metric("vlm_guard_overload_total", reason) == 1
        assert guard.service.intake.pixels.held == 0
    finally:
        guard.close()


def test_decoded_images_are_freed_before_the_answer_streams(upstream: SlowUpstream) -> None:
    # A long stream must not keep the request's decoded pixels alive: only the forward body
    # (compressed PNG) travels on after screening.
    upstream.tokens, upstream.token_s = 20, 0.05
    watch = Watch(seconds=0.0)
    guard = _guard(upstream, watch, {})
    try:
        body = {
            "model": "m",
            "stream": True,
            "messages": image_message(data_url(encode(gradient(SIDE, SIDE)))),
        }
        with httpx.stream("POST", f"{guard.url}/v1/chat/completions", json=body) as response:
            lines = response.iter_lines()
            assert next(line for line in lines if line.startswith("data:"))
            # Mid-stream: the screening is over and the answer still has ~1 s to go.
            alive = guard._thread.call(_alive_after_gc(watch))
            assert guard.service.intake.pixels.held == 0
            rest = [line for line in lines if line.startswith("data:")]
        assert rest[-1] == "data: [DONE]"
        assert alive == 0
    finally:
        guard.close()


def _alive_after_gc(watch: Watch) -> Any:
    async def count() -> int:
        gc.collect()  # on the guard's loop: no frame of this test holds the images
        return sum(ref() is not None for ref in watch.seen)

    return count


def test_an_image_refused_by_its_header_reserves_nothing(upstream: SlowUpstream) -> None:
    watch = Watch()
    guard = _guard(upstream, watch, {"max_pixels": PIXELS, "max_inflight_pixels": PIXELS})
    try:
        too_big = data_url(encode(gradient(SIDE + 1, SIDE)))
        body = {"model": "m", "messages": image_message(too_big)}
        response = httpx.post(f"{guard.url}/v1/chat/completions", json=body)
        assert response.status_code == 413
        assert watch.seen == []
        assert guard.service.intake.pixels.held == 0
        assert (
            guard.metric(
                "vlm_guard_overload_total", {"transport": "http", "reason": "pixel_budget"}
            )
            == 0
        )
    finally:
        guard.close()


def test_a_serving_guard_maps_pillow_blocks_outside_the_arenas(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Blocks above glibc's largest dynamic mmap threshold go back to the OS when freed; with
    # Pillow's default 16 MiB blocks the served guard's memory grew round after round.
    core: Any = Image.core
    monkeypatch.setattr(core, "set_block_size", calls := mock.Mock())
    monkeypatch.delenv("PILLOW_BLOCK_SIZE", raising=False)
    build_service(load_config(None, {"pipeline": {"defenses": []}}))
    calls.assert_called_once_with(PILLOW_BLOCK_BYTES)
    assert PILLOW_BLOCK_BYTES > 32 * 1024 * 1024  # glibc's DEFAULT_MMAP_THRESHOLD_MAX (64-bit)
    monkeypatch.setenv("PILLOW_BLOCK_SIZE", "16m")  # the operator's choice stands
    build_service(load_config(None, {"pipeline": {"defenses": []}}))
    calls.assert_called_once()
