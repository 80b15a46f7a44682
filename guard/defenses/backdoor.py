"""The ``backdoor`` stage: screen each (image, user text) pair for the served model's
triggered-backdoor signatures before anything is forwarded (BYE; DESIGN.md §4.2).

Which images: ``screen: purified`` those the model will see, ``received`` those the client
sent, ``both`` (default) each of them. Purification usually defuses a patch trigger, so the
purified view alone would let an attacker probe for the trigger unnoticed; the received view
also matches how profiles are calibrated (on unpurified fine-tuning samples), and the purified
view catches a trigger that survives purification.

The monitored model is the upstream's own weights, loaded here once. Pairs from concurrent
requests share prefills through one :class:`BatchWorker`. A request is blocked (category
``backdoor``) when any of its images is flagged by the calibrated profile's rule; the Decision's
details carry every image's score, layer entropies and cross-view divergence.
"""

from __future__ import annotations

import logging
from dataclasses import asdict
from pathlib import Path

from PIL import Image

from guard.batching import BatchStats, BatchWorker, submit_all
from guard.config import BackdoorConfig, ConfigError
from guard.config.stages import Screen
from guard.defenses.bye.monitor import Monitor, Screening, load_model, model_identity
from guard.defenses.bye.probe import EntropyProbe
from guard.defenses.bye.profile import BackdoorProfile
from guard.metrics import Metrics
from guard.types import Decision, GuardRequest, ImageInput

log = logging.getLogger(__name__)
NAME = "backdoor"
Pair = tuple[Image.Image, str]


class BackdoorStage:
    name = NAME
    may_rewrite = False

    def __init__(
        self,
        monitor: Monitor,
        *,
        metrics: Metrics | None = None,
        screen: Screen = "both",
        max_batch: int = 8,
        max_wait_s: float = 0.005,
        max_queue: int = 256,
    ) -> None:
        self.monitor = monitor
        self.screen = screen
        self._metrics = metrics
        self._worker: BatchWorker[Pair, Screening] = BatchWorker(
            self._screen,
            name=NAME,
            max_batch=max_batch,
            max_wait_s=max_wait_s,
            max_queue=max_queue,
        )
        self._worker.start()

    @classmethod
    def from_config(cls, cfg: BackdoorConfig, metrics: Metrics | None = None) -> BackdoorStage:
        return cls(
            load_monitor(cfg),
            metrics=metrics,
            screen=cfg.screen,
            max_batch=cfg.max_batch,
            max_wait_s=cfg.max_wait_ms / 1000,
            max_queue=cfg.max_queue,
        )

    async def check(self, request: GuardRequest) -> Decision:
        if not request.images:
            return Decision(NAME, "allow", reason="no images")
        views = self._views(request)
        pairs = [(im.image, request.text) for _, im in views]
        results = await submit_all(self._worker, pairs, "backdoor monitor")
        if self._metrics is not None:
            for r in results:
                self._metrics.backdoor_entropy.observe(r.score)
        details = {
            "channels": list(self.monitor.profile.channels),  # [layer, head or None]
            "threshold": self.monitor.profile.threshold,
            "images": [
                {"index": im.index, "view": view, **asdict(r)}
                for (view, im), r in zip(views, results, strict=True)
            ],
        }
        low = min(r.score for r in results)
        flagged = [i for i, r in enumerate(results) if r.flagged]
        if flagged:
            view, image = views[flagged[0]]
            why = ", ".join(_why(results[i]) for i in flagged)
            return Decision(
                NAME,
                "block",
                reason=f"backdoor trigger signature on image {image.index} as {view} ({why})",
                category="backdoor",
                score=low,
                details=details,
            )
        return Decision(NAME, "allow", reason="no trigger signature", score=low, details=details)

    def _views(self, request: GuardRequest) -> list[tuple[str, ImageInput]]:
        """(view, image) pairs to screen; images nobody rewrote are screened once each."""
        if not request.received:
            return [("received", im) for im in request.images]
        views: list[tuple[str, ImageInput]] = []
        if self.screen in ("received", "both"):
            views += [("received", im) for im in request.received]
        if self.screen in ("purified", "both"):
            views += [("purified", im) for im in request.images]
        return views

    @property
    def batch_stats(self) -> BatchStats:
        return self._worker.stats

    def ready(self) -> bool:
        return self._worker.alive

    def close(self) -> None:
        self._worker.close(timeout=30)

    def _screen(self, pairs: list[Pair]) -> list[Screening]:
        """Runs on the model thread."""
        return self.monitor.screen([p[0] for p in pairs], [p[1] for p in pairs])


def load_monitor(cfg: BackdoorConfig) -> Monitor:
    """The monitored model and its profile, refused where they do not belong together."""
    if cfg.model is None:
        raise ConfigError("backdoor.model must name the served model (hub id or directory)")
    if cfg.profile is None:
        raise ConfigError(
            "backdoor.profile is required: run vlm-guard backdoor calibrate for this model"
        )
    profile = BackdoorProfile.load(cfg.profile)
    local = cfg.model
    if local.startswith(("/", "./", "../", "~")) and not Path(local).expanduser().exists():
        raise ConfigError(f"backdoor.model: no such directory: {local}")
    try:
        model, processor = load_model(cfg.model, cfg.device, cfg.dtype)
    except (OSError, ValueError) as e:
        line = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
        raise ConfigError(f"cannot load backdoor.model {cfg.model!r}: {line}") from None
    profile.check_matches(model_identity(cfg.model, model))
    return Monitor(EntropyProbe(model, processor), profile)


def _why(result: Screening) -> str:
    parts = []
    if result.by_entropy:
        parts.append(f"entropy {result.score:.3f}")
    if result.by_crossview:
        parts.append(f"cross-view divergence {result.divergence:.2e}")
    return " and ".join(parts) or "combined rule"
