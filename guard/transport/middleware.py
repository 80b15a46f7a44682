"""The HTTP app's ASGI middlewares: admission control before a model request's body is read,
a model request cancelled when its client goes away, and a request id on every response."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence

from pydantic import SecretStr
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from guard.admission import Admission
from guard.auth import check_bearer
from guard.errors import GuardError, Unauthenticated
from guard.transport.ids import request_id

log = logging.getLogger(__name__)

MODEL_ROUTES = frozenset({"/v1/chat/completions", "/v1/completions"})


class AdmissionMiddleware:
    """Admits model requests before their bodies are read and holds the slot until the response
    is complete: for a stream, until its last byte is sent or the client has gone.

    A request without a valid key takes no slot: the route refuses it before reading the body.
    Refusals (429/503 with Retry-After) go through ``error_response`` like every other error.
    """

    def __init__(
        self,
        app: ASGIApp,
        admission: Admission,
        api_keys: Sequence[SecretStr],
        refuse: Callable[[GuardError], Response],
    ) -> None:
        self.app = app
        self._admission = admission
        self._keys = list(api_keys)
        self._refuse = refuse  # the transport's one error mapping (http.error_response)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if not self._counts(scope):
            await self.app(scope, receive, send)
            return
        try:
            slot = await self._admission.acquire("http")
        except GuardError as e:
            await self._refuse(e)(scope, receive, send)
            return
        try:
            await self.app(scope, receive, send)
        finally:
            slot.release()

    def _counts(self, scope: Scope) -> bool:
        if scope["type"] != "http" or scope["method"] != "POST":
            return False
        if scope["path"] not in MODEL_ROUTES:
            return False
        try:
            check_bearer(_header(scope, b"authorization"), self._keys)
        except Unauthenticated:
            return False
        return True


class CancelOnDisconnect:
    """Cancels a model request as soon as its client disconnects, whatever it is waiting for.

    Neither uvicorn nor Starlette does: a handler runs on after its client has gone, and only a
    streaming response, once started, listens for the disconnect. So a client that leaves while
    the stages run, while the upstream prepares its first token, or during a non-streamed
    answer would have the guard check and forward its request anyway, and the upstream would
    generate the whole answer for nobody. Here, once the request body has been read, a watcher
    waits for ``http.disconnect`` and cancels the request's task: the stages stop, and an
    upstream call in progress is closed (vLLM aborts the generation when its client goes).
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        task = asyncio.current_task()
        if scope["type"] != "http" or scope["path"] not in MODEL_ROUTES or task is None:
            await self.app(scope, receive, send)
            return
        gone = asyncio.Event()
        complete = cancelled = False
        watcher: asyncio.Task[None] | None = None

        async def watch() -> None:
            nonlocal cancelled
            # After the whole body, the server's receive() only returns on a disconnect, or
            # at once after the response is complete (then there is nothing to cancel).
            while (await receive())["type"] != "http.disconnect":
                pass
            gone.set()
            if not complete:
                cancelled = True
                task.cancel()

        async def receive_body() -> Message:
            nonlocal watcher
            if watcher is not None:  # the body is read: the watcher alone reads from now on
                await gone.wait()
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request" and not message.get("more_body", False):
                watcher = asyncio.create_task(watch())
            return message

        async def send_marking_end(message: Message) -> None:
            nonlocal complete
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                complete = True  # before the send: a disconnect from here on cancels nothing
            await send(message)

        try:
            await self.app(scope, receive_body, send_marking_end)
        except asyncio.CancelledError:
            if not cancelled or task.cancelling() > 1:
                raise  # cancelled from elsewhere too (shutdown): not ours to stop
            log.info("client gone: request %s cancelled", _request_id(scope))
        finally:
            if watcher is not None:
                watcher.cancel()
            if cancelled:
                task.uncancel()  # even when something in the app swallowed our cancellation


class RequestIdMiddleware:
    """Gives every request an id (the client's, if well-formed) and every response the header.

    It wraps the whole application, Starlette's error middleware included, so that even an
    unexpected 500 carries the id a user can quote when reporting it.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        rid = request_id(_header(scope, b"x-request-id"))
        scope.setdefault("state", {})["request_id"] = rid
        raw_id = rid.encode()

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), (b"x-request-id", raw_id)]
            await send(message)

        await self.app(scope, receive, send_with_id)


def _request_id(scope: Scope) -> str:
    return str(scope.get("state", {}).get("request_id", "-"))


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope["headers"]:
        if key == name:
            return str(value.decode("latin-1"))
    return None
