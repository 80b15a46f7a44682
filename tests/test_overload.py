"""Overload: bounded admission (429/503 + Retry-After, RESOURCE_EXHAUSTED/UNAVAILABLE), health
under overload, no slot leaks, and the HTTP limits enforced before anything is parsed whole."""

from __future__ import annotations

import asyncio
import contextlib
import json
import select
import socket
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import grpc
import httpx
import openai
import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from grpc_health.v1 import health_pb2, health_pb2_grpc

from guard.admission import Admission
from guard.config import ServerConfig, StageConfig
from guard.errors import NotAdmitted, Overloaded
from guard.types import Decision, GuardRequest
from guard.v1 import guard_pb2 as pb
from guard.v1 import guard_pb2_grpc as pb_grpc
from tests.servers import AppServer, RunningGuard, eventually

MESSAGES = [{"role": "user", "content": "hello"}]
CHAT = {"model": "m", "messages": MESSAGES}
STREAM = {**CHAT, "stream": True}
COMPLETION = {
    "id": "c1",
    "object": "chat.completion",
    "created": 1,
    "model": "m",
    "choices": [
        {"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}
    ],
}


def _event(text: str) -> bytes:
    chunk = {"id": "c1", "object": "chat.completion.chunk", "created": 1, "model": "m"}
    chunk["choices"] = [{"index": 0, "delta": {"content": text}}]
    return f"data: {json.dumps(chunk)}\n\n".encode()


async def _until(event: threading.Event) -> None:
    while not event.is_set():  # noqa: ASYNC110 - the event is set from the test's thread
        await asyncio.sleep(0.01)


class Gate:
    """An OpenAI-compatible upstream that holds every answer until ``release`` is set; a
    stream sends its first event at once. Model ``broken`` cuts its stream off. ``checks``
    releases the guard's ``GatedStage``."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.checks = threading.Event()
        self.arrived = 0
        app = FastAPI()

        @app.get("/v1/models")
        async def models() -> dict[str, Any]:
            return {"object": "list", "data": [{"id": "m", "object": "model"}]}

        @app.post("/v1/chat/completions")
        async def chat(request: Request) -> Response:
            body = await request.json()
            self.arrived += 1
            if body.get("stream"):
                return StreamingResponse(
                    self._events(body["model"]), media_type="text/event-stream"
                )
            await _until(self.release)
            return JSONResponse(COMPLETION)

        self.server = AppServer(app)

    async def _events(self, model: str) -> Any:
        yield _event("first")
        if model == "broken":
            raise RuntimeError("upstream cut off")  # uvicorn drops the connection
        await _until(self.release)
        yield _event("second")
        yield b"data: [DONE]\n\n"


@dataclass
class GatedStage:
    """A checking stage that decides only once the gate is released (keeps gRPC Check busy)."""

    release: threading.Event
    name: str = "reasoner"
    may_rewrite: bool = False

    async def check(self, request: GuardRequest) -> Decision:
        await _until(self.release)
        return Decision(self.name, "allow")

    def ready(self) -> bool:
        return True


@pytest.fixture
def gate() -> Iterator[Gate]:
    g = Gate()
    yield g
    g.release.set()
    g.checks.set()
    g.server.close()


@pytest.fixture
def pool() -> Iterator[ThreadPoolExecutor]:
    with ThreadPoolExecutor(8) as executor:
        yield executor


StartGuard = Callable[..., RunningGuard]


@pytest.fixture
def start(gate: Gate) -> Iterator[StartGuard]:
    guards: list[RunningGuard] = []

    def make(*, gated_stage: bool = False, **server: Any) -> RunningGuard:
        settings = {"max_inflight": 1, "max_queue": 0, "queue_timeout_s": 5.0, **server}
        guard = RunningGuard(
            gate.server.url + "/v1",
            {"server": settings},
            stages=[GatedStage(gate.checks)] if gated_stage else [],
            stage_configs={"reasoner": StageConfig()},
        )
        guards.append(guard)
        return guard

    yield make
    gate.release.set()  # nothing left to drain
    gate.checks.set()
    for guard in guards:
        guard.close()


def _admission(guard: RunningGuard) -> Admission:
    return guard.server.admission


async def _eventually_async(condition: Callable[[], bool]) -> None:
    deadline = time.monotonic() + 5.0
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.01)


def _post(guard: RunningGuard, body: Any = CHAT, **kw: Any) -> httpx.Response:
    kw.setdefault("timeout", 15)
    if isinstance(body, bytes):
        return httpx.post(guard.url + "/v1/chat/completions", content=body, **kw)
    return httpx.post(guard.url + "/v1/chat/completions", json=body, **kw)


def _assert_idle(guard: RunningGuard) -> None:
    """No slot, waiter or request count left behind."""
    eventually(lambda: _admission(guard).inflight == 0 and _admission(guard).queued == 0)
    eventually(lambda: guard.metric("vlm_guard_inflight_requests") == 0)
    assert guard.metric("vlm_guard_queued_requests") == 0


def _assert_overload(response: httpx.Response, status: int, code: str) -> None:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["code"] == code
    assert error["type"] == ("rate_limit_error" if status == 429 else "overloaded")
    assert response.headers["retry-after"] == "1"
    assert response.headers["x-should-retry"] == "true"
    assert response.headers["x-request-id"]


def _overloads(guard: RunningGuard, transport: str, reason: str) -> float:
    labels = {"transport": transport, "reason": reason}
    return guard.metric("vlm_guard_overload_total", labels)


# --- HTTP admission -------------------------------------------------------------------------


def test_http_429_503_and_health_under_overload(
    start: StartGuard, gate: Gate, pool: ThreadPoolExecutor
) -> None:
    guard = start(max_inflight=1, max_queue=1, queue_timeout_s=0.5)
    held = pool.submit(_post, guard)
    eventually(lambda: gate.arrived == 1)
    began = time.monotonic()
    waiting = pool.submit(_post, guard)
    eventually(lambda: _admission(guard).queued == 1)

    _assert_overload(_post(guard), 429, "overloaded")
    for path in ("/healthz", "/readyz", "/metrics", "/v1/models"):
        assert httpx.get(guard.url + path, timeout=5).status_code == 200, path
    assert guard.metric("vlm_guard_queued_requests") == 1

    _assert_overload(waiting.result(), 503, "queue_timeout")
    assert time.monotonic() - began >= 0.5
    gate.release.set()
    assert held.result().json() == COMPLETION
    _assert_idle(guard)
    assert _overloads(guard, "http", "queue_full") == 1
    assert _overloads(guard, "http", "queue_timeout") == 1
    assert guard.metric("vlm_guard_requests_total", {"transport": "http", "outcome": "allow"}) == 1


def test_queued_requests_run_in_order_with_bodies_unread(
    start: StartGuard, gate: Gate, pool: ThreadPoolExecutor
) -> None:
    guard = start(max_inflight=1, max_queue=2, queue_timeout_s=10)
    held = pool.submit(_post, guard)
    eventually(lambda: gate.arrived == 1)
    # Not JSON: parsed before admission, it would be refused at once.
    invalid = pool.submit(_post, guard, b"{not json")
    eventually(lambda: _admission(guard).queued == 1)
    second = pool.submit(_post, guard)
    eventually(lambda: _admission(guard).queued == 2)
    time.sleep(0.2)
    assert not invalid.done()
    assert guard.metric("vlm_guard_inflight_requests") == 1  # only the admitted one is handled
    gate.release.set()
    assert held.result().status_code == 200
    assert invalid.result().status_code == 400
    assert second.result().status_code == 200
    _assert_idle(guard)


def test_openai_client_sees_rate_limit_and_retries_after(
    start: StartGuard, gate: Gate, pool: ThreadPoolExecutor
) -> None:
    guard = start(max_inflight=1, max_queue=0)
    held = pool.submit(_post, guard)
    eventually(lambda: gate.arrived == 1)
    client = openai.OpenAI(base_url=guard.url + "/v1", api_key="unused", max_retries=0)
    with pytest.raises(openai.RateLimitError) as info:
        client.chat.completions.create(model="m", messages=MESSAGES)
    assert info.value.status_code == 429
    assert info.value.code == "overloaded"
    assert info.value.response.headers["retry-after"] == "1"
    assert info.value.response.headers["x-should-retry"] == "true"

    # The same client with a retry waits the Retry-After second, then gets through.
    threading.Timer(0.2, gate.release.set).start()
    began = time.monotonic()
    retrying = client.with_options(max_retries=1)
    answer = retrying.chat.completions.create(model="m", messages=MESSAGES)
    assert answer.choices[0].message.content == "ok"
    assert 0.9 <= time.monotonic() - began < 5
    assert held.result().status_code == 200
    _assert_idle(guard)
    client.close()


def test_draining_refuses_queued_requests_at_once(gate: Gate, pool: ThreadPoolExecutor) -> None:
    settings = {"max_inflight": 1, "max_queue": 1, "queue_timeout_s": 30, "drain_seconds": 5}
    guard = RunningGuard(gate.server.url + "/v1", {"server": settings})
    try:
        held = pool.submit(_post, guard)
        eventually(lambda: gate.arrived == 1)
        waiting = pool.submit(_post, guard)
        eventually(lambda: _admission(guard).queued == 1)
        began = time.monotonic()
        stopping = pool.submit(guard.close)
        _assert_overload(waiting.result(), 503, "draining")
        assert time.monotonic() - began < 2  # not after the drain, not after the queue timeout
        gate.release.set()
        assert held.result().status_code == 200  # admitted work finishes during the drain
        stopping.result()
    finally:
        gate.release.set()
    assert _admission(guard).inflight == 0 and _admission(guard).queued == 0


# --- no slot leaks --------------------------------------------------------------------------


def test_slots_freed_after_errors_and_disconnects(
    start: StartGuard, gate: Gate, pool: ThreadPoolExecutor
) -> None:
    guard = start(max_inflight=2, max_queue=1, queue_timeout_s=0.5, max_body_bytes=1024)
    assert _post(guard, b"{not json").status_code == 400
    assert _post(guard, {**CHAT, "pad": "x" * 2048}).status_code == 413
    broken = _post(guard, {**STREAM, "model": "broken"})
    assert b"upstream_stream_error" in broken.content  # the cut stream ends in an error event
    _assert_idle(guard)

    # A client that leaves mid-stream frees its slot although the upstream is still held.
    with httpx.stream("POST", guard.url + "/v1/chat/completions", json=STREAM) as response:
        chunks = response.iter_raw()  # (dropping the iterator would close the response)
        assert b"first" in next(chunks)
        time.sleep(0.1)
        assert _admission(guard).inflight == 1
        assert guard.metric("vlm_guard_inflight_requests") == 1
    _assert_idle(guard)

    # A client that leaves while queued: its place is freed (at the latest at the timeout).
    with contextlib.ExitStack() as streams:
        for _ in range(2):
            held = streams.enter_context(
                httpx.stream("POST", guard.url + "/v1/chat/completions", json=STREAM)
            ).iter_raw()
            streams.callback(held.close)
            assert b"first" in next(held)
        assert _admission(guard).inflight == 2
        with socket.create_connection(("127.0.0.1", guard.server.http_port)) as sock:
            body = json.dumps(CHAT).encode()
            sock.sendall(_head("/v1/chat/completions", len(body)) + body)
            eventually(lambda: _admission(guard).queued == 1)
    _assert_idle(guard)
    assert not gate.release.is_set()  # every slot above was freed by a client leaving


async def test_grpc_codes_shared_capacity_and_cancellation(start: StartGuard, gate: Gate) -> None:
    guard = start(max_inflight=1, max_queue=1, queue_timeout_s=0.5, gated_stage=True)
    admission = _admission(guard)
    async with grpc.aio.insecure_channel(guard.grpc_target) as channel:
        stub = pb_grpc.GuardStub(channel)
        held = asyncio.ensure_future(stub.Check(pb.CheckRequest(text="hi")))
        await _eventually_async(lambda: admission.inflight == 1)
        waiting = asyncio.ensure_future(stub.Check(pb.CheckRequest(text="hi")))
        await _eventually_async(lambda: admission.queued == 1)

        with pytest.raises(grpc.aio.AioRpcError) as full:
            await stub.Purify(pb.PurifyRequest())
        assert full.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert ("retry-after", "1") in tuple(full.value.trailing_metadata() or ())
        # One capacity for both transports: HTTP is refused too.
        async with httpx.AsyncClient(timeout=5) as client:
            response = await client.post(guard.url + "/v1/chat/completions", json=CHAT)
            _assert_overload(response, 429, "overloaded")
            assert (await client.get(guard.url + "/healthz")).status_code == 200
        health = health_pb2_grpc.HealthStub(channel)
        status = await health.Check(health_pb2.HealthCheckRequest(service="guard.v1.Guard"))
        assert status.status == health_pb2.HealthCheckResponse.SERVING

        with pytest.raises(grpc.aio.AioRpcError) as timed_out:
            await waiting
        assert timed_out.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "overloaded" in (timed_out.value.details() or "")

        # A call whose deadline passes while queued leaves no waiter behind.
        with pytest.raises(grpc.aio.AioRpcError) as late:
            await stub.Check(pb.CheckRequest(text="hi"), timeout=0.2)
        assert late.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        await _eventually_async(lambda: admission.queued == 0)

        gate.checks.set()
        assert (await held).outcome == pb.OUTCOME_ALLOW
        await _eventually_async(lambda: admission.inflight == 0)

        # A Chat stream cancelled mid-way (the upstream still holds it) frees its slot.
        call = stub.Chat(pb.ChatRequest(json=json.dumps(STREAM)))
        assert b"first" in (await call.read()).json.encode()
        assert admission.inflight == 1
        call.cancel()
        await _eventually_async(lambda: admission.inflight == 0)
        await _eventually_async(lambda: guard.metric("vlm_guard_inflight_requests") == 0)
    assert _overloads(guard, "grpc", "queue_full") == 1
    assert _overloads(guard, "grpc", "queue_timeout") == 1
    assert _overloads(guard, "http", "queue_full") == 1


# --- limits before parsing ------------------------------------------------------------------


def _head(path: str, length: int | None = None, extra: bytes = b"") -> bytes:
    head = f"POST {path} HTTP/1.1\r\nhost: guard\r\ncontent-type: application/json\r\n".encode()
    if length is None:
        head += b"transfer-encoding: chunked\r\n"
    else:
        head += f"content-length: {length}\r\n".encode()
    return head + extra + b"\r\n"


def _response(sock: socket.socket) -> bytes:
    """What the server answered before it closed (or within a second)."""
    sock.settimeout(5)
    data = b""
    try:
        while b"\r\n\r\n" not in data or len(data) < data.index(b"\r\n\r\n") + 4 + _length(data):
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    except (ConnectionResetError, TimeoutError):
        pass
    return data


def _length(data: bytes) -> int:
    head = data.split(b"\r\n\r\n", 1)[0].lower()
    for line in head.split(b"\r\n"):
        if line.startswith(b"content-length:"):
            return int(line.split(b":", 1)[1])
    return 0


def _send(sock: socket.socket, data: bytes) -> None:
    # The server may stop reading and close: what matters is what it answered.
    with contextlib.suppress(BrokenPipeError, ConnectionResetError):
        sock.sendall(data)


def _assert_431(raw: bytes) -> None:
    assert raw.startswith(b"HTTP/1.1 431 "), raw[:200]
    body = json.loads(raw.split(b"\r\n\r\n", 1)[1])
    assert body["error"]["code"] == "headers_too_large"
    assert set(body["error"]) == {"message", "type", "param", "code"}


def test_header_flood_is_refused_before_parsing(start: StartGuard, gate: Gate) -> None:
    guard = start(max_header_bytes=16 * 1024, max_headers=50)
    address = ("127.0.0.1", guard.server.http_port)
    many = b"".join(b"x-flood-%d: 1\r\n" % i for i in range(1000))
    huge = b"x-huge: " + b"a" * (8 * 1024 * 1024) + b"\r\n"  # far beyond any buffer
    for extra in (many, huge):
        with socket.create_connection(address) as sock:
            began = time.monotonic()
            _send(sock, _head("/v1/chat/completions", 2, extra) + b"{}")
            _assert_431(_response(sock))
            assert time.monotonic() - began < 3
    # Within the limits, large headers and many of them are fine (keep-alive included).
    fine = {f"x-h{i}": "v" * 200 for i in range(40)}
    with httpx.Client(base_url=guard.url, timeout=5) as client:
        for _ in range(3):
            assert client.get("/healthz", headers=fine).status_code == 200
        gate.release.set()
        assert client.post("/v1/chat/completions", json=CHAT, headers=fine).status_code == 200
    assert httpx.get(guard.url + "/healthz", timeout=5).status_code == 200


def test_oversized_body_refused_without_reading_it_all(start: StartGuard) -> None:
    guard = start(max_body_bytes=64 * 1024)
    address = ("127.0.0.1", guard.server.http_port)

    # Declared too large: refused from the header, before a byte of body.
    with socket.create_connection(address) as sock:
        _send(sock, _head("/v1/chat/completions", 10 * 1024**3))
        assert _response(sock).startswith(b"HTTP/1.1 413 ")

    # No length at all (chunked): refused once the limit is passed, long before the end.
    chunk = b"%x\r\n%s\r\n" % (64 * 1024, b" " * 64 * 1024)
    total = 256 * 1024 * 1024
    with socket.create_connection(address) as sock:
        _send(sock, _head("/v1/chat/completions"))
        sent = 0
        while sent < total:
            _send(sock, chunk)
            sent += 64 * 1024
            if select.select([sock], [], [], 0)[0]:
                break
        assert sent < 32 * 1024 * 1024, sent
        raw = _response(sock)
    assert raw.startswith(b"HTTP/1.1 413 "), raw[:200]
    assert json.loads(raw.split(b"\r\n\r\n", 1)[1])["error"]["code"] == "payload_too_large"

    # A length that lies (short): the body ends where it says, the rest is not a request.
    with socket.create_connection(address) as sock:
        _send(sock, _head("/v1/chat/completions", 10) + b"{" * (4 * 1024 * 1024))
        raw = _response(sock)
    assert raw.startswith(b"HTTP/1.1 400 "), raw[:200]
    assert httpx.get(guard.url + "/healthz", timeout=5).status_code == 200
    _assert_idle(guard)


# --- Admission on its own: the races ---------------------------------------------------------


def _server(**kw: Any) -> ServerConfig:
    return ServerConfig(**{"max_inflight": 1, "max_queue": 2, "queue_timeout_s": 5, **kw})


async def test_admission_hands_slots_over_in_order_and_survives_cancellation() -> None:
    admission = Admission(_server())
    first = await admission.acquire("http")
    order: list[str] = []

    async def wait(name: str) -> None:
        async with admission.slot("http"):
            order.append(name)

    a = asyncio.create_task(wait("a"))
    cancelled = asyncio.create_task(wait("cancelled"))
    await asyncio.sleep(0)
    assert admission.queued == 2
    with pytest.raises(Overloaded):
        await admission.acquire("http")
    cancelled.cancel()
    with pytest.raises(asyncio.CancelledError):
        await cancelled
    assert admission.queued == 1
    first.release()
    first.release()  # idempotent
    await a
    assert order == ["a"]
    assert admission.inflight == 0 and admission.queued == 0


async def test_admission_slot_arriving_with_the_cancellation_is_passed_on() -> None:
    admission = Admission(_server())
    first = await admission.acquire("grpc")
    late = asyncio.create_task(admission.acquire("grpc"))
    nxt = asyncio.create_task(admission.acquire("grpc"))
    await asyncio.sleep(0)
    first.release()  # hands the slot to ``late``...
    late.cancel()  # ...which is cancelled before it could run
    with pytest.raises(asyncio.CancelledError):
        await late
    (await nxt).release()
    assert admission.inflight == 0 and admission.queued == 0


async def test_admission_timeout_and_drain() -> None:
    admission = Admission(_server(queue_timeout_s=0.05, retry_after_s=7))
    held = await admission.acquire("http")
    with pytest.raises(NotAdmitted) as info:
        await admission.acquire("http")
    assert (info.value.code, info.value.retry_after, info.value.status) == ("queue_timeout", 7, 503)
    waiter = asyncio.create_task(admission.acquire("http"))
    await asyncio.sleep(0)
    admission.drain()
    with pytest.raises(NotAdmitted) as drained:
        await waiter
    assert drained.value.code == "draining"
    with pytest.raises(NotAdmitted):
        await admission.acquire("http")
    held.release()
    assert admission.inflight == 0 and admission.queued == 0
