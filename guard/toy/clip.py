"""The toy world's tiny CLIP: an open_clip model with a custom config, trained on digit pictures.

It is saved as open_clip's own hub layout (``open_clip_config.json`` holding ``model_cfg`` and
``preprocess_cfg``, beside ``open_clip_model.safetensors``), so the guard loads it exactly as it
would load a real checkpoint directory: ``create_model_from_pretrained("local-dir:...")``. The
text side uses open_clip's bundled BPE tokenizer (its vocabulary ships inside the package, so
nothing is downloaded).

Two training choices, both measured on this data:
- Same-label pairs are positives. With 10 classes a batch of 64 holds ~6 pictures of each digit,
  so plain CLIP targets (the diagonal) would push apart pairs that mean the same thing; the
  target row is instead uniform over every caption of the same digit (and vice versa).
- A caption-to-caption term with the same targets. A ViT trained from scratch carries no digit
  signal for its first ~150 steps (colour and position dominate its features); with no image
  signal the cheapest loss is a constant text embedding, and once both sides are constant the
  gradient vanishes: every attempt without this term stalled at loss ln(batch). The term keeps
  the ten digits' captions apart from the start, so the image side meets ten distinct targets.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import open_clip
import torch
from open_clip.constants import HF_CONFIG_NAME, HF_SAFE_WEIGHTS_NAME
from open_clip.model import get_model_preprocess_cfg, set_model_preprocess_cfg
from open_clip.push_to_hf_hub import save_config_for_hf
from PIL import Image
from safetensors.torch import save_file

from guard.toy.data import DIGITS, SIZE, eval_images, load_splits, render
from guard.toy.progress import Bar, task

log = logging.getLogger(__name__)

MODEL_NAME = "vlm-guard-toy-clip"
PROMPT = "a photo of the digit {}"  # the zero-shot class prompt
TEMPLATES = (
    PROMPT,
    "the number {}",
    "a picture of a {}",
    "an image of the digit {}",
    "the digit {}",
    "a {} written in colour",
)
# Mean and std 0.5 make the normalised pixels equal data.to_tensor's [-1, 1]: the range the
# diffusion purifier works in, so it can feed its images to encode_image without conversion.
MEAN = (0.5, 0.5, 0.5)
STD = (0.5, 0.5, 0.5)
# open_clip is untyped: its CLIP (an nn.Module with encode_image / encode_text) is Any to mypy.
ClipModel = Any


@dataclass(frozen=True)
class ClipSettings:
    embed_dim: int = 64
    vision_width: int = 128
    vision_layers: int = 3
    vision_head_width: int = 32  # 4 heads at width 128
    text_width: int = 64
    text_layers: int = 2
    text_heads: int = 2
    context_length: int = 16  # the longest caption is 8 tokens with start and end
    steps: int = 550
    batch: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.05
    text_uniformity: float = 1.0  # weight of the caption-to-caption term (module docstring)

    @classmethod
    def full(cls, **changes: Any) -> ClipSettings:
        return replace(cls(), **changes)

    @classmethod
    def quick(cls, **changes: Any) -> ClipSettings:
        # A narrower, shallower ViT starts reading digits in fewer steps (measured: 51% zero-shot
        # after 400 steps of batch 32, where the full-size one at batch 32 was near chance).
        return replace(
            cls(vision_width=64, vision_layers=2, steps=400, batch=32, lr=2e-3), **changes
        )


def model_config(settings: ClipSettings) -> dict[str, Any]:
    """open_clip's ``model_cfg`` schema (as in its model_configs/*.json)."""
    return {
        "embed_dim": settings.embed_dim,
        "vision_cfg": {
            "image_size": SIZE,
            "patch_size": 4,
            "width": settings.vision_width,
            "layers": settings.vision_layers,
            "head_width": settings.vision_head_width,
        },
        "text_cfg": {
            "context_length": settings.context_length,
            "vocab_size": 49408,  # open_clip's SimpleTokenizer
            "width": settings.text_width,
            "heads": settings.text_heads,
            "layers": settings.text_layers,
        },
    }


def preprocess_config() -> dict[str, Any]:
    return {
        "size": SIZE,
        "mean": MEAN,
        "std": STD,
        "interpolation": "bicubic",
        "resize_mode": "shortest",
    }


def build_clip(settings: ClipSettings) -> ClipModel:
    """A fresh (random) toy CLIP; seed torch first for a reproducible one."""
    model = open_clip.CLIP(**model_config(settings))
    set_model_preprocess_cfg(model, preprocess_config())
    return model


def save_clip(model: ClipModel, settings: ClipSettings, out_dir: Path) -> None:
    """Write open_clip's hub layout: config JSON (open_clip's own writer) + safetensors."""
    out_dir.mkdir(parents=True, exist_ok=True)
    save_config_for_hf(model, out_dir / HF_CONFIG_NAME, model_config=model_config(settings))
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(out_dir / HF_SAFE_WEIGHTS_NAME))


