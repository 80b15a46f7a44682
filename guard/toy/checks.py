"""The built world's last two steps, after training: does purification keep the VLM reading
(DiffPure at t = 0.1 and 0.2), and the DiffCAP calibration profile the guard loads for it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.progress import Progress

from guard.toy.data import eval_images, load_splits, to_tensor, to_uint8
from guard.toy.progress import task


def purification_check(
    out: Path, directory: Path, progress: Progress, n: int | None
) -> dict[str, Any]:
    """DiffPure with the built diffusion model at t = 0.1 and 0.2: does the VLM still read it?"""
    from guard.toy.diffusion import denoise, load_diffusion, noise_to
    from guard.toy.vlm import answer_images, load_vlm
    from guard.toy.vlm_parts import answer

    unet, scheduler = load_diffusion(out / "diffusion")
    model, processor = load_vlm(out / "vlm")
    test = load_splits()["test"]
    clean = eval_images(test)[:n]
    expected = [answer(int(label)) for label in test.labels[:n]]
    result: dict[str, Any] = {}
    task = progress.add_task("purification check", total=2)
    for t in (100, 200):
        generator = torch.Generator().manual_seed(0)
        noisy = noise_to(to_tensor(clean), t, scheduler, generator)
        # DDIM (20 steps): 40 UNet calls per image instead of 302 keeps the check to seconds.
        purified = to_uint8(denoise(unet, scheduler, noisy, t, generator, sampler="ddim"))
        answers = answer_images(model, processor, purified)
        accuracy = float(np.mean([a == e for a, e in zip(answers, expected, strict=True)]))
        result[f"purified_vlm_accuracy_t{t}"] = round(accuracy, 4)
        progress.advance(task)
    return result


@dataclass(frozen=True)
class ProfileSettings:
    """DiffCAP calibration of the toy world: the VLM's own tower as the encoder (as DiffCAP
    does), clean validation images, and the noise budget a clean image may use."""

    check_every: int = 5
    t_max: float = 0.3
    # The tower's similarity does not tell PGD images from clean ones here (both stop at the
    # first checks), so a floor does the purifying and τ decides how far beyond it to go.
    t_min: float = 0.1
    target_steps: int = 120  # the floor's 100 steps and 4 checks
    quantile: float = 0.9


PROFILE = ProfileSettings()


def purify_config(out: Path, profile: bool = True) -> dict[str, Any]:
    """The guard's ``purify`` config section for the toy world built in ``out``."""
    section: dict[str, Any] = {
        "diffusion": str(out / "diffusion"),
        "encoder": "hf",
        "encoder_model": str(out / "vlm"),
        "check_every": PROFILE.check_every,
        "t_max": PROFILE.t_max,
        "t_min": PROFILE.t_min,
    }
    if profile:
        section["profile"] = str(out / "purify_profile" / "profile.json")
    return section


def purify_profile(out: Path, directory: Path, progress: Progress, n: int | None) -> dict[str, Any]:
    """Calibrate τ on the clean validation images, as ``vlm-guard purify calibrate`` does."""
    from guard.config import PurifyConfig
    from guard.defenses.diffcap import Trace
    from guard.defenses.diffcap.loading import load_purifier
    from guard.defenses.diffcap.profile import calibrate_purifier

    purifier, identity, _ = load_purifier(
        PurifyConfig(**purify_config(out, profile=False)), use_profile=False
    )
    images = to_tensor(eval_images(load_splits()["val"])[:n])
    traces: list[Trace] = []
    chunks = range(0, len(images), 50)
    with task(progress, "purify calibration", len(chunks)) as advance:
        for i in chunks:
            traces.extend(purifier.traces(list(images[i : i + 50])))
            advance()
    profile = calibrate_purifier(
        purifier,
        traces,
        target_steps=PROFILE.target_steps,
        quantile=PROFILE.quantile,
        identity=identity,
    )
    profile.save(directory / "profile.json")
    return {"tau": profile.tau, "clean_t_star_mean": round(profile.clean_mean, 2)}
