"""Throughput of the micro-batching PurifyStage: 16 concurrent requests against one at a time."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from functools import partial
from typing import Any

import numpy as np
from PIL import Image
from rich.progress import Progress

from benchmarks.purification.common import BATCH_CONCURRENCY, chunks
from guard.defenses.diffcap import Purifier
from guard.defenses.purify import PurifyStage
from guard.intake.decode import image_digest
from guard.types import GuardRequest, ImageInput


async def _drive(
    stage: PurifyStage,
    groups: list[list[GuardRequest]],
    rounds: int,
    concurrent: bool,
    advance: Callable[[int], None],
) -> tuple[float, float]:
    """Seconds to send every group ``rounds`` times, together (gather) or one by one, and the
    mean number of images per model call (from the worker's own counters)."""
    await stage.check(groups[0][0])  # warm-up: thread start, first-call allocations
    stats = stage.batch_stats
    batches, rows = stats.batches, stats.rows
    start = time.perf_counter()
    for _ in range(rounds):
        for group in groups:
            if concurrent:
                await asyncio.gather(*(stage.check(r) for r in group))
            else:
                for request in group:
                    await stage.check(request)
            advance(len(group))
    seconds = time.perf_counter() - start
    return seconds, (stats.rows - rows) / max(1, stats.batches - batches)


def measure_batching(
    purifier: Purifier, images: np.ndarray, rounds: int, progress: Progress
) -> dict[str, Any]:
    """Images/s of 16 concurrent requests through PurifyStage vs one request at a time.

    The cache is off (every request is a miss), so both modes do the same model work.
    """
    pils = [Image.fromarray(image, "RGB") for image in images]
    requests = [
        GuardRequest(f"r{i}", "What digit is in the image?", (ImageInput(0, im, image_digest(im)),))
        for i, im in enumerate(pils)
    ]
    groups = [requests[s] for s in chunks(len(requests), BATCH_CONCURRENCY)]
    out: dict[str, Any] = {"images": len(requests), "rounds": rounds}
    for mode, max_batch in (("one_at_a_time", 1), ("concurrent_16", BATCH_CONCURRENCY)):
        stage = PurifyStage(purifier, max_batch=max_batch, max_wait_s=0.005, cache_bytes=0)
        task = progress.add_task(f"PurifyStage {mode}", total=rounds * len(requests))
        try:
            seconds, mean_batch = asyncio.run(
                _drive(stage, groups, rounds, max_batch > 1, partial(progress.advance, task))
            )
        finally:
            stage.close()
        out[mode] = {
            "max_batch": max_batch,
            "seconds": seconds,
            "images_per_s": rounds * len(requests) / seconds,
            "mean_batch_size": mean_batch,
        }
    out["speedup"] = out["concurrent_16"]["images_per_s"] / out["one_at_a_time"]["images_per_s"]
    return out
