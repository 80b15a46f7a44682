"""A budget of decoded pixels shared by every request in flight.

Each image is limited on its own (``images.max_pixels``), and admission bounds the requests in
flight, but their product is large: 256 requests × 8 images × 50 MP. Measured before this
budget: 8 concurrent 49-MP images took the guard from 84 MiB to 2.5 GiB. So a request reserves
the pixels of all its images, read from their headers, before any of them is decoded, and
holds them until screening ends (the stages work on the decoded images; the forward body is
compressed PNG). A request whose images do not fit waits, first in first out, for at most
``images.pixel_wait_s``; then it is refused like an admission timeout (503 ``overloaded``,
code ``pixel_budget``, Retry-After). A request larger than the whole budget takes all of it:
it waits until it is alone, and is never refused for its size (``max_images`` and
``max_pixels`` limit that).

A request reserves once, for all its images together: two requests each holding part of what
they need and waiting for the rest would wait for each other.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from guard.config import ImagesConfig
from guard.errors import NotAdmitted
from guard.metrics import Metrics


class Hold:
    """One request's share of the budget; released when its ``PixelBudget.hold`` block ends."""

    def __init__(self, budget: PixelBudget, transport: str) -> None:
        self._budget = budget
        self._transport = transport
        self.pixels = 0

    async def reserve(self, pixels: int) -> None:
        """Wait for room for ``pixels`` (once per request: see the module docstring)."""
        if self.pixels:
            raise RuntimeError("a request reserves its pixels once")
        self.pixels = await self._budget._take(pixels, self._transport)


class PixelBudget:
    def __init__(self, cfg: ImagesConfig, metrics: Metrics | None = None, retry_after: int = 1):
        self.limit = cfg.max_inflight_pixels
        self._timeout = cfg.pixel_wait_s
        self._metrics = metrics
        self._retry_after = retry_after
        self.held = 0
        # Oldest first; a waiter's future resolves once its pixels are counted in ``held``.
        self._waiters: collections.deque[tuple[int, asyncio.Future[None]]] = collections.deque()

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    @asynccontextmanager
    async def hold(self, transport: str) -> AsyncIterator[Hold]:
        hold = Hold(self, transport)
        try:
            yield hold
        finally:
            if hold.pixels:
                self._give_back(hold.pixels)

    async def _take(self, pixels: int, transport: str) -> int:
        pixels = min(max(pixels, 0), self.limit)
        if not pixels:
            return 0
        if not self._waiters and self.held + pixels <= self.limit:
            self._add(pixels)
            return pixels
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = (pixels, waiter)
        self._waiters.append(entry)
        try:
            async with asyncio.timeout(self._timeout):
                await waiter
        except BaseException as e:
            if waiter.done() and not waiter.cancelled():
                self._give_back(pixels)  # granted just as the wait ended: pass it on
            else:
                waiter.cancel()
                with contextlib.suppress(ValueError):
                    self._waiters.remove(entry)
                self._wake()  # a large waiter leaving may let smaller ones behind it in
            if isinstance(e, TimeoutError):
                raise self._refuse(transport) from None
            raise
        return pixels

    def _give_back(self, pixels: int) -> None:
        self._add(-pixels)
        self._wake()

    def _wake(self) -> None:
        # Strictly in order: the oldest waiter that does not fit stops the others, so a large
        # request is not starved by a stream of small ones.
        while self._waiters and self.held + self._waiters[0][0] <= self.limit:
            pixels, waiter = self._waiters.popleft()
            if not waiter.done():
                self._add(pixels)
                waiter.set_result(None)

    def _add(self, pixels: int) -> None:
        self.held += pixels
        if self._metrics is not None:
            self._metrics.pixels_inflight.set(self.held)

    def _refuse(self, transport: str) -> NotAdmitted:
        if self._metrics is not None:
            self._metrics.overload.labels(transport, "pixel_budget").inc()
        error = NotAdmitted(
            "the guard is busy with other images; retry after the Retry-After delay",
            code="pixel_budget",
        )
        error.retry_after = self._retry_after
        return error
