"""The guard's request flow, shared by both transports.

intake (decode, limits, hash) → pipeline (stages) → outcome → forward body with the checked
pixels. Transports call this and only translate wire formats; they never decide.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable, Coroutine, Mapping, Sequence
from contextlib import asynccontextmanager
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
    RequestTimeout,
    StageDisabled,
    Unauthenticated,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from guard.intake.budget import Hold
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
    """A request that went through the pipeline and may be forwarded (or refused politely).

    It keeps the verdict's outcome, not the verdict: the verdict holds the decoded images,
    which must not stay in memory for the whole answer once their forward body is built.
    """

    outcome: str  # the pipeline's (Verdict.outcome)
    body: dict[str, Any]  # what to send upstream: the client's body with the checked pixels
    refuse: bool = False  # blocked, and the configured answer is a 200 refusal message
    # Parallel gating: the upstream call already started on ``body`` (what ``start`` returns).
    early: asyncio.Task[Any] | None = None

    @property
    def decision(self) -> str:
        return "block" if self.refuse else self.outcome


# Starts the upstream call on the rewritten body (parallel gating); returns what the transport
# forwards, e.g. an opened UpstreamStream.
Start = Callable[[dict[str, Any]], Coroutine[Any, Any, Any]]


async def _cancel(task: asyncio.Task[Any] | None) -> None:
    """Stop an early upstream call: cancel it, or close what it already opened."""
    if task is None:
        return
    # A callback, not code after the wait: it runs even if we are cancelled while waiting, and
    # the call may have opened its response before the cancel landed.
    task.add_done_callback(_close_opened)
    task.cancel()  # a no-op when it is done
    # wait() rather than ``await task``: the task's own end (cancelled, failed) is not ours to
    # raise, but our own cancellation (the client went away) must still propagate.
    await asyncio.wait({task})


def _close_opened(task: asyncio.Task[Any]) -> None:
    if not task.cancelled() and task.exception() is None:
        closer = getattr(task.result(), "close", None)
        if callable(closer):
            closer()


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
    if isinstance(error, asyncio.CancelledError | GeneratorExit):
        # The client left before the verdict (or the server stopped it): nobody's error.
        return "cancelled"
    if isinstance(error, PolicyViolation):
        return "block"
    if isinstance(
        error, InvalidRequest | PayloadTooLarge | RequestTimeout | NotFound | StageDisabled
    ):
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
        self,
        request_id: str,
        body: Mapping[str, Any],
        *,
        transport: str,
        start: Start | None = None,
    ) -> Screened:
        """Judge a chat request; the Screened body carries the checked pixels.

        With parallel gating (``pipeline.gating: parallel``) and a ``start`` callable, the
        upstream call starts on the rewritten body as soon as purification is done, while the
        other stages run; it is handed over only on a forwarding verdict and cancelled (the
        upstream sees the connection close) on any other outcome.
        """
        # The decoded images live until the forward body is built: the pixel budget is held
        # that long, and nothing returned from here keeps them.
        async with self.intake.pixels.hold(transport) as hold:
            request, refs = await self.intake.chat(request_id, body, hold)
            done = await self.pipeline.rewrite(request)
            forward = None
            early: asyncio.Task[Any] | None = None
            if start is not None and self.cfg.pipeline.gating == "parallel" and done.final is None:
                forward = await self._forward_body(body, refs, done.request)
                early = asyncio.create_task(start(forward))
            try:
                verdict = await self.pipeline.check(done)
                self.audit.record(verdict, transport=transport)
                refuse = self._refuse(verdict)
            except BaseException:
                await _cancel(early)
                raise
            if refuse:
                await _cancel(early)
                return Screened(verdict.outcome, dict(body), refuse)
            if forward is None:
                forward = await self._forward_body(body, refs, verdict.request)
            return Screened(verdict.outcome, forward, early=early)

    async def screen_completion(
        self, request_id: str, body: Mapping[str, Any], *, transport: str
    ) -> Screened:
        verdict = await self._judge(self.intake.completion(request_id, body), transport)
        return Screened(verdict.outcome, dict(body), self._refuse(verdict))

    async def check(
        self,
        request_id: str,
        text: str,
        images: Sequence[ImageSource],
        *,
        transport: str,
        hold: Hold | None = None,
    ) -> Verdict:
        """Judge text and images without forwarding anything (gRPC ``Check``).

        The verdict holds the decoded images: a caller that keeps it past this call passes the
        ``hold`` (``intake.pixels.hold``) it keeps as long; by default the call holds its own.
        """
        async with self._holding(hold, transport) as held:
            loaded = await self.intake.load_all(images, _params(images), held)
            return await self._judge(GuardRequest(request_id, text, loaded), transport)

    async def purify(
        self,
        request_id: str,
        images: Sequence[ImageSource],
        *,
        transport: str = "grpc",
        hold: Hold | None = None,
    ) -> Decision:
        """Purify images with the purify stage alone; the Decision always carries images
        (``hold`` as for ``check``)."""
        stage = self.pipeline.stage("purify")
        if stage is None:
            raise StageDisabled("the purify stage is not enabled on this guard")
        async with self._holding(hold, transport) as held:
            loaded = await self.intake.load_all(images, _params(images), held)
            try:
                decision = await stage.check(GuardRequest(request_id, "", loaded))
            except GuardError:
                raise
            except Exception:
                log.exception("purify failed on request %s", request_id)
                raise GuardUnavailable("purification failed") from None
            return decision if decision.images is not None else replace(decision, images=loaded)

    @asynccontextmanager
    async def _holding(self, hold: Hold | None, transport: str) -> AsyncIterator[Hold]:
        if hold is not None:
            yield hold
            return
        async with self.intake.pixels.hold(transport) as own:
            yield own

    async def _forward_body(
        self, body: Mapping[str, Any], refs: Sequence[Any], request: GuardRequest
    ) -> dict[str, Any]:
        if not refs:
            return dict(body)
        # PNG encoding is CPU work proportional to the pixels: off the event loop.
        urls = await asyncio.to_thread(lambda: [to_png_data_url(im.image) for im in request.images])
        return rewrite_images(body, refs, urls)

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


def _params(images: Sequence[ImageSource]) -> list[str]:
    return [f"images[{i}]" for i in range(len(images))]
