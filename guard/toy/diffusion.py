"""The toy world's diffusion model: a pixel-space DDPM on clean 32×32 digit renderings.

It is saved with ``DDPMPipeline.save_pretrained`` (``unet/``, ``scheduler/``,
``model_index.json``), the layout of ``google/ddpm-cifar10-32``, so the guard loads it with the
same code as a real checkpoint. ``noise_to`` + ``denoise`` are the DiffPure baseline: diffuse a
clean image forward to timestep t, then run the reverse chain back to 0.

Timesteps follow diffusers: t ∈ [0, T-1] and x_t = √ᾱ_t·x_0 + √(1-ᾱ_t)·ε with
ᾱ_t = alphas_cumprod[t]. Cost is counted in UNet evaluations per image (``unet_evaluations``).
"""

from __future__ import annotations

import copy
import logging
import math
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel
from torch import nn

# The general-purpose pieces live in the library (the guard must not import the toy world);
# re-exported here so the toy world's callers keep their imports.
from guard.defenses.diffcap.diffusion import (
    Sampler,
    denoise,
    load_diffusion,
    noise_to,
    reverse_timesteps,
    unet_evaluations,
)
from guard.toy.data import eval_images, load_splits, render, to_tensor
from guard.toy.progress import Bar, task

__all__ = [
    "DiffusionSettings",
    "Sampler",
    "build_scheduler",
    "build_unet",
    "denoise",
    "load_diffusion",
    "noise_to",
    "purification_psnr",
    "reverse_timesteps",
    "train_diffusion",
    "unet_evaluations",
]
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DiffusionSettings:
    # Conv-only UNet (DownBlock2D/UpBlock2D): attention at 16×16 doubles the CPU cost.
    # Measured s/step at batch 32 (2-core machine, one of its days): 0.52 with both cores,
    # 0.81 with one (the build trains it on one core beside the VLM). Purified PSNR at t = 200
    # after 600 steps: 25.95 dB; after 1,000: 26.45 dB, so 600 steps fit the build's budget.
    block_out_channels: tuple[int, ...] = (32, 32, 64)
    layers_per_block: int = 1
    norm_num_groups: int = 8  # diffusers' 32 groups would leave one channel per group at 32 wide
    steps: int = 600
    batch_size: int = 32
    lr: float = 2e-3
    warmup: int = 50
    ema_decay: float = 0.995  # horizon of ~200 steps: a short run cannot average over more
    num_train_timesteps: int = 1000
    beta_schedule: str = "linear"  # DDPM's schedule, as in google/ddpm-cifar10-32
    # Purification only ever reverses from small t (DiffPure: t* ≈ 0.1-0.2 T), so most of a
    # short training budget goes to t < focus_timesteps; the rest keeps the full range sane.
    focus_timesteps: int = 300
    focus_fraction: float = 0.9
    eval_images: int = 100  # test images for the PSNR figure

    @classmethod
    def full(cls, **changes: Any) -> DiffusionSettings:
        return replace(cls(), **changes)

    @classmethod
    def quick(cls, **changes: Any) -> DiffusionSettings:
        return replace(
            cls(block_out_channels=(16, 32, 32), steps=150, batch_size=16, eval_images=32),
            **changes,
        )


def build_unet(settings: DiffusionSettings, sample_size: int = 32) -> UNet2DModel:
    levels = len(settings.block_out_channels)
    return UNet2DModel(
        sample_size=sample_size,
        in_channels=3,
        out_channels=3,
        block_out_channels=settings.block_out_channels,
        layers_per_block=settings.layers_per_block,
        norm_num_groups=settings.norm_num_groups,
        down_block_types=("DownBlock2D",) * levels,
        up_block_types=("UpBlock2D",) * levels,
    )


def build_scheduler(settings: DiffusionSettings) -> DDPMScheduler:
    return DDPMScheduler(
        num_train_timesteps=settings.num_train_timesteps,
        beta_schedule=settings.beta_schedule,
        clip_sample=True,
    )


def _lr_factor(step: int, settings: DiffusionSettings) -> float:
    """Linear warmup, then cosine decay to zero."""
    if step < settings.warmup:
        return (step + 1) / settings.warmup
    span = max(1, settings.steps - settings.warmup)
    return 0.5 * (1 + math.cos(math.pi * (step - settings.warmup) / span))


