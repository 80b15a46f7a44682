"""Micro-batching of model calls from many requests onto one model thread.

Model-backed defenses (the DiffCAP purifier, the backdoor monitor) keep their torch code plain
and synchronous: ``fn(items) -> results``. A :class:`BatchWorker` owns the single thread that
calls it, so the model is used from one thread only, and concurrent requests share a forward
pass instead of queueing for one each::

    worker = BatchWorker(purifier.purify_batch, name="purify", max_batch=16)
    worker.start()                         # at start-up, after the model has loaded
    purified = await worker.submit(image)  # from request handlers, on any event loop
    worker.close()                         # at shutdown

Batching rule: the thread takes the oldest queued item, then keeps gathering until it holds
``max_batch`` items or ``max_wait_s`` has passed since that first item was queued, and calls
``fn`` once. ``max_wait_s`` therefore bounds the extra latency batching adds to any item.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Generic, TypeVar

from guard.errors import GuardUnavailable, Overloaded

logger = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")


class QueueFull(Exception):
    """The worker already holds ``max_queue`` waiting items; callers report overload."""


class WorkerClosed(Exception):
    """The worker is closed (or its thread died): the item was not, and will not be, run."""


@dataclass
class BatchStats:
    """Counters written by the model thread only; read them for tests and metrics."""

    batches: int = 0
    items: int = 0

    @property
    def mean_batch_size(self) -> float:
        return self.items / self.batches if self.batches else 0.0


class _Job(Generic[T, R]):
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


class _AsyncJob(_Job[T, R]):
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


class _SyncJob(_Job[T, R]):
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


class BatchWorker(Generic[T, R]):
    """Run ``fn`` on micro-batches of submitted items, on one daemon thread.

    ``fn`` must return one result per item, in order; a result of the wrong length, or an
    exception from ``fn``, is raised to every caller in that batch, and the worker goes on
    serving later batches.
    """

    def __init__(
        self,
        fn: Callable[[list[T]], list[R]],
        *,
        name: str,
        max_batch: int = 16,
        max_wait_s: float = 0.005,
        max_queue: int = 256,
    ) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        if not max_wait_s >= 0:  # written this way so NaN is rejected too
            raise ValueError(f"max_wait_s must be >= 0, got {max_wait_s}")
        if max_queue < 1:
            raise ValueError(f"max_queue must be >= 1, got {max_queue}")
        self.name = name
        self.stats = BatchStats()
        self._fn = fn
        self._max_batch = max_batch
        self._max_wait_s = max_wait_s
        self._max_queue = max_queue
        # One condition guards the queue, the closed flag and the thread handle; submitters
        # hold it only for an append, so the event loop never waits on model work.
        self._cond = threading.Condition()
        self._queue: collections.deque[_Job[T, R]] = collections.deque()
        self._closed = False
        self._thread: threading.Thread | None = None

    @property
    def alive(self) -> bool:
        thread = self._thread
        return thread is not None and thread.is_alive()

    def start(self) -> None:
        """Start the model thread; calling it again is a no-op."""
        with self._cond:
            if self._closed:
                raise WorkerClosed(f"batch worker {self.name!r} is closed")
            if self._thread is not None:
                return
            self._thread = threading.Thread(
                target=self._run, name=f"batch-worker-{self.name}", daemon=True
            )
            self._thread.start()

    async def submit(self, item: T) -> R:
        """Queue ``item`` and wait for its result; raises :class:`QueueFull` without waiting.

        If the caller is cancelled before the item joins a batch, the item is withdrawn; after
        that, its result is dropped.
        """
        loop = asyncio.get_running_loop()
        future: asyncio.Future[R] = loop.create_future()
        job: _AsyncJob[T, R] = _AsyncJob(item, loop, future)
        self._enqueue(job)
        try:
            return await future
        except asyncio.CancelledError:
            self._withdraw(job)
            raise

    def submit_sync(self, item: T, timeout: float | None = None) -> R:
        """Blocking :meth:`submit` for plain threads (CLI tools, benchmarks).

        Raises ``TimeoutError`` after ``timeout`` seconds, withdrawing the item if it has not
        joined a batch yet.
        """
        if threading.current_thread() is self._thread:
            raise RuntimeError("submit_sync from the model thread would wait on itself")
        future: concurrent.futures.Future[R] = concurrent.futures.Future()
        job: _SyncJob[T, R] = _SyncJob(item, future)
        self._enqueue(job)
        try:
            return future.result(timeout)
        except TimeoutError:
            self._withdraw(job)
            future.cancel()
            raise

    def close(self, timeout: float | None = None) -> None:
        """Stop accepting items, let the thread finish queued work, and join it.

        Items the thread has not taken into a batch within ``timeout`` seconds get
        :class:`WorkerClosed`; a batch already inside ``fn`` still completes (a running
        model call cannot be interrupted), after which the thread exits. Idempotent.
        """
        with self._cond:
            self._closed = True
            self._cond.notify_all()
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)
        with self._cond:
            leftover = list(self._queue)
            self._queue.clear()
        self._fail_all(leftover)

    # -- internals -------------------------------------------------------------------------

    def _enqueue(self, job: _Job[T, R]) -> None:
        with self._cond:
            if self._closed:
                raise WorkerClosed(f"batch worker {self.name!r} is closed")
            if self._thread is None:
                raise RuntimeError(f"batch worker {self.name!r} was not started")
            if len(self._queue) >= self._max_queue:
                raise QueueFull(f"batch worker {self.name!r} has {self._max_queue} items queued")
            self._queue.append(job)
            self._cond.notify()

    def _withdraw(self, job: _Job[T, R]) -> None:
        # ValueError: already taken into a batch; its result will be dropped on delivery.
        with self._cond, contextlib.suppress(ValueError):
            self._queue.remove(job)

    def _fail_all(self, jobs: list[_Job[T, R]]) -> None:
        for job in jobs:
            job.fail(WorkerClosed(f"batch worker {self.name!r} closed before running the item"))

    def _take(self) -> list[_Job[T, R]] | None:
        """Block for the next batch; None once closed and drained."""
        with self._cond:
            while not self._queue:
                if self._closed:
                    return None
                self._cond.wait()
            batch = [self._queue.popleft()]
            deadline = batch[0].enqueued_at + self._max_wait_s
            while len(batch) < self._max_batch:
                if self._queue:
                    batch.append(self._queue.popleft())
                    continue
                if self._closed:
                    break  # nothing more can arrive: do not sit out max_wait_s
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._cond.wait(remaining)
            return batch

    def _run(self) -> None:
        batch: list[_Job[T, R]] | None = None
        try:
            while (batch := self._take()) is not None:
                self._process(batch)
        except BaseException:
            logger.critical("batch worker %r died", self.name, exc_info=True)
            raise
        finally:
            # Normally a no-op; if the thread dies, nobody may be left waiting forever.
            with self._cond:
                self._closed = True
                leftover = list(self._queue)
                self._queue.clear()
            self._fail_all([*(batch or []), *leftover])

    def _process(self, batch: list[_Job[T, R]]) -> None:
        items = [job.item for job in batch]
        self.stats.batches += 1
        self.stats.items += len(items)
        try:
            results = list(self._fn(items))
            if len(results) != len(items):
                raise ValueError(
                    f"batch worker {self.name!r}: fn returned {len(results)} results "
                    f"for {len(items)} items"
                )
        except Exception as exc:
            # The callers own the error (each defense applies its fail mode); debug only here.
            logger.debug("batch of %d failed in %r", len(items), self.name, exc_info=True)
            for job in batch:
                job.fail(exc)
            return
        for job, result in zip(batch, results, strict=True):
            job.resolve(result)


async def submit_all(worker: BatchWorker[T, R], items: Iterable[T], what: str) -> list[R]:
    """Submit ``items`` together and wait for all; a full queue becomes :class:`Overloaded`
    (429 + Retry-After) and a closed worker :class:`GuardUnavailable`, named by ``what``.

    Raised from a stage, both are stage failures like any other: the pipeline applies the
    stage's fail mode (closed: 503 ``guard_unavailable``; open: forwarded). Only the gRPC
    ``Purify`` route, which runs the purifier alone, passes them on as they are."""
    try:
        return list(await asyncio.gather(*(worker.submit(item) for item in items)))
    except QueueFull:
        raise Overloaded(f"the {what} is at capacity; retry shortly") from None
    except WorkerClosed:
        raise GuardUnavailable(f"the {what} is shutting down") from None
