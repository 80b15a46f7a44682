"""Admission control: a bounded number of model requests in flight and a bounded wait queue.

Both transports share one ``Admission``: the capacity protects the pipeline and the upstream,
not a port. A request takes a slot before its body is read (HTTP) and keeps it until its
answer is complete: a stream holds its slot until the last byte is sent or the client leaves.
Beyond ``max_inflight`` a request waits, first in first out, for at most ``queue_timeout_s``;
beyond ``max_queue`` waiting requests it is refused at once.

    queue full         → ``Overloaded``        429 / RESOURCE_EXHAUSTED
    wait timed out     → ``NotAdmitted``       503 / UNAVAILABLE, code ``queue_timeout``
    shutting down      → ``NotAdmitted``       503 / UNAVAILABLE, code ``draining``

Every refusal carries ``Retry-After`` (``server.retry_after_s``). Health, readiness and metrics
never pass through here, so they stay answerable under overload.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from guard.config import ServerConfig
from guard.errors import GuardError, NotAdmitted, Overloaded
from guard.metrics import Metrics


class _Drained(Exception):
    """Wakes a waiter at shutdown; it becomes the waiter's ``draining`` refusal."""


class Slot:
    """One admitted request's place; ``release`` is idempotent, so every exit path may call it."""

    def __init__(self, admission: Admission) -> None:
        self._admission: Admission | None = admission

    def release(self) -> None:
        admission, self._admission = self._admission, None
        if admission is not None:
            admission._release()


class Admission:
    """At most ``max_inflight`` slots taken; at most ``max_queue`` waiters, each for a while."""

    def __init__(self, cfg: ServerConfig, metrics: Metrics | None = None) -> None:
        self._capacity = cfg.max_inflight
        self._max_queue = cfg.max_queue
        self._timeout = cfg.queue_timeout_s
        self._retry_after = cfg.retry_after_s
        self._metrics = metrics
        self._inflight = 0
        # A waiter's future resolves when a released slot is handed to it (inflight unchanged).
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()
        self._draining = False

    @property
    def inflight(self) -> int:
        """Slots taken now."""
        return self._inflight

    @property
    def queued(self) -> int:
        """Requests waiting for a slot now."""
        return len(self._waiters)

    @asynccontextmanager
    async def slot(self, transport: str) -> AsyncIterator[None]:
        """Hold a slot for the block; refusals raise before it runs."""
        taken = await self.acquire(transport)
        try:
            yield
        finally:
            taken.release()

    async def acquire(self, transport: str) -> Slot:
        """A slot now, or after a wait in the queue; raises ``Overloaded``/``NotAdmitted``."""
        if self._draining:
            raise self._refuse(transport, "draining")
        if self._inflight < self._capacity and not self._waiters:
            self._inflight += 1
            return Slot(self)
        if len(self._waiters) >= self._max_queue:
            raise self._refuse(transport, "queue_full")
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        self._gauge()
        try:
            async with asyncio.timeout(self._timeout):
                await waiter
        except BaseException as e:
            if waiter.done() and not waiter.cancelled() and waiter.exception() is None:
                # The slot arrived just as the wait ended (timeout, cancellation): pass it on.
                self._release()
            else:
                waiter.cancel()
                self._discard(waiter)
            if isinstance(e, TimeoutError):
                raise self._refuse(transport, "queue_timeout") from None
            if isinstance(e, _Drained):
                raise self._refuse(transport, "draining") from None
            raise
        return Slot(self)

    def drain(self) -> None:
        """Shutdown: refuse new requests and every waiter now; admitted ones finish."""
        self._draining = True
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_exception(_Drained())
        self._gauge()

    def _release(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)  # the slot moves to the oldest waiter
                self._gauge()
                return
        self._inflight -= 1
        self._gauge()

    def _discard(self, waiter: asyncio.Future[None]) -> None:
        with contextlib.suppress(ValueError):  # already handed over or drained
            self._waiters.remove(waiter)
        self._gauge()

    def _gauge(self) -> None:
        if self._metrics is not None:
            self._metrics.queued.set(len(self._waiters))

    def _refuse(self, transport: str, reason: str) -> GuardError:
        if self._metrics is not None:
            self._metrics.overload.labels(transport, reason).inc()
        return self._refuse_error(reason)

    def _refuse_error(self, reason: str) -> GuardError:
        error: GuardError
        if reason == "queue_full":
            error = Overloaded("the guard is at capacity; retry after the Retry-After delay")
        elif reason == "queue_timeout":
            message = "the guard is overloaded; retry after the Retry-After delay"
            error = NotAdmitted(message, code="queue_timeout")
        else:
            message = "the guard is shutting down; retry on another instance"
            error = NotAdmitted(message, code="draining")
        error.retry_after = self._retry_after
        return error
