"""A queued item and the way back to whoever waits for it: an asyncio future on its own loop,
or a concurrent future for plain threads."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import time
from collections.abc import Callable
from typing import Generic, TypeVar

logger = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")


class Job(Generic[T, R]):
    """One queued item and the way back to whoever waits for it.

    Identity equality (no dataclass ``__eq__``) so a cancelled job can be removed from the
    queue even when two callers submitted equal items.
    """

    __slots__ = ("enqueued_at", "item")

    def __init__(self, item: T) -> None:
        self.item = item
        self.enqueued_at = time.monotonic()

    def resolve(self, result: R) -> None:
        raise NotImplementedError

    def fail(self, exc: BaseException) -> None:
        raise NotImplementedError


class AsyncJob(Job[T, R]):
    __slots__ = ("_future", "_loop")

    def __init__(self, item: T, loop: asyncio.AbstractEventLoop, future: asyncio.Future[R]) -> None:
        super().__init__(item)
        self._loop = loop
        self._future = future

    def resolve(self, result: R) -> None:
        self._post(lambda: self._future.set_result(result))

    def fail(self, exc: BaseException) -> None:
        self._post(lambda: self._future.set_exception(exc))

    def _post(self, settle: Callable[[], None]) -> None:
        future = self._future

        def deliver() -> None:
            # Runs on the future's own loop, so done() cannot change under us. A done future
            # here was cancelled by its awaiter: nobody wants the result, so drop it silently.
            if not future.done():
                settle()

        try:
            self._loop.call_soon_threadsafe(deliver)
        except RuntimeError:
            # The loop is closed: nobody can be waiting any more.
            logger.debug("dropping a batch result for a closed event loop")


class SyncJob(Job[T, R]):
    __slots__ = ("_future",)

    def __init__(self, item: T, future: concurrent.futures.Future[R]) -> None:
        super().__init__(item)
        self._future = future

    def resolve(self, result: R) -> None:
        # InvalidStateError: the caller timed out and cancelled the future meanwhile.
        with contextlib.suppress(concurrent.futures.InvalidStateError):
            self._future.set_result(result)

    def fail(self, exc: BaseException) -> None:
        with contextlib.suppress(concurrent.futures.InvalidStateError):
            self._future.set_exception(exc)
