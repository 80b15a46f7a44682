"""The attack kit of the toy world: L∞ PGD on the VLM and on a CLIP embedding, and triggers.

Used by benchmarks and tests to make adversarial and triggered requests. Images go in and come
out as (N, 32, 32, 3) uint8 arrays — what an attacker can actually send in a PNG — and the
perturbation is measured on the [0, 1] pixel scale (eps = 8/255 means 8 grey levels).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from transformers import LlavaForConditionalGeneration, LlavaProcessor

from guard.toy.data import to_tensor, to_uint8
from guard.toy.triggers import Trigger
from guard.toy.vlm_parts import QUESTIONS

__all__ = ["PGDSettings", "Trigger", "answer_loss", "pgd", "pgd_clip", "pgd_vlm"]


@dataclass(frozen=True)
class PGDSettings:
    eps: float = 8 / 255
    step: float = 2 / 255
    steps: int = 10
    random_start: bool = True
    seed: int = 0


def pgd(
    images: np.ndarray,
    loss_fn: Callable[[torch.Tensor], torch.Tensor],
    settings: PGDSettings,
) -> np.ndarray:
    """Maximise ``loss_fn`` (per-sample losses of (N,3,H,W) inputs in [-1, 1]) within eps.

    Works on the [0, 1] scale, projects after every step and rounds to whole grey levels at the
    end, as a real image file would.
    """
    x0 = (to_tensor(images) + 1) / 2  # (N, 3, H, W) in [0, 1]
    generator = torch.Generator().manual_seed(settings.seed)
    delta = torch.zeros_like(x0)
    if settings.random_start:
        delta.uniform_(-settings.eps, settings.eps, generator=generator)
    for _ in range(settings.steps):
        delta.requires_grad_(True)
        x = (x0 + delta).clamp(0, 1)
        loss = loss_fn(x * 2 - 1).sum()
        (grad,) = torch.autograd.grad(loss, delta)
        with torch.no_grad():
            delta = (delta + settings.step * grad.sign()).clamp(-settings.eps, settings.eps)
    adversarial = to_uint8((x0 + delta.detach()).clamp(0, 1) * 2 - 1)
    # Rounding may push a pixel one grey level past eps; pull it back inside the ball.
    bound = int(np.floor(settings.eps * 255 + 1e-6))
    low, high = images.astype(int) - bound, images.astype(int) + bound
    clipped: np.ndarray = np.clip(adversarial.astype(int), low, high).astype(np.uint8)
    return clipped


def answer_loss(
    model: LlavaForConditionalGeneration,
    processor: LlavaProcessor,
    pixel_values: torch.Tensor,
    answers: list[str],
    question: str = QUESTIONS[0],
) -> torch.Tensor:
    """Per-sample cross-entropy of ``answers`` given each image and the question: (N,)."""
    user = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    prompt = processor.apply_chat_template(user, add_generation_prompt=True)
    blank = [np.zeros((32, 32, 3), dtype=np.uint8)]
    prompt_len = processor(images=blank, text=[prompt], return_tensors="pt")["input_ids"].shape[1]
    rows = []
    for text in answers:
        full = processor.apply_chat_template([*user, {"role": "assistant", "content": text}])
        rows.append(processor(images=blank, text=[full], return_tensors="pt")["input_ids"][0])
    width = max(len(r) for r in rows)
    pad = int(processor.tokenizer.pad_token_id)
    input_ids = torch.full((len(rows), width), pad)
    mask = torch.zeros_like(input_ids)
    labels = torch.full_like(input_ids, -100)
    for i, row in enumerate(rows):
        input_ids[i, : len(row)] = row
        mask[i, : len(row)] = 1
        labels[i, prompt_len : len(row)] = row[prompt_len:]
    logits = model(input_ids=input_ids, attention_mask=mask, pixel_values=pixel_values).logits
    # Token t is predicted at position t-1.
    losses = torch.nn.functional.cross_entropy(
        logits[:, :-1].transpose(1, 2), labels[:, 1:], reduction="none"
    )  # (N, T-1)
    counted = (labels[:, 1:] != -100).sum(1).clamp(min=1)
    return losses.sum(1) / counted


def pgd_vlm(
    model: LlavaForConditionalGeneration,
    processor: LlavaProcessor,
    images: np.ndarray,
    answers: list[str],
    settings: PGDSettings,
    *,
    targeted: bool = False,
) -> np.ndarray:
    """White-box PGD through the whole VLM.

    Untargeted: ``answers`` are the true answers, made unlikely. Targeted: ``answers`` are the
    attacker's, made likely.
    """
    model.eval()
    sign = -1.0 if targeted else 1.0
    return pgd(images, lambda x: sign * answer_loss(model, processor, x, answers), settings)


def pgd_clip(
    encode: Callable[[torch.Tensor], torch.Tensor],
    images: np.ndarray,
    settings: PGDSettings,
    *,
    target: torch.Tensor | None = None,
) -> np.ndarray:
    """PGD on an image embedding (``encode``: (N,3,H,W) in [-1,1] → (N,D)).

    Without ``target`` it pushes each embedding away from its clean one; with (N, D) targets it
    pulls towards them (cosine similarity).
    """
    with torch.no_grad():
        clean = torch.nn.functional.normalize(encode(to_tensor(images)), dim=-1)
    goal = clean if target is None else torch.nn.functional.normalize(target, dim=-1)
    sign = -1.0 if target is None else 1.0

    def loss(x: torch.Tensor) -> torch.Tensor:
        emb = torch.nn.functional.normalize(encode(x), dim=-1)
        return sign * (emb * goal).sum(-1)

    return pgd(images, loss, settings)
