"""BatchWorker: batching, stepping, errors, back-pressure, cancellation and shutdown semantics."""

from __future__ import annotations

import asyncio
import gc
import logging
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from guard.batching import BatchWorker, QueueFull, Stepper, WorkerClosed

Result = tuple[int, int]  # (item * 2, size of the batch it ran in)


class Model:
    """A stand-in model function: records every batch; can hold its first call on a gate."""

    def __init__(self, *, gated: bool = False) -> None:
        self.batches: list[list[int]] = []
        self.entered = threading.Event()  # set once the first call is inside fn
        self.release = threading.Event()
        if not gated:
            self.release.set()

    def __call__(self, items: list[int]) -> list[Result]:
        self.batches.append(list(items))
        self.entered.set()
        assert self.release.wait(10), "test forgot to release the model"
        if any(x < 0 for x in items):
            raise RuntimeError("negative input")
        return [(x * 2, len(items)) for x in items]

    def seen(self) -> list[int]:
        return [x for batch in self.batches for x in batch]


Make = Callable[..., BatchWorker[int, Result]]


@pytest.fixture
def make_worker() -> Iterator[Make]:
    made: list[BatchWorker[int, Result]] = []

    def make(
        work: Callable[[list[int]], list[Result]] | Stepper[int, Result], **kwargs: Any
    ) -> BatchWorker[int, Result]:
        worker: BatchWorker[int, Result] = BatchWorker(work, name="test", **kwargs)
        worker.start()
        made.append(worker)
        return worker

    yield make
    for worker in made:
        worker.close(timeout=5)
        assert not worker.alive


async def entered(model: Model) -> None:
    """Wait, without blocking the loop, until the model thread is inside ``fn``."""
    deadline = time.monotonic() + 5
    while not model.entered.is_set():
        assert time.monotonic() < deadline, "model was never called"
        await asyncio.sleep(0.001)


async def test_concurrent_submits_share_model_calls(make_worker: Make) -> None:
    model = Model()
    worker = make_worker(model, max_batch=8, max_wait_s=0.2)
    results = await asyncio.gather(*(worker.submit(i) for i in range(16)))
    assert [r[0] for r in results] == [i * 2 for i in range(16)]
    assert sorted(model.seen()) == list(range(16))
    assert len(model.batches) < 16 and max(len(b) for b in model.batches) > 1
    # Each caller got the result of its own item, computed in a batch of the size it reports.
    sizes = {x: len(b) for b in model.batches for x in b}
    assert all(r[1] == sizes[i] for i, r in enumerate(results))
    assert worker.stats.items == 16 and worker.stats.batches == len(model.batches)
    assert worker.stats.mean_batch_size == 16 / len(model.batches)


async def test_max_batch_splits_a_backlog(make_worker: Make) -> None:
    model = Model(gated=True)
    worker = make_worker(model, max_batch=3, max_wait_s=0)
    first = asyncio.create_task(worker.submit(0))
    await entered(model)
    rest = [asyncio.create_task(worker.submit(i)) for i in range(1, 10)]
    await asyncio.sleep(0)  # every task has queued its item
    model.release.set()
    await asyncio.gather(first, *rest)
    assert [len(b) for b in model.batches] == [1, 3, 3, 3]
    assert model.seen() == list(range(10))  # FIFO


async def test_lone_item_is_not_held_for_company(make_worker: Make) -> None:
    model = Model()
    worker = make_worker(model, max_batch=16, max_wait_s=0.05)
    start = time.monotonic()
    assert await asyncio.wait_for(worker.submit(4), 3) == (8, 1)
    assert time.monotonic() - start < 1.5  # max_wait + generous slack, not a full batch


async def test_max_wait_gathers_late_arrivals(make_worker: Make) -> None:
    model = Model()
    worker = make_worker(model, max_batch=2, max_wait_s=5)
    first = asyncio.create_task(worker.submit(1))
    await asyncio.sleep(0.05)
    second = worker.submit(2)
    assert list(await asyncio.wait_for(asyncio.gather(first, second), 3)) == [(2, 2), (4, 2)]
    assert model.batches == [[1, 2]]


