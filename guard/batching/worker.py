"""BatchWorker: one model thread, a bounded queue, and the batching rule (see the package)."""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import logging
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Generic, TypeVar

from guard.batching.jobs import AsyncJob, Job, SyncJob
from guard.batching.stepper import Stepper, WholeBatches
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

    batches: int = 0  # model calls: calls of ``fn``, or steps of a stepper
    items: int = 0  # items taken in
    rows: int = 0  # items live at each call, summed (with ``fn``: the items again)

    @property
    def mean_batch_size(self) -> float:
        """Items per model call."""
        return self.rows / self.batches if self.batches else 0.0


class BatchWorker(Generic[T, R]):
    """Run ``fn`` on micro-batches of submitted items, or a :class:`Stepper` on the items live
    in it, on one daemon thread.

    ``fn`` must return one result per item, in order; a result of the wrong length, or an
    exception from ``fn``, is raised to every caller in that batch, and the worker goes on
    serving later batches. A stepper's failed step fails every item live in it; a failed
    ``admit`` only the items being admitted. ``max_batch`` caps the items live at once.
    """

    def __init__(
        self,
        work: Callable[[list[T]], list[R]] | Stepper[T, R],
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
        self._work: Stepper[T, R] = work if isinstance(work, Stepper) else WholeBatches(work, name)
        self._max_batch = max_batch
        self._max_wait_s = max_wait_s
        self._max_queue = max_queue
        # One condition guards the queue, the closed flag and the thread handle; submitters
        # hold it only for an append, so the event loop never waits on model work.
        self._cond = threading.Condition()
        self._queue: collections.deque[Job[T, R]] = collections.deque()
        self._gone: set[Job[T, R]] = set()  # taken jobs whose callers gave up
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
        job: AsyncJob[T, R] = AsyncJob(item, loop, future)
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
        job: SyncJob[T, R] = SyncJob(item, future)
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
        :class:`WorkerClosed`; work already taken (a batch inside ``fn``, a stepper's live
        items) still completes, since a running model call cannot be interrupted, after which
        the thread exits. Idempotent.
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

    def _enqueue(self, job: Job[T, R]) -> None:
        with self._cond:
            if self._closed:
                raise WorkerClosed(f"batch worker {self.name!r} is closed")
            if self._thread is None:
                raise RuntimeError(f"batch worker {self.name!r} was not started")
            if len(self._queue) >= self._max_queue:
                raise QueueFull(f"batch worker {self.name!r} has {self._max_queue} items queued")
            self._queue.append(job)
            self._cond.notify()

    def _withdraw(self, job: Job[T, R]) -> None:
        with self._cond:
            try:
                self._queue.remove(job)
            except ValueError:
                # Already taken: the model thread drops it before its next step, so a stepper
                # spends no more model calls on it (a batch inside fn still completes, and
                # its result is dropped on delivery).
                self._gone.add(job)

    def _fail_all(self, jobs: list[Job[T, R]]) -> None:
        for job in jobs:
            job.fail(WorkerClosed(f"batch worker {self.name!r} closed before running the item"))

    def _take(self, room: int, wait: bool) -> list[Job[T, R]] | None:
        """Up to ``room`` queued jobs. ``wait`` (nothing live): block for the first, then gather
        company for up to ``max_wait_s``; None once closed and drained. Otherwise take only
        what is queued now: live items must not wait for newcomers."""
        with self._cond:
            if not wait:
                return [self._queue.popleft() for _ in range(min(room, len(self._queue)))]
            while not self._queue:
                if self._closed:
                    return None
                self._cond.wait()
            batch = [self._queue.popleft()]
            deadline = batch[0].enqueued_at + self._max_wait_s
            while len(batch) < room:
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
        live: dict[object, Job[T, R]] = {}  # admitted jobs by key: the jobs themselves
        try:
            while True:
                self._forget(live)
                jobs = self._take(self._max_batch - len(live), wait=not live)
                if jobs is None:
                    break
                if jobs:
                    self._admit(jobs, live)
                if live:
                    self._step(live)
        except BaseException:
            logger.critical("batch worker %r died", self.name, exc_info=True)
            raise
        finally:
            # Normally a no-op; if the thread dies, nobody may be left waiting forever.
            with self._cond:
                self._closed = True
                leftover = list(self._queue)
                self._queue.clear()
            self._fail_all([*live.values(), *leftover])

    def _forget(self, live: dict[object, Job[T, R]]) -> None:
        """Drop the live jobs whose callers gave up since the last step."""
        with self._cond:
            gone, self._gone = self._gone, set()
        dropped: list[object] = [job for job in gone if job in live]
        if dropped:
            self._work.drop(dropped)
            for job in dropped:
                del live[job]

    def _admit(self, jobs: list[Job[T, R]], live: dict[object, Job[T, R]]) -> None:
        try:
            self._work.admit(list(jobs), [job.item for job in jobs])
        except Exception as exc:
            logger.debug("admitting %d failed in %r", len(jobs), self.name, exc_info=True)
            for job in jobs:
                job.fail(exc)
            return
        live.update((job, job) for job in jobs)
        self.stats.items += len(jobs)

    def _step(self, live: dict[object, Job[T, R]]) -> None:
        self.stats.batches += 1
        self.stats.rows += len(live)
        try:
            finished = self._work.step()
        except Exception as exc:
            # The callers own the error (each defense applies its fail mode); debug only here.
            logger.debug("batch of %d failed in %r", len(live), self.name, exc_info=True)
            self._work.abandon()
            for job in live.values():
                job.fail(exc)
            live.clear()
            return
        for key, result in finished:
            live.pop(key).resolve(result)


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
