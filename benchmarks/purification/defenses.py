"""The defense rows (none, JPEG q75, DiffPure at fixed t*, DiffCAP per encoder, each diffusion
defense with both samplers) and their evaluation: purify, then ask the VLM, per image."""

from __future__ import annotations

import argparse
import io
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from PIL import Image
from rich.progress import Progress

from benchmarks.purification.common import (
    Condition,
    Defense,
    Outcome,
    chunks,
    diffcap_settings,
)
from guard.defenses.diffcap import Encoder, Purifier, PurifySettings
from guard.defenses.diffcap.profile import PurifyProfile
from guard.toy.data import to_tensor, to_uint8
from guard.toy.vlm import answer_images


def build_defenses(
    unet: Any,
    scheduler: Any,
    encoders: dict[str, Encoder],
    profiles: dict[str, PurifyProfile],
    args: argparse.Namespace,
) -> list[Defense]:
    """Every row of the main table, in table order; DiffCAP's τ comes from ``profiles``."""
    defenses = [Defense("none", "none", "none"), Defense("jpeg75", "JPEG q75", "jpeg")]
    for sampler in args.samplers:
        for t in args.fixed_t:
            settings = PurifySettings(
                tau=None, t_max=t, sampler=sampler, ddim_steps=args.ddim_steps, seed=args.seed
            )
            defenses.append(
                Defense(
                    f"diffpure_t{t}_{sampler}",
                    f"DiffPure t*={t} ({sampler.upper()})",
                    "diffpure",
                    sampler=sampler,
                    t_fixed=t,
                    purifier=Purifier(unet, scheduler, encoders["hf"], settings),
                )
            )
        for name, encoder in encoders.items():
            settings = diffcap_settings(
                args,
                tau=profiles[name].tau,
                drift_tau=profiles[name].drift_tau,
                confirm_tau=profiles[name].confirm_tau,
                sampler=sampler,
                ddim_steps=args.ddim_steps,
            )
            short = "CLIP"
            if name == "hf":
                short = "VLM tower, patches" if args.hf_features == "patches" else "VLM tower"
            defenses.append(
                Defense(
                    f"diffcap_{name}_{sampler}",
                    f"DiffCAP {short} ({sampler.upper()})",
                    "diffcap",
                    sampler=sampler,
                    encoder=name,
                    purifier=Purifier(unet, scheduler, encoder, settings),
                )
            )
    return defenses


def _jpeg(images: np.ndarray, quality: int) -> np.ndarray:
    out = np.empty_like(images)
    for i, image in enumerate(images):
        buf = io.BytesIO()
        Image.fromarray(image, "RGB").save(buf, "JPEG", quality=quality)
        out[i] = np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))
    return out


def purify(
    defense: Defense,
    images: np.ndarray,
    batch: int,
    advance: Callable[[int], None],
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None, float]:
    """Purified images, UNet and encoder evaluations per image, t* per image, seconds."""
    n = len(images)
    zeros = np.zeros(n, dtype=np.int64)
    if defense.family == "none":
        advance(n)
        return images, zeros, zeros, None, 0.0
    if defense.family == "jpeg":
        start = time.perf_counter()
        out = _jpeg(images, 75)
        advance(n)
        return out, zeros, zeros, None, time.perf_counter() - start
    assert defense.purifier is not None
    tensors = to_tensor(images)  # (N, 3, 32, 32) in [-1, 1]
    purified = np.empty_like(images)
    unet, enc, t_star = zeros.copy(), zeros.copy(), zeros.copy()
    seconds = 0.0
    for part in chunks(n, batch):
        start = time.perf_counter()
        results = defense.purifier.purify_batch(list(tensors[part]))
        seconds += time.perf_counter() - start
        purified[part] = to_uint8(torch.stack([r.image for r in results]))
        unet[part] = [r.unet_evals for r in results]
        enc[part] = [r.encoder_evals for r in results]
        t_star[part] = [r.t_star for r in results]
        advance(part.stop - part.start)
    return purified, unet, enc, t_star, seconds


def evaluate(
    defense: Defense,
    condition: Condition,
    truth: list[str],
    model: Any,
    processor: Any,
    batch: int,
    advance: Callable[[int], None],
) -> Outcome:
    images, unet, enc, t_star, seconds = purify(defense, condition.images, batch, advance)
    answers = answer_images(model, processor, images)
    correct = np.array([a == e for a, e in zip(answers, truth, strict=True)])
    hit = None
    if condition.targets is not None:
        hit = np.array([a == t for a, t in zip(answers, condition.targets, strict=True)])
    return Outcome(images, answers, correct, hit, unet, enc, t_star, seconds)


def evaluate_all(
    defenses: list[Defense],
    conditions: list[Condition],
    truth: list[str],
    model: Any,
    processor: Any,
    batch: int,
    progress: Progress,
) -> dict[str, dict[str, Outcome]]:
    """Every defense on every condition: results[defense key][condition key]."""
    results: dict[str, dict[str, Outcome]] = {}
    total = len(defenses) * len(conditions) * len(truth)
    task = progress.add_task("defenses × conditions", total=total)
    for d in defenses:
        results[d.key] = {}
        for c in conditions:
            progress.update(task, description=f"{d.label} on {c.key}")
            results[d.key][c.key] = evaluate(
                d, c, truth, model, processor, batch, lambda k: progress.advance(task, k)
            )
    return results
