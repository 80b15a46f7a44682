"""Real servers on loopback for tests: uvicorn and grpc.aio in background threads.

``RunningGuard`` also watches everything its guard tells clients: error bodies (HTTP status
400 and up), error events inside event streams, and gRPC status details. Any internals found
there (tracebacks, source paths, memory addresses, exception names, file-system paths) fail
the test when the guard is closed, so every test that runs a guard checks DESIGN.md §7's "no
exception text, path or traceback ever reaches a client". Successful bodies are not checked:
the echo upstream repeats the client's own text in them.
"""

from __future__ import annotations

import asyncio
import json
import re
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from concurrent.futures import Future
from contextlib import aclosing
from typing import Any, TypeVar
from unittest import mock

import grpc
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from prometheus_client import CollectorRegistry
from starlette.types import ASGIApp, Message, Receive, Scope, Send

import guard.transport.grpc
from guard.config import GuardConfig, StageConfig, load_config
from guard.server import GuardServer, build_service
from guard.service import GuardService
from guard.sse import SSEParser
from guard.transport.grpc_errors import GUARD_SERVICE, GuardInterceptor
from guard.transport.openai_models import is_error_event
from guard.types import Stage

T = TypeVar("T")


def wait_for(condition: Callable[[], bool], seconds: float) -> bool:
    """Poll ``condition`` until it holds (True) or ``seconds`` have passed (False)."""
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.005)
    return True


def eventually(condition: Callable[[], bool], seconds: float = 5.0) -> None:
    assert wait_for(condition, seconds), "condition not reached"


class LoopThread:
    """An event loop running in a daemon thread; ``call`` runs a coroutine there."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()

    def call(self, factory: Callable[[], Awaitable[T]], timeout: float = 30) -> T:
        async def run() -> T:
            return await factory()

        future: Future[T] = asyncio.run_coroutine_threadsafe(run(), self.loop)
        return future.result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        self.loop.close()


class AppServer:
    """Any ASGI app served by uvicorn on 127.0.0.1, on an ephemeral port."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self._thread = LoopThread()
        self._server = uvicorn.Server(
            uvicorn.Config(
                app, host="127.0.0.1", port=0, log_config=None, lifespan="off", access_log=False
            )
        )
        self._task: asyncio.Task[None] | None = None

        async def start() -> int:
            self._task = asyncio.create_task(self._server.serve())
            while not self._server.started:  # noqa: ASYNC110 - uvicorn offers no event
                await asyncio.sleep(0.01)
            return int(self._server.servers[0].sockets[0].getsockname()[1])

        self.port = self._thread.call(start)
        self.url = f"http://127.0.0.1:{self.port}"

    def close(self) -> None:
        async def stop() -> None:
            self._server.should_exit = True
            if self._task is not None:
                await self._task

        self._thread.call(stop)
        self._thread.close()


# What must never reach a client. Tuned on error bodies only: no pattern matches the guard's
# own messages or an upstream's ordinary 4xx ("The model `x` does not exist.").
LEAK_PATTERNS = re.compile(
    r"""
    Traceback
    | \bFile\ "                               # a traceback frame
    | \bline\ \d+,\ in\ \w
    | \.pyc?\b                                # a source file: x.py" x.py:12 x.py,
    | \b0x[0-9a-fA-F]{6,}                      # a memory address (object repr)
    | <class\ '                               # repr() of a type: "Unexpected <class '...'>"
    | /(?:root|tmp|home|usr|opt|etc|var|proc|srv|app)/
    | site-packages | dist-packages
    | \bErrno\b
    | \b[A-Z][A-Za-z0-9_]*(?:Error|Exception|Warning|Interrupt|Exit):  # "KeyError: 'x'"
    | \b(?:\d{1,3}\.){3}\d{1,3}:\d{2,5}\b         # an address and port (upstream, cluster)
    """,
    re.VERBOSE,
)


class LeakRecorder:
    """Collects every leak found in what a guard sent; ``RunningGuard.close`` reports them."""

    def __init__(self) -> None:
        self.found: list[str] = []
        self._lock = threading.Lock()

    def scan(self, where: str, text: str) -> None:
        for m in LEAK_PATTERNS.finditer(text):
            context = text[max(0, m.start() - 80) : m.end() + 80]
            with self._lock:
                self.found.append(f"{where}: {m.group()!r} in {context!r}")

    def check(self) -> None:
        if self.found:
            raise AssertionError(
                "the guard sent internals to a client:\n  " + "\n  ".join(self.found)
            )


