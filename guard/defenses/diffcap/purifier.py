"""DiffCAP purification (DESIGN.md §4.1): noise each image until its embedding stops moving,
then denoise it back.

For a batch of images the noising loop runs in lock-step: every ``check_every`` steps one
encoder call embeds the images still noising, and each stops on its own once the cosine
similarity to its previous check reaches τ (t* = k) or at k_max = round(t_max·T). The reverse
chains, each from its own t*, then share UNet calls (``diffusion.reverse``).

Results never depend on the batch: every image draws its noise from its own generator, seeded
from the settings' seed and a hash of its (resized) pixels, and every operation works per
sample, so an image purified alone or beside others gives the same pixels (to float rounding)
and the same t*. A micro-batcher can therefore group requests freely.
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import UNet2DModel
from PIL import Image

from guard.defenses.diffcap.diffusion import (
    NoiseSchedule,
    noise_steps,
    predict_x0,
    reverse,
)
from guard.defenses.diffcap.encoders import Encoder
from guard.defenses.diffcap.settings import PurifySettings, Stop

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PurifyResult:
    image: torch.Tensor  # (3, H, W) in [-1, 1], the input's size and device
    t_star: int  # noising steps taken; the reverse chain starts at diffusers timestep t* - 1
    # cos(φ(x_k), φ(x_{k-check_every})), one per check (from the floor's first check on)
    similarities: tuple[float, ...]
    stopped: Stop
    # cos(φ(x̂_0(x_k)), φ(x)), one per check, when the drift rule is on (drift_tau)
    drifts: tuple[float, ...]
    unet_evals: int  # the reverse chain's, plus one per embedding with signal="denoised"
    encoder_evals: int  # φ(x_0) (or φ at the check before the floor) plus one per check


@dataclass(frozen=True)
class Trace:
    """One image's checks from k_min (or the first check) to k_max, for calibration."""

    similarities: tuple[float, ...]  # cos(φ at check j, φ at check j - 1)
    drifts: tuple[float, ...]  # cos(φ(x̂_0) at check j, φ(x)); empty with signal="noisy"


@dataclass
class _Noised:
    x: torch.Tensor  # (B, 3, R, R), each sample at its own x_{t*}
    t_star: list[int]
    traces: list[list[float]]
    stopped: list[Stop]
    encoder_evals: list[int]
    check_unet_evals: list[int]  # UNet calls spent on checks (signal="denoised")
    drifts: list[list[float]]  # cos(φ(x̂_0(x_k)), φ(x)) per check, where measured


