"""The ``purify`` stage: DiffCAP purification of every image before anything else sees it.

Each image is looked up in a byte-bounded cache (key: the image digest, which covers mode, size
and pixels, plus the purifier's settings); misses go to one :class:`BatchWorker`, whose model
thread steps the images of concurrent requests together: they share encoder and UNet calls even
when they stop at different t*, new images join between two steps, and each image's result goes
back as soon as its own chain ends. The stage always rewrites: the model must see exactly the
pixels the guard checked, and those are the purified ones. With a calibration profile it also
scores how unusual t* is against clean images, and may block above ``block_score``.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

from PIL import Image

from guard.batching import BatchStats, BatchWorker, submit_all
from guard.cache import ByteLRU
from guard.config import ConfigError, PurifyConfig
from guard.defenses.diffcap import (
    Purifier,
    PurifyResult,
    pil_to_tensor,
    tensor_to_pil,
)
from guard.defenses.diffcap.loading import load_purifier
from guard.defenses.diffcap.profile import PurifyProfile
from guard.defenses.diffcap.purifier import chain_result
from guard.defenses.diffcap.stepper import PurifyStepper
from guard.intake.decode import image_digest
from guard.metrics import Metrics
from guard.types import Decision, GuardRequest, ImageInput

log = logging.getLogger(__name__)
NAME = "purify"


@dataclass(frozen=True)
class Purified:
    """One image's outcome, as cached and reported (``details["images"]``)."""

    image: Image.Image
    digest: str
    steps: int  # t*
    similarity: tuple[float, ...]
    drift: tuple[float, ...]  # with the drift rule on: cos(φ(x̂_0), φ(input)) per check
    confirm_drift: float | None  # the same at the look confirming a stop, where one was taken
    stopped: str
    unet_evals: int
    encoder_evals: int

    def nbytes(self) -> int:
        width, height = self.image.size
        return width * height * 3 + 8 * (len(self.similarity) + len(self.drift)) + 256


