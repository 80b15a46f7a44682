"""The OpenAI-compatible upstream (vLLM in production): forward, stream back, probe readiness.

Responses are passed on as bytes: the guard never re-serialises what the model said. Only the
routes the guard serves are ever requested here, with the guard's own upstream credential.

aiohttp rather than httpx: on the proxy's hot path httpx's connection pool bookkeeping cost
more CPU than everything else the guard does per request (measured with py-spy: ~50% of a
--defenses none guard's time), and aiohttp's client is about 1.5x faster on this machine.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp

from guard.config import UpstreamConfig
from guard.errors import UpstreamOverloaded, UpstreamTimeout, UpstreamUnavailable
from guard.metrics import Metrics
from guard.sse import EventFramer, SSEError

log = logging.getLogger(__name__)

# Response headers worth passing back to the client; hop-by-hop and length headers are not
# (the guard's server frames the body itself).
PASS_HEADERS = frozenset(
    {"content-type", "openai-processing-ms", "openai-version", "retry-after"}  # e.g. on a 429
)


class UpstreamStreamError(Exception):
    """The upstream broke off a response after it had started."""


class _PastDeadline(TimeoutError):
    """The answer outlived ``upstream.total_timeout_s``: a timeout like any other to the
    callers (504 before the first event, a broken stream after it), logged where it happens."""


# Every way a connection can fail under aiohttp: its own errors, OS errors it lets through
# (a reset at the wrong moment) and timeouts (TimeoutError is an OSError).
_BROKEN = (aiohttp.ClientError, OSError)
_BROKEN_STREAM = (*_BROKEN, SSEError)  # and an event stream cut inside an event


@dataclass
class UpstreamResponse:
    status: int
    headers: Mapping[str, str]
    content: bytes


def _pass_headers(response: aiohttp.ClientResponse) -> dict[str, str]:
    return {k.lower(): v for k, v in response.headers.items() if k.lower() in PASS_HEADERS}


def _failure(error: BaseException, what: str) -> UpstreamTimeout | UpstreamUnavailable:
    """The client-safe error for a failed exchange; the log gets the exception's type only."""
    if not isinstance(error, _PastDeadline):  # already logged, with the deadline
        log.warning("upstream %s failed: %s", what, type(error).__name__)
    if isinstance(error, TimeoutError):
        return UpstreamTimeout("upstream timed out")
    return UpstreamUnavailable("upstream connection failed")


class UpstreamStream:
    """An open response whose body has not been read yet: ``chunks()`` or ``read()`` once.

    An event stream (``text/event-stream``) comes out of ``chunks()`` in whole events, byte for
    byte, and must end with ``data: [DONE]``: a transport can then always close a broken one
    with an error event of its own, and a stream cut short never passes for a complete answer.

    Every read ends by ``deadline`` (loop time, ``upstream.total_timeout_s`` after the request
    was sent): ``read_timeout_s`` bounds each wait, but an upstream that trickles a byte now
    and then would otherwise hold the answer, and the client's admission slot, forever.
    """

    def __init__(
        self, response: aiohttp.ClientResponse, deadline: float, total_timeout_s: float
    ) -> None:
        self._response = response
        self._deadline = deadline
        self._total = total_timeout_s
        self._loop = asyncio.get_running_loop()
        self._finished = False
        self.status = response.status
        self.headers = _pass_headers(response)
        sse = response.status == 200 and response.content_type == "text/event-stream"
        self._events = EventFramer() if sse else None
        self._first = b""  # the first events, read by ``open`` before it returned

    async def chunks(self) -> AsyncIterator[bytes]:
        complete = False
        try:
            if self._first:
                first, self._first = self._first, b""
                yield first
            while (piece := await self._next()) is not None:
                yield piece
            complete = True
        except _BROKEN_STREAM as e:
            if not isinstance(e, _PastDeadline):  # already logged, with the deadline
                log.warning("upstream stream broke: %s", type(e).__name__)
            raise UpstreamStreamError("upstream stream interrupted") from None
        finally:
            self._finish(complete)

    async def read(self) -> bytes:
        complete = False
        try:
            content = self._first + await self._within(whole=True)  # and what ``open`` read
            complete = True
            return content
        except _BROKEN as e:
            raise _failure(e, "read") from None
        finally:
            self._finish(complete)

    def close(self) -> None:
        self._finish(False)

    async def _start(self) -> None:
        """Read up to the end of the first event (``open``): until then nothing has reached
        the client, and a failure can still be an error status rather than a broken stream."""
        if self._events is None:
            return
        try:
            piece = await self._next()
        except BaseException as e:
            self.close()
            if isinstance(e, _BROKEN_STREAM):
                raise _failure(e, "stream start") from None
            if isinstance(e, UpstreamStreamError):
                raise UpstreamUnavailable("upstream connection failed") from None
            raise
        self._first = piece or b""

    async def _next(self) -> bytes | None:
        """The next bytes to relay (whole events of an event stream); None at the end."""
        while True:
            chunk = await self._within()
            if self._events is None:
                return chunk or None
            if not chunk:
                rest = self._events.close()  # raises SSEError if cut inside an event
                if not self._events.done:
                    log.warning("upstream event stream ended without [DONE]")
                    raise UpstreamStreamError("upstream stream ended early")
                return rest or None
            if whole := self._events.feed(chunk):
                return whole

    async def _within(self, *, whole: bool = False) -> bytes:
        """The next bytes (``whole``: the rest of the body), or ``_PastDeadline`` once the
        deadline has passed. Checked before reading too: data already buffered is returned
        without a wait, so a fast upstream would never let the timeout fire."""
        if self._loop.time() < self._deadline:
            timeout = asyncio.timeout_at(self._deadline)  # one timer handle, no task
            try:
                async with timeout:
                    if whole:
                        return await self._response.read()
                    return await self._response.content.readany()
            except TimeoutError:
                if not timeout.expired():
                    raise  # aiohttp's own read timeout
        log.warning("upstream answer cut off: upstream.total_timeout_s (%g s) passed", self._total)
        raise _PastDeadline

    def _finish(self, complete: bool) -> None:
        if self._finished:
            return
        self._finished = True
        if complete:
            self._response.release()  # the connection goes back to the pool
        else:
            # Closing the connection is how the upstream learns that nobody is listening any
            # more: vLLM aborts the generation when its client disconnects.
            self._response.close()


