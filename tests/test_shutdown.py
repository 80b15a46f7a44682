"""Shutdown: both transports stop taking work at once and drain together, so a stop takes at
most ``server.drain_seconds`` (deploy/kubernetes's grace period counts on it), and gRPC health
turns NOT_SERVING as readiness fails."""

from __future__ import annotations

import asyncio
import threading
import time

import grpc
import httpx
from fastapi import FastAPI
from grpc_health.v1 import health_pb2, health_pb2_grpc

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