class Purifier:
    """Batch purification with a loaded UNet, its noise schedule and an encoder φ."""

    def __init__(
        self,
        unet: UNet2DModel,
        scheduler: Any,  # a diffusers DDPM/DDIM scheduler, or a NoiseSchedule
        encoder: Encoder,
        settings: PurifySettings | None = None,
    ) -> None:
        self.unet = unet.eval()
        self.schedule = NoiseSchedule.from_scheduler(scheduler)
        self.encoder = encoder
        self.settings = settings or PurifySettings()
        T = self.schedule.num_train_timesteps
        self.k_max = round(self.settings.t_max * T)
        self.k_min = round(self.settings.t_min * T)
        escalate = self.settings.t_escalate
        self.k_escalate = self.k_max if escalate is None else round(escalate * T)
        if self.k_max < 1:
            raise ValueError(f"t_max={self.settings.t_max} of T={T} rounds to 0 noising steps")
        size = self.settings.resolution or unet.config.sample_size
        self.resolution: tuple[int, int] = (
            (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
        )

    def purify_batch(self, images: Sequence[torch.Tensor]) -> list[PurifyResult]:
        """Purify images (3, H, W) in [-1, 1] of any sizes; one result per image, in order."""
        for i, image in enumerate(images):
            if image.ndim != 3 or image.shape[0] != 3 or not image.is_floating_point():
                raise ValueError(
                    f"image {i}: expected a float (3, H, W) tensor, got "
                    f"{image.dtype} {tuple(image.shape)}"
                )
        if not images:
            return []
        s = self.settings
        with torch.inference_mode():
            x0, generators = self._prepare(images)
            noised = self._noise(x0, generators)
            clean, unet_evals = reverse(
                self.unet,
                self.schedule,
                noised.x,
                [t - 1 for t in noised.t_star],  # after k steps: diffusers timestep k-1
                generators,
                sampler=s.sampler,
                ddim_steps=s.ddim_steps,
            )  # (B, 3, R, R)
            results = [
                PurifyResult(
                    image=_resize(clean[i].float(), tuple(img.shape[-2:]))
                    .clamp(-1, 1)
                    .to(img.device),
                    t_star=noised.t_star[i],
                    similarities=tuple(noised.traces[i]),
                    stopped=noised.stopped[i],
                    drifts=tuple(noised.drifts[i]),
                    unet_evals=unet_evals[i] + noised.check_unet_evals[i],
                    encoder_evals=noised.encoder_evals[i],
                )
                for i, img in enumerate(images)
            ]
        log.debug("purified %d images: t* %s", len(results), noised.t_star)
        return results

    def traces(self, images: Sequence[torch.Tensor]) -> list[Trace]:
        """Every check's similarity (and drift, with signal="denoised") up to k_max, with no
        stop and no denoising: what calibration works from."""
        if not images:
            return []
        with torch.inference_mode():
            x0, generators = self._prepare(images)
            noised = self._noise(x0, generators, stop=False)
        return [
            Trace(tuple(t), tuple(d)) for t, d in zip(noised.traces, noised.drifts, strict=True)
        ]

    def _prepare(
        self, images: Sequence[torch.Tensor]
    ) -> tuple[torch.Tensor, list[torch.Generator]]:
        """The batch at model resolution, (B, 3, R, R), and one generator per image."""
        # Resize where each image lives; the per-image seed hashes the resized pixels.
        small = [_resize(img.float(), self.resolution) for img in images]  # (3, R, R) each
        generators = [torch.Generator().manual_seed(_seed(self.settings.seed, x)) for x in small]
        return torch.stack([x.to(self.unet.device) for x in small]), generators

    def _noise(
        self, x0: torch.Tensor, generators: list[torch.Generator], *, stop: bool = True
    ) -> _Noised:
        """Noise all samples in lock-step until each stops (τ, if ``stop``) or reaches k_max."""
        s, n = self.settings, x0.shape[0]
        out = _Noised(
            x0.clone(),
            [self.k_max] * n,
            [[] for _ in range(n)],
            ["t_max"] * n,
            [0] * n,
            [0] * n,
            [[] for _ in range(n)],
        )
        if s.tau is None and stop:
            out.x = noise_steps(out.x, self.schedule, 0, self.k_max, generators)
            return out
        k = 0
        if stop:
            # No check below the floor can stop an image: noise straight to the check that
            # precedes the first one allowed to (checks fall on multiples of check_every).
            first = max(1, math.ceil(self.k_min / s.check_every)) * s.check_every
            k = min(first - s.check_every, self.k_max)
            out.x = noise_steps(out.x, self.schedule, 0, k, generators)
        e_prev = self._embed(out.x, k, out, list(range(n)))  # (B, D)
        # The drift reference φ(x): e_prev already, unless the floor pre-noised the batch. A
        # copy, since e_prev is updated in place at every check (an alias made the "drift"
        # the consecutive similarity from the second check on).
        e_input: torch.Tensor | None = None
        if s.signal == "denoised" and (s.drift_tau is not None or not stop):
            e_input = e_prev.clone() if k == 0 else self._embed(x0, 0, out, list(range(n)))
        escalate: dict[int, list[int]] = {}  # noising step → images sent on from there
        active = list(range(n))
        while active and k < self.k_max:
            until = min(k + s.check_every, self.k_max)
            idx = torch.tensor(active, device=x0.device)
            gens = [generators[i] for i in active]
            out.x[idx] = noise_steps(out.x[idx], self.schedule, k, until, gens)  # (A, 3, R, R)
            k = until
            if k % s.check_every:
                break  # k_max falls between two checks: the cap stops everyone left
            e = self._embed(out.x[idx], k, out, active)  # (A, D): frozen samples skipped
            cos = F.cosine_similarity(e, e_prev[idx], dim=-1).tolist()  # (A,)
            drift = (
                [math.nan] * len(active)
                if e_input is None
                else F.cosine_similarity(e, e_input[idx], dim=-1).tolist()  # (A,)
            )
            e_prev[idx] = e
            still = []
            for i, c, d in zip(active, cos, drift, strict=True):
                out.traces[i].append(float(c))
                if e_input is not None:
                    out.drifts[i].append(float(d))
                if stop and s.drift_tau is not None and d < s.drift_tau:
                    escalate.setdefault(k, []).append(i)
                elif stop and s.tau is not None and c >= s.tau:
                    out.t_star[i], out.stopped[i] = k, "tau"
                else:
                    still.append(i)
            active = still
        flagged = {i for which in escalate.values() for i in which}
        capped = [i for i in range(n) if out.stopped[i] == "t_max" and i not in flagged]
        if stop and capped and self.k_escalate > self.k_max:
            escalate.setdefault(self.k_max, []).extend(capped)
        for start, which in escalate.items():
            idx = torch.tensor(which, device=x0.device)
            gens = [generators[i] for i in which]
            out.x[idx] = noise_steps(out.x[idx], self.schedule, start, self.k_escalate, gens)
            for i in which:
                out.t_star[i], out.stopped[i] = self.k_escalate, "escalated"
        return out

    def _embed(self, x: torch.Tensor, k: int, out: _Noised, which: list[int]) -> torch.Tensor:
        """φ of the samples ``which`` (A, 3, R, R), all after k noising steps: of x_k itself, or
        of the UNet's x̂_0 estimate from it (signal="denoised"; nothing to denoise at k = 0)."""
        if self.settings.signal == "denoised" and k > 0:
            a = self.schedule.alphas_cumprod[k - 1].to(x.device, x.dtype)  # ᾱ at timestep k-1
            t = torch.full((x.shape[0],), k - 1, device=x.device)
            x = predict_x0(self.schedule, self.unet(x, t).sample, x, a)  # (A, 3, R, R)
            for i in which:
                out.check_unet_evals[i] += 1
        for i in which:
            out.encoder_evals[i] += 1
        return self.encoder.embed(x).to(out.x.device)  # (A, D)


def _resize(x: torch.Tensor, size: tuple[int, ...]) -> torch.Tensor:
    """(3, H, W) → (3, *size), bilinear with antialiasing for downscaling."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x[None], size=size, mode="bilinear", antialias=True)[0]


def _seed(seed: int, x: torch.Tensor) -> int:
    """A per-image seed from the settings' seed and the image's pixels, independent of the batch."""
    h = hashlib.sha256(str(seed).encode())
    h.update(str(tuple(x.shape)).encode())
    h.update(x.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return int.from_bytes(h.digest()[:8], "little") & (2**63 - 1)


def pil_to_tensor(image: Image.Image) -> torch.Tensor:
    """PIL RGB → (3, H, W) float32 in [-1, 1]."""
    array = np.asarray(image.convert("RGB"), dtype=np.float32)  # (H, W, 3)
    return torch.from_numpy(array).permute(2, 0, 1).div(127.5).sub(1.0)


def tensor_to_pil(tensor: torch.Tensor) -> Image.Image:
    """(3, H, W) in [-1, 1] → PIL RGB, rounded to the nearest 8-bit value."""
    array = tensor.clamp(-1, 1).add(1).mul(127.5).round().to(torch.uint8)
    return Image.fromarray(array.permute(1, 2, 0).cpu().numpy(), "RGB")
