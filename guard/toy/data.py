"""The toy world's images: sklearn's 8×8 digits rendered as 32×32 RGB pictures.

Each glyph is upscaled to a random size, placed at a random offset and painted in a random
foreground colour on a random, contrasting background, so that models have to learn digits
rather than pixel positions. The train/val/test split is over glyphs and fixed (it never
depends on the build seed); rendering draws from a seeded generator, so a fresh rendering of
the training glyphs is fresh data while the test rendering is the same for every build.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

SIZE = 32
DIGITS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
SPLIT_SEED = 0  # the split is part of the world, not of a build
TEST_RENDER_SEED = 1234
_LUMA = np.array([0.299, 0.587, 0.114])


@dataclass(frozen=True)
class Split:
    glyphs: np.ndarray  # (N, 8, 8) float32 in [0, 1]
    labels: np.ndarray  # (N,) int64


def load_splits() -> dict[str, Split]:
    """Fixed train (1397) / val (200) / test (200) glyph splits of sklearn's digits."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    glyphs = (digits.images / 16.0).astype(np.float32)
    labels = digits.target.astype(np.int64)
    order = np.random.default_rng(SPLIT_SEED).permutation(len(labels))
    parts = {"test": order[:200], "val": order[200:400], "train": order[400:]}
    return {name: Split(glyphs[idx], labels[idx]) for name, idx in parts.items()}


def render(glyphs: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Render glyphs as (N, 32, 32, 3) uint8 pictures with random scale, offset and colours."""
    out = np.empty((len(glyphs), SIZE, SIZE, 3), dtype=np.uint8)
    for i, glyph in enumerate(glyphs):
        side = int(rng.integers(24, 29))
        mask = (
            np.asarray(
                Image.fromarray((glyph * 255).astype(np.uint8)).resize(
                    (side, side), Image.Resampling.BILINEAR
                ),
                dtype=np.float32,
            )[..., None]
            / 255.0
        )  # (side, side, 1)
        background = rng.uniform(0, 1, 3)
        foreground = rng.uniform(0, 1, 3)
        # Keep the digit readable: if the two colours are too close in brightness, draw the
        # digit near black on a light background or near white on a dark one.
        if abs(float((foreground - background) @ _LUMA)) < 0.4:
            base = 0.1 if float(background @ _LUMA) > 0.5 else 0.9
            foreground = np.clip(base + rng.uniform(-0.1, 0.1, 3), 0, 1)
        canvas = np.broadcast_to(background, (SIZE, SIZE, 3)).copy()
        y, x = rng.integers(0, SIZE - side + 1, 2)
        patch = canvas[y : y + side, x : x + side]
        canvas[y : y + side, x : x + side] = patch * (1 - mask) + foreground * mask
        canvas += rng.normal(0, 0.02, canvas.shape)
        out[i] = (np.clip(canvas, 0, 1) * 255).round().astype(np.uint8)
    return out


def eval_images(split: Split) -> np.ndarray:
    """The same rendering of a split for every build: what quality floors are measured on."""
    return render(split.glyphs, np.random.default_rng(TEST_RENDER_SEED))


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """(N, H, W, 3) uint8 → (N, 3, H, W) float32 in [-1, 1]."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def to_uint8(tensor: torch.Tensor) -> np.ndarray:
    """(N, 3, H, W) in [-1, 1] → (N, H, W, 3) uint8."""
    x = tensor.detach().clamp(-1, 1).add(1).mul(127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


def to_pil(image: np.ndarray) -> Image.Image:
    return Image.fromarray(image, "RGB")
