"""The adaptive attack: an attacker who knows the purifier runs EOT-PGD through noising and a
differentiable DDIM reconstruction, and the result is judged through the real DiffCAP rows."""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from rich.progress import Progress

from benchmarks.purification.common import Condition, Defense, Outcome, stats
from benchmarks.purification.defenses import evaluate
from benchmarks.purification.evasion import drift_evading_attack
from guard.defenses.diffcap import NoiseSchedule, reverse_timesteps
from guard.defenses.diffcap.diffusion import ddim_step, predict_x0
from guard.toy.attacks import PGDSettings, answer_loss, pgd
from guard.toy.vlm_parts import answer


def _ddim_differentiable(
    unet: Any, schedule: NoiseSchedule, x: torch.Tensor, t: int, steps: int
) -> torch.Tensor:
    """DDIM (η = 0) from timestep t to x_0 with autograd through the UNet: (B, 3, H, W).

    The same update as guard.defenses.diffcap.diffusion (x̂_0 clipped, ε̂ consistent with it).
    """
    alphas = schedule.alphas_cumprod.float()
    chain = reverse_timesteps(t, "ddim", steps)
    for i, now in enumerate(chain):
        a_t = alphas[now]
        a_prev = alphas[chain[i + 1]] if i + 1 < len(chain) else torch.tensor(1.0)
        out = unet(x, torch.full((x.shape[0],), now, dtype=torch.long)).sample
        # The purifier's own step math, here with autograd on.
        x = ddim_step(predict_x0(schedule, out, x, a_t), x, a_t, a_prev)
    return x.clamp(-1, 1)


def adaptive_attack(
    model: Any,
    processor: Any,
    unet: Any,
    schedule: NoiseSchedule,
    images: np.ndarray,
    labels: np.ndarray,
    depths: Sequence[int],
    args: argparse.Namespace,
    progress: Progress,
) -> np.ndarray:
    """Untargeted EOT-PGD through noise-to-t + differentiable DDIM, t drawn from ``depths``.

    Each PGD step averages the VLM loss over ``--eot-draws`` draws of (t, noise); t is drawn
    from the depths DiffCAP actually stopped at, so the expectation covers its adaptive depth.
    """
    truth = [answer(int(label)) for label in labels]
    eps = 8 / 255
    settings = PGDSettings(eps=eps, step=eps / 4, steps=args.adaptive_steps, seed=args.seed)
    generator = torch.Generator().manual_seed(args.seed + 1)
    alphas = schedule.alphas_cumprod.float()
    task = progress.add_task("adaptive EOT-PGD", total=args.adaptive_steps)
    for p in unet.parameters():
        p.requires_grad_(False)

    def loss(x: torch.Tensor) -> torch.Tensor:  # (N, 3, H, W) in [-1, 1] → (N,)
        total = torch.zeros(x.shape[0])
        for _ in range(args.eot_draws):
            pick = int(torch.randint(len(depths), (1,), generator=generator))
            t = int(depths[pick]) - 1  # after k noising steps: diffusers timestep k - 1
            noise = torch.randn(x.shape, generator=generator)
            x_t = alphas[t].sqrt() * x + (1 - alphas[t]).sqrt() * noise
            x0 = _ddim_differentiable(unet, schedule, x_t, t, args.adaptive_ddim_steps)
            total = total + answer_loss(model, processor, x0, truth)
        progress.advance(task)
        mean: torch.Tensor = total / args.eot_draws
        return mean

    return pgd(images, loss, settings)


def run_adaptive(
    model: Any,
    processor: Any,
    unet: Any,
    schedule: NoiseSchedule,
    images: np.ndarray,
    labels: np.ndarray,
    truth: list[str],
    defenses: list[Defense],
    results: dict[str, dict[str, Outcome]],
    args: argparse.Namespace,
    progress: Progress,
) -> dict[str, Any]:
    """Attack the first ``--adaptive-images`` test images, then evaluate the undefended and
    the DiffCAP rows on them, next to their accuracy under plain PGD on the same images."""
    m = min(args.adaptive_images, len(images))
    ref = next(results[k] for k in ("diffcap_hf_ddpm", "diffcap_hf_ddim") if k in results)
    depths = sorted(
        {
            int(t)
            for key in ("clean", "untargeted_8")
            for t in ref[key].t_star  # type: ignore[union-attr]
        }
    )
    start = time.perf_counter()
    adv = adaptive_attack(
        model, processor, unet, schedule, images[:m], labels[:m], depths, args, progress
    )
    attack_s = time.perf_counter() - start
    cond = Condition("adaptive_8", "adaptive", adv)
    adaptive: dict[str, Any] = {
        "images": m,
        "eps": "8/255",
        "steps": args.adaptive_steps,
        "eot_draws": args.eot_draws,
        "ddim_steps": args.adaptive_ddim_steps,
        "depths_drawn_from": depths,
        "seconds": round(attack_s, 1),
        "defenses": {},
    }
    evaluated = [d for d in defenses if d.family in ("none", "diffcap")]
    adaptive["defenses"] = _judge(
        evaluated, cond, truth[:m], results, model, processor, args, progress
    )
    # With the drift rule, also the attack on the rule itself (benchmarks/purification/evasion.py).
    ruled = [d for d in evaluated if d.purifier is not None and d.purifier.settings.drift_tau]
    if ruled:
        target = ruled[0]
        assert target.purifier is not None
        start = time.perf_counter()
        evading = drift_evading_attack(
            model, processor, target.purifier, schedule, images[:m], labels[:m], args, progress
        )
        seconds = round(time.perf_counter() - start, 1)
        cond = Condition("evading_8", "evading", evading)
        judged = _judge(evaluated, cond, truth[:m], results, model, processor, args, progress)
        adaptive["drift_evasion"] = {
            "against": target.label,
            "steps": args.evasion_steps,
            "seconds": seconds,
            "defenses": judged,
        }
    return adaptive


def _judge(
    evaluated: list[Defense],
    cond: Condition,
    truth: list[str],
    results: dict[str, dict[str, Outcome]],
    model: Any,
    processor: Any,
    args: argparse.Namespace,
    progress: Progress,
) -> dict[str, dict[str, Any]]:
    """Each defense's accuracy on ``cond``, next to plain PGD's on the same images."""
    m = len(truth)
    task = progress.add_task(f"{cond.key}: evaluating", total=len(evaluated) * m)
    out = {}
    for d in evaluated:
        o = evaluate(
            d, cond, truth, model, processor, args.batch, lambda k: progress.advance(task, k)
        )
        pgd8 = results[d.key]["untargeted_8"]
        escalated = None  # the share noised on to t_escalate, where the rule has one
        p = d.purifier
        if o.t_star is not None and p is not None and p.k_escalate > p.k_max:
            escalated = float((o.t_star >= p.k_escalate).mean())
        out[d.key] = {
            "label": d.label,
            "accuracy_adaptive": float(o.correct.mean()),
            "accuracy_pgd_same_images": float(pgd8.correct[:m].mean()),
            "t_star": None if o.t_star is None else stats(o.t_star),
            "escalated": escalated,
            "unet_evals_mean": float(o.unet_evals.mean()),
        }
    return out
