"""Throughput and latency of the PurifyStage under 16 concurrent clients, on the 90/10 mix.

Three ways to serve the same requests (cache off, so every request is a miss and all do the
same model work): one request at a time; whole micro-batches of 16 (each runs to its deepest
image before the next starts: the stage's scheduling before stepping); and iteration-level
stepping (the stage as it serves: chains join and leave between model calls). The clients are
closed-loop: each sends its next request as soon as its previous one is answered.

It runs in a fresh process (``measure_batching_apart``). Measured in the benchmark's own
process, after the attacks and the defenses had run torch on the main thread, every UNet call
on the stage's model thread took about 2.4× as long at batch 1 (30 against 13 ms; the same
slow-down after a single forward of the VLM's tower on the main thread), which made stepping
look 3.5–4.2× faster than one request at a time instead of about 2×. A guard serving requests
runs torch on its model threads only.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import queue
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from rich.progress import Progress

from benchmarks.purification.common import BATCH_CONCURRENCY, MIX_ATTACKED
from guard.defenses.diffcap import Purifier, PurifySettings, load_diffusion, load_encoder
from guard.defenses.diffcap.encoders import Features
from guard.defenses.purify import PurifyStage
from guard.intake.decode import image_digest
from guard.types import GuardRequest, ImageInput

# (mode, clients and max_batch, whole batches?)
MODES = (
    ("one_at_a_time", 1, False),
    ("whole_batches_16", BATCH_CONCURRENCY, True),
    ("stepping_16", BATCH_CONCURRENCY, False),
)


def traffic(
    clean: np.ndarray, attacked: np.ndarray, seed: int
) -> tuple[list[GuardRequest], list[str]]:
    """The 90/10 mix: every test image once, a seeded 10% of them in their attacked version,
    in a seeded order; and each request's kind ("clean" | "attacked")."""
    rng = np.random.default_rng(seed)
    n = len(clean)
    hit = set(rng.choice(n, size=round(MIX_ATTACKED * n), replace=False).tolist())
    order = rng.permutation(n).tolist()
    requests, kinds = [], []
    for i in order:
        image = Image.fromarray(attacked[i] if i in hit else clean[i], "RGB")
        inputs = (ImageInput(0, image, image_digest(image)),)
        requests.append(GuardRequest(f"r{i}", "What digit is in the image?", inputs))
        kinds.append("attacked" if i in hit else "clean")
    return requests, kinds


async def _serve(
    stage: PurifyStage, requests: list[GuardRequest], clients: int, advance: Callable[[int], None]
) -> tuple[float, list[float], float]:
    """Seconds for ``clients`` closed-loop clients to send every request, each request's
    latency (s), and the mean images per model call (the worker's own counters)."""
    await stage.check(requests[0])  # warm-up: thread start, first-call allocations
    stats = stage.batch_stats
    batches, rows = stats.batches, stats.rows
    pending = iter(enumerate(requests))  # shared: each client takes the next one free
    latency = [0.0] * len(requests)

    async def client() -> None:
        for i, request in pending:
            sent = time.perf_counter()
            await stage.check(request)
            latency[i] = time.perf_counter() - sent
            advance(1)

    start = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(clients)))
    seconds = time.perf_counter() - start
    return seconds, latency, (stats.rows - rows) / max(1, stats.batches - batches)


def _percentiles(values: list[float]) -> dict[str, float]:
    ms = 1000 * np.asarray(values)
    return {"p50_ms": float(np.percentile(ms, 50)), "p95_ms": float(np.percentile(ms, 95))}


def measure_batching(
    purifier: Purifier,
    clean: np.ndarray,
    attacked: np.ndarray,
    progress: Progress,
    *,
    seed: int = 0,
) -> dict[str, Any]:
    """Images/s and latency by kind for each mode in MODES, on the 90/10 mix of ``clean`` and
    ``attacked`` (N, H, W, 3) uint8 images (the same N, the same order)."""
    requests, kinds = traffic(clean, attacked, seed)
    out: dict[str, Any] = {"images": len(requests), "attacked": kinds.count("attacked")}
    for mode, clients, whole in MODES:
        stage = PurifyStage(
            purifier, max_batch=clients, max_wait_s=0.005, cache_bytes=0, whole_batches=whole
        )
        task = progress.add_task(f"PurifyStage {mode}", total=len(requests))
        try:
            seconds, latency, mean_batch = asyncio.run(
                _serve(stage, requests, clients, partial(progress.advance, task))
            )
        finally:
            stage.close()
        out[mode] = {
            "clients": clients,
            "seconds": seconds,
            "images_per_s": len(requests) / seconds,
            "mean_batch_size": mean_batch,
            **{
                kind: _percentiles([t for t, k in zip(latency, kinds, strict=True) if k == kind])
                for kind in ("clean", "attacked")
            },
        }
    base = out["one_at_a_time"]["images_per_s"]
    for mode, _, _ in MODES[1:]:
        out[mode]["speedup"] = out[mode]["images_per_s"] / base
    return out


def measure_batching_apart(
    world: Path,
    features: Features,
    settings: PurifySettings,
    clean: np.ndarray,
    attacked: np.ndarray,
    progress: Progress,
    *,
    seed: int = 0,
    threads: int | None = None,
) -> dict[str, Any]:
    """:func:`measure_batching` in a fresh process (see the module docstring), with the world's
    UNet and the VLM's tower as encoder (``features``) under ``settings``; its progress is
    shown on ``progress``."""
    ctx = multiprocessing.get_context("spawn")
    messages = ctx.Queue()
    child = ctx.Process(
        target=_apart,
        args=(messages, world, features, settings, clean, attacked, seed, threads),
        daemon=True,
    )
    child.start()
    tasks: dict[str, Any] = {}
    try:
        while True:
            try:
                kind, *payload = messages.get(timeout=1)
            except queue.Empty:
                if not child.is_alive():
                    died = f"serving benchmark process died ({child.exitcode})"
                    raise RuntimeError(died) from None
                continue
            if kind == "task":
                tasks[payload[0]] = progress.add_task(payload[0], total=payload[1])
            elif kind == "advance":
                progress.advance(tasks[payload[0]], payload[1])
            elif kind == "error":
                raise RuntimeError(f"serving benchmark process failed: {payload[0]}")
            else:
                result: dict[str, Any] = payload[0]
                return result
    finally:
        child.join(timeout=10)


class _Relay:
    """Progress in the child process, sent to the parent's bars."""

    def __init__(self, messages: Any) -> None:
        self._messages = messages

    def add_task(self, description: str, total: int) -> str:
        self._messages.put(("task", description, total))
        return description

    def advance(self, task: str, n: int = 1) -> None:
        self._messages.put(("advance", task, n))


def _apart(
    messages: Any,
    world: Path,
    features: Features,
    settings: PurifySettings,
    clean: np.ndarray,
    attacked: np.ndarray,
    seed: int,
    threads: int | None,
) -> None:
    import torch

    try:
        if threads:
            torch.set_num_threads(threads)
        unet, scheduler = load_diffusion(world / "diffusion")
        encoder = load_encoder("hf", str(world / "vlm"), features=features)
        purifier = Purifier(unet, scheduler, encoder, settings)
        relay: Any = _Relay(messages)
        messages.put(("done", measure_batching(purifier, clean, attacked, relay, seed=seed)))
    except Exception as e:  # reported to the parent, which raises it
        messages.put(("error", f"{type(e).__name__}: {e}"))
