"""The guard's request flow, shared by both transports.

intake (decode, limits, hash) → pipeline (stages) → outcome → forward body with the checked
pixels. Transports call this and only translate wire formats; they never decide.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from guard.audit import AuditLog
from guard.config import GuardConfig
from guard.errors import (
    GuardError,
    GuardUnavailable,
    InvalidRequest,
    NotFound,
    PayloadTooLarge,
    PolicyViolation,
    StageDisabled,
    Unauthenticated,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from guard.intake.decode import to_png_data_url
from guard.intake.loader import ImageSource, Intake
from guard.intake.messages import rewrite_images
from guard.metrics import Metrics
from guard.pipeline import Pipeline
from guard.types import AsyncCloseable, Closeable, Decision, GuardRequest, Verdict
from guard.upstream import UpstreamClient

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Screened:
    """A request that went through the pipeline and may be forwarded (or refused politely)."""

    verdict: Verdict
    body: dict[str, Any]  # what to send upstream: the client's body with the checked pixels
    refuse: bool = False  # blocked, and the configured answer is a 200 refusal message

    @property
    def decision(self) -> str:
        return "block" if self.refuse else self.verdict.outcome


class Tracker:
    """Counts one request in ``inflight_requests`` and ``requests_total`` exactly once."""

    def __init__(self, metrics: Metrics, transport: str) -> None:
        self._metrics = metrics
        self._transport = transport
        self._done = False
        metrics.inflight.inc()

    def finish(self, outcome: str) -> None:
        if self._done:
            return
        self._done = True
        self._metrics.inflight.dec()
        self._metrics.requests.labels(self._transport, outcome).inc()

    def fail(self, error: BaseException) -> None:
        self.finish(outcome_of(error))


def outcome_of(error: BaseException) -> str:
    if isinstance(error, PolicyViolation):
        return "block"
    if isinstance(error, InvalidRequest | PayloadTooLarge | NotFound | StageDisabled):
        return "invalid"
    if isinstance(error, Unauthenticated):
        return "unauthenticated"
    if isinstance(error, UpstreamUnavailable | UpstreamTimeout):
        return "upstream_error"
    return "error"


class GuardService:
    def __init__(
        self,
        cfg: GuardConfig,
        intake: Intake,
        pipeline: Pipeline,
        upstream: UpstreamClient,
        metrics: Metrics,
        audit: AuditLog,
    ) -> None:
        self.cfg = cfg
        self.intake = intake
        self.pipeline = pipeline
        self.upstream = upstream
        self.metrics = metrics
        self.audit = audit
        self.draining = False  # set at shutdown: readiness fails while open requests finish

    def track(self, transport: str) -> Tracker:
        return Tracker(self.metrics, transport)

    async def aclose(self) -> None:
        for stage in self.pipeline.stages:
            if isinstance(stage, Closeable):
                # Model threads finish their queued work; joining them must not block the loop.
                await asyncio.to_thread(stage.close)
            if isinstance(stage, AsyncCloseable):
                await stage.aclose()
        await self.intake.aclose()
        await self.upstream.aclose()
        self.audit.close()

    async def ready(self) -> bool:
        if self.draining:
            return False
        return self.pipeline.ready() and await self.upstream.ready()

    async def screen_chat(
        self, request_id: str, body: Mapping[str, Any], *, transport: str
    ) -> Screened:
        request, refs = await self.intake.chat(request_id, body)
        verdict = await self._judge(request, transport)
        refuse = self._refuse(verdict)
        if refs and not refuse:
            # PNG encoding is CPU work proportional to the pixels: off the event loop.
            urls = await asyncio.to_thread(
                lambda: [to_png_data_url(im.image) for im in verdict.request.images]
            )
            return Screened(verdict, rewrite_images(body, refs, urls))
        return Screened(verdict, dict(body), refuse)

    async def screen_completion(
        self, request_id: str, body: Mapping[str, Any], *, transport: str
    ) -> Screened:
        verdict = await self._judge(self.intake.completion(request_id, body), transport)
        return Screened(verdict, dict(body), self._refuse(verdict))

    async def check(
        self, request_id: str, text: str, images: Sequence[ImageSource], *, transport: str
    ) -> Verdict:
        """Judge text and images without forwarding anything (gRPC ``Check``)."""
        loaded = await self.intake.load_all(images, [f"images[{i}]" for i in range(len(images))])
        return await self._judge(GuardRequest(request_id, text, loaded), transport)

    async def purify(self, request_id: str, images: Sequence[ImageSource]) -> Decision:
        """Purify images with the purify stage alone; the Decision always carries images."""
        stage = self.pipeline.stage("purify")
        if stage is None:
            raise StageDisabled("the purify stage is not enabled on this guard")
        loaded = await self.intake.load_all(images, [f"images[{i}]" for i in range(len(images))])
        try:
            decision = await stage.check(GuardRequest(request_id, "", loaded))
        except GuardError:
            raise
        except Exception:
            log.exception("purify failed on request %s", request_id)
            raise GuardUnavailable("purification failed") from None
        return decision if decision.images is not None else replace(decision, images=loaded)

    async def _judge(self, request: GuardRequest, transport: str) -> Verdict:
        verdict = await self.pipeline.run(request)
        self.audit.record(verdict, transport=transport)
        return verdict

    def _refuse(self, verdict: Verdict) -> bool:
        """Raise for outcomes that end in an error; True when a refusal message is owed."""
        if verdict.outcome == "error":
            raise GuardUnavailable("the guard could not check this request; try again")
        if verdict.outcome != "block":
            return False
        if self.cfg.server.block_response == "error":
            raise PolicyViolation("this request was blocked by the content policy")
        return True
