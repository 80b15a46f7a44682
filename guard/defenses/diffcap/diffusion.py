"""Diffusion pieces of DiffCAP: checkpoint loading, forward noising, per-sample reverse sampling.

Timesteps follow diffusers: t ∈ [0, T-1], x_t = √ᾱ_t·x_0 + √(1-ᾱ_t)·ε, ᾱ_t = alphas_cumprod[t].
The incremental forward process x_k = √(1-β_k)·x_{k-1} + √β_k·z_k counts steps k = 1, 2, …
with β_k = betas[k-1] (diffusers' betas are 0-based), so after k steps a sample is distributed
as x at diffusers timestep k-1: that is where the reverse chain starts.

The reverse update is written here from ``alphas_cumprod`` instead of calling a scheduler's
``step``: those take one scalar timestep per call, and DiffCAP batches images that stopped at
different timesteps into one UNet call (UNet2DModel takes a (B,) timestep tensor). Cost is
counted in UNet evaluations per image.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from diffusers import DDPMScheduler, UNet2DModel

log = logging.getLogger(__name__)
Sampler = Literal["ddpm", "ddim"]
# One generator for the whole batch (draws in one call), one per sample (draws that do not
# depend on who else is in the batch), or None (torch's global generator).
Generators = torch.Generator | Sequence[torch.Generator] | None
_VARIANCES = ("fixed_small", "fixed_small_log", "fixed_large")


@dataclass(frozen=True)
class NoiseSchedule:
    """What the forward and reverse processes need from a DDPM-style scheduler config."""

    betas: torch.Tensor  # (T,) float64
    alphas_cumprod: torch.Tensor  # (T,) float64
    prediction_type: str = "epsilon"
    clip_sample_range: float | None = 1.0  # None: x̂_0 is not clipped
    variance_type: str = "fixed_small"

    def __post_init__(self) -> None:
        if self.prediction_type not in ("epsilon", "sample", "v_prediction"):
            raise ValueError(f"unsupported prediction_type {self.prediction_type!r}")
        if self.variance_type not in _VARIANCES:
            raise ValueError(f"unsupported variance_type {self.variance_type!r}: use {_VARIANCES}")

    @property
    def num_train_timesteps(self) -> int:
        return int(self.betas.shape[0])

    @classmethod
    def from_scheduler(cls, scheduler: Any) -> NoiseSchedule:
        """From a diffusers DDPM/DDIM scheduler (its ``betas``, ``alphas_cumprod``, config)."""
        if isinstance(scheduler, NoiseSchedule):
            return scheduler
        config = scheduler.config
        if config.get("thresholding", False):
            # Dynamic thresholding is for pixel models with guidance; not worth a second path.
            raise ValueError("schedulers with thresholding=True are not supported")
        clip = float(config.get("clip_sample_range", 1.0)) if config.get("clip_sample") else None
        return cls(
            betas=scheduler.betas.detach().to("cpu", torch.float64),
            alphas_cumprod=scheduler.alphas_cumprod.detach().to("cpu", torch.float64),
            prediction_type=str(config.get("prediction_type", "epsilon")),
            clip_sample_range=clip,
            variance_type=str(config.get("variance_type", "fixed_small")),
        )


def load_diffusion(
    path: str | Path, device: str | torch.device = "cpu"
) -> tuple[UNet2DModel, DDPMScheduler]:
    """A DDPMPipeline directory (or hub id such as google/ddpm-cifar10-32), in eval mode."""
    # low_cpu_mem_usage needs `accelerate`; asking for the plain load explicitly keeps
    # diffusers from printing a multi-line warning about it on every start-up.
    unet = UNet2DModel.from_pretrained(str(path), subfolder="unet", low_cpu_mem_usage=False)
    unet = unet.eval().to(device)
    scheduler = DDPMScheduler.from_pretrained(str(path), subfolder="scheduler")
    return unet, scheduler


def reverse_timesteps(t: int, sampler: Sampler, ddim_steps: int) -> list[int]:
    """The diffusers timesteps a reverse chain from t visits, one UNet evaluation each."""
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


def unet_evaluations(t: int, sampler: Sampler = "ddpm", ddim_steps: int = 20) -> int:
    """UNet evaluations per image that a reverse chain from timestep t spends."""
    return len(reverse_timesteps(t, sampler, ddim_steps))


def sample_noise(
    generators: Generators, shape: tuple[int, ...], device: torch.device, dtype: torch.dtype
) -> torch.Tensor:
    """Standard normal (B, …) noise; per-sample generators each draw their own row."""
    if generators is None or isinstance(generators, torch.Generator):
        # Draw where the generator lives (CPU generators give the same numbers on any device).
        where = device if generators is None else generators.device
        noise = torch.randn(shape, generator=generators, device=where, dtype=torch.float32)
    else:
        if len(generators) != shape[0]:
            raise ValueError(f"{len(generators)} generators for a batch of {shape[0]}")
        noise = torch.stack(
            [
                torch.randn(shape[1:], generator=g, device=g.device, dtype=torch.float32)
                for g in generators
            ]
        )
    return noise.to(device=device, dtype=dtype)


@torch.no_grad()
def noise_to(
    x0: torch.Tensor, t: int, scheduler: Any, generator: torch.Generator | None
) -> torch.Tensor:
    """Forward-diffuse clean images (B, 3, H, W) in [-1, 1] to timestep t in one shot."""
    schedule = NoiseSchedule.from_scheduler(scheduler)
    _check_timestep(t, schedule)
    noise = sample_noise(generator, tuple(x0.shape), x0.device, x0.dtype)
    a = float(schedule.alphas_cumprod[t])
    return math.sqrt(a) * x0 + math.sqrt(1 - a) * noise


def noise_steps(
    x: torch.Tensor, schedule: NoiseSchedule, start: int, stop: int, generators: Generators
) -> torch.Tensor:
    """Incremental noising of x_start (B, 3, H, W) to x_stop, fresh z every step k."""
    if not 0 <= start <= stop <= schedule.num_train_timesteps:
        raise ValueError(f"steps {start}..{stop} outside [0, {schedule.num_train_timesteps}]")
    for k in range(start + 1, stop + 1):
        beta = float(schedule.betas[k - 1])  # step k uses diffusers' β[k-1]
        z = sample_noise(generators, tuple(x.shape), x.device, x.dtype)  # (B, 3, H, W)
        x = math.sqrt(1 - beta) * x + math.sqrt(beta) * z
    return x


@torch.no_grad()
def reverse(
    unet: UNet2DModel,
    scheduler: Any,
    x_t: torch.Tensor,
    timesteps: Sequence[int],
    generators: Generators,
    *,
    sampler: Sampler = "ddim",
    ddim_steps: int = 20,
) -> tuple[torch.Tensor, list[int]]:
    """Reverse each x_t[i] (B, 3, H, W) from its own timestep t[i] to a clean image in [-1, 1].

    Every iteration advances all unfinished samples by one step of their own chain in one UNet
    call; chains have ``reverse_timesteps`` lengths, so short ones finish first and drop out.
    ``ddpm``: ancestral steps (stochastic: the generators matter); ``ddim``: η = 0 (deterministic
    given x_t). Returns the images and the UNet evaluations spent on each.
    """
    schedule = NoiseSchedule.from_scheduler(scheduler)
    if len(timesteps) != x_t.shape[0]:
        raise ValueError(f"{len(timesteps)} timesteps for a batch of {x_t.shape[0]}")
    for t in timesteps:
        _check_timestep(t, schedule)
    chains = [reverse_timesteps(t, sampler, ddim_steps) for t in timesteps]
    device, dtype = unet.device, unet.dtype
    alphas = padded_alphas(schedule, device)  # (T+1,)
    x = x_t.to(device=device, dtype=dtype).clone()  # (B, 3, H, W)
    for i in range(max(len(c) for c in chains)):
        active = [b for b, c in enumerate(chains) if i < len(c)]
        t_now = torch.tensor([chains[b][i] for b in active], device=device)  # (A,)
        t_next = torch.tensor([next_timestep(chains[b], i, sampler) for b in active], device=device)
        idx = torch.tensor(active, device=device)
        xa = x[idx]  # (A, 3, H, W)
        out = unet(xa, t_now).sample  # (A, 3, H, W)
        gens = _pick(generators, active)
        x[idx] = reverse_step(schedule, alphas, out, xa, t_now, t_next, sampler, gens).to(dtype)
    return x.clamp(-1, 1), [len(c) for c in chains]


def denoise(
    unet: UNet2DModel,
    scheduler: Any,
    x_t: torch.Tensor,
    t: int,
    generator: torch.Generator | None,
    *,
    sampler: Sampler = "ddpm",
    ddim_steps: int = 20,
) -> torch.Tensor:
    """Reverse a batch x_t (B, 3, H, W) that sits at one timestep t (the DiffPure baseline)."""
    images, _ = reverse(
        unet, scheduler, x_t, [t] * x_t.shape[0], generator, sampler=sampler, ddim_steps=ddim_steps
    )
    return images


def _pick(generators: Generators, active: list[int]) -> Generators:
    if generators is None or isinstance(generators, torch.Generator):
        return generators
    return [generators[b] for b in active]


def next_timestep(chain: list[int], i: int, sampler: Sampler) -> int:
    """The timestep the step from chain[i] lands on; -1 stands for x_0 (ᾱ = 1)."""
    if sampler == "ddpm":
        return chain[i] - 1
    return chain[i + 1] if i + 1 < len(chain) else -1


def padded_alphas(schedule: NoiseSchedule, device: torch.device) -> torch.Tensor:
    """ᾱ (T+1,) float32 with a trailing 1 at index -1 (= T): the step past timestep 0 lands
    on x_0."""
    alphas = torch.cat([schedule.alphas_cumprod, torch.ones(1, dtype=torch.float64)])
    return alphas.to(device=device, dtype=torch.float32)


def _check_timestep(t: int, schedule: NoiseSchedule) -> None:
    if not 0 <= t < schedule.num_train_timesteps:
        raise ValueError(f"t={t} outside [0, {schedule.num_train_timesteps - 1}]")


def predict_x0(
    schedule: NoiseSchedule, out: torch.Tensor, x: torch.Tensor, a_t: torch.Tensor
) -> torch.Tensor:
    """x̂_0 from the UNet output at x_t (ᾱ_t broadcastable to x), clipped as the scheduler says."""
    if schedule.prediction_type == "epsilon":
        x0 = (x - (1 - a_t).sqrt() * out) / a_t.sqrt()
    elif schedule.prediction_type == "sample":
        x0 = out
    else:  # v_prediction
        x0 = a_t.sqrt() * x - (1 - a_t).sqrt() * out
    if schedule.clip_sample_range is not None:
        x0 = x0.clamp(-schedule.clip_sample_range, schedule.clip_sample_range)
    return x0


def ddim_step(
    x0: torch.Tensor, x: torch.Tensor, a_t: torch.Tensor, a_prev: torch.Tensor
) -> torch.Tensor:
    """One η = 0 DDIM step, with the ε̂ consistent with the (possibly clipped) x̂_0."""
    eps = (x - a_t.sqrt() * x0) / (1 - a_t).sqrt()
    return a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps


def reverse_step(
    schedule: NoiseSchedule,
    alphas: torch.Tensor,  # (T+1,) ᾱ, index -1 → 1
    out: torch.Tensor,  # (A, 3, H, W) UNet output
    x: torch.Tensor,  # (A, 3, H, W) x_t
    t_now: torch.Tensor,  # (A,)
    t_next: torch.Tensor,  # (A,), -1 for x_0
    sampler: Sampler,
    generators: Generators,
) -> torch.Tensor:
    out, x = out.float(), x.float()
    a_t = alphas[t_now].view(-1, 1, 1, 1)  # (A, 1, 1, 1)
    a_prev = alphas[t_next].view(-1, 1, 1, 1)  # index -1 picks the trailing 1
    x0 = predict_x0(schedule, out, x, a_t)
    if sampler == "ddim":
        return ddim_step(x0, x, a_t, a_prev)
    # DDPM posterior q(x_{t-1} | x_t, x̂_0) (Ho et al. eq. 7), β_t derived from ᾱ as diffusers.
    beta = 1 - a_t / a_prev
    mean = (a_prev.sqrt() * beta * x0 + (1 - beta).sqrt() * (1 - a_prev) * x) / (1 - a_t)
    if schedule.variance_type == "fixed_large":
        var = beta
    else:  # fixed_small (and its _log twin, the same standard deviation)
        var = ((1 - a_prev) / (1 - a_t) * beta).clamp_min(1e-20)
    z = sample_noise(generators, tuple(x.shape), x.device, torch.float32)  # (A, 3, H, W)
    last = (t_now == 0).view(-1, 1, 1, 1)  # the step to x_0 adds no noise
    return torch.where(last, mean, mean + var.sqrt() * z)
