"""The monitored model with its profile: screen (image, prompt) pairs for backdoor triggers.

The model is the one the upstream serves, loaded with transformers' auto classes (a hub id or a
local directory) with SDPA attention that also returns the rows the probe reads (eager where
transformers cannot register it), in the checkpoint's dtype unless told otherwise. Its
identity (name, configuration, dtype, size and a digest of its first and last weight tensors)
goes into every profile, so a profile calibrated on another model, or on the same weights in
another dtype, is refused rather than silently misread.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, get_args

import numpy as np
import torch
from PIL import Image

from guard.config.stages import Dtype
from guard.defenses.bye import attention
from guard.defenses.bye.crossview import CrossView, ViewSettings
from guard.defenses.bye.probe import EntropyProbe
from guard.defenses.bye.profile import BackdoorProfile, combined

# Bump when model_identity's fields change (cached toy-world profiles are then rebuilt).
IDENTITY_VERSION = 2
DTYPES: tuple[str, ...] = get_args(Dtype)


@dataclass(frozen=True)
class Screening:
    """One (image, prompt) pair's outcome."""

    score: float  # mean entropy over the profile's channels (nats)
    entropies: tuple[float, ...]  # per profile channel
    divergence: float | None  # cross-view mean JS (nats); None when the profile does not use it
    by_entropy: bool
    by_crossview: bool | None
    flagged: bool  # the profile's combination


def load_model(source: str | Path, device: str = "cpu", dtype: str = "auto") -> tuple[Any, Any]:
    """A LLaVA-family model and its processor, as vLLM would serve it, with attention that
    also returns the last position's attention row (guard/defenses/bye/attention.py).
    ``dtype``: one of DTYPES. Entropies depend on it a little, so a profile is made for one."""
    import transformers
    from packaging.version import Version
    from transformers import AutoModelForImageTextToText, AutoProcessor

    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    # transformers 4.56 renamed torch_dtype to dtype; older releases would take dtype for a
    # configuration field and silently load float32 (a 7B model then needs 28 GB).
    key = "dtype" if Version(transformers.__version__) >= Version("4.56") else "torch_dtype"
    chosen = dtype if dtype == "auto" else getattr(torch, dtype)
    processor = AutoProcessor.from_pretrained(source)
    model = AutoModelForImageTextToText.from_pretrained(
        source, attn_implementation=attention.implementation(), **{key: chosen}
    )
    return model.to(device).eval(), processor


def model_identity(source: str | Path, model: Any) -> dict[str, Any]:
    """What a profile must match: the source, the configuration and a weight fingerprint."""
    # Without where it was loaded from and which library wrote it: the architecture only.
    settings = {
        k: v
        for k, v in model.config.to_dict().items()
        if not k.startswith("_") and k != "transformers_version"
    }
    config = json.dumps(settings, sort_keys=True, default=str)
    params = list(model.parameters())
    digest = hashlib.sha256()
    for tensor in (params[0], params[-1]):
        digest.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return {
        "model": str(source),
        "architecture": type(model).__name__,
        "dtype": str(model.dtype).removeprefix("torch."),  # also in the config, but unnamed there
        "config_sha256": hashlib.sha256(config.encode()).hexdigest()[:16],
        "parameters": sum(p.numel() for p in params),
        "weights_sha256": digest.hexdigest()[:16],
    }


class Monitor:
    """Entropy probe + optional cross-view check, judged by a calibrated profile."""

    def __init__(self, probe: EntropyProbe, profile: BackdoorProfile) -> None:
        self.probe = probe
        self.profile = profile
        uses_views = profile.combine != "entropy"
        self.crossview = CrossView(probe, ViewSettings(**profile.crossview)) if uses_views else None

    def screen(self, images: Sequence[Image.Image], prompts: Sequence[str]) -> list[Screening]:
        if not images:
            return []
        batch = self.probe.prepare(images, prompts)  # one processor pass serves both checks
        layers = self.profile.layers
        signals = self.probe.signals(batch, layers).numpy()  # (B, layers, 1 + heads)
        entropies = self.profile.pick(signals, layers)  # (B, channels)
        scores = entropies.mean(1)  # (B,)
        divergences = None
        if self.crossview is not None:
            divergences = self.crossview.divergences(images, prompts, batch).numpy()
        by_entropy = self.profile.entropy_flags(scores)
        by_view = None if divergences is None else self.profile.crossview_flags(divergences)
        flagged = combined(self.profile, scores, divergences)
        return [
            Screening(
                score=float(scores[i]),
                entropies=tuple(float(h) for h in entropies[i]),
                divergence=None if divergences is None else float(divergences[i]),
                by_entropy=bool(by_entropy[i]),
                by_crossview=None if by_view is None else bool(by_view[i]),
                flagged=bool(flagged[i]),
            )
            for i in range(len(images))
        ]


def measure(
    probe: EntropyProbe,
    images: Sequence[Image.Image],
    prompts: Sequence[str],
    views: ViewSettings | None = None,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Every layer's signals (N, layers, 1 + heads) and, with ``views``, divergences (N,):
    what calibration takes."""
    batch = probe.prepare(images, prompts)
    entropies = probe.signals(batch).numpy()
    if views is None:
        return entropies, None
    return entropies, CrossView(probe, views).divergences(images, prompts, batch).numpy()