class PurifyStage:
    name = NAME
    may_rewrite = True

    def __init__(
        self,
        purifier: Purifier,
        *,
        identity: Mapping[str, Any] | None = None,
        profile: PurifyProfile | None = None,
        metrics: Metrics | None = None,
        block_score: float | None = None,
        cache_bytes: int = 0,
        max_batch: int = 16,
        max_wait_s: float = 0.005,
        max_queue: int = 256,
        whole_batches: bool = False,
    ) -> None:
        """``whole_batches`` runs each micro-batch to its deepest image before the next one
        starts (the scheduling before stepping), for benchmarks to compare against."""
        if block_score is not None and profile is None:
            raise ConfigError("purify.block_score needs a calibration profile (purify.profile)")
        self.purifier = purifier
        self.profile = profile
        self.block_score = block_score
        self._metrics = metrics
        self._cache: ByteLRU[Purified] = ByteLRU(cache_bytes)
        # What makes a cached result valid: the models and every setting that changes pixels.
        key = {"models": dict(identity or {}), "settings": asdict(purifier.settings)}
        self._key = hashlib.sha256(
            json.dumps(key, sort_keys=True, default=str).encode()
        ).hexdigest()[:16]

        def whole_batch(images: list[Image.Image]) -> list[Purified]:
            tensors = [pil_to_tensor(im) for im in images]
            return [_purified(r) for r in purifier.purify_batch(tensors)]

        work = whole_batch if whole_batches else _Chains(purifier.stepper())
        self._worker: BatchWorker[Image.Image, Purified] = BatchWorker(
            work,
            name=NAME,
            max_batch=max_batch,
            max_wait_s=max_wait_s,
            max_queue=max_queue,
        )
        self._worker.start()

    @classmethod
    def from_config(cls, cfg: PurifyConfig, metrics: Metrics | None = None) -> PurifyStage:
        """Load the models named in ``cfg`` (once, at start-up) and build the stage."""
        purifier, identity, profile = load_purifier(cfg)
        return cls(
            purifier,
            identity=identity,
            profile=profile,
            metrics=metrics,
            block_score=cfg.block_score,
            cache_bytes=cfg.cache_bytes,
            max_batch=cfg.max_batch,
            max_wait_s=cfg.max_wait_ms / 1000,
            max_queue=cfg.max_queue,
        )

    async def check(self, request: GuardRequest) -> Decision:
        if not request.images:
            return Decision(NAME, "allow", reason="no images")
        hits = [self._cache.get((im.digest, self._key)) for im in request.images]
        # One model call per distinct image: a request may repeat an image.
        misses = {
            im.digest: im.image for im, hit in zip(request.images, hits, strict=True) if hit is None
        }
        fresh = await submit_all(self._worker, misses.values(), "purifier")
        purified = dict(zip(misses, fresh, strict=True))
        for digest, result in purified.items():
            self._cache.put((digest, self._key), result, result.nbytes())
        results = [
            hit if hit is not None else purified[im.digest]
            for im, hit in zip(request.images, hits, strict=True)
        ]
        scores = [self._score(r.steps) for r in results]
        self._observe(results, cached=sum(h is not None for h in hits))
        images = tuple(
            ImageInput(im.index, r.image, r.digest)
            for im, r in zip(request.images, results, strict=True)
        )
        details: dict[str, Any] = {
            "images": [
                {
                    "steps": r.steps,
                    "similarity": list(r.similarity),
                    "drift": list(r.drift),
                    "confirm_drift": r.confirm_drift,
                    "stopped": r.stopped,
                    "score": s,
                    "unet_evals": r.unet_evals,
                    "encoder_evals": r.encoder_evals,
                    "cached": h is not None,
                }
                for r, s, h in zip(results, scores, hits, strict=True)
            ]
        }
        top = max((s for s in scores if s is not None), default=None)
        if self.block_score is not None and top is not None and top > self.block_score:
            return Decision(
                NAME,
                "block",
                reason=f"purification needed unusually much noise (score {top:.2f})",
                category="adversarial",
                score=top,
                images=images,
                details=details,
            )
        steps = ", ".join(str(r.steps) for r in results)
        return Decision(
            NAME,
            "rewrite",
            reason=f"purified (t* {steps})",
            score=top,
            images=images,
            details=details,
        )

    @property
    def batch_stats(self) -> BatchStats:
        """The model thread's live batch counters (read-only: for benchmarks, tests, metrics)."""
        return self._worker.stats

    def ready(self) -> bool:
        return self._worker.alive

    def close(self) -> None:
        self._worker.close(timeout=30)

    def _score(self, steps: int) -> float | None:
        return None if self.profile is None else self.profile.score(steps)

    def _observe(self, results: list[Purified], *, cached: int) -> None:
        if self._metrics is None:
            return
        for r in results:
            self._metrics.purify_steps.observe(r.steps)
        if cached:
            self._metrics.cache_hits.labels(NAME).inc(cached)


class _Chains:
    """The purifier's stepper as the worker's :class:`~guard.batching.Stepper`: PIL images
    in, :class:`Purified` out, on the model thread."""

    def __init__(self, stepper: PurifyStepper) -> None:
        self._stepper = stepper

    @property
    def live(self) -> int:
        return self._stepper.live

    def admit(self, keys: list[object], items: list[Image.Image]) -> None:
        self._stepper.admit(keys, [pil_to_tensor(im) for im in items])

    def step(self) -> list[tuple[object, Purified]]:
        return [(chain.key, _purified(chain_result(chain))) for chain in self._stepper.advance()]

    def drop(self, keys: list[object]) -> None:
        self._stepper.drop(keys)

    def abandon(self) -> None:
        self._stepper.abandon()


def _purified(r: PurifyResult) -> Purified:
    image = tensor_to_pil(r.image)
    return Purified(
        image=image,
        digest=image_digest(image),
        steps=r.t_star,
        similarity=tuple(r.similarities),
        drift=tuple(r.drifts),
        confirm_drift=r.confirm_drift,
        stopped=r.stopped,
        unet_evals=r.unet_evals,
        encoder_evals=r.encoder_evals,
    )
