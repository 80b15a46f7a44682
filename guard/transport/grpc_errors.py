"""The gRPC transport's one interceptor: API keys, and every exception mapped to a status.

Only the ``guard.v1.Guard`` service is intercepted; health and reflection stay open, as
``/healthz`` does over HTTP. ``GuardError`` becomes its own code and client-safe message; any
other exception is logged with its traceback and the client reads only "internal error".
"""

from __future__ import annotations

import logging
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Sequence
from contextlib import aclosing
from typing import Any

import grpc
from pydantic import SecretStr

from guard.auth import check_bearer
from guard.errors import GuardError, Unauthenticated
from guard.service import Tracker

log = logging.getLogger(__name__)

GUARD_SERVICE = "guard.v1.Guard"

Continuation = Callable[[Any], Awaitable[Any]]


class GuardInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Checks the bearer key and maps errors for every Guard RPC, in exactly one place."""

    def __init__(self, api_keys: Sequence[SecretStr], track: Callable[[str], Tracker]) -> None:
        self._keys = list(api_keys)
        self._track = track

    async def intercept_service(self, continuation: Continuation, details: Any) -> Any:
        handler = await continuation(details)
        method: str = details.method
        if handler is None or not method.startswith(f"/{GUARD_SERVICE}/"):
            return handler
        authorization = _metadata(details.invocation_metadata, "authorization")
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                self._unary(handler.unary_unary, method, authorization),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(
                self._stream(handler.unary_stream, method, authorization),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        raise TypeError(f"{method}: only unary requests are supported")  # a proto change

    def _authorize(self, authorization: str | None) -> None:
        try:
            check_bearer(authorization, self._keys)
        except Unauthenticated as e:
            # The servicer never runs, so the request is counted here, as HTTP counts it.
            self._track("grpc").fail(e)
            raise

    def _unary(
        self, behavior: Callable[[Any, Any], Awaitable[Any]], method: str, auth: str | None
    ) -> Callable[[Any, Any], Awaitable[Any]]:
        async def unary(request: Any, context: Any) -> Any:
            try:
                self._authorize(auth)
                return await behavior(request, context)
            except Exception as e:
                await _abort(context, e, method)

        return unary

    def _stream(
        self,
        behavior: Callable[[Any, Any], AsyncGenerator[Any, None]],
        method: str,
        auth: str | None,
    ) -> Callable[[Any, Any], AsyncIterator[Any]]:
        async def stream(request: Any, context: Any) -> AsyncIterator[Any]:
            try:
                self._authorize(auth)
                # aclosing: a cancelled call closes the servicer's generator now, so its
                # finally blocks (tracker, upstream response) run at once, not at GC.
                async with aclosing(behavior(request, context)) as responses:
                    async for response in responses:
                        yield response
            except Exception as e:
                await _abort(context, e, method)

        return stream


async def _abort(context: Any, error: Exception, method: str) -> None:
    """Turn ``error`` into the call's status; ``context.abort`` always raises."""
    if isinstance(error, grpc.aio.AbortError):
        raise error  # context.abort was already called: the status is set
    if isinstance(error, GuardError):
        trailers: tuple[tuple[str, str], ...] = ()
        if error.retry_after is not None:
            trailers = (("retry-after", str(error.retry_after)),)
        await context.abort(error.grpc_code, error.message, trailers)
    else:
        log.error("unexpected error in %s", method, exc_info=error)
        await context.abort(grpc.StatusCode.INTERNAL, "internal error")


def _metadata(metadata: Sequence[tuple[str, str | bytes]] | None, key: str) -> str | None:
    for name, value in metadata or ():
        if name == key:
            return value if isinstance(value, str) else value.decode("latin-1")
    return None
