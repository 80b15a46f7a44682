"""Micro-batching of model calls from many requests onto one model thread.

Model-backed defenses (the DiffCAP purifier, the backdoor monitor) keep their torch code plain
and synchronous: ``fn(items) -> results``. A :class:`BatchWorker` owns the single thread that
calls it, so the model is used from one thread only, and concurrent requests share a forward
pass instead of queueing for one each::

    worker = BatchWorker(monitor.screen_batch, name="backdoor", max_batch=8)
    worker.start()                         # at start-up, after the model has loaded
    screened = await worker.submit(pair)   # from request handlers, on any event loop
    worker.close()                         # at shutdown

Batching rule: the thread takes the oldest queued item, then keeps gathering until it holds
``max_batch`` items or ``max_wait_s`` has passed since that first item was queued, and calls
``fn`` once. ``max_wait_s`` therefore bounds the extra latency batching adds to any item.

Work that runs for many model calls per item, with a different number of calls per item (the
purifier's chains: t* differs per image), takes a :class:`Stepper` instead of ``fn``: items
join between two steps and each leaves as soon as it is done (iteration-level batching, as
vLLM schedules sequences). With ``fn`` a short item would wait for the longest one in its
batch, and new arrivals for the whole batch.
"""

from guard.batching.stepper import Stepper
from guard.batching.worker import BatchStats, BatchWorker, QueueFull, WorkerClosed, submit_all

__all__ = ["BatchStats", "BatchWorker", "QueueFull", "Stepper", "WorkerClosed", "submit_all"]