def _readable(payload: str) -> str:
    """A JSON body's strings as a client reads them (escapes undone), else ``payload``."""
    try:
        value = json.loads(payload)
    except ValueError:
        return payload
    strings: list[str] = []

    def walk(v: Any) -> None:
        if isinstance(v, str):
            strings.append(v)
        elif isinstance(v, dict):
            for key, item in v.items():
                strings.append(str(key))
                walk(item)
        elif isinstance(v, list):
            for item in v:
                walk(item)

    walk(value)
    return "\n".join(strings)


class LeakCheck:
    """ASGI middleware: scans error bodies and event-stream error events on their way out."""

    def __init__(self, app: ASGIApp, recorder: LeakRecorder) -> None:
        self.app = app
        self.recorder = recorder

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        where = f"HTTP {scope['method']} {scope['path']}"
        status = 0
        events: SSEParser | None = None
        error_body: list[bytes] = []

        async def checked(message: Message) -> None:
            nonlocal status, events
            if message["type"] == "http.response.start":
                status = int(message["status"])
                headers = {k.lower(): v for k, v in message.get("headers", [])}
                if status < 400 and headers.get(b"content-type", b"").startswith(
                    b"text/event-stream"
                ):
                    events = SSEParser()
            elif message["type"] == "http.response.body":
                chunk = bytes(message.get("body", b""))
                if status >= 400:
                    error_body.append(chunk)
                    if not message.get("more_body", False):
                        text = b"".join(error_body).decode("utf-8", errors="replace")
                        self.recorder.scan(f"{where} -> {status}", _readable(text))
                elif events is not None:
                    for payload in events.feed(chunk):
                        if is_error_event(payload):
                            self.recorder.scan(f"{where} -> error event", _readable(payload))
            await send(message)

        await self.app(scope, receive, checked)


class _RecordingContext:
    """A grpc.aio servicer context that scans the status details a call ends with."""

    def __init__(self, context: Any, where: str, recorder: LeakRecorder) -> None:
        self._context = context
        self._where = where
        self._recorder = recorder

    def __getattr__(self, name: str) -> Any:
        return getattr(self._context, name)

    async def abort(self, code: Any, details: str = "", trailing_metadata: Any = ()) -> None:
        self._recorder.scan(f"{self._where} -> {code.name}", details)
        await self._context.abort(code, details, trailing_metadata)

    def set_details(self, details: str) -> None:
        self._recorder.scan(f"{self._where} -> details", details)
        self._context.set_details(details)