def load_clip(
    path: str | Path,
) -> tuple[ClipModel, Callable[[Image.Image], torch.Tensor], Any]:
    """(model in eval mode, inference preprocess, tokenizer) through open_clip's public API."""
    name = f"local-dir:{Path(path).resolve()}"
    model, preprocess = open_clip.create_model_from_pretrained(name)
    model.eval()
    return model, preprocess, open_clip.get_tokenizer(name)


def pixels(model: ClipModel, images: np.ndarray) -> torch.Tensor:
    """(N, 32, 32, 3) uint8 → (N, 3, 32, 32), normalised as the model's preprocess does."""
    cfg = get_model_preprocess_cfg(model)
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float().div(255.0)
    mean = torch.tensor(cfg["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(cfg["std"]).view(1, 3, 1, 1)
    return (x - mean) / std


@torch.no_grad()
def zero_shot_accuracy(
    model: ClipModel, tokenizer: Any, images_uint8: np.ndarray, labels: np.ndarray
) -> float:
    """Accuracy of the nearest class prompt ("a photo of the digit seven") per image."""
    was_training = model.training
    model.eval()
    prompts = tokenizer([PROMPT.format(name) for name in DIGITS])
    text = model.encode_text(prompts, normalize=True)  # (10, D)
    predicted = []
    for start in range(0, len(images_uint8), 256):
        image = model.encode_image(pixels(model, images_uint8[start : start + 256]), normalize=True)
        predicted.append((image @ text.T).argmax(1))  # (B,)
    model.train(was_training)
    return float((torch.cat(predicted).numpy() == labels).mean())


def clip_loss(
    image: torch.Tensor,  # (B, D), unit norm
    text: torch.Tensor,  # (B, D), unit norm
    labels: torch.Tensor,  # (B,)
    scale: torch.Tensor,
    text_uniformity: float,
) -> torch.Tensor:
    """Symmetric CLIP cross-entropy with same-label targets, plus the caption-to-caption term."""
    same = (labels[:, None] == labels[None, :]).float()
    target = same / same.sum(1, keepdim=True)  # (B, B), rows sum to 1; symmetric
    logits = scale * image @ text.T  # (B, B)

    def xent(x: torch.Tensor) -> torch.Tensor:
        return -(target * x.log_softmax(1)).sum(1).mean()

    loss = 0.5 * (xent(logits) + xent(logits.T))
    if text_uniformity:
        loss = loss + text_uniformity * xent(scale * text @ text.T)
    return loss


def train_clip(
    out_dir: Path, *, seed: int, settings: ClipSettings, progress: Bar | None = None
) -> dict[str, Any]:
    """Train the toy CLIP on fresh renderings, save it to ``out_dir`` and measure it."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    splits = load_splits()
    train = splits["train"]
    model = build_clip(settings)
    model.train()
    tokenizer = open_clip.SimpleTokenizer(context_length=settings.context_length)
    # Every caption tokenised once: (templates, 10, context_length).
    captions = torch.stack([tokenizer([t.format(n) for n in DIGITS]) for t in TEMPLATES])
    # fused: one kernel over all parameters; on CPU the default per-tensor loop spent ~25 ms a
    # step on the 49408-row token embedding alone, more than the whole forward pass.
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=settings.lr, weight_decay=settings.weight_decay, fused=True
    )
    warmup = max(1, settings.steps // 20)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, settings.steps - warmup)))

    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    start = time.perf_counter()
    loss = torch.zeros(())
    with task(progress, "CLIP", settings.steps) as advance:
        for _ in range(settings.steps):
            idx = rng.integers(0, len(train.labels), settings.batch)
            labels = torch.from_numpy(train.labels[idx])
            templates = torch.from_numpy(rng.integers(0, len(TEMPLATES), settings.batch))
            image, text, scale = model(
                pixels(model, render(train.glyphs[idx], rng)), captions[templates, labels]
            )
            loss = clip_loss(image, text, labels, scale, settings.text_uniformity)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()  # type: ignore[no-untyped-call]
            optimizer.step()
            schedule.step()
            with torch.no_grad():  # as open_clip's trainer: temperature at most 1/100
                model.logit_scale.clamp_(0, math.log(100))
            advance(description=f"CLIP (loss {loss.item():.3f})")
    seconds = time.perf_counter() - start
    save_clip(model, settings, out_dir)
    model.eval()
    test, val = splits["test"], splits["val"]
    figures = {
        "settings": asdict(settings),
        "model_name": MODEL_NAME,
        "parameters": sum(p.numel() for p in model.parameters()),
        "train_seconds": round(seconds, 1),
        "seconds_per_step": round(seconds / max(1, settings.steps), 4),
        "final_loss": round(float(loss.item()), 4),
        "logit_scale": round(float(model.logit_scale.exp().item()), 2),
        "zero_shot_accuracy": zero_shot_accuracy(model, tokenizer, eval_images(test), test.labels),
        "val_zero_shot_accuracy": zero_shot_accuracy(
            model, tokenizer, eval_images(val), val.labels
        ),
    }
    log.info("toy CLIP: %s", figures)
    return figures