async def test_exception_reaches_the_whole_batch_and_worker_recovers(make_worker: Make) -> None:
    model = Model()
    worker = make_worker(model, max_batch=3, max_wait_s=1)
    outcomes = await asyncio.gather(*(worker.submit(x) for x in (1, -1, 2)), return_exceptions=True)
    assert model.batches == [[1, -1, 2]]
    assert all(isinstance(o, RuntimeError) and str(o) == "negative input" for o in outcomes)
    assert await worker.submit(5) == (10, 1)
    assert worker.alive


@pytest.mark.parametrize("returned", [[], [(0, 0)] * 3], ids=["short", "long"])
async def test_wrong_length_result_fails_the_batch(
    make_worker: Make, returned: list[Result]
) -> None:
    worker = make_worker(lambda items: returned, max_batch=2, max_wait_s=1)
    outcomes = await asyncio.gather(worker.submit(1), worker.submit(2), return_exceptions=True)
    for outcome in outcomes:
        assert isinstance(outcome, ValueError)
        assert f"returned {len(returned)} results for 2 items" in str(outcome)
    assert worker.alive


async def test_queue_full_is_raised_immediately(make_worker: Make) -> None:
    model = Model(gated=True)
    worker = make_worker(model, max_batch=1, max_queue=2)
    running = asyncio.create_task(worker.submit(0))
    await entered(model)  # item 0 is inside fn: the queue is empty again
    queued = [asyncio.create_task(worker.submit(i)) for i in (1, 2)]
    await asyncio.sleep(0)
    with pytest.raises(QueueFull):
        await asyncio.wait_for(worker.submit(3), 1)
    with pytest.raises(QueueFull):
        worker.submit_sync(3, timeout=1)
    model.release.set()
    assert await asyncio.gather(running, *queued) == [(0, 1), (2, 1), (4, 1)]
    assert 3 not in model.seen()
    assert await worker.submit(3) == (6, 1)  # room again once drained


async def test_cancel_before_pickup_skips_the_item(make_worker: Make) -> None:
    model = Model(gated=True)
    worker = make_worker(model, max_batch=4, max_wait_s=0)
    running = asyncio.create_task(worker.submit(0))
    await entered(model)
    doomed = asyncio.create_task(worker.submit(1))
    kept = asyncio.create_task(worker.submit(2))
    await asyncio.sleep(0)
    doomed.cancel()
    with pytest.raises(asyncio.CancelledError):
        await doomed
    model.release.set()
    assert list(await asyncio.gather(running, kept)) == [(0, 1), (4, 1)]
    assert model.batches == [[0], [2]]


@pytest.mark.parametrize("fails", [False, True], ids=["result", "exception"])
async def test_cancel_after_pickup_drops_the_outcome_quietly(
    make_worker: Make, caplog: pytest.LogCaptureFixture, fails: bool
) -> None:
    model = Model(gated=True)
    worker = make_worker(model, max_batch=1)
    doomed = asyncio.create_task(worker.submit(-1 if fails else 1))  # -1: fn raises
    await entered(model)
    doomed.cancel()
    with pytest.raises(asyncio.CancelledError):
        await doomed
    model.release.set()
    # The late outcome for item 1 is posted to this loop before item 2 is even taken.
    assert await worker.submit(2) == (4, 1)
    await asyncio.sleep(0.01)
    gc.collect()  # "exception was never retrieved" is reported when the future is collected
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert worker.alive


def test_result_for_a_closed_loop_is_dropped(make_worker: Make) -> None:
    model = Model(gated=True)
    worker = make_worker(model, max_batch=1)
    loop = asyncio.new_event_loop()
    try:
        task = loop.create_task(worker.submit(1))
        loop.run_until_complete(asyncio.sleep(0))  # the task queues its item
        assert model.entered.wait(5)
        task.cancel()
        loop.run_until_complete(asyncio.gather(task, return_exceptions=True))
    finally:
        loop.close()
    model.release.set()  # the result now goes to a closed loop
    assert worker.submit_sync(2, timeout=5) == (4, 1)
    assert worker.alive