class _LeakCheckingInterceptor(GuardInterceptor):  # type: ignore[misc]
    """The guard's own interceptor, whose Guard methods get a ``_RecordingContext``."""

    def __init__(self, api_keys: Any, track: Any, recorder: LeakRecorder) -> None:
        super().__init__(api_keys, track)
        self._recorder = recorder

    async def intercept_service(self, continuation: Any, details: Any) -> Any:
        handler = await super().intercept_service(continuation, details)
        method: str = details.method
        if handler is None or not method.startswith(f"/{GUARD_SERVICE}/"):
            return handler
        where, recorder = f"gRPC {method}", self._recorder
        if handler.unary_unary is not None:
            unary_behavior = handler.unary_unary

            async def unary(request: Any, context: Any) -> Any:
                return await unary_behavior(request, _RecordingContext(context, where, recorder))

            return grpc.unary_unary_rpc_method_handler(
                unary,
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        stream_behavior = handler.unary_stream

        async def stream(request: Any, context: Any) -> AsyncIterator[Any]:
            recording = _RecordingContext(context, where, recorder)
            async with aclosing(stream_behavior(request, recording)) as responses:
                async for response in responses:
                    yield response

        return grpc.unary_stream_rpc_method_handler(
            stream,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )


class RunningGuard:
    """A whole guard (HTTP + gRPC) built from a config, served on ephemeral ports."""

    def __init__(
        self,
        upstream_url: str,
        overrides: Mapping[str, Any] | None = None,
        *,
        stages: Sequence[Stage] | None = None,  # None: the stages the config names
        stage_configs: Mapping[str, StageConfig] | None = None,
        resolver: Any = None,
    ) -> None:
        base: dict[str, Any] = {
            "server": {"host": "127.0.0.1", "http_port": 0, "grpc_port": 0, "drain_seconds": 1},
            "upstream": {"url": upstream_url},
            "pipeline": {"defenses": []},
        }
        self.cfg: GuardConfig = load_config(None, _merge(base, dict(overrides or {})))
        self.registry = CollectorRegistry()
        self.leaks = LeakRecorder()
        self._thread = LoopThread()

        def interceptor(api_keys: Any, track: Any) -> GuardInterceptor:
            return _LeakCheckingInterceptor(api_keys, track, self.leaks)

        async def start() -> GuardServer:
            service = build_service(
                self.cfg,
                stages=stages,
                stage_configs=stage_configs,
                registry=self.registry,
                resolver=resolver,
            )
            server = GuardServer(self.cfg, service)
            # The HTTP app as uvicorn will serve it, and the gRPC interceptor the server is
            # built with (create_server runs inside start), both watched for leaks.
            config = server._uvicorn.config
            config.app = LeakCheck(config.app, self.leaks)
            with mock.patch.object(guard.transport.grpc, "GuardInterceptor", interceptor):
                await server.start()
            return server

        self.server = self._thread.call(start)
        self.service: GuardService = self.server.service
        self.url = f"http://127.0.0.1:{self.server.http_port}"
        self.grpc_target = f"127.0.0.1:{self.server.grpc_port}"

    def metric(self, name: str, labels: Mapping[str, str] | None = None) -> float:
        value = self.registry.get_sample_value(name, dict(labels or {}))
        return 0.0 if value is None else value

    def close(self) -> None:
        """Stop both servers; then fail if the guard sent internals to any client."""
        self._thread.call(self.server.stop)
        self._thread.close()
        self.leaks.check()


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


class SlowUpstream:
    """An OpenAI-compatible upstream that answers slowly (``tokens`` pieces, ``token_s`` apart,
    the first after ``first_token_s`` more) and records per request id, as vLLM's abort on
    disconnect would show, when the request arrived, when it noticed the guard had gone
    (disconnect or cancellation) and when it finished an answer. A non-streamed answer looks
    for a disconnect every ``poll_s``, as vLLM does between steps."""

    def __init__(
        self, tokens: int = 10, token_s: float = 0.05, poll_s: float | None = None
    ) -> None:
        self.tokens, self.token_s, self.poll_s = tokens, token_s, poll_s or token_s
        self.first_token_s = 0.0
        self.started: dict[str, float] = {}
        self.cancelled: dict[str, float] = {}
        self.finished: dict[str, float] = {}
        app = FastAPI()

        @app.post("/v1/chat/completions")
        async def chat(request: Request) -> Any:
            body = await request.json()
            rid = request.headers["x-request-id"]
            self.started[rid] = time.monotonic()
            if body.get("stream"):
                return StreamingResponse(self._events(rid), media_type="text/event-stream")
            try:
                deadline = time.monotonic() + self.tokens * self.token_s
                while time.monotonic() < deadline:
                    await asyncio.sleep(self.poll_s)
                    if await request.is_disconnected():
                        self.cancelled[rid] = time.monotonic()
                        return JSONResponse({}, status_code=499)
            except BaseException:
                self.cancelled[rid] = time.monotonic()
                raise
            self.finished[rid] = time.monotonic()
            message = {"role": "assistant", "content": "slow answer"}
            choice = {"index": 0, "message": message, "finish_reason": "stop"}
            return JSONResponse({"id": rid, "object": "chat.completion", "choices": [choice]})

        self.server = AppServer(app)

    async def _events(self, rid: str) -> AsyncIterator[bytes]:
        # Starlette cancels this generator as soon as the connection is lost (it listens for
        # the disconnect beside the stream): CancelledError, recorded below.
        try:
            await asyncio.sleep(self.first_token_s)
            for i in range(self.tokens):
                await asyncio.sleep(self.token_s)
                chunk = {"id": rid, "choices": [{"index": 0, "delta": {"content": f"t{i} "}}]}
                yield f"data: {json.dumps(chunk)}\n\n".encode()
            yield b"data: [DONE]\n\n"
            self.finished[rid] = time.monotonic()
        except BaseException:
            self.cancelled[rid] = time.monotonic()
            raise
