"""Assemble the guard from its configuration and run both servers in one event loop."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Awaitable, Generator, Mapping, Sequence

import aiohttp
import grpc
import uvicorn
from prometheus_client import CollectorRegistry

from guard.audit import AuditLog
from guard.config import DEFENSES, ConfigError, GuardConfig, StageConfig
from guard.intake.fetch import Fetcher, Resolver
from guard.intake.loader import Intake
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
        Intake(cfg.images, Fetcher(cfg.images, resolver=resolver)),
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


class GuardServer:
    """The HTTP and gRPC servers of one guard, started and stopped together."""

    def __init__(self, cfg: GuardConfig, service: GuardService) -> None:
        self.cfg = cfg
        self.service = service
        self.http_port: int | None = None
        self.grpc_port: int | None = None
        self._grpc: grpc.aio.Server | None = None
        self._uvicorn = _Uvicorn(
            uvicorn.Config(
                create_app(cfg, service),
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
            self._grpc, self.grpc_port = create_grpc_server(self.cfg, self.service)
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
        drains: list[Awaitable[None]] = []
        if self._grpc is not None:
            await set_serving(self._grpc, False)  # gRPC health: NOT_SERVING, like /readyz
            drains.append(self._grpc.stop(grace=self.cfg.server.drain_seconds))
        self._uvicorn.should_exit = True
        if self._http_task is not None:
            drains.append(self._http_task)
        await asyncio.gather(*drains)
        await self.service.aclose()
