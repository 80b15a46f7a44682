"""Real servers on loopback for tests: uvicorn and grpc.aio in background threads."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable, Mapping, Sequence
from concurrent.futures import Future
from typing import Any, TypeVar

import uvicorn
from prometheus_client import CollectorRegistry
from starlette.types import ASGIApp

from guard.config import GuardConfig, StageConfig, load_config
from guard.server import GuardServer, build_service
from guard.service import GuardService
from guard.types import Stage

T = TypeVar("T")


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
        self._thread = LoopThread()

        async def start() -> GuardServer:
            service = build_service(
                self.cfg,
                stages=stages,
                stage_configs=stage_configs,
                registry=self.registry,
                resolver=resolver,
            )
            server = GuardServer(self.cfg, service)
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
        self._thread.call(self.server.stop)
        self._thread.close()


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out
