"""The OpenAI-compatible upstream (vLLM in production): forward, stream back, probe readiness.

Responses are passed on as bytes: the guard never re-serialises what the model said. Only the
routes the guard serves are ever requested here, with the guard's own upstream credential.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Any

import httpx

from guard.config import UpstreamConfig
from guard.errors import UpstreamTimeout, UpstreamUnavailable
from guard.metrics import Metrics

log = logging.getLogger(__name__)

# Response headers worth passing back to the client; hop-by-hop and length headers are not
# (the guard's server frames the body itself).
PASS_HEADERS = ("content-type", "openai-processing-ms", "openai-version", "openai-model")


@dataclass
class UpstreamResponse:
    status: int
    headers: Mapping[str, str]
    content: bytes


class UpstreamStream:
    """An open streaming response: iterate ``chunks()`` once, then it is closed."""

    def __init__(self, response: httpx.Response) -> None:
        self._response = response
        self.status = response.status_code
        self.headers = {k: v for k, v in response.headers.items() if k.lower() in PASS_HEADERS}

    async def chunks(self) -> AsyncIterator[bytes]:
        try:
            async for chunk in self._response.aiter_raw():
                yield chunk
        finally:
            await self._response.aclose()

    async def read(self) -> bytes:
        try:
            return await self._response.aread()
        finally:
            await self._response.aclose()

    async def aclose(self) -> None:
        await self._response.aclose()


class UpstreamClient:
    def __init__(
        self,
        cfg: UpstreamConfig,
        metrics: Metrics,
        *,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self._cfg = cfg
        self._metrics = metrics
        headers = {"accept": "application/json"}
        if cfg.api_key is not None:
            headers["authorization"] = f"Bearer {cfg.api_key.get_secret_value()}"
        self._client = httpx.AsyncClient(
            base_url=str(cfg.url).rstrip("/") + "/",
            headers=headers,
            timeout=httpx.Timeout(
                connect=cfg.connect_timeout_s, read=cfg.read_timeout_s, write=30.0, pool=30.0
            ),
            limits=httpx.Limits(max_connections=cfg.max_connections, max_keepalive_connections=100),
            transport=transport,
            trust_env=False,  # a proxy from the environment must not sit between guard and model
        )

    async def aclose(self) -> None:
        await self._client.aclose()

    async def post(
        self, path: str, body: Mapping[str, Any], *, request_id: str
    ) -> UpstreamResponse:
        stream = await self.open(path, body, request_id=request_id)
        try:
            content = await stream.read()
        except httpx.TimeoutException:
            raise UpstreamTimeout("upstream timed out") from None
        except httpx.HTTPError:
            raise UpstreamUnavailable("upstream connection failed") from None
        return UpstreamResponse(stream.status, stream.headers, content)

    async def open(self, path: str, body: Mapping[str, Any], *, request_id: str) -> UpstreamStream:
        """Send a POST and return once the response headers have arrived."""
        payload = json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode()
        request = self._client.build_request(
            "POST",
            path.lstrip("/"),
            content=payload,
            headers={"content-type": "application/json", "x-request-id": request_id},
        )
        return UpstreamStream(await self._send(request))

    async def get(self, path: str, *, request_id: str) -> UpstreamResponse:
        request = self._client.build_request(
            "GET", path.lstrip("/"), headers={"x-request-id": request_id}
        )
        response = await self._send(request)
        try:
            content = await response.aread()
        except httpx.HTTPError:
            raise UpstreamUnavailable("upstream connection failed") from None
        finally:
            await response.aclose()
        headers = {k: v for k, v in response.headers.items() if k.lower() in PASS_HEADERS}
        return UpstreamResponse(response.status_code, headers, content)

    async def ready(self) -> bool:
        """True when the upstream answers its model list within the readiness timeout."""
        try:
            response = await self._client.get("models", timeout=self._cfg.ready_timeout_s)
        except httpx.HTTPError:
            return False
        return response.status_code == 200

    async def _send(self, request: httpx.Request) -> httpx.Response:
        start = time.perf_counter()
        try:
            response = await self._client.send(request, stream=True)
        except httpx.TimeoutException:
            log.warning("upstream timeout on %s %s", request.method, request.url.path)
            raise UpstreamTimeout("upstream timed out") from None
        except httpx.HTTPError as e:
            log.warning("upstream error on %s %s: %s", request.method, request.url.path, e)
            raise UpstreamUnavailable("upstream connection failed") from None
        finally:
            self._metrics.upstream_seconds.observe(time.perf_counter() - start)
        if response.status_code >= 500:
            # The upstream's own 5xx text may carry internals; the client gets ours.
            await response.aclose()
            log.warning("upstream answered %d on %s", response.status_code, request.url.path)
            raise UpstreamUnavailable(f"upstream error (status {response.status_code})")
        return response
