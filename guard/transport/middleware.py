"""The HTTP app's ASGI middlewares: admission control before a model request's body is read,
and a request id on every response."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from pydantic import SecretStr
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from guard.admission import Admission
from guard.auth import check_bearer
from guard.errors import GuardError, Unauthenticated
from guard.transport.ids import request_id

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


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope["headers"]:
        if key == name:
            return str(value.decode("latin-1"))
    return None