async def test_close_finishes_queued_work(make_worker: Make) -> None:
    model = Model(gated=True)
    worker = make_worker(model, max_batch=1)
    tasks = [asyncio.create_task(worker.submit(i)) for i in range(3)]
    await entered(model)
    # close() blocks this loop while it joins; the model is released from another thread.
    timer = threading.Timer(0.1, model.release.set)
    timer.start()
    worker.close()
    timer.join()
    assert not worker.alive
    assert await asyncio.gather(*tasks) == [(0, 1), (2, 1), (4, 1)]
    with pytest.raises(WorkerClosed):
        await worker.submit(9)
    with pytest.raises(WorkerClosed):
        worker.submit_sync(9)
    with pytest.raises(WorkerClosed):
        worker.start()
    assert 9 not in model.seen()


async def test_close_timeout_fails_items_still_queued(make_worker: Make) -> None:
    model = Model(gated=True)
    worker = make_worker(model, max_batch=1)
    running = asyncio.create_task(worker.submit(0))
    await entered(model)
    queued = [asyncio.create_task(worker.submit(i)) for i in (1, 2)]
    await asyncio.sleep(0)
    worker.close(timeout=0.05)  # the model is stuck: the join times out
    for task in queued:
        with pytest.raises(WorkerClosed):
            await task
    assert worker.alive  # the batch inside fn cannot be interrupted
    model.release.set()
    assert await running == (0, 1)  # ... and still completes
    worker.close()
    assert not worker.alive
    assert model.batches == [[0]]


def test_submit_sync_from_plain_threads(make_worker: Make) -> None:
    model = Model()
    worker = make_worker(model, max_batch=8, max_wait_s=0.5)
    barrier = threading.Barrier(8)

    def call(i: int) -> Result:
        barrier.wait(5)
        return worker.submit_sync(i, timeout=5)

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(call, range(8)))
    assert [r[0] for r in results] == [i * 2 for i in range(8)]
    assert worker.stats.items == 8 and worker.stats.batches < 8


def test_submit_sync_timeout_withdraws_the_item(make_worker: Make) -> None:
    model = Model(gated=True)
    worker = make_worker(model, max_batch=1)
    threading.Thread(target=worker.submit_sync, args=(0, 5), daemon=True).start()
    assert model.entered.wait(5)
    with pytest.raises(TimeoutError):
        worker.submit_sync(1, timeout=0.05)
    model.release.set()
    assert worker.submit_sync(2, timeout=5) == (4, 1)
    assert model.batches == [[0], [2]]


def test_thread_lifecycle() -> None:
    worker: BatchWorker[int, Result] = BatchWorker(Model(), name="purify")
    assert not worker.alive
    with pytest.raises(RuntimeError, match="not started"):
        worker.submit_sync(1)
    worker.start()
    worker.start()  # idempotent: still one thread
    threads = [t for t in threading.enumerate() if "purify" in t.name]
    assert len(threads) == 1 and threads[0].daemon and worker.alive
    worker.close()
    worker.close()
    assert not worker.alive and not threads[0].is_alive()


@pytest.mark.parametrize(
    ("kwargs", "argument"),
    [
        ({"max_batch": 0}, "max_batch"),
        ({"max_wait_s": -0.1}, "max_wait_s"),
        ({"max_wait_s": float("nan")}, "max_wait_s"),
        ({"max_queue": 0}, "max_queue"),
    ],
)
def test_constructor_rejects_bad_arguments(kwargs: dict[str, Any], argument: str) -> None:
    with pytest.raises(ValueError, match=argument):
        BatchWorker(Model(), name="bad", **kwargs)