def _sample_timesteps(
    rng: np.random.Generator, settings: DiffusionSettings, n: int
) -> torch.Tensor:
    full = rng.integers(0, settings.num_train_timesteps, n)
    focused = rng.integers(0, min(settings.focus_timesteps, settings.num_train_timesteps), n)
    pick = rng.random(n) < settings.focus_fraction
    return torch.from_numpy(np.where(pick, focused, full))  # (B,) int64


@torch.no_grad()
def _ema_update(ema: nn.Module, model: nn.Module, decay: float) -> None:
    for e, p in zip(ema.parameters(), model.parameters(), strict=True):
        e.lerp_(p, 1 - decay)


def purification_psnr(
    unet: UNet2DModel, scheduler: DDPMScheduler, images: torch.Tensor, t: int, seed: int = 0
) -> tuple[float, float]:
    """Mean PSNR (dB, vs the clean image) of x_t and of its DDIM-20 reconstruction."""
    generator = torch.Generator().manual_seed(seed)
    noisy = noise_to(images, t, scheduler, generator)
    clean = denoise(unet, scheduler, noisy, t, generator, sampler="ddim")

    def psnr(x: torch.Tensor) -> float:
        mse = ((x.clamp(-1, 1) - images) / 2).pow(2).flatten(1).mean(1)  # (B,) on a [0, 1] scale
        return float((-10 * torch.log10(mse.clamp_min(1e-10))).mean())

    return psnr(noisy), psnr(clean)


def train_diffusion(
    out_dir: Path, *, seed: int, settings: DiffusionSettings, progress: Bar | None = None
) -> dict[str, Any]:
    """Train the DDPM on fresh renderings of the train glyphs; save the EMA weights."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    generator = torch.Generator().manual_seed(seed)
    splits = load_splits()
    train = splits["train"]
    unet = build_unet(settings).train()
    ema = copy.deepcopy(unet).eval().requires_grad_(False)
    scheduler = build_scheduler(settings)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=settings.lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: _lr_factor(s, settings))
    start = time.perf_counter()
    losses: list[float] = []
    with task(progress, "diffusion", settings.steps) as advance:
        for step in range(settings.steps):
            # Every step a fresh rendering (random size, offset, colours): unlimited data.
            idx = rng.integers(0, len(train.labels), settings.batch_size)
            x0 = to_tensor(render(train.glyphs[idx], rng))  # (B, 3, 32, 32)
            t = _sample_timesteps(rng, settings, settings.batch_size)
            noise = torch.randn(x0.shape, generator=generator)
            loss = nn.functional.mse_loss(unet(scheduler.add_noise(x0, noise, t), t).sample, noise)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()  # type: ignore[no-untyped-call]
            optimizer.step()
            schedule.step()
            # Warm-up EMA: early on the average would otherwise be dominated by the random init.
            _ema_update(ema, unet, min(settings.ema_decay, (1 + step) / (10 + step)))
            losses.append(loss.item())
            if step % 10 == 0 or step == settings.steps - 1:
                advance(description=f"diffusion (loss {np.mean(losses[-50:]):.4f})")
            else:
                advance()
    seconds = time.perf_counter() - start
    DDPMPipeline(unet=ema, scheduler=scheduler).save_pretrained(out_dir)
    images = to_tensor(eval_images(splits["test"])[: settings.eval_images])
    figures: dict[str, Any] = {
        "settings": {**asdict(settings), "block_out_channels": list(settings.block_out_channels)},
        "steps": settings.steps,
        "seconds": round(seconds, 1),
        "seconds_per_step": round(seconds / max(1, settings.steps), 3),
        "parameters": sum(p.numel() for p in ema.parameters()),
        "final_loss": round(float(np.mean(losses[-50:])), 4),
    }
    for t_eval in (100, 200):
        noisy_psnr, psnr = purification_psnr(ema, scheduler, images, t_eval, seed)
        figures[f"noisy_psnr_t{t_eval}"] = round(noisy_psnr, 2)
        figures[f"purified_psnr_t{t_eval}"] = round(psnr, 2)
    log.info("diffusion trained: %s", figures)
    return figures
