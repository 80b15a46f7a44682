"""Shutdown: both transports stop taking work at once and drain together, so a stop takes at
most ``server.drain_seconds`` (deploy/kubernetes's grace period counts on it), and gRPC health
turns NOT_SERVING as readiness fails."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import threading
import time
from pathlib import Path

import grpc
import httpx
import yaml
from fastapi import FastAPI
from grpc_health.v1 import health_pb2, health_pb2_grpc

from guard.toy.processes import GUARD, free_port, running
from tests.images import data_url, encode, gradient, image_message
from tests.servers import AppServer, RunningGuard

DRAIN = 3.0


def test_stop_drains_http_and_grpc_together() -> None:
    arrived, release = threading.Event(), threading.Event()
    app = FastAPI()

    @app.post("/v1/chat/completions")
    async def stall() -> None:  # an upstream that never answers within the drain
        arrived.set()
        await asyncio.to_thread(release.wait, 60)  # released when the test is done

    upstream = AppServer(app)
    guard = RunningGuard(upstream.url + "/v1", {"server": {"drain_seconds": DRAIN}})
    channel = grpc.insecure_channel(guard.grpc_target)
    watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=""))
    statuses = [next(watch).status]  # a gRPC call still open when the stop begins
    body = {"model": "m", "messages": image_message(data_url(encode(gradient(16, 16))))}
    held = threading.Thread(
        target=lambda: httpx.post(guard.url + "/v1/chat/completions", json=body, timeout=60)
    )
    held.start()  # an HTTP request still open when the stop begins
    assert arrived.wait(30)
    start = time.perf_counter()
    stopper = threading.Thread(target=guard.close)
    stopper.start()
    try:
        statuses.append(next(watch).status)
        ready = httpx.get(guard.url + "/readyz", timeout=5)
    except (grpc.RpcError, httpx.HTTPError):  # pragma: no cover - shown by the asserts below
        ready = None
    stopper.join(30)
    took = time.perf_counter() - start
    held.join(30)
    channel.close()
    release.set()
    upstream.close()
    serving, not_serving = (
        health_pb2.HealthCheckResponse.SERVING,
        health_pb2.HealthCheckResponse.NOT_SERVING,
    )
    assert statuses == [serving, not_serving]
    assert ready is None or ready.status_code == 503  # draining, or already closed
    # Both open calls were waited for up to the drain, once: one after the other took 2 × 3 s.
    assert DRAIN - 0.5 < took < 2 * DRAIN - 0.5, took


STREAMS = 100
WORDS = ["one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"]


def test_sigterm_with_open_streams_loses_none(tmp_path: Path) -> None:
    """SIGTERM to a real `vlm-guard serve` with 100 streams open: readiness goes at once, new
    connections are refused, gRPC health turns NOT_SERVING, and every stream ends complete
    (all its words and [DONE]) within the grace; the process exits 0."""
    up, http_port, grpc_port = free_port(), free_port(), free_port()
    config = tmp_path / "guard.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "server": {"http_port": http_port, "grpc_port": grpc_port, "drain_seconds": 20},
                "upstream": {"url": f"http://127.0.0.1:{up}/v1"},
                "pipeline": {"defenses": []},
            }
        )
    )
    # Each answer is 11 words at 0.15 s: about 1.7 s, so all streams are mid-answer at SIGTERM.
    upstream = [*GUARD, "toy", "upstream", "--port", str(up), "--token-delay", "0.15"]
    guard_url = f"http://127.0.0.1:{http_port}"
    with (
        running(upstream, f"http://127.0.0.1:{up}/v1/models"),
        running([*GUARD, "serve", "--config", str(config)], guard_url + "/readyz") as guard,
    ):
        channel = grpc.insecure_channel(f"127.0.0.1:{grpc_port}")
        health = health_pb2_grpc.HealthStub(channel)
        watch = health.Watch(health_pb2.HealthCheckRequest(service=""))
        statuses = [next(watch).status]
        answers, took = asyncio.run(_streams_across_sigterm(guard_url, guard))
        statuses.append(next(watch).status)
        assert guard.wait(30) == 0
        channel.close()
    assert statuses == [
        health_pb2.HealthCheckResponse.SERVING,
        health_pb2.HealthCheckResponse.NOT_SERVING,
    ]
    expected = " ".join(["echo:", *WORDS, "images=0"])
    assert len(answers) == STREAMS
    incomplete = [a for a in answers if a != expected]
    assert not incomplete, incomplete[:3]  # none dropped, none cut short
    assert took["refused_after_s"] < 1.0  # new connections are refused at once
    assert took["all_done_s"] < 20  # within the drain


async def _streams_across_sigterm(
    url: str, guard: subprocess.Popen[str]
) -> tuple[list[str], dict[str, float]]:
    started = asyncio.Event()
    first = 0

    async def stream(client: httpx.AsyncClient) -> str:
        nonlocal first
        body = {
            "model": "echo",
            "stream": True,
            "messages": [{"role": "user", "content": " ".join(WORDS)}],
        }
        words, done = [], False
        async with client.stream("POST", url + "/v1/chat/completions", json=body) as r:
            assert r.status_code == 200
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    done = True
                    continue
                delta = json.loads(line[6:])["choices"][0]["delta"].get("content")
                if delta:
                    if not words:
                        first += 1
                        if first == STREAMS:
                            started.set()
                    words.append(delta)
        return "".join(words).strip() if done else "(no [DONE])"

    limits = httpx.Limits(max_connections=STREAMS + 10)
    async with httpx.AsyncClient(timeout=60, limits=limits) as client:
        tasks = [asyncio.create_task(stream(client)) for _ in range(STREAMS)]
        await asyncio.wait_for(started.wait(), 60)  # every stream has its first words
        start = time.perf_counter()
        guard.send_signal(signal.SIGTERM)
        refused_after = float("inf")
        while time.perf_counter() - start < 5:
            try:
                async with httpx.AsyncClient(timeout=1) as fresh:
                    await fresh.get(url + "/readyz")
            except httpx.HTTPError:
                refused_after = time.perf_counter() - start
                break
            await asyncio.sleep(0.02)
        answers = await asyncio.gather(*tasks)
        all_done = time.perf_counter() - start
    return list(answers), {"refused_after_s": refused_after, "all_done_s": all_done}
