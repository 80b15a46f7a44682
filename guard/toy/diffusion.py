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
from typing import Any, Literal

import numpy as np
import torch
from diffusers import DDIMScheduler, DDPMPipeline, DDPMScheduler, UNet2DModel
from diffusers.utils.torch_utils import randn_tensor
from rich.progress import Progress
from torch import nn

from guard.toy.data import eval_images, load_splits, render, to_tensor
from guard.toy.progress import task

log = logging.getLogger(__name__)
Sampler = Literal["ddpm", "ddim"]


@dataclass(frozen=True)
class DiffusionSettings:
    # Conv-only UNet (DownBlock2D/UpBlock2D): attention at 16×16 doubles the CPU cost.
    # Measured on 2 idle cores, s/step: (32, 32, 64)×1 layer at batch 32: 0.33; batch 48: 0.48;
    # (32, 64, 64)×1 at 32: 0.46, at 48: 0.72; ×2 layers at 48: 1.09. 1,000 steps of the first
    # fit the ~6 min budget and purify well; the wider model would get only ~700 steps.
    block_out_channels: tuple[int, ...] = (32, 32, 64)
    layers_per_block: int = 1
    norm_num_groups: int = 8  # diffusers' 32 groups would leave one channel per group at 32 wide
    steps: int = 1000
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


def load_diffusion(path: str | Path) -> tuple[UNet2DModel, DDPMScheduler]:
    """A DDPMPipeline directory (or hub id such as google/ddpm-cifar10-32), in eval mode."""
    unet = UNet2DModel.from_pretrained(str(path), subfolder="unet").eval()
    scheduler = DDPMScheduler.from_pretrained(str(path), subfolder="scheduler")
    return unet, scheduler


def unet_evaluations(t: int, sampler: Sampler = "ddpm", ddim_steps: int = 20) -> int:
    """UNet evaluations per image that ``denoise`` spends reversing from timestep t."""
    return len(_reverse_timesteps(t, sampler, ddim_steps))


def _reverse_timesteps(t: int, sampler: Sampler, ddim_steps: int) -> list[int]:
    if t < 0:
        raise ValueError(f"timestep must be >= 0, got {t}")
    if sampler == "ddpm":
        return list(range(t, -1, -1))  # t, t-1, …, 0: t+1 evaluations
    if sampler == "ddim":
        if ddim_steps < 1:
            raise ValueError(f"ddim_steps must be >= 1, got {ddim_steps}")
        # Evenly spaced from t down to 0 inclusive; the step from 0 lands on x_0 (ᾱ = 1).
        n = min(ddim_steps, t + 1)
        return [int(v) for v in np.linspace(t, 0, n).round()]
    raise ValueError(f"unknown sampler {sampler!r}")


def _check_timestep(t: int, scheduler: DDPMScheduler) -> None:
    if not 0 <= t < scheduler.config.num_train_timesteps:
        raise ValueError(f"t={t} outside [0, {scheduler.config.num_train_timesteps - 1}]")


@torch.no_grad()
def noise_to(
    x0: torch.Tensor, t: int, scheduler: DDPMScheduler, generator: torch.Generator | None
) -> torch.Tensor:
    """Forward-diffuse clean images (B, 3, H, W) in [-1, 1] to timestep t in one shot."""
    _check_timestep(t, scheduler)
    noise = randn_tensor(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
    timesteps = torch.full((x0.shape[0],), t, dtype=torch.long, device=x0.device)
    noisy: torch.Tensor = scheduler.add_noise(x0, noise, timesteps)
    return noisy


@torch.no_grad()
def denoise(
    unet: UNet2DModel,
    scheduler: DDPMScheduler,
    x_t: torch.Tensor,
    t: int,
    generator: torch.Generator | None,
    *,
    sampler: Sampler = "ddpm",
    ddim_steps: int = 20,
) -> torch.Tensor:
    """Reverse x_t (B, 3, H, W) from timestep t to a clean batch in [-1, 1].

    ``ddpm``: ancestral steps t, t-1, …, 0 (t+1 UNet evaluations, stochastic: the generator
    matters). ``ddim``: η = 0 over ``min(ddim_steps, t+1)`` evenly spaced timesteps from t
    (deterministic given x_t). See ``unet_evaluations``.
    """
    _check_timestep(t, scheduler)
    timesteps = _reverse_timesteps(t, sampler, ddim_steps)
    device = unet.device
    x = x_t.to(device=device, dtype=unet.dtype)
    ones = torch.ones(x.shape[0], dtype=torch.long, device=device)  # (B,)
    if sampler == "ddpm":
        # A fresh copy: the caller's scheduler may carry set_timesteps state (which changes
        # step()'s idea of the previous timestep) and may be shared between threads.
        ddpm = DDPMScheduler.from_config(scheduler.config)
        for step_t in timesteps:
            eps = unet(x, ones * step_t).sample
            x = ddpm.step(eps, step_t, x, generator=generator).prev_sample
    else:
        # DDIMScheduler.step derives the previous timestep as t - T // num_inference_steps, a
        # fixed stride from T, so it cannot follow a schedule that starts exactly at t. Use it
        # for what it does well (x̂_0 for any prediction type, clipped as configured) and take
        # the η = 0 update x_prev = √ᾱ_prev·x̂_0 + √(1-ᾱ_prev)·ε̂ ourselves.
        ddim = DDIMScheduler.from_config(scheduler.config)
        ddim.set_timesteps(len(timesteps))
        ddim.timesteps = torch.tensor(timesteps)
        alphas = ddim.alphas_cumprod.to(device=device, dtype=x.dtype)
        final = float(ddim.final_alpha_cumprod)
        for i, step_t in enumerate(timesteps):
            out = unet(x, ones * step_t).sample
            x0 = ddim.step(out, step_t, x).pred_original_sample
            a_t = alphas[step_t]
            eps = (x - a_t.sqrt() * x0) / (1 - a_t).sqrt()  # ε̂ consistent with the clipped x̂_0
            a_prev = alphas[timesteps[i + 1]] if i + 1 < len(timesteps) else final
            x = math.sqrt(a_prev) * x0 + math.sqrt(1 - a_prev) * eps
    return x.clamp(-1, 1)


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
    out_dir: Path, *, seed: int, settings: DiffusionSettings, progress: Progress | None = None
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
