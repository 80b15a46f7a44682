"""An adaptive attack on the drift rule itself: PGD that fools the VLM while keeping the image's
x̂₀ at the first check close to the image under φ, so that DiffCAP neither escalates it nor
noises it past that check, where the perturbation survives.

Without a floor, the first check compares φ(x̂₀(x_k)) with φ(x) twice: as the drift (escalate
below ``drift_tau``) and as the first consecutive similarity (stop at or above ``tau``). The
attack maximises the VLM's loss on x̂₀(x_k) (k: the first check, one UNet call, EOT over the
noise) minus a hinge on that cosine below max(drift_tau, tau) plus a margin. White-box: it
knows the UNet, φ and both thresholds. (Under a floor τ compares with the check before it;
the hinge then still keeps the drift, not necessarily τ, satisfied.)

With a look that confirms the stop (``confirm_tau``), a second hinge keeps x̂₀ at the look
(k + confirm_steps, its own noise draw) within confirm_tau of the image too: the attacker knows
the look as well.
"""

from __future__ import annotations

import argparse
import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from rich.progress import Progress

from guard.defenses.diffcap import NoiseSchedule, Purifier
from guard.defenses.diffcap.diffusion import predict_x0
from guard.toy.attacks import PGDSettings, answer_loss, pgd
from guard.toy.vlm_parts import answer

MARGIN = 0.001  # aim this far above the stop threshold: rounding to grey levels moves φ a bit
WEIGHT = 1000.0  # hinge weight: a cosine short by 0.001 costs as much as one nat of VLM loss


def drift_evading_attack(
    model: Any,
    processor: Any,
    purifier: Purifier,
    schedule: NoiseSchedule,
    images: np.ndarray,
    labels: np.ndarray,
    args: argparse.Namespace,
    progress: Progress,
) -> np.ndarray:
    """Untargeted L∞ PGD (eps 8/255) against ``purifier``'s drift rule; see the module."""
    settings = purifier.settings
    if settings.drift_tau is None or not hasattr(purifier.encoder, "forward"):
        raise ValueError("the drift-evading attack needs a drift rule and a differentiable φ")
    target = max(settings.drift_tau, settings.tau or -1.0) + MARGIN
    # The first check that may stop an image (checks fall on multiples of check_every).
    k = max(1, math.ceil(purifier.k_min / settings.check_every)) * settings.check_every
    a = schedule.alphas_cumprod.float()[k - 1]  # after k noising steps: timestep k - 1
    # (steps, ᾱ, the cosine to keep) of each estimate the attack must keep close to the image.
    looks = [(k, a, target)]
    if settings.confirm_tau is not None:
        k_look = k + settings.confirm_steps
        a_look = schedule.alphas_cumprod.float()[k_look - 1]
        looks.append((k_look, a_look, settings.confirm_tau + MARGIN))
    truth = [answer(int(label)) for label in labels]
    eps = 8 / 255
    pgd_settings = PGDSettings(eps=eps, step=eps / 4, steps=args.evasion_steps, seed=args.seed)
    generator = torch.Generator().manual_seed(args.seed + 2)
    encoder: Any = purifier.encoder
    unet = purifier.unet
    for p in unet.parameters():
        p.requires_grad_(False)
    task = progress.add_task("drift-evading PGD", total=args.evasion_steps)

    def loss(x: torch.Tensor) -> torch.Tensor:  # (N, 3, H, W) in [-1, 1] → (N,)
        e_x = encoder.forward(x)  # (N, D)
        total = torch.zeros(x.shape[0])
        for _ in range(args.eot_draws):
            for j, (steps, alpha, keep) in enumerate(looks):
                noise = torch.randn(x.shape, generator=generator)
                x_k = alpha.sqrt() * x + (1 - alpha).sqrt() * noise
                t = torch.full((x.shape[0],), steps - 1, dtype=torch.long)
                x0 = predict_x0(schedule, unet(x_k, t).sample, x_k, alpha).clamp(-1, 1)
                drift = F.cosine_similarity(encoder.forward(x0), e_x)  # (N,)
                total = total - WEIGHT * F.relu(keep - drift)
                if j == 0:  # the image is denoised from the first check: fool the VLM there
                    total = total + answer_loss(model, processor, x0, truth)
        progress.advance(task)
        mean: torch.Tensor = total / args.eot_draws
        return mean

    return pgd(images, loss, pgd_settings)