class Countdown:
    """A stand-in stepper: item n needs n steps; records who was live at each step, and can
    raise on a given step or refuse items below zero at admission."""

    def __init__(self, *, fail_at: int | None = None) -> None:
        self.left: dict[object, int] = {}
        self.items: dict[object, int] = {}
        self.steps: list[list[int]] = []
        self.fail_at = fail_at
        self.step_started = threading.Event()

    @property
    def live(self) -> int:
        return len(self.left)

    def admit(self, keys: list[object], items: list[int]) -> None:
        if any(n < 0 for n in items):
            raise ValueError("negative steps")
        for key, n in zip(keys, items, strict=True):
            self.left[key], self.items[key] = n, n

    def step(self) -> list[tuple[object, Result]]:
        self.steps.append(sorted(self.items[key] for key in self.left))
        self.step_started.set()
        if len(self.steps) == self.fail_at:
            raise RuntimeError("step failed")
        time.sleep(0.01)  # long enough for a late arrival to queue meanwhile
        done = []
        for key in list(self.left):
            self.left[key] -= 1
            if self.left[key] <= 0:
                del self.left[key]
                done.append((key, (self.items[key], len(self.steps))))
        return done

    def drop(self, keys: list[object]) -> None:
        for key in keys:
            del self.left[key]

    def abandon(self) -> None:
        self.left.clear()


async def test_a_stepper_lets_items_join_and_leave_between_steps(make_worker: Make) -> None:
    stepper = Countdown()
    worker = make_worker(stepper, max_batch=8, max_wait_s=0.1)
    long, short = worker.submit(30), worker.submit(2)
    long_task, short_task = asyncio.ensure_future(long), asyncio.ensure_future(short)
    # The short item comes back after its own two steps, not the long one's thirty.
    assert await asyncio.wait_for(short_task, 5) == (2, 2)
    assert not long_task.done()
    # A late arrival joins the running long item at the next step instead of waiting for it.
    late = await asyncio.wait_for(worker.submit(3), 5)
    assert await asyncio.wait_for(long_task, 5) == (30, 30)
    joined = late[1] - 2  # the step the late item first ran in
    assert stepper.steps[joined - 1] == [3, 30] and late[1] < 30
    assert worker.stats.items == 3 and worker.stats.batches == 30
    assert worker.stats.rows == sum(len(live) for live in stepper.steps)


async def test_max_batch_caps_the_items_live_in_a_stepper(make_worker: Make) -> None:
    stepper = Countdown()
    worker = make_worker(stepper, max_batch=2, max_wait_s=0.1)
    results = await asyncio.gather(*(worker.submit(n) for n in (3, 3, 1)))
    assert max(len(live) for live in stepper.steps) == 2
    assert [r[0] for r in results] == [3, 3, 1] and results[2][1] == 4  # it waited for room


async def test_a_failed_step_fails_every_live_item_and_the_worker_goes_on(
    make_worker: Make,
) -> None:
    stepper = Countdown(fail_at=2)
    worker = make_worker(stepper, max_batch=4, max_wait_s=0.1)
    outcomes = await asyncio.gather(
        worker.submit(5), worker.submit(1), worker.submit(4), return_exceptions=True
    )
    # The one-step item left at step 1; the others were live when step 2 raised.
    assert outcomes[1] == (1, 1)
    for outcome in (outcomes[0], outcomes[2]):
        assert isinstance(outcome, RuntimeError) and str(outcome) == "step failed"
    assert stepper.live == 0  # abandoned
    assert await worker.submit(2) == (2, 4)
    assert worker.alive


async def test_a_failed_admission_fails_only_the_items_it_brought(make_worker: Make) -> None:
    stepper = Countdown()
    worker = make_worker(stepper, max_batch=4, max_wait_s=0.1)
    running = asyncio.ensure_future(worker.submit(20))
    await asyncio.to_thread(stepper.step_started.wait, 5)
    with pytest.raises(ValueError, match="negative steps"):
        await asyncio.wait_for(worker.submit(-1), 5)
    assert (await asyncio.wait_for(running, 5))[0] == 20
    assert all(-1 not in live for live in stepper.steps)


async def test_a_cancelled_live_item_costs_no_further_steps(make_worker: Make) -> None:
    stepper = Countdown()
    worker = make_worker(stepper, max_batch=4, max_wait_s=0)
    doomed = asyncio.ensure_future(worker.submit(1000))
    await asyncio.to_thread(stepper.step_started.wait, 5)
    doomed.cancel()
    with pytest.raises(asyncio.CancelledError):
        await doomed
    # The next item runs alone: the cancelled one was dropped at the next step boundary.
    assert await asyncio.wait_for(worker.submit(2), 5) == (2, len(stepper.steps))
    assert stepper.steps[-1] == [2] and len(stepper.steps) < 10
