"""τ for each DiffCAP encoder, calibrated on clean validation images (the same procedure as
``vlm-guard purify calibrate``: guard.defenses.diffcap.profile.calibrate)."""

from __future__ import annotations

import argparse
from typing import Any

import numpy as np
from rich.progress import Progress

from benchmarks.purification.common import chunks, diffcap_settings
from guard.defenses.diffcap import Encoder, Purifier, Trace
from guard.defenses.diffcap.profile import PurifyProfile, calibrate_purifier
from guard.toy.data import to_tensor


def calibrate_tau(
    purifier: Purifier,
    images: np.ndarray,
    args: argparse.Namespace,
    progress: Progress,
    name: str,
) -> PurifyProfile:
    """τ (and drift_tau) from noise-only traces of clean validation images (no stop, to k_max)."""
    tensors = to_tensor(images)
    parts = chunks(len(images), args.batch)
    task = progress.add_task(f"calibrating τ ({name})", total=len(images))
    traces: list[Trace] = []
    for part in parts:
        traces.extend(purifier.traces(list(tensors[part])))
        progress.advance(task, part.stop - part.start)
    return calibrate_purifier(
        purifier,
        traces,
        target_steps=args.target_steps,
        quantile=args.quantile,
        identity={"encoder": name, "check_every": purifier.settings.check_every},
        drift_quantile=args.drift_quantile,
        confirm_quantile=args.confirm_quantile,
    )


def calibrate_encoders(
    unet: Any,
    scheduler: Any,
    encoders: dict[str, Encoder],
    images: np.ndarray,
    args: argparse.Namespace,
    progress: Progress,
) -> dict[str, PurifyProfile]:
    """One profile (τ) per encoder, from the same clean validation images."""
    profiles: dict[str, PurifyProfile] = {}
    for name, encoder in encoders.items():
        probe = Purifier(
            unet,
            scheduler,
            encoder,
            diffcap_settings(args),
        )
        profiles[name] = calibrate_tau(probe, images, args, progress, name)
    return profiles