class UpstreamClient:
    def __init__(
        self,
        cfg: UpstreamConfig,
        metrics: Metrics,
        *,
        connector: aiohttp.BaseConnector | None = None,
    ) -> None:
        self._cfg = cfg
        self._metrics = metrics
        self._base = str(cfg.url).rstrip("/") + "/"
        self._headers = {"accept": "application/json", "accept-encoding": "identity"}
        if cfg.api_key is not None:
            self._headers["authorization"] = f"Bearer {cfg.api_key.get_secret_value()}"
        self._connector = connector
        self._session: aiohttp.ClientSession | None = None

    def _client(self) -> aiohttp.ClientSession:
        # Created on first use: an aiohttp session belongs to the running event loop.
        if self._session is None:
            self._session = aiohttp.ClientSession(
                connector=self._connector
                or aiohttp.TCPConnector(limit=self._cfg.max_connections, ttl_dns_cache=60),
                headers=self._headers,
                timeout=aiohttp.ClientTimeout(
                    total=None,
                    connect=self._cfg.connect_timeout_s,
                    sock_read=self._cfg.read_timeout_s,
                ),
                auto_decompress=False,  # bytes are relayed as they came
                trust_env=False,  # a proxy from the environment must not sit in between
            )
        return self._session

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()

    async def post(
        self, path: str, body: Mapping[str, Any], *, request_id: str
    ) -> UpstreamResponse:
        stream = await self.open(path, body, request_id=request_id)
        content = await stream.read()
        return UpstreamResponse(stream.status, stream.headers, content)

    async def open(self, path: str, body: Mapping[str, Any], *, request_id: str) -> UpstreamStream:
        """Send a POST; return once the response headers (and, for an event stream, its first
        event) have arrived. Never sent twice: once bytes left, the upstream may be generating.
        """
        payload = json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode()
        headers = {"content-type": "application/json", "x-request-id": request_id}
        stream = await self._send("POST", path, headers, payload)
        await stream._start()
        return stream

    async def get(self, path: str, *, request_id: str) -> UpstreamResponse:
        stream = await self._send("GET", path, {"x-request-id": request_id}, None)
        return UpstreamResponse(stream.status, stream.headers, await stream.read())

    async def ready(self) -> bool:
        """True when the upstream answers its model list within the readiness timeout."""
        timeout = aiohttp.ClientTimeout(total=self._cfg.ready_timeout_s)
        try:
            async with self._client().get(self._base + "models", timeout=timeout) as response:
                await response.read()
                return response.status == 200
        except _BROKEN:
            return False

    async def _send(
        self, method: str, path: str, headers: dict[str, str], payload: bytes | None
    ) -> UpstreamStream:
        """Send a request; its answer's deadline (``total_timeout_s``) starts now."""
        start = time.perf_counter()
        total = self._cfg.total_timeout_s
        deadline = asyncio.get_running_loop().time() + total
        url = self._base + path.lstrip("/")
        timeout = asyncio.timeout_at(deadline)
        try:
            async with timeout:
                response = await self._client().request(method, url, data=payload, headers=headers)
        except _BROKEN as e:
            if timeout.expired():
                log.warning(
                    "upstream %s %s: no answer within upstream.total_timeout_s (%g s)",
                    method,
                    path,
                    total,
                )
                raise UpstreamTimeout("upstream timed out") from None
            raise _failure(e, f"{method} {path}") from None
        finally:
            self._metrics.upstream_seconds.observe(time.perf_counter() - start)
        if response.status >= 500:
            # The upstream's own 5xx text may carry internals; the client gets ours.
            retry_after = response.headers.get("retry-after", "")
            response.close()
            log.warning("upstream answered %d on %s", response.status, path)
            if response.status == 503:  # at capacity, loading, draining: back off and retry
                raise UpstreamOverloaded(
                    "the upstream model server is overloaded; retry later",
                    retry_after=_seconds(retry_after),
                )
            raise UpstreamUnavailable(f"upstream error (status {response.status})")
        return UpstreamStream(response, deadline, total)


def _seconds(retry_after: str) -> int | None:
    """A Retry-After in whole seconds; None for an HTTP date or anything else."""
    value = retry_after.strip()
    return int(value) if value.isascii() and value.isdigit() else None
