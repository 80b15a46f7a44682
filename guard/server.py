"""Assemble the guard from its configuration and run both servers in one event loop."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import signal
from collections.abc import Awaitable, Generator, Mapping, Sequence
from typing import Any

import aiohttp
import grpc
import uvicorn
from prometheus_client import CollectorRegistry
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol
from uvicorn.server import ServerState

from guard.admission import Admission
from guard.audit import AuditLog
from guard.config import DEFENSES, ConfigError, GuardConfig, ServerConfig, StageConfig
from guard.errors import GuardError
from guard.intake.budget import PixelBudget
from guard.intake.decode import configure_pillow
from guard.intake.fetch import Fetcher, Resolver
from guard.intake.loader import Intake
from guard.intake.messages import RiskyFields
from guard.metrics import STAGES, Metrics
from guard.pipeline import Pipeline
from guard.service import GuardService
from guard.transport.grpc import create_server as create_grpc_server
from guard.transport.grpc import set_serving
from guard.transport.http import create_app
from guard.types import Stage
from guard.upstream import UpstreamClient

log = logging.getLogger(__name__)


def build_stages(cfg: GuardConfig, metrics: Metrics | None = None) -> list[Stage]:
    """The configured defenses, in pipeline order; each loads its models here, once."""
    stages: list[Stage] = []
    for name in cfg.pipeline.defenses:
        if name == "purify":
            from guard.defenses.purify import PurifyStage  # torch: only when configured

            stages.append(PurifyStage.from_config(cfg.purify, metrics))
            continue
        if name == "reasoner":
            from guard.defenses.reasoner import ReasonerStage

            stages.append(ReasonerStage.from_config(cfg.reasoner, metrics))
            continue
        if name == "backdoor":
            from guard.defenses.backdoor import BackdoorStage

            stages.append(BackdoorStage.from_config(cfg.backdoor, metrics))
            continue
        raise ConfigError(f"unknown defense '{name}'")
    return stages


def build_service(
    cfg: GuardConfig,
    *,
    stages: Sequence[Stage] | None = None,
    stage_configs: Mapping[str, StageConfig] | None = None,
    registry: CollectorRegistry | None = None,
    upstream_connector: aiohttp.BaseConnector | None = None,
    resolver: Resolver | None = None,
) -> GuardService:
    """Every part of the guard, built from ``cfg``; tests pass their own stages and transports."""
    configure_pillow()
    metrics = Metrics(
        registry if registry is not None else CollectorRegistry(),
        stages={*STAGES, *(s.name for s in stages or ())},
    )
    stages = list(stages) if stages is not None else build_stages(cfg, metrics)
    configs: dict[str, StageConfig] = {
        s.name: cfg.stage(s.name) if s.name in DEFENSES else StageConfig() for s in stages
    }
    configs.update(stage_configs or {})
    return GuardService(
        cfg,
        Intake(
            cfg.images,
            Fetcher(cfg.images, resolver=resolver),
            RiskyFields(cfg.requests, metrics),
            PixelBudget(cfg.images, metrics, retry_after=cfg.server.retry_after_s),
        ),
        Pipeline(stages, configs, metrics, mode=cfg.pipeline.mode),
        UpstreamClient(cfg.upstream, metrics, connector=upstream_connector),
        metrics,
        AuditLog(cfg.audit),
    )


class _Uvicorn(uvicorn.Server):
    """uvicorn without its own signal handling.

    uvicorn re-raises a captured SIGTERM after shutdown, so the process would die by the
    signal instead of exiting 0 after an orderly drain of both servers; the guard handles
    signals itself (``GuardServer.run_until_signal``).
    """

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield


class _TooManyHeaders(Exception):
    """Raised in a parser callback to stop parsing; ``send_400_response`` then answers 431."""


class _LimitedHttpTools(HttpToolsProtocol):
    """uvicorn's httptools protocol with limits on the request head.

    uvicorn bounds the head only with h11 (``h11_max_incomplete_event_size``); with httptools
    a header is accumulated whole, by repeated concatenation, however long it is. Here the
    bytes of each request head are counted as they arrive and at most ``max_head`` of them
    reach the parser; beyond that, or beyond ``max_headers`` fields, the client gets 431 and
    the connection closes. A pipelined head that shares a read with the end of the previous
    request is undercounted by at most that one read: still bounded.
    """

    max_head = 64 * 1024
    max_headers = 100

    def __init__(
        self,
        config: uvicorn.Config,
        server_state: ServerState,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        super().__init__(config, server_state, app_state, _loop)
        self._head: int | None = 0  # bytes of the current request head; None once complete
        self._fields = 0
        self._refused = False

    def data_received(self, data: bytes) -> None:
        while data and not self._refused and not self.transport.is_closing():
            if self._head is None:  # in a body: uvicorn's flow control bounds what it buffers
                super().data_received(data)
                return
            room = self.max_head - self._head
            if room <= 0:
                self._refuse()
                return
            piece, data = data[:room], data[room:]
            self._head += len(piece)
            super().data_received(piece)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._fields = 0

    def on_header(self, name: bytes, value: bytes) -> None:
        self._fields += 1
        if self._fields > self.max_headers:
            self._refused = True
            raise _TooManyHeaders
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self._head = None
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._head = 0

    def send_400_response(self, msg: str) -> None:
        if self._refused:  # the parser stopped because of on_header
            self._refuse()
        else:
            super().send_400_response(msg)

    def _refuse(self) -> None:
        self._refused = True
        log.info("request head over %s bytes or %s fields", self.max_head, self.max_headers)
        error = GuardError("request headers too large")
        error.status, error.type, error.code = 431, "invalid_request_error", "headers_too_large"
        body = json.dumps(error.body()).encode()
        content = [STATUS_LINE[431]]
        content.extend(k + b": " + v + b"\r\n" for k, v in self.server_state.default_headers)
        content.append(b"content-type: application/json\r\n")
        content.append(b"content-length: %d\r\nconnection: close\r\n\r\n" % len(body))
        content.append(body)
        self.transport.write(b"".join(content))
        self.transport.close()


def _http_protocol(server: ServerConfig) -> type[HttpToolsProtocol]:
    class GuardHttpProtocol(_LimitedHttpTools):
        max_head = server.max_header_bytes
        max_headers = server.max_headers

    return GuardHttpProtocol


class GuardServer:
    """The HTTP and gRPC servers of one guard, started and stopped together."""

    def __init__(self, cfg: GuardConfig, service: GuardService) -> None:
        self.cfg = cfg
        self.service = service
        # One capacity for both transports: it protects the pipeline and upstream, not a port.
        self.admission = Admission(cfg.server, service.metrics)
        self.http_port: int | None = None
        self.grpc_port: int | None = None
        self._grpc: grpc.aio.Server | None = None
        self._uvicorn = _Uvicorn(
            uvicorn.Config(
                create_app(cfg, service, self.admission),
                http=_http_protocol(cfg.server),
                host=cfg.server.host,
                port=cfg.server.http_port,
                log_config=None,  # logging is configured once, by the CLI
                access_log=False,
                server_header=False,
                lifespan="off",
                timeout_graceful_shutdown=int(cfg.server.drain_seconds),
            )
        )
        self._http_task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        if self.cfg.server.grpc_port is not None:
            self._grpc, self.grpc_port = create_grpc_server(self.cfg, self.service, self.admission)
            await self._grpc.start()
        self._http_task = asyncio.create_task(self._uvicorn.serve())
        while not self._uvicorn.started:
            if self._http_task.done():
                await self._http_task  # raises start-up errors such as a port in use
                raise OSError("HTTP server stopped during start-up")
            await asyncio.sleep(0.01)
        sockets = self._uvicorn.servers[0].sockets
        self.http_port = int(sockets[0].getsockname()[1])
        log.info(
            "vlm-guard serving HTTP on %s:%s, gRPC on %s, upstream %s, stages %s, mode %s",
            self.cfg.server.host,
            self.http_port,
            self.grpc_port or "off",
            self.cfg.upstream.url,
            ",".join(self.service.pipeline.names) or "none",
            self.cfg.pipeline.mode,
        )

    async def run_until_signal(self) -> None:
        """Serve until SIGINT or SIGTERM (or the HTTP server ends), then drain and stop."""
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        waiter = asyncio.create_task(stop.wait())
        assert self._http_task is not None, "start() first"
        try:
            await asyncio.wait({waiter, self._http_task}, return_when=asyncio.FIRST_COMPLETED)
            if stop.is_set():
                log.info("signal received: draining for up to %ss", self.cfg.server.drain_seconds)
        finally:
            waiter.cancel()
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(sig)
            await self.stop()

    async def stop(self) -> None:
        """Refuse new work on both transports at once, then drain them together: the whole
        stop takes at most ``drain_seconds`` (the grace periods in deploy/ count on it)."""
        self.service.draining = True  # readiness fails at once; open requests finish
        self.admission.drain()  # queued requests get 503 now rather than at the end of the drain
        drains: list[Awaitable[None]] = []
        if self._grpc is not None:
            await set_serving(self._grpc, False)  # gRPC health: NOT_SERVING, like /readyz
            drains.append(self._grpc.stop(grace=self.cfg.server.drain_seconds))
        self._uvicorn.should_exit = True
        if self._http_task is not None:
            drains.append(self._http_task)
        await asyncio.gather(*drains)
        await self.service.aclose()
